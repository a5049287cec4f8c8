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
use rvmm::placement::PlacementMode;
use rvmm::vm::config::{CpusArg, DEFAULT_CMDLINE, DEFAULT_ROOT_PORTS, MAX_ROOT_PORTS};
use rvmm::vm::reboot::OnReboot;
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
    /// Kernel: a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux with a PVH entry.
    #[arg(long)]
    kernel: PathBuf,
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
    /// Number of hotplug-capable PCIe root ports (1 to 128).
    #[arg(long, default_value_t = DEFAULT_ROOT_PORTS, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_ROOT_PORTS)))]
    root_ports: u8,
    /// Serial console: stdio, file=PATH[,max_size=SIZE] (at most 64M unless max_size says
    /// otherwise), socket=PATH[,buffer=SIZE] (one client at a time, e.g. `rvmm ctl console`;
    /// output while nobody is attached kept in a ring, 64K by default, and replayed on attach),
    /// pty (its path is logged and shown in info) or off. Output never waits for a slow reader:
    /// past a 1 MiB buffer it is dropped and counted.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// Unix socket for the control API.
    #[arg(long)]
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
        VmConfig {
            kernel: a.kernel,
            initramfs: a.initramfs,
            cmdline: a.cmdline,
            cpus: a.cpus.count,
            memory: a.memory,
            root_ports: a.root_ports,
            serial: a.serial,
            api_socket: a.api_socket,
            devices: a.devices.into_iter().chain(a.vfs).collect(),
            seccomp: a.seccomp,
            event_log: a.event_log,
            placement: a.placement,
            cpu_affinity: a.cpus.affinity,
            on_reboot: a.on_reboot,
            hotplug: a.hotplug,
        }
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            let config = VmConfig::from(*args);
            ExitCode::from(run(&config, shutdown_timeout))
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
