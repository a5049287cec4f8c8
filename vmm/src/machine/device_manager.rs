//! Creates the platform devices, registers them on the buses and owns them.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvmm_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_COUNT};
use rvmm_devices::cmos::{Cmos, CMOS_PORT_COUNT};
use rvmm_devices::ged::{Ged, GED_PORT_COUNT};
use rvmm_devices::i8042::{I8042, I8042_PORT_COUNT};
use rvmm_devices::pci_hotplug::{PciHotplug, PCI_HOTPLUG_PORT_COUNT};
use rvmm_devices::serial::{Serial, SERIAL_PORT_COUNT};
use rvmm_devices::sync::MutexExt;
use rvmm_devices::{Bus, BusError, Interrupt, SharedBusDevice, VmEvents};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::api::types::{ConsoleInfo, ConsoleKind};
use crate::device::passthrough::{Passthrough, PassthroughError};
use crate::device::{DeviceSpec, InheritedFds};
use crate::hotplug::HotplugMode;
use crate::kvm::guest_mmio::KvmGuestMmio;
use crate::kvm::irq_routing::GsiRouter;
use crate::machine::acpi;
use crate::machine::layout;
use crate::machine::pci::{self, PciRoot};
use crate::placement::GuestTopology;
use crate::seccomp::{SeccompMode, ThreadFilter, ThreadKind};
use crate::vm::config::{SerialConfig, VmConfig};
use crate::vm::console::ConsoleHost;
use crate::vm::console_out::{ConsoleOutput, ConsoleWriter};
use crate::vm::console_pty::Pty;
use crate::vm::console_socket::{ConsoleListener, SocketConsoleError, SocketShared, SocketSink};
use crate::vm::exit::ExitSignal;

/// Errors of device creation.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A device's range could not be registered.
    #[error("cannot register the {device} at {base:#x}")]
    Register {
        /// The device.
        device: &'static str,
        /// Its base address or port.
        base: u64,
        /// The bus error.
        #[source]
        source: BusError,
    },
    /// An interrupt line could not be wired.
    #[error("cannot wire the interrupt of the {device} (GSI {gsi})")]
    Irq {
        /// The device.
        device: &'static str,
        /// Its GSI.
        gsi: u32,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The ACPI tables could not be created.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The PCIe topology could not be built.
    #[error(transparent)]
    Pci(#[from] pci::PciError),
    /// A passthrough device could not be attached.
    #[error("cannot attach device {spec}")]
    Passthrough {
        /// The device as given.
        spec: String,
        /// Why (boxed: passthrough errors carry the whole VFIO cause).
        #[source]
        source: Box<PassthroughError>,
    },
    /// A device added before boot after the VM was booted.
    #[error("the VM is booted: add devices to it with a hot-add")]
    Booted,
    /// The ACPI PCI hotplug registers could not get their wake-up line.
    #[error("cannot create the wake-up line of the ACPI PCI hotplug registers")]
    PciHotplugWake(#[source] std::io::Error),
    /// The serial output could not be opened.
    #[error("cannot open the serial console output")]
    SerialOutput(#[source] std::io::Error),
    /// The console socket could not be set up.
    #[error("cannot set up the serial console socket")]
    ConsoleSocket(#[source] SocketConsoleError),
    /// No pseudo-terminal could be opened for the console.
    #[error("cannot open a pseudo-terminal for the serial console (is /dev/pts mounted?)")]
    ConsolePty(#[source] std::io::Error),
}

/// Result type of device creation.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// Owns the VM's devices; the buses hold weak references to them.
pub struct DeviceManager {
    serial: Option<Arc<Mutex<Serial>>>,
    ged: Option<Arc<Mutex<Ged>>>,
    /// The ACPI PCI hotplug registers, with `--hotplug acpi`.
    pci_hotplug: Option<Arc<Mutex<PciHotplug>>>,
    console_writer: Option<ConsoleWriter>,
    console_host: Option<ConsoleHost>,
    console_info: ConsoleInfo,
    owned: Vec<SharedBusDevice>,
    _irqfds: Vec<EventFd>,
    rsdp: u64,
    /// What the ACPI tables describe, to write them again at a reboot.
    acpi: AcpiInputs,
    i8042: Option<Arc<Mutex<I8042>>>,
    pci: Option<PciRoot>,
    passthrough: Option<Passthrough>,
}

/// What the ACPI tables are built from.
#[derive(Default)]
struct AcpiInputs {
    cpus: u8,
    mmio64: (u64, u64),
    root_ports: Vec<(u8, u8, u16, u32)>,
    numa: Option<GuestTopology>,
    numa_bridges: Vec<rvmm_acpi::NumaBridge>,
    acpi_hotplug: bool,
}

/// The parts of the VM the devices are built on.
pub struct Machine<'a> {
    /// The KVM VM.
    pub vm_fd: &'a Arc<VmFd>,
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
    /// Port I/O bus.
    pub pio: &'a Arc<Bus>,
    /// MMIO bus.
    pub mmio: &'a Arc<Bus>,
    /// Where reset and power-off requests go.
    pub exit: Arc<ExitSignal>,
    /// The host's physical address width.
    pub phys_bits: u8,
    /// KVM's number of memory slots.
    pub max_memslots: u32,
    /// The guest NUMA topology (`--numa`), if any.
    pub guest_topology: Option<&'a GuestTopology>,
}

impl DeviceManager {
    /// Creates and registers the platform devices of `config` on `machine`.
    pub fn new(machine: Machine, config: &VmConfig) -> Result<Self> {
        let Machine {
            vm_fd,
            memory,
            pio,
            mmio,
            exit,
            phys_bits,
            max_memslots,
            guest_topology,
        } = machine;
        let mut dm = Self {
            serial: None,
            ged: None,
            pci_hotplug: None,
            console_writer: None,
            console_host: None,
            console_info: ConsoleInfo {
                kind: ConsoleKind::Off,
                path: None,
            },
            owned: Vec::new(),
            _irqfds: Vec::new(),
            rsdp: 0,
            acpi: AcpiInputs::default(),
            i8042: None,
            pci: None,
            passthrough: None,
        };
        dm.add_platform_devices(vm_fd, pio, exit, config)?;
        let ram_end = memory.last_addr().raw_value() + 1;
        let mmio64 = layout::mmio64_window(ram_end, phys_bits);
        let root_buses = guest_topology.map_or(1, |t| t.nodes.len());
        // Ports of boot devices get 64-bit windows that hold their BARs (unless every port's
        // size was given).
        let mmio64_minimums = match config.root_port_mmio64 {
            None => crate::device::bar_windows::mmio64_minimums(
                &config.devices,
                std::path::Path::new(rvmm_pci::SYSFS_PCI_DEVICES),
            ),
            Some(_) => Vec::new(),
        };
        let pci = PciRoot::new(
            vm_fd,
            pio,
            mmio,
            config.root_ports,
            (mmio64, config.root_port_mmio64),
            mmio64_minimums,
            root_buses,
        )?;
        dm.acpi = AcpiInputs {
            cpus: config.cpus,
            mmio64,
            root_ports: pci.acpi_ports(),
            numa: guest_topology.cloned(),
            numa_bridges: pci.numa_bridges(),
            acpi_hotplug: config.hotplug == HotplugMode::Acpi,
        };
        if config.hotplug == HotplugMode::Acpi {
            dm.add_pci_hotplug(pio, &pci)?;
        }
        dm.rsdp = dm.write_acpi_tables(memory)?;
        let router = Arc::new(GsiRouter::new(vm_fd.clone()));
        let guest_mmio = Arc::new(KvmGuestMmio::new(
            vm_fd.clone(),
            pio.clone(),
            mmio.clone(),
            memory.num_regions() as u32,
            max_memslots,
        ));
        let mut passthrough = Passthrough::new(vm_fd.clone(), memory.clone(), router, guest_mmio);
        if let Some(topology) = guest_topology {
            let nodes = topology.nodes.len();
            passthrough.set_port_host_nodes(
                (0..usize::from(config.root_ports))
                    .map(|p| topology.host_node(acpi::port_guest_node(p, nodes)))
                    .collect(),
            );
        }
        attach_boot_devices(&mut passthrough, &pci, &config.devices)?;
        if let Some(registers) = &dm.pci_hotplug {
            let mut registers = registers.locked();
            for d in passthrough.devices() {
                registers.set_present_at_boot(d.port);
            }
        }
        dm.pci = Some(pci);
        dm.passthrough = Some(passthrough);
        Ok(dm)
    }

    /// The serial port (unless `--serial off`), the i8042 reset line, the ACPI PM registers, the
    /// GED's event register (the power button) and the CMOS RTC, on port I/O.
    fn add_platform_devices(
        &mut self,
        vm_fd: &VmFd,
        pio: &Arc<Bus>,
        exit: Arc<ExitSignal>,
        config: &VmConfig,
    ) -> Result<()> {
        if let Some((writer, out, host, info)) = serial_output(&config.serial, config.seccomp)? {
            self.console_writer = Some(writer);
            self.console_host = Some(host);
            self.console_info = info;
            let irq = self.irqfd(vm_fd, "serial port", layout::SERIAL_IRQ)?;
            let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(out))));
            let shared: SharedBusDevice = serial.clone();
            self.register(
                pio,
                "serial port",
                &shared,
                layout::SERIAL_PORT,
                SERIAL_PORT_COUNT,
            )?;
            self.serial = Some(serial);
        }
        let events: Arc<dyn VmEvents> = exit;
        let i8042_dev = Arc::new(Mutex::new(I8042::new(events.clone())));
        self.i8042 = Some(i8042_dev.clone());
        let i8042: SharedBusDevice = i8042_dev;
        self.register(
            pio,
            "i8042",
            &i8042,
            layout::I8042_DATA_PORT,
            I8042_PORT_COUNT,
        )?;
        let pm: SharedBusDevice = Arc::new(Mutex::new(AcpiPm::new(events)));
        self.register(
            pio,
            "ACPI PM registers",
            &pm,
            layout::ACPI_PM_PORT,
            ACPI_PM_PORT_COUNT,
        )?;
        let ged_irq = self.irqfd(vm_fd, "ACPI GED", layout::GED_IRQ)?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        let shared: SharedBusDevice = ged.clone();
        self.register(pio, "ACPI GED", &shared, layout::GED_PORT, GED_PORT_COUNT)?;
        self.ged = Some(ged);
        let cmos: SharedBusDevice = Arc::new(Mutex::new(Cmos::new()));
        self.register(pio, "CMOS RTC", &cmos, layout::CMOS_PORT, CMOS_PORT_COUNT)
    }

    /// The ACPI PCI hotplug registers, one slot per root port; the guest's `_EJ0` and `_OST`
    /// wake the VM controller through the slot notifier.
    fn add_pci_hotplug(&mut self, pio: &Arc<Bus>, pci: &PciRoot) -> Result<()> {
        let wake = pci
            .notifier
            .event()
            .try_clone()
            .map_err(DeviceError::PciHotplugWake)?;
        let registers = Arc::new(Mutex::new(PciHotplug::new(
            pci.segment.ports().len(),
            Arc::new(wake),
        )));
        let shared: SharedBusDevice = registers.clone();
        self.register(
            pio,
            "ACPI PCI hotplug registers",
            &shared,
            layout::PCI_HOTPLUG_PORT,
            PCI_HOTPLUG_PORT_COUNT,
        )?;
        self.pci_hotplug = Some(registers);
        Ok(())
    }

    /// The ACPI PCI hotplug registers, with `--hotplug acpi`.
    pub fn pci_hotplug(&self) -> Option<Arc<Mutex<PciHotplug>>> {
        self.pci_hotplug.clone()
    }

    /// An EventFd registered as irqfd on `gsi`, as an [`Interrupt`].
    fn irqfd(
        &mut self,
        vm_fd: &VmFd,
        device: &'static str,
        gsi: u32,
    ) -> Result<Arc<dyn Interrupt>> {
        let err = |source| DeviceError::Irq {
            device,
            gsi,
            source,
        };
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
        vm_fd
            .register_irqfd(&fd, gsi)
            .map_err(|e| err(std::io::Error::from_raw_os_error(e.errno())))?;
        let trigger = fd.try_clone().map_err(err)?;
        self._irqfds.push(fd);
        Ok(Arc::new(trigger))
    }

    fn register(
        &mut self,
        bus: &Bus,
        device: &'static str,
        dev: &SharedBusDevice,
        base: u64,
        len: u64,
    ) -> Result<()> {
        bus.insert(dev, base, len)
            .map_err(|source| DeviceError::Register {
                device,
                base,
                source,
            })?;
        self.owned.push(dev.clone());
        Ok(())
    }

    /// Writes the ACPI tables into guest memory (at build, and again at each reboot: the last
    /// guest may have overwritten them) and returns the RSDP address. They describe the root
    /// ports, not the devices in them: with native PCIe hotplug the guest finds devices by
    /// enumeration, so hot-added devices need no change here.
    pub fn write_acpi_tables(&self, memory: &GuestMemoryMmap) -> Result<u64> {
        Ok(acpi::write_tables(
            memory,
            &acpi::Machine {
                cpus: self.acpi.cpus,
                bus_end: pci::BUS_END,
                mmio64: self.acpi.mmio64,
                root_ports: &self.acpi.root_ports,
                numa: self.acpi.numa.as_ref(),
                numa_bridges: &self.acpi.numa_bridges,
                serial: self.serial.is_some(),
                acpi_hotplug: self.acpi.acpi_hotplug,
            },
        )?)
    }

    /// Puts the platform devices with guest-programmed state back to power-on for a reboot:
    /// the serial port's registers (its console connection stays), the i8042, the GED's
    /// latched events. The ACPI PM block holds no state; the CMOS keeps its NVRAM, as on real
    /// hardware.
    pub fn reset_platform(&self) {
        if let Some(serial) = &self.serial {
            serial.locked().reset_registers();
        }
        if let Some(i8042) = &self.i8042 {
            i8042.locked().reset();
        }
        if let Some(ged) = &self.ged {
            ged.locked().reset();
        }
        if let Some(registers) = &self.pci_hotplug {
            registers.locked().reset();
        }
    }

    /// The serial port, when the VM has one.
    pub fn serial(&self) -> Option<Arc<Mutex<Serial>>> {
        self.serial.clone()
    }

    /// The ACPI Generic Event Device, whose power button the VM controller presses.
    pub fn ged(&self) -> Option<Arc<Mutex<Ged>>> {
        self.ged.clone()
    }

    /// The PCIe segment.
    pub fn pci(&self) -> Option<&PciRoot> {
        self.pci.as_ref()
    }

    /// Hands the host side of the console over (once), for the event loop to serve.
    pub fn take_console_host(&mut self) -> Option<ConsoleHost> {
        self.console_host.take()
    }

    /// Where the serial console is, for `info`.
    pub fn console_info(&self) -> ConsoleInfo {
        self.console_info.clone()
    }

    /// Hands the console writer over (once), to finish it when the VM ends.
    pub fn take_console_writer(&mut self) -> Option<ConsoleWriter> {
        self.console_writer.take()
    }

    /// Attaches one more device as the devices given at boot are (present and powered when
    /// the guest starts), between creating the VM and booting it; refused once the
    /// passthrough devices went to the controller (the VM runs: hot-add then).
    pub fn attach_cold(&mut self, spec: &DeviceSpec) -> Result<crate::api::DeviceInfo> {
        let err = |source| DeviceError::Passthrough {
            spec: spec.to_string(),
            source: Box::new(source),
        };
        let (Some(pci), Some(passthrough)) = (self.pci.as_ref(), self.passthrough.as_mut()) else {
            return Err(DeviceError::Booted);
        };
        let d = passthrough
            .attach_at_boot(spec, &pci.segment)
            .map_err(err)?;
        let port = pci.segment.ports().get(d.port).map(|p| p.address);
        Ok(crate::api::DeviceInfo {
            id: d.id.clone(),
            bdf: d.guest_bdf,
            host_bdf: d.host.bdf,
            slot: d.slot,
            root_port: port.unwrap_or(d.guest_bdf),
            state: d.state,
            vf: d.vf_info(),
        })
    }

    /// Hands the passthrough devices to the VM controller (once).
    pub fn take_passthrough(&mut self) -> Option<Passthrough> {
        self.passthrough.take()
    }

    /// Guest address of the ACPI RSDP.
    pub fn rsdp_address(&self) -> u64 {
        self.rsdp
    }
}

/// The serial console's writer thread, the UART's output, the host side the event loop serves
/// and what `info` says of it.
type SerialParts = (ConsoleWriter, ConsoleOutput, ConsoleHost, ConsoleInfo);

/// Opens the serial output of `config` behind a console writer thread (the UART never waits
/// for the sink), with the host side of its input.
fn serial_output(config: &SerialConfig, seccomp: SeccompMode) -> Result<Option<SerialParts>> {
    // Absolute in `info`: a client (`rvmm ctl console`) may run elsewhere than rvmm's directory.
    let info = |kind, path: Option<&std::path::Path>| ConsoleInfo {
        kind,
        path: path.map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .to_string_lossy()
                .into_owned()
        }),
    };
    let mut socket = None;
    let (sink, limit, host, info): (Box<dyn Write + Send>, Option<u64>, _, _) = match config {
        SerialConfig::Stdio => (
            Box::new(std::io::stdout()),
            None,
            ConsoleHost::Stdin,
            info(ConsoleKind::Stdio, None),
        ),
        SerialConfig::File { path, max_size } => (
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(DeviceError::SerialOutput)?,
            ),
            Some(*max_size),
            ConsoleHost::Nothing,
            info(ConsoleKind::File, Some(path)),
        ),
        SerialConfig::Socket { path, buffer } => {
            let listener = ConsoleListener::bind(path).map_err(DeviceError::ConsoleSocket)?;
            let shared = SocketShared::new(usize::try_from(*buffer).unwrap_or(usize::MAX));
            log::info!("guest serial console on the unix socket {}", path.display());
            let sink = Box::new(SocketSink::new(shared.clone()));
            socket = Some((listener, shared));
            (
                sink,
                None,
                ConsoleHost::Nothing,
                info(ConsoleKind::Socket, Some(path)),
            )
        }
        SerialConfig::Pty => {
            let pty = Pty::open().map_err(DeviceError::ConsolePty)?;
            let sink = Box::new(pty.output().map_err(DeviceError::ConsolePty)?);
            // The operator needs the path to reach the console: shown at the default level.
            log::warn!(
                "guest serial console on the pseudo-terminal {}",
                pty.path().display()
            );
            let info = info(ConsoleKind::Pty, Some(pty.path()));
            (sink, None, ConsoleHost::Pty(pty), info)
        }
        SerialConfig::Off => return Ok(None),
    };
    let filter = ThreadFilter::new(ThreadKind::Console, seccomp)
        .map_err(|e| DeviceError::SerialOutput(std::io::Error::other(e)))?;
    let (writer, output) =
        ConsoleWriter::start(sink, limit, filter).map_err(DeviceError::SerialOutput)?;
    let host = match socket {
        Some((listener, shared)) => ConsoleHost::Socket {
            listener,
            shared,
            waker: writer.waker(),
        },
        None => host,
    };
    Ok(Some((writer, output, host, info)))
}

/// Attaches the devices given at boot (present and powered when the guest starts).
fn attach_boot_devices(
    passthrough: &mut Passthrough,
    pci: &PciRoot,
    devices: &[DeviceSpec],
) -> Result<()> {
    for spec in devices {
        passthrough
            .attach_at_boot(spec, &pci.segment)
            .map_err(|source| DeviceError::Passthrough {
                spec: spec.to_string(),
                source: Box::new(source),
            })?;
    }
    Ok(())
}

/// `devices` with every group descriptor given by number ([`crate::device::GroupFd::Number`], inherited from
/// the process that started rvmm) taken over as this process's own. Called before rvmm opens
/// anything, so that a number can only name a descriptor the caller handed over, never one of
/// rvmm's own.
pub fn adopt_inherited_groups(devices: &[DeviceSpec]) -> Result<Vec<DeviceSpec>> {
    let mut inherited = InheritedFds::default();
    devices
        .iter()
        .map(|spec| {
            let mut spec = spec.clone();
            if let Some(group) = &spec.group {
                let adopted = inherited
                    .adopt(group)
                    .map_err(|e| DeviceError::Passthrough {
                        spec: spec.to_string(),
                        source: Box::new(e.into()),
                    })?;
                spec.group = Some(adopted);
            }
            Ok(spec)
        })
        .collect()
}
