//! The `rvmm` command: a thin layer that turns arguments into a [`rvmm::VmConfig`] and runs it.

mod signals;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rvmm::device::{DeviceSource, DeviceSpec};
use rvmm::observe::logging::{self, LogLevel};
use rvmm::observe::EventLogTarget;
use rvmm::placement::{GuestNodeArg, PlacementMode};
use rvmm::vm::config::{CpusArg, DEFAULT_CMDLINE};
use rvmm::vm::reboot::OnReboot;
use rvmm::vm::root_ports::RootPortsArg;
use rvmm::{MemoryConfig, SeccompMode, SerialConfig, Vm, VmConfig};

use crate::signals::{Policy, ShutdownSignals};

/// Exit code of an rvmm error outside the guest (bad input, host not ready).
const EXIT_ERROR: u8 = 1;
/// How long the guest gets to power off after SIGTERM or SIGINT pressed its power button,
/// unless `--shutdown-timeout-ms` says otherwise.
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// Longest `--shutdown-timeout-ms`: an hour.
const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 3_600_000;

#[derive(Parser)]
#[command(
    name = "rvmm",
    version,
    about = "A minimal KVM VMM for PCI passthrough and hotplug"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off (exit 0), resets (exit 3) or crashes (4),
    /// or rvmm powers it off on a signal (exit 5).
    ///
    /// SIGTERM presses the ACPI power button, and so does SIGINT unless the console is an
    /// interactive terminal (there Ctrl-C powers off at once); a guest still running
    /// --shutdown-timeout-ms later is powered off, and a second signal powers it off at once.
    Run(Box<RunArgs>),
    /// Control a running VM through its API socket (exit 1 when the call fails).
    Ctl(rvmm::api::ctl::CtlArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux with a PVH entry. Without
    /// --kernel and --config, rvmm starts with no VM and serves --api-socket, through which a
    /// VM is created and booted (Cloud Hypervisor's PUT /api/v1/vm.create and vm.boot).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The VM's configuration as JSON (rvmm's VmConfig: docs/api.md); options given on the
    /// command line override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1 to 254; at most what KVM supports on this host), optionally with the
    /// host CPUs of the vCPU threads: N[,affinity=CPULIST] (e.g. 2,affinity=4-7; every vCPU
    /// thread may run on every CPU of the list, not vCPU i on the i-th CPU).
    #[arg(long, value_name = "N[,affinity=CPULIST]", default_value = "1")]
    cpus: CpusArg,
    /// Guest memory: size=SIZE[,hugepages=on|off][,hugepage_size=2M|1G][,host_node=N];
    /// host_node=N binds it strictly to host NUMA node N (refused when the node cannot hold it).
    #[arg(long, default_value = "size=512M")]
    memory: MemoryConfig,
    /// Host locality: auto binds guest RAM to the host NUMA node of the passthrough devices
    /// given at start (when they share one) and keeps the vCPU threads on its CPUs; off leaves
    /// both to the host. The decision and its reason are logged and shown by info.
    #[arg(long, value_name = "auto|off", default_value = "auto")]
    placement: PlacementMode,
    /// Guest NUMA node (repeatable): guest_node=G,cpus=LIST,size=SIZE[,host_node=N]; the nodes
    /// number 0 up without gaps, every vCPU in one node, sizes adding up to --memory size. The
    /// guest gets SRAT/SLIT; with host_node=N the node's RAM is bound to host node N and its
    /// vCPU threads run on N's CPUs; root ports are spread over the guest nodes (_PXM).
    #[arg(
        long = "numa",
        value_name = "guest_node=G,cpus=LIST,size=SIZE[,host_node=N]"
    )]
    numa: Vec<GuestNodeArg>,
    /// Hotplug-capable PCIe root ports: N (1 to 128)[,mmio64=SIZE]. The 64-bit window (up to
    /// the host's physical address width) is shared out evenly, or each port reserves SIZE (a
    /// power of two, e.g. 8,mmio64=64G) for the 64-bit BARs of the devices it will hold.
    #[arg(long, value_name = "N[,mmio64=SIZE]", default_value_t = RootPortsArg::default())]
    root_ports: RootPortsArg,
    /// Serial console: stdio, file=PATH[,max_size=SIZE] (at most 64M unless max_size says
    /// otherwise), socket=PATH[,buffer=SIZE] (one client at a time, e.g. `rvmm ctl console`;
    /// output while nobody is attached kept in a ring, 64K by default, and replayed on attach),
    /// pty (its path is logged and shown in info) or off. Output never waits for a slow reader:
    /// past a 1 MiB buffer it is dropped and counted.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// Unix socket for the control API: a path rvmm binds, or fd=N, an inherited socket that
    /// is already bound and listening.
    #[arg(long, value_name = "PATH|fd=N")]
    api_socket: Option<PathBuf>,
    /// Passthrough device: path=/sys/bus/pci/devices/BDF[,id=NAME][,group-fd=N] or a bare BDF
    /// (repeatable); group-fd=N: the device's VFIO group, already open as descriptor N.
    #[arg(long = "device")]
    devices: Vec<DeviceSpec>,
    /// SR-IOV VF taken from a PF's pool (PF: BDF or interface name), configured and passed
    /// through: pf=PF[,id=NAME][,mac=MAC][,vlan=N][,trust=on|off][,spoofchk=on|off] (repeatable).
    #[arg(long = "vf", value_parser = parse_vf)]
    vfs: Vec<DeviceSpec>,
    /// Seccomp filters of rvmm's threads: on (a forbidden syscall is reported by name and ends
    /// rvmm), log (allowed and logged by the kernel) or off.
    #[arg(long, default_value = "on")]
    seccomp: SeccompMode,
    /// Write every event of the VM from its start (the JSON lines of `rvmm ctl events`) to
    /// PATH (appended) or to the inherited descriptor N (fd=N, 3 or above).
    #[arg(long, value_name = "PATH|fd=N")]
    event_log: Option<EventLogTarget>,
    /// rvmm's log level: error, warn (the default), info, debug or trace; RUST_LOG still
    /// works: this flag sets the level of every module RUST_LOG does not name.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LogLevel>,
    /// Append rvmm's log to PATH instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// After SIGTERM (or SIGINT) pressed the power button, how long the guest gets to power off
    /// before rvmm powers it off (1 to 3600000).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..=MAX_SHUTDOWN_TIMEOUT_MS)
    )]
    shutdown_timeout_ms: u64,
    /// What a guest reset (reboot) does: restart (the VM reboots in place, in the same
    /// process, with its devices, memory and API) or exit (rvmm ends with exit code 3).
    #[arg(long, value_name = "restart|exit", default_value = "restart")]
    on_reboot: OnReboot,
    /// How hotplug reaches the guest: native (PCIe hotplug through each root port's slot,
    /// served by the guest's pciehp, as on physical servers) or acpi (ACPI hotplug served by
    /// the guest's acpiphp: no 5-second wait on graceful removal; needs ACPI in the guest).
    #[arg(long, value_name = "native|acpi", default_value = "native")]
    hotplug: rvmm::hotplug::HotplugMode,
}

/// `--vf`: the `pf=` form of a device argument (a bare PF first stands for `pf=PF`).
fn parse_vf(arg: &str) -> Result<DeviceSpec, String> {
    let first = arg.split(',').next().unwrap_or_default();
    let arg = if first.contains('=') {
        arg.to_owned()
    } else {
        format!("pf={arg}")
    };
    let req: DeviceSpec = arg.parse().map_err(|e| format!("{e}"))?;
    match req.source {
        DeviceSource::Vf(_) => Ok(req),
        DeviceSource::Host(_) => {
            Err("--vf takes pf=PF[,...]; give a host device with --device".to_owned())
        }
    }
}

impl From<RunArgs> for VmConfig {
    fn from(a: RunArgs) -> Self {
        a.overlay(VmConfig::default(), &|_| true)
    }
}

impl RunArgs {
    /// `base` with the options `given` says were given (by their clap ids) put over it.
    fn overlay(self, base: VmConfig, given: &dyn Fn(&str) -> bool) -> VmConfig {
        let mut c = base;
        if let Some(kernel) = self.kernel {
            c.kernel = kernel;
        }
        if self.initramfs.is_some() {
            c.initramfs = self.initramfs;
        }
        if given("cmdline") {
            c.cmdline = self.cmdline;
        }
        if given("cpus") {
            c.cpus = self.cpus.count;
            c.cpu_affinity = self.cpus.affinity;
        }
        if given("memory") {
            c.memory = self.memory;
        }
        if given("root_ports") {
            c.root_ports = self.root_ports.count;
            c.root_port_mmio64 = self.root_ports.mmio64;
        }
        if given("serial") {
            c.serial = self.serial;
        }
        if self.api_socket.is_some() {
            c.api_socket = self.api_socket;
        }
        if !self.devices.is_empty() || !self.vfs.is_empty() {
            c.devices = self.devices.into_iter().chain(self.vfs).collect();
        }
        if given("seccomp") {
            c.seccomp = self.seccomp;
        }
        if self.event_log.is_some() {
            c.event_log = self.event_log;
        }
        if given("placement") {
            c.placement = self.placement;
        }
        if given("on_reboot") {
            c.on_reboot = self.on_reboot;
        }
        if given("hotplug") {
            c.hotplug = self.hotplug;
        }
        if !self.numa.is_empty() {
            c.numa = self.numa;
        }
        c
    }
}

/// What `rvmm run` was asked for.
enum RunMode {
    /// Build and run this VM.
    Vm(Box<VmConfig>),
    /// No VM: serve the API on this socket and create VMs as it asks.
    Manager(PathBuf, SeccompMode),
}

/// The VM of `rvmm run`'s options: `--config`'s JSON (if given) with the options given on the
/// command line over it; no VM when neither `--kernel` nor `--config` is given.
fn run_mode(args: RunArgs, matches: Option<&clap::ArgMatches>) -> Result<RunMode, String> {
    if args.kernel.is_none() && args.config.is_none() {
        return match args.api_socket {
            Some(socket) => Ok(RunMode::Manager(socket, args.seccomp)),
            None => Err("give --kernel PATH or --config FILE to run a VM, or --api-socket PATH alone to start without a VM and create one through the API".into()),
        };
    }
    let base = match &args.config {
        Some(path) => {
            let json = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
            VmConfig::from_json(&json).map_err(|e| format!("--config {}: {e}", path.display()))?
        }
        None => VmConfig::default(),
    };
    let from_file = args.config.is_some();
    let given = |id: &str| {
        !from_file
            || matches
                .is_some_and(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    };
    Ok(RunMode::Vm(Box::new(args.overlay(base, &given))))
}

/// Prints an error with its chain of causes on one line.
fn report(err: &dyn std::error::Error) {
    eprintln!("rvmm: error: {}", rvmm_devices::error_chain(err));
}

/// `rvmm run`: builds and runs the VM with SIGTERM and SIGINT handled by the signal thread
/// (see [`signals`]); returns the exit code.
fn run(config: &VmConfig, shutdown_timeout: Duration) -> u8 {
    // Before any thread starts (Vm::new starts the console writer), so that every thread
    // inherits the mask and only the signal thread sees these signals.
    if let Err(e) = signals::block() {
        report(&e);
        return EXIT_ERROR;
    }
    let vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let interactive = config.serial == SerialConfig::Stdio && std::io::stdin().is_terminal();
    let policy = Policy::new(interactive, shutdown_timeout);
    let watcher = match ShutdownSignals::start(vm.handle(), policy, config.seccomp) {
        Ok(watcher) => watcher,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let result = vm.run();
    watcher.stop();
    match result {
        Ok(exit) => u8::try_from(exit.exit_code()).unwrap_or(EXIT_ERROR),
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

/// `rvmm run --api-socket` alone: the VMM without a VM until `vmm.shutdown`; exits 0 then, 1
/// when the API cannot be served.
fn serve(socket: &std::path::Path, seccomp: SeccompMode) -> u8 {
    let manager = rvmm::manager::VmManager::new();
    let config = rvmm::api::ServerConfig {
        seccomp,
        ..Default::default()
    };
    match manager.serve(socket, config) {
        Ok(_) => 0,
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let (level, file) = match &cli.command {
        Command::Run(args) => (args.log_level, args.log_file.clone()),
        Command::Ctl(_) => (None, None),
    };
    // Before any thread starts: the log file is opened here.
    if let Err(e) = logging::init(level, file.as_deref()) {
        report(&e);
        return ExitCode::from(EXIT_ERROR);
    }
    match cli.command {
        Command::Run(args) => {
            let shutdown_timeout = Duration::from_millis(args.shutdown_timeout_ms);
            match run_mode(*args, matches.subcommand_matches("run")) {
                Ok(RunMode::Vm(config)) => ExitCode::from(run(&config, shutdown_timeout)),
                Ok(RunMode::Manager(socket, seccomp)) => ExitCode::from(serve(&socket, seccomp)),
                Err(e) => {
                    eprintln!("rvmm: error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Ctl(args) => match rvmm::api::ctl::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report(&e);
                ExitCode::from(EXIT_ERROR)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vf_flag_takes_the_pf_form() {
        let req = parse_vf("pf=eth0,id=net0,vlan=5").expect("valid");

        assert!(matches!(req.source, DeviceSource::Vf(ref vf) if vf.policy.vlan == Some(5)));
    }

    #[test]
    fn vf_flag_takes_a_bare_pf_first() {
        assert_eq!(parse_vf("eth0,vlan=5"), parse_vf("pf=eth0,vlan=5"));
        assert_eq!(parse_vf("0000:3b:00.0"), parse_vf("pf=0000:3b:00.0"));
    }

    #[test]
    fn vf_flag_refuses_a_host_device() {
        let err = parse_vf("path=0000:01:00.0").expect_err("not a VF");

        assert!(err.contains("--device"), "{err}");
    }

    #[test]
    fn vf_flags_join_the_boot_devices_after_device_flags() {
        let cli = Cli::try_parse_from([
            "rvmm", "run", "--kernel", "/k", "--vf", "pf=eth0", "--device", "01:00.0",
        ])
        .expect("valid command line");
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };

        let config = VmConfig::from(*args);

        assert!(matches!(config.devices[0].source, DeviceSource::Host(_)));
        assert!(matches!(config.devices[1].source, DeviceSource::Vf(_)));
    }

    #[test]
    fn out_of_range_counts_are_command_line_errors_with_exit_code_2() {
        for args in [
            ["--cpus", "0"],
            ["--cpus", "255"],
            ["--root-ports", "0"],
            ["--root-ports", "200"],
        ] {
            let err = Cli::try_parse_from(["rvmm", "run", "--kernel", "/k", args[0], args[1]])
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));

            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(args[1]), "{args:?}: {err}");
        }
    }

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(
            ["rvmm", "run", "--kernel", "/k"]
                .into_iter()
                .chain(extra.iter().copied()),
        )?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            Command::Ctl(_) => panic!("not run"),
        }
    }

    #[test]
    fn hotplug_defaults_to_native_and_takes_acpi() {
        use rvmm::hotplug::HotplugMode;
        let default = VmConfig::from(run_args(&[]).expect("valid"));
        let acpi = VmConfig::from(run_args(&["--hotplug", "acpi"]).expect("valid"));
        assert_eq!(default.hotplug, HotplugMode::Native);
        assert_eq!(acpi.hotplug, HotplugMode::Acpi);
        let err = run_args(&["--hotplug", "shpc"]).err().expect("refused");
        assert!(err.to_string().contains("native"), "{err}");
    }

    #[test]
    fn cpus_keep_the_bare_count_and_take_an_affinity() {
        let plain = VmConfig::from(run_args(&["--cpus", "2"]).expect("valid"));
        let pinned = VmConfig::from(run_args(&["--cpus", "2,affinity=0-1"]).expect("valid"));

        assert_eq!((plain.cpus, plain.cpu_affinity), (2, None));
        assert_eq!(pinned.cpus, 2);
        assert_eq!(
            pinned.cpu_affinity.map(|c| c.to_string()).as_deref(),
            Some("0-1")
        );
    }

    #[test]
    fn bad_affinity_and_placement_are_command_line_errors() {
        for args in [["--cpus", "2,affinity=x"], ["--placement", "numa"]] {
            let err = run_args(&args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));

            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn placement_defaults_to_auto() {
        let config = VmConfig::from(run_args(&[]).expect("valid"));

        assert_eq!(config.placement, PlacementMode::Auto);
    }

    #[test]
    fn shutdown_timeout_defaults_to_30_seconds() {
        assert_eq!(run_args(&[]).expect("valid").shutdown_timeout_ms, 30_000);
    }

    #[test]
    fn shutdown_timeout_is_taken_in_milliseconds() {
        let args = run_args(&["--shutdown-timeout-ms", "3000"]).expect("valid");

        assert_eq!(args.shutdown_timeout_ms, 3000);
    }

    #[test]
    fn shutdown_timeout_out_of_range_is_a_usage_error() {
        for value in ["0", "3600001", "-1", "soon"] {
            let err = run_args(&["--shutdown-timeout-ms", value])
                .err()
                .unwrap_or_else(|| panic!("{value} accepted"));

            assert_eq!(err.exit_code(), 2, "{value}");
        }
    }

    /// `rvmm run` with `args`, as `main` reads it.
    fn mode(args: &[&str]) -> Result<RunMode, String> {
        let matches = <Cli as clap::CommandFactory>::command()
            .try_get_matches_from(["rvmm", "run"].into_iter().chain(args.iter().copied()))
            .expect("valid command line");
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).expect("parsed");
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        run_mode(*run, matches.subcommand_matches("run"))
    }

    #[test]
    fn an_api_socket_alone_starts_without_a_vm() {
        assert!(matches!(
            mode(&["--api-socket", "/tmp/x.sock"]),
            Ok(RunMode::Manager(..))
        ));
        assert!(mode(&[]).is_err());
    }

    #[test]
    fn command_line_options_override_the_config_file() {
        let file = std::env::temp_dir().join(format!("rvmm-config-{}.json", std::process::id()));
        std::fs::write(
            &file,
            r#"{"kernel": "/k", "cpus": 2, "memory": "size=1G", "cmdline": "from-file"}"#,
        )
        .expect("write");

        let result = mode(&["--config", file.to_str().expect("utf-8"), "--cpus", "4"]);
        std::fs::remove_file(&file).ok();

        let Ok(RunMode::Vm(config)) = result else {
            panic!("not a VM");
        };
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory.size, 1 << 30);
        assert_eq!(config.cmdline, "from-file");
    }

    #[test]
    fn counts_at_the_limits_are_accepted() {
        let cli = Cli::try_parse_from([
            "rvmm",
            "run",
            "--kernel",
            "/k",
            "--cpus",
            "254",
            "--root-ports",
            "128",
        ]);

        assert!(cli.is_ok());
    }
}
