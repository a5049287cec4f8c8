//! The description of a VM: everything `rvmm run` can be told, validated before anything is built.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::DeviceSpec;
use crate::memory::MemoryConfig;
use crate::observe::EventLogTarget;
use crate::placement::{CpuList, GuestNodeArg, PlacementMode};
use crate::seccomp::SeccompMode;
use crate::vm::reboot::OnReboot;

/// Default kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1";
/// Root ports when `--root-ports` is not given.
pub const DEFAULT_ROOT_PORTS: u8 = 8;
/// Most root ports a VM can have (each owns one bus number and a slice of the MMIO windows).
pub const MAX_ROOT_PORTS: u8 = 128;
/// Guest RAM when none is given: 512 MiB.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Most vCPUs rvmm configures (APIC ids fit in 8 bits; x2APIC is not used).
pub const MAX_CPUS: u8 = 254;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialConfig {
    /// rvmm's stdin/stdout.
    #[default]
    Stdio,
    /// Appended to a file, at most `max_size` bytes (then one line says the rest was dropped);
    /// no input.
    File {
        /// The file.
        path: PathBuf,
        /// Most bytes written to it ([`crate::vm::console_out::DEFAULT_FILE_LIMIT`] unless
        /// `max_size=` says otherwise).
        max_size: u64,
    },
    /// A unix socket one client at a time attaches to; output while nobody is attached is kept
    /// in a ring of `buffer` bytes (the oldest dropped) and replayed on attach.
    Socket {
        /// The socket.
        path: PathBuf,
        /// Output kept while detached ([`crate::vm::console_socket::DEFAULT_RING_SIZE`] unless
        /// `buffer=` says otherwise).
        buffer: u64,
    },
    /// A pseudo-terminal; its path is logged and shown in `info`.
    Pty,
    /// No serial port at all.
    Off,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "off" => Ok(SerialConfig::Off),
            "pty" => Ok(SerialConfig::Pty),
            _ if s.starts_with("socket=") => parse_socket(s),
            _ => {
                let err = || ConfigError::Serial(s.to_owned());
                let spec = s.strip_prefix("file=").ok_or_else(err)?;
                // `max_size=` comes last, so that a path may hold commas.
                let (path, max_size) = match spec.rsplit_once(",max_size=") {
                    Some((path, size)) => (
                        path,
                        crate::memory::parse_size(size)
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(err)?,
                    ),
                    None => (spec, crate::vm::console_out::DEFAULT_FILE_LIMIT),
                };
                if path.is_empty() {
                    return Err(err());
                }
                Ok(SerialConfig::File {
                    path: PathBuf::from(path),
                    max_size,
                })
            }
        }
    }
}

impl std::fmt::Display for SerialConfig {
    /// The command-line form, which [`SerialConfig::from_str`](std::str::FromStr) reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialConfig::Stdio => f.write_str("stdio"),
            SerialConfig::Off => f.write_str("off"),
            SerialConfig::Pty => f.write_str("pty"),
            SerialConfig::File { path, max_size } => {
                write!(f, "file={},max_size={max_size}", path.display())
            }
            SerialConfig::Socket { path, buffer } => {
                write!(f, "socket={},buffer={buffer}", path.display())
            }
        }
    }
}

rvmm_pci::serde_as_string!(SerialConfig);
rvmm_pci::serde_as_string!(GuestNodeArg);

/// `socket=PATH[,buffer=SIZE]`: `buffer=` comes last, so that a path may hold commas.
fn parse_socket(s: &str) -> Result<SerialConfig, ConfigError> {
    use crate::vm::console_socket::{DEFAULT_RING_SIZE, MAX_RING_SIZE};
    let err = || ConfigError::Serial(s.to_owned());
    let spec = s.strip_prefix("socket=").ok_or_else(err)?;
    let (path, buffer) = match spec.rsplit_once(",buffer=") {
        Some((path, size)) => {
            let size = crate::memory::parse_size(size).map_err(|_| err())?;
            if size == 0 || size > MAX_RING_SIZE {
                return Err(ConfigError::SerialBuffer {
                    given: size,
                    max: MAX_RING_SIZE,
                });
            }
            (path, size)
        }
        None => (spec, DEFAULT_RING_SIZE),
    };
    if path.is_empty() {
        return Err(err());
    }
    Ok(SerialConfig::Socket {
        path: PathBuf::from(path),
        buffer,
    })
}

/// Everything needed to build and boot a VM: what `rvmm run` builds from its options, what
/// `rvmm run --config FILE` reads as JSON, what an embedding program fills in (start from
/// [`VmConfig::default`]: new fields will come, with defaults).
///
/// As JSON, every field is optional (its default when absent) and unknown fields are refused;
/// values with a command-line form take it as a string (`"memory": "size=1G,hugepages=on"`,
/// `"serial": "file=/tmp/console.log"`, `"cpu_affinity": "0-3"`), devices take the body of
/// `PUT /v1/vm/add-device` (`{"path": "0000:01:00.0", "id": "nvme0"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct VmConfig {
    /// Kernel image: a bzImage or an ELF vmlinux with a PVH entry (required: the default, an
    /// empty path, is refused by [`VmConfig::validate`]).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// Number of hotplug-capable PCIe root ports.
    pub root_ports: u8,
    /// The 64-bit window every root port reserves (`--root-ports N,mmio64=SIZE`), or `None`
    /// to share the 64-bit window out evenly among the ports.
    pub root_port_mmio64: Option<u64>,
    /// Serial console.
    pub serial: SerialConfig,
    /// Unix socket of the control API.
    pub api_socket: Option<PathBuf>,
    /// Passthrough devices attached at boot, each behind its own root port.
    pub devices: Vec<DeviceSpec>,
    /// Seccomp filters of the VM's threads (on by default).
    pub seccomp: SeccompMode,
    /// Where every event of the VM is written from its start (`--event-log`), if anywhere.
    pub event_log: Option<EventLogTarget>,
    /// Automatic placement by the cold-plugged devices' host node (`--placement`, on by
    /// default; [`crate::placement`]).
    pub placement: PlacementMode,
    /// Host CPUs every vCPU thread may run on (`--cpus N,affinity=CPULIST`); all vCPU threads
    /// share the list.
    pub cpu_affinity: Option<CpuList>,
    /// Guest NUMA nodes (`--numa`, repeatable); empty: the guest sees one node.
    pub numa: Vec<GuestNodeArg>,
    /// What a guest reset does (`--on-reboot`): restart in place or end the VM (the default).
    pub on_reboot: OnReboot,
    /// How hotplug reaches the guest (`--hotplug`): native PCIe hotplug (the default) or ACPI.
    pub hotplug: crate::hotplug::HotplugMode,
}

impl Default for VmConfig {
    /// No kernel (it must be set), [`DEFAULT_CMDLINE`], one vCPU, 512 MiB of RAM,
    /// [`DEFAULT_ROOT_PORTS`], the console on stdio, no API socket, no devices, seccomp on, no
    /// event log, automatic placement, reboot in place.
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            cpus: 1,
            memory: MemoryConfig {
                size: DEFAULT_MEMORY_SIZE,
                hugepages: false,
                hugepage_size: Default::default(),
                host_node: None,
            },
            root_ports: DEFAULT_ROOT_PORTS,
            root_port_mmio64: None,
            serial: SerialConfig::default(),
            api_socket: None,
            devices: Vec::new(),
            seccomp: SeccompMode::default(),
            event_log: None,
            placement: PlacementMode::default(),
            cpu_affinity: None,
            numa: Vec::new(),
            on_reboot: OnReboot::default(),
            hotplug: Default::default(),
        }
    }
}

impl VmConfig {
    /// Reads a configuration from JSON (`rvmm run --config FILE`); fields left out take their
    /// defaults.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))
    }
}

/// `--cpus N[,affinity=CPULIST]`: the vCPU count and, optionally, the host CPUs of every vCPU
/// thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpusArg {
    /// Number of vCPUs, 1 to [`MAX_CPUS`].
    pub count: u8,
    /// `affinity=`: host CPUs shared by every vCPU thread.
    pub affinity: Option<CpuList>,
}

impl std::str::FromStr for CpusArg {
    type Err = String;

    /// Parses `N` or `N,affinity=CPULIST`; the count is checked against 1..=[`MAX_CPUS`].
    fn from_str(s: &str) -> Result<Self, String> {
        let (count, rest) = match s.split_once(',') {
            Some((count, rest)) => (count, Some(rest)),
            None => (s, None),
        };
        let count = match count.parse::<u64>() {
            Ok(n) if (1..=u64::from(MAX_CPUS)).contains(&n) => n as u8,
            Ok(n) => return Err(format!("{n} is not in 1..={MAX_CPUS}")),
            Err(_) => {
                return Err(format!(
                    "\"{count}\" is not a number of vCPUs; give N[,affinity=CPULIST], e.g. 2 or \
                     2,affinity=0-3"
                ))
            }
        };
        let affinity = match rest {
            None => None,
            Some(option) => {
                let list = option.strip_prefix("affinity=").ok_or_else(|| {
                    format!("unknown option \"{option}\"; the only option is affinity=CPULIST")
                })?;
                let list: CpuList = list.parse().map_err(|e| format!("{e}"))?;
                if list.is_empty() {
                    return Err("affinity= needs at least one host CPU, e.g. affinity=0-3".into());
                }
                Some(list)
            }
        };
        Ok(CpusArg { count, affinity })
    }
}

/// Errors in a VM description.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--cpus` out of range.
    #[error("--cpus {given} is not supported: give 1 to {max}")]
    Cpus {
        /// The value given.
        given: u64,
        /// The largest supported.
        max: u8,
    },
    /// `--root-ports` out of range.
    #[error("--root-ports {given} is not supported: give 1 to {max}")]
    RootPorts {
        /// The value given.
        given: u64,
        /// The largest supported.
        max: u8,
    },
    /// `--serial` not understood.
    #[error("--serial {0:?} is not understood: use stdio, file=PATH[,max_size=SIZE], socket=PATH[,buffer=SIZE], pty or off")]
    Serial(String),
    /// `--serial socket=PATH,buffer=SIZE` out of range.
    #[error("--serial socket buffer={given} bytes is not supported: give 1 byte to {max} bytes (e.g. 64K)")]
    SerialBuffer {
        /// The size given, in bytes.
        given: u64,
        /// The largest supported.
        max: u64,
    },
    /// More boot devices than root ports.
    #[error("{devices} devices given (--device and --vf) but only {ports} root ports; raise --root-ports")]
    TooManyDevices {
        /// Devices given.
        devices: usize,
        /// Root ports.
        ports: u8,
    },
    /// No kernel given.
    #[error("no kernel given: set --kernel PATH (or \"kernel\" in the JSON configuration)")]
    NoKernel,
    /// A JSON configuration that does not parse.
    #[error("invalid VM configuration: {0}")]
    Json(String),
    /// The kernel file does not exist.
    #[error("kernel {0} not found")]
    KernelNotFound(PathBuf),
    /// The initramfs file does not exist.
    #[error("initramfs {0} not found")]
    InitramfsNotFound(PathBuf),
}

impl VmConfig {
    /// Checks ranges and that the files exist; `max_cpus` is what KVM supports on this host.
    pub fn validate(&self, max_cpus: u8) -> Result<(), ConfigError> {
        let max = max_cpus.min(MAX_CPUS);
        if self.cpus == 0 || self.cpus > max {
            return Err(ConfigError::Cpus {
                given: u64::from(self.cpus),
                max,
            });
        }
        if self.root_ports == 0 || self.root_ports > MAX_ROOT_PORTS {
            return Err(ConfigError::RootPorts {
                given: u64::from(self.root_ports),
                max: MAX_ROOT_PORTS,
            });
        }
        if self.devices.len() > usize::from(self.root_ports) {
            return Err(ConfigError::TooManyDevices {
                devices: self.devices.len(),
                ports: self.root_ports,
            });
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelNotFound(self.kernel.clone()));
        }
        if let Some(p) = &self.initramfs {
            if !p.is_file() {
                return Err(ConfigError::InitramfsNotFound(p.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_alone_is_a_count() {
        assert_eq!(
            "2".parse::<CpusArg>().unwrap(),
            CpusArg {
                count: 2,
                affinity: None
            }
        );
    }

    #[test]
    fn cpus_with_affinity_takes_a_cpu_list() {
        let arg: CpusArg = "2,affinity=0-1,4".parse().unwrap();

        assert_eq!(arg.count, 2);
        assert_eq!(arg.affinity, Some(CpuList::from_ids([0, 1, 4])));
    }

    #[test]
    fn cpus_out_of_range_are_refused() {
        assert_eq!("0".parse::<CpusArg>().unwrap_err(), "0 is not in 1..=254");
        assert_eq!(
            "255".parse::<CpusArg>().unwrap_err(),
            "255 is not in 1..=254"
        );
    }

    #[test]
    fn cpus_bad_options_are_refused() {
        assert!("2,pin=0"
            .parse::<CpusArg>()
            .unwrap_err()
            .contains("affinity=CPULIST"));
        assert!("2,affinity="
            .parse::<CpusArg>()
            .unwrap_err()
            .contains("at least one"));
        assert!("2,affinity=3-1"
            .parse::<CpusArg>()
            .unwrap_err()
            .contains("backwards"));
    }

    fn config() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/proc/self/exe"),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory: "size=128M".parse().unwrap(),
            placement: Default::default(),
            cpu_affinity: None,
            numa: Vec::new(),
            root_ports: DEFAULT_ROOT_PORTS,
            root_port_mmio64: None,
            serial: SerialConfig::Stdio,
            api_socket: None,
            devices: Vec::new(),
            seccomp: SeccompMode::On,
            event_log: None,
            on_reboot: Default::default(),
            hotplug: Default::default(),
        }
    }

    #[test]
    fn serial_values_parse() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File {
                path: PathBuf::from("/tmp/x"),
                max_size: crate::vm::console_out::DEFAULT_FILE_LIMIT,
            })
        );
        assert_eq!(
            "file=/tmp/a,b,max_size=1M".parse(),
            Ok(SerialConfig::File {
                path: PathBuf::from("/tmp/a,b"),
                max_size: 1 << 20,
            })
        );
        assert!("file=/tmp/x,max_size=0".parse::<SerialConfig>().is_err());
        assert!("file=/tmp/x,max_size=lots".parse::<SerialConfig>().is_err());
        assert_eq!("file=/tmp/x".parse::<SerialConfig>().map(|_| ()), Ok(()));
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn socket_and_pty_values_parse() {
        assert_eq!("pty".parse(), Ok(SerialConfig::Pty));
        assert_eq!(
            "socket=/run/vm.sock".parse(),
            Ok(SerialConfig::Socket {
                path: PathBuf::from("/run/vm.sock"),
                buffer: crate::vm::console_socket::DEFAULT_RING_SIZE,
            })
        );
        assert_eq!(
            "socket=/tmp/a,b,buffer=1M".parse(),
            Ok(SerialConfig::Socket {
                path: PathBuf::from("/tmp/a,b"),
                buffer: 1 << 20,
            })
        );
        assert!("socket=".parse::<SerialConfig>().is_err());
        assert!("socket=/tmp/x,buffer=lots".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn socket_buffer_out_of_range_is_refused_with_the_limit() {
        let err = "socket=/tmp/x,buffer=0"
            .parse::<SerialConfig>()
            .unwrap_err();
        assert!(matches!(err, ConfigError::SerialBuffer { given: 0, .. }));

        let err = "socket=/tmp/x,buffer=1G"
            .parse::<SerialConfig>()
            .unwrap_err();
        assert!(err.to_string().contains("64K"), "{err}");
    }

    #[test]
    fn cpus_beyond_host_limit_are_refused() {
        let mut c = config();
        c.cpus = 9;
        assert_eq!(c.validate(8), Err(ConfigError::Cpus { given: 9, max: 8 }));
        c.cpus = 0;
        assert!(c.validate(8).is_err());
        c.cpus = 8;
        assert!(c.validate(8).is_ok());
    }

    #[test]
    fn root_ports_out_of_range_are_refused() {
        let mut c = config();
        c.root_ports = 0;
        assert!(c.validate(8).is_err());
        c.root_ports = MAX_ROOT_PORTS;
        assert!(c.validate(8).is_ok());
    }

    #[test]
    fn json_takes_the_command_line_forms_and_defaults_the_rest() {
        let c = VmConfig::from_json(
            r#"{"kernel": "/k", "memory": "size=1G,hugepages=on", "serial": "file=/tmp/c",
                "cpu_affinity": "0-1", "devices": [{"path": "0000:01:00.0", "id": "nvme0"}]}"#,
        )
        .expect("valid");

        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.memory.size, 1 << 30);
        assert!(c.memory.hugepages);
        assert!(matches!(c.serial, SerialConfig::File { .. }));
        assert_eq!(c.cpu_affinity, Some(CpuList::from_ids([0, 1])));
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn json_round_trips() {
        let mut c = config();
        c.serial = "socket=/tmp/s,buffer=1M".parse().unwrap();
        c.event_log = Some("fd=3".parse().unwrap());

        let json = serde_json::to_string(&c).unwrap();

        assert_eq!(VmConfig::from_json(&json), Ok(c));
    }

    #[test]
    fn json_refuses_unknown_fields_by_name() {
        let err = VmConfig::from_json(r#"{"kernel": "/k", "disks": []}"#).unwrap_err();

        assert!(err.to_string().contains("disks"), "{err}");
    }

    #[test]
    fn an_empty_kernel_is_refused_with_the_fix() {
        let err = VmConfig::default().validate(8).unwrap_err();

        assert_eq!(err, ConfigError::NoKernel);
    }

    #[test]
    fn missing_kernel_is_refused() {
        let mut c = config();
        c.kernel = PathBuf::from("/nonexistent/vmlinuz");
        assert!(matches!(c.validate(8), Err(ConfigError::KernelNotFound(_))));
    }
}
