//! The plain description of a machine the ACPI tables are built from, and its validation.
//!
//! The VMM fills a [`MachineDescription`]; nothing here knows about KVM or guest memory.
//! [`MachineDescription::validate`] rejects every value the table builders cannot encode or
//! that would describe an inconsistent machine, so the builders themselves cannot fail.

use std::collections::HashSet;

/// Number of ECAM bytes per PCI bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BYTES_PER_BUS: u64 = 1 << 20;

/// Highest PCI device number on a bus.
const MAX_PCI_DEVICE: u8 = 31;
/// Highest PCI function number of a device.
const MAX_PCI_FUNCTION: u8 = 7;
/// Highest physical slot number: the Slot Capabilities register holds 13 bits.
pub const MAX_SLOT_NUMBER: u16 = 0x1fff;
/// Highest sleep type: SLP_TYP is a 3-bit field of the sleep control register.
pub const MAX_SLEEP_TYPE: u8 = 7;
/// Number of consecutive I/O ports a 16550 UART decodes.
pub const SERIAL_PORT_LEN: u16 = 8;
/// Highest ISA IRQ.
const MAX_ISA_IRQ: u8 = 15;
/// End (exclusive) of the 32-bit address space.
const FOUR_GIB: u64 = 1 << 32;
/// Inputs of the IOAPIC.
const IOAPIC_INPUTS: u32 = 24;
/// First I/O port of PCI configuration mechanism #1.
pub(crate) const PCI_CONFIG_PORT: u16 = 0xcf8;
/// I/O ports of PCI configuration mechanism #1.
pub(crate) const PCI_CONFIG_PORTS: u16 = 8;

/// Errors found while validating a [`MachineDescription`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The machine has no vCPU.
    #[error("machine has no vCPU")]
    NoCpus,
    /// The PCI bus range is reversed.
    #[error("PCI bus range {start:#x}..={end:#x} is reversed")]
    BusRange {
        /// First bus number.
        start: u8,
        /// Last bus number.
        end: u8,
    },
    /// The ECAM region of the bus range does not fit in the address space.
    #[error("ECAM at {base:#x} for buses up to {end_bus:#x} wraps around the address space")]
    EcamWraps {
        /// ECAM base address (bus 0).
        base: u64,
        /// Last bus number.
        end_bus: u8,
    },
    /// An MMIO window is empty or wraps around the address space.
    #[error("PCI {window} window at {base:#x} with size {size:#x} is empty or wraps around")]
    EmptyOrWrappingWindow {
        /// Which window ("mmio32" or "mmio64").
        window: &'static str,
        /// Window base address.
        base: u64,
        /// Window size in bytes.
        size: u64,
    },
    /// The 32-bit MMIO window does not fit below 4 GiB, or is 4 GiB large.
    #[error("PCI mmio32 window at {base:#x} with size {size:#x} does not fit in 32 bits")]
    Mmio32OutOfRange {
        /// Window base address.
        base: u64,
        /// Window size in bytes.
        size: u64,
    },
    /// An MMIO window overlaps the ECAM region.
    #[error(
        "PCI {window} window at {base:#x} with size {size:#x} overlaps the ECAM region at \
         {ecam_base:#x} with size {ecam_size:#x}"
    )]
    WindowOverlapsEcam {
        /// Which window ("mmio32" or "mmio64").
        window: &'static str,
        /// Window base address.
        base: u64,
        /// Window size in bytes.
        size: u64,
        /// Start of the ECAM region of the bus range.
        ecam_base: u64,
        /// Size of the ECAM region of the bus range.
        ecam_size: u64,
    },
    /// A root port has a device or function number out of range.
    #[error("root port {device:#x}.{function} has an invalid PCI device or function number")]
    RootPortAddress {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// Two root ports share a device and function number.
    #[error("root port {device:#x}.{function} is described twice")]
    DuplicateRootPort {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// A slot number does not fit the 13-bit Physical Slot Number field.
    #[error("slot number {slot_number} is above the maximum {MAX_SLOT_NUMBER}")]
    SlotNumberTooLarge {
        /// The slot number.
        slot_number: u16,
    },
    /// Two root ports share a slot number.
    #[error("slot number {slot_number} is used by more than one root port")]
    DuplicateSlotNumber {
        /// The slot number.
        slot_number: u16,
    },
    /// The S5 sleep type does not fit the 3-bit SLP_TYP field.
    #[error("S5 sleep type {sleep_type} is above the maximum {MAX_SLEEP_TYPE}")]
    SleepType {
        /// The sleep type.
        sleep_type: u8,
    },
    /// The serial port's I/O range wraps around the I/O space.
    #[error("serial port at I/O port {port:#x} wraps around the I/O space")]
    SerialPortWraps {
        /// First I/O port.
        port: u16,
    },
    /// The serial port's IRQ is not a usable ISA IRQ.
    #[error("serial IRQ {irq} is not an ISA IRQ in 1..=15 other than 2")]
    SerialIrq {
        /// The IRQ.
        irq: u8,
    },
    /// The power button's IRQ is not a usable ISA IRQ.
    #[error("power button IRQ {irq} is not an ISA IRQ in 1..=15 other than 2")]
    PowerButtonIrq {
        /// The IRQ.
        irq: u8,
    },
    /// A root port's INTx GSI is not an IOAPIC input above the ISA IRQs.
    #[error("root port {device:#x}.{function}: INTx GSI {gsi} is not an IOAPIC input in {first}..={last}")]
    IntxGsi {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
        /// The GSI.
        gsi: u32,
        /// First GSI allowed.
        first: u32,
        /// Last GSI allowed.
        last: u32,
    },
    /// The I/O window is empty, runs past port 0xffff or overlaps a platform device's ports.
    #[error("PCI I/O window {base:#x}+{size:#x} is empty, runs past port 0xffff or overlaps the {what} ports")]
    IoWindow {
        /// First port.
        base: u16,
        /// Number of ports.
        size: u32,
        /// What it overlaps ("no" when it is empty or too long).
        what: &'static str,
    },
    /// ACPI PCI hotplug needs the Generic Event Device that signals it.
    #[error("ACPI PCI hotplug needs the Generic Event Device: describe a power button too")]
    PciHotplugWithoutGed,
    /// More root ports than the ACPI PCI hotplug registers describe.
    #[error("ACPI PCI hotplug describes at most {MAX_PCI_HOTPLUG_SLOTS} slots, the machine has {ports} root ports")]
    TooManyHotplugSlots {
        /// Root ports of the machine.
        ports: usize,
    },
    /// The ACPI PCI hotplug register block wraps around the I/O space.
    #[error("ACPI PCI hotplug registers at I/O port {port:#x} wrap around the I/O space")]
    PciHotplugPortWraps {
        /// First I/O port.
        port: u16,
    },
    /// The power button's IRQ is the serial port's too.
    #[error("power button IRQ {irq} is the serial port's IRQ: give the power button its own")]
    PowerButtonIrqShared {
        /// The IRQ.
        irq: u8,
    },
    /// The NUMA description is inconsistent.
    #[error("invalid NUMA description: {0}")]
    Numa(String),
}

/// Result of validating a description.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything the ACPI tables say about the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDescription {
    /// Number of vCPUs, 1..=255. vCPU `i` has local APIC id and ACPI processor UID `i`
    /// (xAPIC only: ids stay below the broadcast id 0xff).
    pub cpus: u8,
    /// Physical address of the local APICs (normally 0xFEE0_0000).
    pub lapic_address: u32,
    /// The single I/O APIC.
    pub ioapic: IoApic,
    /// The PCIe host bridge.
    pub pci: PciHostBridge,
    /// Hardware-reduced ACPI power management registers.
    pub pm: PowerManagement,
    /// COM1, if the machine has one.
    pub serial: Option<SerialPort>,
    /// The power button and the Generic Event Device that signals it, if the machine has one.
    pub power_button: Option<PowerButton>,
    /// ACPI PCI hotplug of the root ports' slots (`None`: the OS gets native PCIe hotplug).
    pub pci_hotplug: Option<PciHotplug>,
    /// Legacy devices announced in the FADT boot architecture flags.
    pub legacy: LegacyDevices,
    /// The guest NUMA topology (SRAT, SLIT, `_PXM` of the root ports); `None`: one node, no
    /// SRAT or SLIT.
    pub numa: Option<Numa>,
}

/// The NUMA topology: proximity domain `i` is `nodes[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numa {
    /// The nodes, in proximity domain order.
    pub nodes: Vec<NumaNode>,
    /// SLIT distances: `distances[i][j]` from domain `i` to `j`; 10 on the diagonal, 11 to
    /// 254 elsewhere.
    pub distances: Vec<Vec<u8>>,
    /// The proximity domain of each root port, in the order of [`PciHostBridge::root_ports`].
    pub root_port_domains: Vec<u32>,
    /// One host bridge per node holding root ports, the first becoming `PCI0`; empty: the one
    /// `PCI0` of [`PciHostBridge`] with every port (a Linux guest then gives no device a node:
    /// it takes a PCI device's node from its host bridge only).
    pub bridges: Vec<NumaBridge>,
}

/// A host bridge of one NUMA node: its own root bus and bus range in the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaBridge {
    /// Its proximity domain (`_PXM`).
    pub domain: u32,
    /// Its root bus (`_BBN`), the first bus of its range.
    pub bus_start: u8,
    /// The last bus of its range.
    pub bus_end: u8,
    /// Its root ports: indices into [`PciHostBridge::root_ports`].
    pub ports: Vec<usize>,
    /// The memory windows it forwards (its ports' windows).
    pub windows: Vec<MmioWindow>,
    /// The I/O windows it forwards (its ports' I/O windows).
    pub io_windows: Vec<IoWindow>,
}

/// One proximity domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Its vCPUs (local APIC ids).
    pub cpus: Vec<u8>,
    /// Its RAM: (base, size) ranges of guest physical addresses.
    pub memory: Vec<(u64, u64)>,
}

impl Numa {
    /// Checks the topology against `cpus` vCPUs and `root_ports` root ports.
    fn validate(&self, cpus: u8, root_ports: usize) -> Result<()> {
        let err = |s: String| Err(Error::Numa(s));
        let n = self.nodes.len();
        if n == 0 {
            return err("no node".into());
        }
        let mut owner = vec![None; usize::from(cpus)];
        for (domain, node) in self.nodes.iter().enumerate() {
            for &cpu in &node.cpus {
                match owner.get_mut(usize::from(cpu)) {
                    None => return err(format!("node {domain} has vCPU {cpu} of {cpus}")),
                    Some(Some(other)) => {
                        return err(format!("vCPU {cpu} in nodes {other} and {domain}"))
                    }
                    Some(slot) => *slot = Some(domain),
                }
            }
            for &(base, size) in &node.memory {
                if size == 0 || base.checked_add(size).is_none() {
                    return err(format!(
                        "node {domain} has an empty or wrapping memory range"
                    ));
                }
            }
        }
        if let Some(cpu) = owner.iter().position(Option::is_none) {
            return err(format!("vCPU {cpu} in no node"));
        }
        if self.distances.len() != n || self.distances.iter().any(|row| row.len() != n) {
            return err(format!("distances are not {n} x {n}"));
        }
        for (i, row) in self.distances.iter().enumerate() {
            for (j, &d) in row.iter().enumerate() {
                let ok = if i == j {
                    d == 10
                } else {
                    (11..=254).contains(&d)
                };
                if !ok {
                    return err(format!("distance {i} -> {j} is {d}"));
                }
            }
        }
        if self.root_port_domains.len() != root_ports {
            return err(format!(
                "{} root port domains for {root_ports} root ports",
                self.root_port_domains.len()
            ));
        }
        if let Some(d) = self.root_port_domains.iter().find(|d| **d as usize >= n) {
            return err(format!("root port in domain {d} of {n}"));
        }
        if !self.bridges.is_empty() {
            let mut seen = vec![false; root_ports];
            for bridge in &self.bridges {
                if bridge.domain as usize >= n || bridge.bus_start > bridge.bus_end {
                    return err(format!(
                        "host bridge of domain {} with buses {}..={}",
                        bridge.domain, bridge.bus_start, bridge.bus_end
                    ));
                }
                for &port in &bridge.ports {
                    match seen.get_mut(port) {
                        Some(s) if !*s => *s = true,
                        _ => return err(format!("root port {port} in no or two host bridges")),
                    }
                }
                if bridge
                    .windows
                    .iter()
                    .any(|w| w.size == 0 || w.last().is_none())
                {
                    return err("empty or wrapping host bridge window".into());
                }
                if bridge.io_windows.iter().any(|w| w.last().is_none()) {
                    return err("empty host bridge I/O window or one past port 0xffff".into());
                }
            }
            if seen.iter().any(|s| !*s) {
                return err("a root port is in no host bridge".into());
            }
        }
        Ok(())
    }
}

/// The I/O APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApic {
    /// I/O APIC id.
    pub id: u8,
    /// Physical address of its registers (normally 0xFEC0_0000).
    pub address: u32,
    /// First global system interrupt it serves (normally 0).
    pub gsi_base: u32,
}

/// An MMIO address window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    /// First address.
    pub base: u64,
    /// Size in bytes, not zero.
    pub size: u64,
}

impl MmioWindow {
    /// Last address of the window, `None` if it is empty or wraps around.
    pub fn last(&self) -> Option<u64> {
        self.size
            .checked_sub(1)
            .and_then(|s| self.base.checked_add(s))
    }
}

/// The PCIe host bridge and the root ports on its root bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHostBridge {
    /// PCI segment group.
    pub segment: u16,
    /// ECAM base address: the address of bus 0's configuration space, as in the MCFG, even when
    /// `bus_start` is not 0.
    pub ecam_base: u64,
    /// Root bus number.
    pub bus_start: u8,
    /// Last bus number decoded by the host bridge.
    pub bus_end: u8,
    /// Window for non-prefetchable memory BARs, below 4 GiB.
    pub mmio32: MmioWindow,
    /// Window for 64-bit prefetchable memory BARs.
    pub mmio64: MmioWindow,
    /// Window of I/O ports for I/O BARs, or `None` for no I/O window.
    pub io: Option<IoWindow>,
    /// Root ports on the root bus.
    pub root_ports: Vec<RootPort>,
}

impl PciHostBridge {
    /// The ECAM region of the bus range: its first address and size.
    ///
    /// Returns `None` when the region wraps around the address space or the bus range is reversed.
    pub fn ecam_region(&self) -> Option<(u64, u64)> {
        let buses = u64::from(self.bus_end)
            .checked_sub(u64::from(self.bus_start))?
            .checked_add(1)?;
        let start = self
            .ecam_base
            .checked_add(u64::from(self.bus_start) * ECAM_BYTES_PER_BUS)?;
        let size = buses * ECAM_BYTES_PER_BUS;
        start.checked_add(size - 1)?;
        Some((start, size))
    }
}

/// A window of the 16-bit I/O port space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoWindow {
    /// First port.
    pub base: u16,
    /// Number of ports; the window must end at or below port 0xffff.
    pub size: u32,
}

impl IoWindow {
    /// The last port, or `None` when the window is empty or runs past port 0xffff.
    pub fn last(&self) -> Option<u16> {
        let last = u32::from(self.base).checked_add(self.size.checked_sub(1)?)?;
        u16::try_from(last).ok()
    }

    fn overlaps(&self, first: u16, count: u16) -> bool {
        let Some(last) = self.last() else {
            return false;
        };
        count != 0 && first <= last && u32::from(self.base) < u32::from(first) + u32::from(count)
    }
}

/// A PCIe root port with a hot-plug slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootPort {
    /// Device number on the root bus, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
    /// Physical slot number; must equal the Physical Slot Number the port reports in
    /// its Slot Capabilities register, and be unique.
    pub slot_number: u16,
    /// The IOAPIC GSI that INTA..INTD of the device behind the port are routed to (the port's
    /// `_PRT`, level-triggered, active-low), or `None` for no `_PRT` (MSI/MSI-X only). Must be
    /// an IOAPIC input above the ISA IRQs (16..=23 with one IOAPIC at GSI 0).
    pub intx_gsi: Option<u32>,
}

/// Hardware-reduced ACPI power management registers, all 8-bit I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerManagement {
    /// Sleep control register. To enter S5 the guest writes
    /// `(s5_sleep_type << 2) | (1 << 5)` (SLP_TYP, SLP_EN).
    pub sleep_control_port: u16,
    /// Sleep status register (WAK_STS is bit 7).
    pub sleep_status_port: u16,
    /// Reset register.
    pub reset_port: u16,
    /// Value the guest writes to the reset register to reset the machine.
    pub reset_value: u8,
    /// SLP_TYP value the PM device recognises as S5 (soft off), 0..=7.
    pub s5_sleep_type: u8,
}

/// A 16550 serial port described as COM1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialPort {
    /// First of its eight I/O ports (normally 0x3f8).
    pub port: u16,
    /// ISA IRQ (normally 4), identity-mapped to the GSI of the same number: 1..=15, not 2
    /// (GSI 2 receives ISA IRQ 0).
    pub irq: u8,
}

/// A control-method power button (`PNP0C0C`) signalled through a Generic Event Device
/// (`ACPI0013`), the only way a hardware-reduced machine has to report one.
///
/// The machine raises `irq` (edge-triggered, active high) after setting a bit in the 8-bit
/// event register at `event_port`; the GED's `_EVT` reads the register, which clears it, and
/// for [`GED_EVENT_POWER_BUTTON`] notifies the power button device (0x80, "button pressed"),
/// which the OS reports as a power key press.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerButton {
    /// The GED's event register: one byte, read-to-clear, bit 0 = the power button.
    pub event_port: u16,
    /// ISA IRQ of the GED, identity-mapped to the GSI of the same number: 1..=15, not 2, not
    /// the serial port's.
    pub irq: u8,
}

/// Bit of the GED event register that means "the power button was pressed".
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Bit of the GED event register that means "a PCI hotplug slot changed".
pub const GED_EVENT_PCI_HOTPLUG: u8 = 1 << 1;
/// Most slots ACPI PCI hotplug describes.
pub const MAX_PCI_HOTPLUG_SLOTS: usize = 128;
/// Length of the ACPI PCI hotplug register block in I/O ports.
pub const PCI_HOTPLUG_REGISTERS_LEN: u16 = 0x48;

/// ACPI PCI hotplug: the slot below each root port is described in the DSDT as an ejectable
/// device, `_OSC` keeps native PCIe hotplug for the firmware, and the machine signals slot
/// changes through the GED ([`GED_EVENT_PCI_HOTPLUG`]) and a register block of
/// [`PCI_HOTPLUG_REGISTERS_LEN`] I/O ports (see `rvmm_devices::pci_hotplug` for its layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHotplug {
    /// First I/O port of the register block.
    pub port: u16,
}

/// Legacy devices the FADT tells the guest about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegacyDevices {
    /// A CMOS RTC is present at I/O ports 0x70/0x71. When false the FADT says
    /// "CMOS RTC not present".
    pub cmos_rtc: bool,
    /// A full 8042 keyboard controller is present at 0x60/0x64. When false the guest does not
    /// probe for one (a reset-only 8042 does not count: reset goes through the FADT reset register).
    pub i8042: bool,
}

impl MachineDescription {
    /// Checks that the description is consistent and encodable.
    pub fn validate(&self) -> Result<()> {
        if self.cpus == 0 {
            return Err(Error::NoCpus);
        }
        // With a host bridge per node, ports on different root buses may share an address.
        let bridges = self.numa.as_ref().map_or(&[][..], |n| &n.bridges[..]);
        self.pci.validate(bridges)?;
        if self.pm.s5_sleep_type > MAX_SLEEP_TYPE {
            return Err(Error::SleepType {
                sleep_type: self.pm.s5_sleep_type,
            });
        }
        if let Some(serial) = &self.serial {
            serial.validate()?;
        }
        if let Some(button) = &self.power_button {
            button.validate(self.serial.as_ref())?;
        }
        if let Some(numa) = &self.numa {
            numa.validate(self.cpus, self.pci.root_ports.len())?;
        }
        self.validate_pci_hotplug()?;
        self.validate_intx()?;
        self.validate_io_window()
    }

    /// Every `_PRT` GSI is an IOAPIC input above the ISA IRQs.
    fn validate_intx(&self) -> Result<()> {
        let first = self.ioapic.gsi_base.max(u32::from(MAX_ISA_IRQ) + 1);
        let last = self.ioapic.gsi_base + (IOAPIC_INPUTS - 1);
        for port in &self.pci.root_ports {
            match port.intx_gsi {
                Some(gsi) if !(first..=last).contains(&gsi) => {
                    return Err(Error::IntxGsi {
                        device: port.device,
                        function: port.function,
                        gsi,
                        first,
                        last,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// ACPI PCI hotplug has the GED that signals it, a slot per root port and registers that
    /// fit in the I/O space.
    fn validate_pci_hotplug(&self) -> Result<()> {
        if let Some(hotplug) = &self.pci_hotplug {
            if self.power_button.is_none() {
                return Err(Error::PciHotplugWithoutGed);
            }
            if self.pci.root_ports.len() > MAX_PCI_HOTPLUG_SLOTS {
                return Err(Error::TooManyHotplugSlots {
                    ports: self.pci.root_ports.len(),
                });
            }
            if hotplug
                .port
                .checked_add(PCI_HOTPLUG_REGISTERS_LEN - 1)
                .is_none()
            {
                return Err(Error::PciHotplugPortWraps { port: hotplug.port });
            }
        }
        Ok(())
    }

    /// The I/O window is not empty, ends at port 0xffff at most and leaves the platform's ports
    /// alone.
    fn validate_io_window(&self) -> Result<()> {
        let Some(io) = self.pci.io else {
            return Ok(());
        };
        let refuse = |what| {
            Err(Error::IoWindow {
                base: io.base,
                size: io.size,
                what,
            })
        };
        if io.last().is_none() {
            return refuse("no");
        }
        let mut platform = vec![
            ("PCI configuration", PCI_CONFIG_PORT, PCI_CONFIG_PORTS),
            ("sleep control", self.pm.sleep_control_port, 1),
            ("sleep status", self.pm.sleep_status_port, 1),
            ("reset", self.pm.reset_port, 1),
        ];
        if let Some(serial) = &self.serial {
            platform.push(("serial", serial.port, SERIAL_PORT_LEN));
        }
        if let Some(button) = &self.power_button {
            platform.push(("GED event", button.event_port, 1));
        }
        if let Some(hotplug) = &self.pci_hotplug {
            platform.push(("ACPI PCI hotplug", hotplug.port, PCI_HOTPLUG_REGISTERS_LEN));
        }
        if self.legacy.cmos_rtc {
            platform.push(("CMOS", 0x70, 2));
        }
        if self.legacy.i8042 {
            platform.push(("i8042", 0x60, 5));
        }
        match platform
            .into_iter()
            .find(|&(_, first, count)| io.overlaps(first, count))
        {
            Some((what, _, _)) => refuse(what),
            None => Ok(()),
        }
    }
}

impl PciHostBridge {
    fn validate(&self, bridges: &[NumaBridge]) -> Result<()> {
        if self.bus_start > self.bus_end {
            return Err(Error::BusRange {
                start: self.bus_start,
                end: self.bus_end,
            });
        }
        let (ecam_base, ecam_size) = self.ecam_region().ok_or(Error::EcamWraps {
            base: self.ecam_base,
            end_bus: self.bus_end,
        })?;
        // `ecam_region` checked that the region is non-empty and does not wrap.
        let ecam_last = ecam_base + (ecam_size - 1);
        for (window, w) in [("mmio32", &self.mmio32), ("mmio64", &self.mmio64)] {
            let last = w.last().ok_or(Error::EmptyOrWrappingWindow {
                window,
                base: w.base,
                size: w.size,
            })?;
            if w.base <= ecam_last && ecam_base <= last {
                return Err(Error::WindowOverlapsEcam {
                    window,
                    base: w.base,
                    size: w.size,
                    ecam_base,
                    ecam_size,
                });
            }
        }
        // A DWordMemory descriptor holds the window's last address and its size in 32 bits each.
        if self.mmio32.last().is_none_or(|last| last >= FOUR_GIB) || self.mmio32.size >= FOUR_GIB {
            return Err(Error::Mmio32OutOfRange {
                base: self.mmio32.base,
                size: self.mmio32.size,
            });
        }
        self.validate_root_ports(bridges)
    }

    fn validate_root_ports(&self, bridges: &[NumaBridge]) -> Result<()> {
        let mut addresses = HashSet::new();
        let mut slots = HashSet::new();
        for (i, port) in self.root_ports.iter().enumerate() {
            let (device, function) = (port.device, port.function);
            if device > MAX_PCI_DEVICE || function > MAX_PCI_FUNCTION {
                return Err(Error::RootPortAddress { device, function });
            }
            let bridge = bridges.iter().position(|b| b.ports.contains(&i));
            if !addresses.insert((bridge, device, function)) {
                return Err(Error::DuplicateRootPort { device, function });
            }
            let slot_number = port.slot_number;
            if slot_number > MAX_SLOT_NUMBER {
                return Err(Error::SlotNumberTooLarge { slot_number });
            }
            if !slots.insert(slot_number) {
                return Err(Error::DuplicateSlotNumber { slot_number });
            }
        }
        Ok(())
    }
}

impl SerialPort {
    fn validate(&self) -> Result<()> {
        if self.port.checked_add(SERIAL_PORT_LEN - 1).is_none() {
            return Err(Error::SerialPortWraps { port: self.port });
        }
        if !is_isa_irq(self.irq) {
            return Err(Error::SerialIrq { irq: self.irq });
        }
        Ok(())
    }
}

impl PowerButton {
    fn validate(&self, serial: Option<&SerialPort>) -> Result<()> {
        if !is_isa_irq(self.irq) {
            return Err(Error::PowerButtonIrq { irq: self.irq });
        }
        if serial.is_some_and(|s| s.irq == self.irq) {
            return Err(Error::PowerButtonIrqShared { irq: self.irq });
        }
        Ok(())
    }
}

/// Whether `irq` is an ISA IRQ a device may use: 1..=15, not 2 (GSI 2 receives ISA IRQ 0).
fn is_isa_irq(irq: u8) -> bool {
    irq != 0 && irq != 2 && irq <= MAX_ISA_IRQ
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A description shaped like rvmm's default machine.
    pub(crate) fn example() -> MachineDescription {
        MachineDescription {
            cpus: 4,
            lapic_address: 0xfee0_0000,
            ioapic: IoApic {
                id: 0,
                address: 0xfec0_0000,
                gsi_base: 0,
            },
            pci: PciHostBridge {
                segment: 0,
                ecam_base: 0xe000_0000,
                bus_start: 0,
                bus_end: 0xff,
                mmio32: MmioWindow {
                    base: 0xc000_0000,
                    size: 0x2000_0000,
                },
                mmio64: MmioWindow {
                    base: 0x100_0000_0000,
                    size: 0x100_0000_0000,
                },
                io: Some(IoWindow {
                    base: 0x1000,
                    size: 0xf000,
                }),
                root_ports: vec![
                    RootPort {
                        device: 1,
                        function: 0,
                        slot_number: 1,
                        intx_gsi: Some(16),
                    },
                    RootPort {
                        device: 2,
                        function: 0,
                        slot_number: 2,
                        intx_gsi: None,
                    },
                ],
            },
            pm: PowerManagement {
                sleep_control_port: 0x600,
                sleep_status_port: 0x601,
                reset_port: 0x602,
                reset_value: 0x1,
                s5_sleep_type: 5,
            },
            serial: Some(SerialPort {
                port: 0x3f8,
                irq: 4,
            }),
            power_button: Some(PowerButton {
                event_port: 0x603,
                irq: 5,
            }),
            pci_hotplug: None,
            legacy: LegacyDevices::default(),
            numa: None,
        }
    }

    /// [`example`] with two NUMA nodes: vCPUs 0, 2 and the first 1 GiB on node 0, vCPUs 1, 3
    /// and the rest on node 1; root port 0 on node 0, port 1 on node 1.
    pub(crate) fn numa_example() -> MachineDescription {
        MachineDescription {
            numa: Some(Numa {
                nodes: vec![
                    NumaNode {
                        cpus: vec![0, 2],
                        memory: vec![(0, 0x4000_0000)],
                    },
                    NumaNode {
                        cpus: vec![1, 3],
                        memory: vec![(0x4000_0000, 0x8000_0000), (0x1_0000_0000, 0x4000_0000)],
                    },
                ],
                distances: vec![vec![10, 21], vec![21, 10]],
                root_port_domains: vec![0, 1],
                bridges: Vec::new(),
            }),
            ..example()
        }
    }

    #[test]
    fn numa_example_is_valid() {
        assert_eq!(numa_example().validate(), Ok(()));
    }

    #[test]
    fn inconsistent_numa_is_rejected() {
        let cases: [fn(&mut Numa); 6] = [
            |n| n.nodes[0].cpus.push(1),
            |n| n.nodes[0].cpus.push(9),
            |n| n.nodes[1].cpus.pop().map(drop).unwrap_or(()),
            |n| n.distances[0][0] = 11,
            |n| n.distances[0][1] = 10,
            |n| n.root_port_domains[1] = 2,
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut desc = numa_example();
            case(desc.numa.as_mut().unwrap());
            assert!(
                matches!(desc.validate(), Err(Error::Numa(_))),
                "case {i}: {:?}",
                desc.validate()
            );
        }
    }

    /// [`example`] with ACPI PCI hotplug.
    pub(crate) fn example_acpi_hotplug() -> MachineDescription {
        MachineDescription {
            pci_hotplug: Some(PciHotplug { port: 0x620 }),
            ..example()
        }
    }

    #[test]
    fn example_description_is_valid() {
        assert_eq!(example().validate(), Ok(()));
    }

    #[test]
    fn intx_gsi_must_be_an_ioapic_input_above_the_isa_irqs() {
        for gsi in [5, 15, 24] {
            let mut desc = example();
            desc.pci.root_ports[1].intx_gsi = Some(gsi);
            assert_eq!(
                desc.validate(),
                Err(Error::IntxGsi {
                    device: 2,
                    function: 0,
                    gsi,
                    first: 16,
                    last: 23
                })
            );
        }
        let mut desc = example();
        desc.pci.root_ports[1].intx_gsi = Some(23);
        assert_eq!(desc.validate(), Ok(()));
    }

    #[test]
    fn io_window_must_not_cover_platform_ports_or_run_past_0xffff() {
        for (base, size, what) in [
            (0x0, 0x1000, "PCI configuration"),
            (0x3f8, 1, "serial"),
            (0x600, 4, "sleep control"),
            (0x603, 1, "GED event"),
            (0x1000, 0x1_0000, "no"),
            (0x1000, 0, "no"),
        ] {
            let mut desc = example();
            desc.pci.io = Some(IoWindow { base, size });
            assert_eq!(
                desc.validate(),
                Err(Error::IoWindow { base, size, what }),
                "{base:#x}+{size:#x}"
            );
        }
        let mut desc = example();
        desc.pci.io = Some(IoWindow {
            base: 0xd00,
            size: 0xf300,
        });
        assert_eq!(desc.validate(), Ok(()));
    }

    #[test]
    fn zero_cpus_are_rejected() {
        let mut desc = example();
        desc.cpus = 0;
        assert_eq!(desc.validate(), Err(Error::NoCpus));
    }

    #[test]
    fn reversed_bus_range_is_rejected() {
        let mut desc = example();
        desc.pci.bus_start = 2;
        desc.pci.bus_end = 1;
        assert_eq!(desc.validate(), Err(Error::BusRange { start: 2, end: 1 }));
    }

    #[test]
    fn ecam_region_starts_at_the_first_bus() {
        let mut desc = example();
        desc.pci.bus_start = 0x10;
        desc.pci.bus_end = 0x1f;
        assert_eq!(
            desc.pci.ecam_region(),
            Some((
                0xe000_0000 + 0x10 * ECAM_BYTES_PER_BUS,
                0x10 * ECAM_BYTES_PER_BUS
            ))
        );
    }

    #[test]
    fn wrapping_ecam_is_rejected() {
        let mut desc = example();
        desc.pci.ecam_base = u64::MAX - ECAM_BYTES_PER_BUS;
        assert_eq!(
            desc.validate(),
            Err(Error::EcamWraps {
                base: u64::MAX - ECAM_BYTES_PER_BUS,
                end_bus: 0xff
            })
        );
    }

    #[test]
    fn empty_window_is_rejected() {
        let mut desc = example();
        desc.pci.mmio64.size = 0;
        assert!(matches!(
            desc.validate(),
            Err(Error::EmptyOrWrappingWindow {
                window: "mmio64",
                ..
            })
        ));
    }

    #[test]
    fn wrapping_window_is_rejected() {
        let mut desc = example();
        desc.pci.mmio64.base = u64::MAX;
        assert!(matches!(
            desc.validate(),
            Err(Error::EmptyOrWrappingWindow {
                window: "mmio64",
                ..
            })
        ));
    }

    #[test]
    fn mmio32_window_above_four_gib_is_rejected() {
        let mut desc = example();
        desc.pci.mmio32 = MmioWindow {
            base: 0xf000_0000,
            size: 0x2000_0000,
        };
        assert_eq!(
            desc.validate(),
            Err(Error::Mmio32OutOfRange {
                base: 0xf000_0000,
                size: 0x2000_0000
            })
        );
    }

    #[test]
    fn mmio32_window_of_4_gib_is_rejected() {
        let mut desc = example();
        desc.pci.ecam_base = 0x1_0000_0000;
        desc.pci.mmio32 = MmioWindow {
            base: 0,
            size: 0x1_0000_0000,
        };
        assert_eq!(
            desc.validate(),
            Err(Error::Mmio32OutOfRange {
                base: 0,
                size: 0x1_0000_0000
            })
        );
    }

    #[test]
    fn window_overlapping_ecam_is_rejected() {
        let mut desc = example();
        desc.pci.mmio32.size = 0x2000_1000;
        assert!(matches!(
            desc.validate(),
            Err(Error::WindowOverlapsEcam {
                window: "mmio32",
                ..
            })
        ));
    }

    #[test]
    fn window_adjacent_to_ecam_is_accepted() {
        let mut desc = example();
        desc.pci.mmio32 = MmioWindow {
            base: 0xd000_0000,
            size: 0x1000_0000,
        };
        assert_eq!(desc.validate(), Ok(()));
    }

    #[test]
    fn root_port_device_above_31_is_rejected() {
        let mut desc = example();
        desc.pci.root_ports[0].device = 32;
        assert_eq!(
            desc.validate(),
            Err(Error::RootPortAddress {
                device: 32,
                function: 0
            })
        );
    }

    #[test]
    fn root_port_function_above_7_is_rejected() {
        let mut desc = example();
        desc.pci.root_ports[0].function = 8;
        assert_eq!(
            desc.validate(),
            Err(Error::RootPortAddress {
                device: 1,
                function: 8
            })
        );
    }

    #[test]
    fn duplicate_root_port_is_rejected() {
        let mut desc = example();
        desc.pci.root_ports[1].device = 1;
        assert_eq!(
            desc.validate(),
            Err(Error::DuplicateRootPort {
                device: 1,
                function: 0
            })
        );
    }

    #[test]
    fn slot_number_above_13_bits_is_rejected() {
        let mut desc = example();
        desc.pci.root_ports[0].slot_number = 0x2000;
        assert_eq!(
            desc.validate(),
            Err(Error::SlotNumberTooLarge {
                slot_number: 0x2000
            })
        );
    }

    #[test]
    fn duplicate_slot_number_is_rejected() {
        let mut desc = example();
        desc.pci.root_ports[1].slot_number = 1;
        assert_eq!(
            desc.validate(),
            Err(Error::DuplicateSlotNumber { slot_number: 1 })
        );
    }

    #[test]
    fn sleep_type_above_7_is_rejected() {
        let mut desc = example();
        desc.pm.s5_sleep_type = 8;
        assert_eq!(desc.validate(), Err(Error::SleepType { sleep_type: 8 }));
    }

    #[test]
    fn serial_port_wrapping_io_space_is_rejected() {
        let mut desc = example();
        desc.serial = Some(SerialPort {
            port: 0xfffa,
            irq: 4,
        });
        assert_eq!(
            desc.validate(),
            Err(Error::SerialPortWraps { port: 0xfffa })
        );
    }

    #[test]
    fn serial_irq_2_is_rejected() {
        let mut desc = example();
        desc.serial = Some(SerialPort {
            port: 0x3f8,
            irq: 2,
        });
        assert_eq!(desc.validate(), Err(Error::SerialIrq { irq: 2 }));
    }

    #[test]
    fn serial_irq_above_15_is_rejected() {
        let mut desc = example();
        desc.serial = Some(SerialPort {
            port: 0x3f8,
            irq: 16,
        });
        assert_eq!(desc.validate(), Err(Error::SerialIrq { irq: 16 }));
    }

    #[test]
    fn power_button_irq_out_of_range_is_rejected() {
        for irq in [0, 2, 16] {
            let mut desc = example();
            desc.power_button = Some(PowerButton {
                event_port: 0x603,
                irq,
            });
            assert_eq!(desc.validate(), Err(Error::PowerButtonIrq { irq }), "{irq}");
        }
    }

    #[test]
    fn power_button_sharing_the_serial_irq_is_rejected() {
        let mut desc = example();
        desc.power_button = Some(PowerButton {
            event_port: 0x603,
            irq: 4,
        });
        assert_eq!(desc.validate(), Err(Error::PowerButtonIrqShared { irq: 4 }));
    }

    #[test]
    fn power_button_on_the_serial_irq_is_accepted_without_serial() {
        let mut desc = example();
        desc.serial = None;
        desc.power_button = Some(PowerButton {
            event_port: 0x603,
            irq: 4,
        });
        assert_eq!(desc.validate(), Ok(()));
    }

    #[test]
    fn acpi_hotplug_example_is_valid() {
        assert_eq!(example_acpi_hotplug().validate(), Ok(()));
    }

    #[test]
    fn acpi_hotplug_without_ged_is_rejected() {
        let mut desc = example_acpi_hotplug();
        desc.power_button = None;
        assert_eq!(desc.validate(), Err(Error::PciHotplugWithoutGed));
    }

    #[test]
    fn acpi_hotplug_with_too_many_ports_is_rejected() {
        let mut desc = example_acpi_hotplug();
        desc.pci.root_ports = (0..129u16)
            .map(|i| RootPort {
                device: (i / 8) as u8,
                function: (i % 8) as u8,
                slot_number: i + 1,
                intx_gsi: None,
            })
            .collect();
        assert_eq!(
            desc.validate(),
            Err(Error::TooManyHotplugSlots { ports: 129 })
        );
    }

    #[test]
    fn acpi_hotplug_registers_wrapping_the_io_space_are_rejected() {
        let mut desc = example_acpi_hotplug();
        desc.pci_hotplug = Some(PciHotplug { port: 0xffc0 });
        assert_eq!(
            desc.validate(),
            Err(Error::PciHotplugPortWraps { port: 0xffc0 })
        );
    }
}
