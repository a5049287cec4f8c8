//! The `rvmm` command: a thin layer that turns arguments into a [`rvmm::VmConfig`] and runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rvmm::device::{DeviceSource, DeviceSpec};
use rvmm::vm::config::{DEFAULT_CMDLINE, DEFAULT_ROOT_PORTS, MAX_CPUS, MAX_ROOT_PORTS};
use rvmm::{MemoryConfig, SeccompMode, SerialConfig, Vm, VmConfig};

/// Exit code of an rvmm error outside the guest (bad input, host not ready).
const EXIT_ERROR: u8 = 1;

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
    /// Boot a VM and run it until the guest powers off (exit 0), resets (exit 3) or crashes (4).
    Run(RunArgs),
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
    /// Number of vCPUs (1 to 254; at most what KVM supports on this host).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    cpus: u8,
    /// Guest memory: size=SIZE[,hugepages=on|off][,hugepage_size=2M|1G].
    #[arg(long, default_value = "size=512M")]
    memory: MemoryConfig,
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
            cpus: a.cpus,
            memory: a.memory,
            root_ports: a.root_ports,
            serial: a.serial,
            api_socket: a.api_socket,
            devices: a.devices.into_iter().chain(a.vfs).collect(),
            seccomp: a.seccomp,
        }
    }
}

/// Prints an error with its chain of causes on one line.
fn report(err: &dyn std::error::Error) {
    eprintln!("rvmm: error: {}", rvmm_devices::error_chain(err));
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = VmConfig::from(args);
            match Vm::new(&config).and_then(Vm::run) {
                Ok(exit) => ExitCode::from(exit.exit_code() as u8),
                Err(e) => {
                    report(&e);
                    ExitCode::from(EXIT_ERROR)
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

        let config = VmConfig::from(args);

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
