//! DSDT (Differentiated System Description Table): the AML namespace of the machine.
//!
//! ```text
//! \_SB.PCI0        PCIe host bridge: ids, _SEG/_BBN, _CRS windows, _OSC granting native
//!                  control (PCIe hot-plug above all) to the OS
//! \_SB.PCI0.RPxx   one device per root port (xx = devfn in hex) with _ADR, and _PXM (its
//!                  proximity domain) when the machine has a NUMA topology (no _SUN: the slot is
//!                  the port's downstream one, named by pciehp from Slot Capabilities; a _SUN here
//!                  would make Linux's pci_slot claim the name for the port itself) and, when the
//!                  port has an INTx GSI, a _PRT routing INTA..INTD of device 0 behind it to it.
//!                  With ACPI hotplug (`--hotplug acpi`): `_OSC` keeps native hot-plug from the
//!                  OS, each port has an ejectable `SLOT` device below it, and PCI0 has the
//!                  hotplug registers and `PCNT` (see `dsdt_hotplug`)
//! \_SB.PXnn        with root ports split over NUMA nodes: one host bridge per node
//!                  (PCI0 for the first), each with its bus range, its ports' windows and _PXM
//! \_SB.MRES        PNP0C02 motherboard resources reserving the ECAM region
//! \_SB.COM1        PNP0501 16550 UART, when the machine has one
//! \_SB.PWRB        PNP0C0C control-method power button, when the machine has one
//! \_SB.GED0        ACPI0013 Generic Event Device signalling the power button: an edge-triggered
//!                  ISA interrupt, an 8-bit read-to-clear event register, `_EVT` notifying PWRB
//!                  (bit 0) and, with ACPI hotplug, calling `\_SB.PCI0.PCNT` (bit 1)
//! \_S5             soft-off sleep type
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Else, Equal,
    Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, GreaterEqual, If,
    Interrupt, Local, Memory32Fixed, Method, MethodCall, Name, NotEqual, Notify, OpRegion,
    OpRegionSpace, Or, Package, Path, ResourceTemplate, Return, Scope, Store, Uuid, IO, ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use crate::description::{
    MachineDescription, MmioWindow, Numa, PciHostBridge, PciHotplug, PowerButton, RootPort,
    SerialPort, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON,
};
use crate::dsdt_hotplug;
use crate::{oem_table_id, OEM_ID, OEM_REVISION};

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Size of the common table header.
const HEADER_LEN: u32 = 36;

/// UUID of the PCI host bridge `_OSC` (PCI Firmware Specification 3.3, section 4.5).
pub(crate) const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// The only `_OSC` revision of the PCI host bridge UUID.
const OSC_REVISION: u8 = 1;
/// `_OSC` CDW1 error bit: unrecognised UUID.
pub(crate) const OSC_UNRECOGNISED_UUID: u8 = 1 << 2;
/// `_OSC` CDW1 error bit: unrecognised revision.
pub(crate) const OSC_UNRECOGNISED_REVISION: u8 = 1 << 3;

/// The PCI configuration mechanism #1 ports (0xCF8 address, 0xCFC data).
const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Number of PCI configuration mechanism #1 ports.
const PCI_CONFIG_IO_LEN: u8 = 8;

/// AML already serialised to bytes, so that children can be built in loops without keeping
/// every borrowed builder alive.
pub(crate) struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Serialises one AML object.
pub(crate) fn serialise(aml: &dyn Aml) -> RawAml {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// `_OSC` CDW3 control bits kept from the OS with ACPI hotplug: PCI Express native hot-plug
/// (bit 0) and SHPC native hot-plug (bit 1).
const OSC_NATIVE_HOTPLUG_CONTROLS: u32 = 0b11;

/// `_OSC` of the host bridge: grants every control the OS requests for the PCI host bridge
/// UUID (Arg3 is returned with CDW3 untouched, so the OS gets native PCIe hot-plug, PME, AER,
/// ... whatever it asks for) — except, with ACPI hotplug (`native_hotplug` false), the native
/// hot-plug controls, which the firmware keeps (CDW3 &= ~3) — flags an unknown revision, and
/// flags any other UUID as unrecognised.
fn osc_method(native_hotplug: bool) -> RawAml {
    let cdw1 = Path::new("CDW1");
    let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &ZERO);
    let cdw3 = Path::new("CDW3");
    let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);
    let keep_mask = !OSC_NATIVE_HOTPLUG_CONTROLS;
    let mask_hotplug = And::new(&cdw3, &cdw3, &keep_mask);
    let has_cdw3 = GreaterEqual::new(&Arg(2), &3u8);
    let if_has_cdw3 = If::new(&has_cdw3, vec![&create_cdw3, &mask_hotplug]);

    let pci_uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci_uuid = Equal::new(&Arg(0), &pci_uuid);
    let unknown_revision = NotEqual::new(&Arg(1), &OSC_REVISION);
    let set_revision_error = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNISED_REVISION);
    let check_revision = If::new(&unknown_revision, vec![&set_revision_error]);
    let mut pci_body: Vec<&dyn Aml> = vec![&check_revision];
    if !native_hotplug {
        pci_body.push(&if_has_cdw3);
    }
    let if_pci_uuid = If::new(&is_pci_uuid, pci_body);
    let set_uuid_error = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNISED_UUID);
    let else_other_uuid = Else::new(vec![&set_uuid_error]);
    let return_arg3 = Return::new(&Arg(3));

    // Serialized: CreateDWordField creates a named object in the method's scope.
    serialise(&Method::new(
        "_OSC".into(),
        4,
        true,
        vec![&create_cdw1, &if_pci_uuid, &else_other_uuid, &return_arg3],
    ))
}

/// The ACPI name of a root port: "RP" and its devfn in hex.
pub(crate) fn root_port_name(port: &RootPort) -> String {
    let devfn = (u16::from(port.device) << 3) | u16::from(port.function);
    format!("RP{devfn:02X}")
}

/// `_PRT` address field: device 0, any function.
const PRT_DEVICE_0: u32 = 0xffff;

/// A root port under its host bridge, in proximity domain `pxm` if the machine has NUMA, with
/// its `_PRT` when it has an INTx GSI and, with ACPI hotplug, the ejectable slot below it
/// (`index` is the port's bit in the hotplug registers).
fn root_port(index: usize, port: &RootPort, pxm: Option<u32>, acpi_hotplug: bool) -> RawAml {
    let address = (u32::from(port.device) << 16) | u32::from(port.function);
    let adr = Name::new("_ADR".into(), &address);
    let pxm = pxm.map(|domain| Name::new("_PXM".into(), &domain));
    // Package { address, pin (0 = INTA), source (0: a GSI, level-triggered, active-low), GSI }.
    let pins: [u8; 4] = [0, 1, 2, 3];
    let gsi = port.intx_gsi.unwrap_or_default();
    let entries: Vec<Package> = match port.intx_gsi {
        Some(_) => pins
            .iter()
            .map(|pin| Package::new(vec![&PRT_DEVICE_0, pin, &ZERO, &gsi]))
            .collect(),
        None => Vec::new(),
    };
    let entries: Vec<&dyn Aml> = entries.iter().map(|e| e as &dyn Aml).collect();
    let prt = port
        .intx_gsi
        .map(|_| Name::new("_PRT".into(), &Package::new(entries)));
    let slot = acpi_hotplug.then(|| dsdt_hotplug::slot_device(index, port));
    let mut children: Vec<&dyn Aml> = vec![&adr];
    if let Some(pxm) = &pxm {
        children.push(pxm);
    }
    if let Some(prt) = &prt {
        children.push(prt);
    }
    if let Some(slot) = &slot {
        children.push(slot);
    }
    serialise(&Device::new(Path::new(&root_port_name(port)), children))
}

/// `\_SB.PCI0`, the PCIe host bridge with its root ports (and, with ACPI hotplug, the hotplug
/// registers, `PCNT` and a slot below each port).
fn pci_host_bridge(
    pci: &PciHostBridge,
    numa: Option<&Numa>,
    hotplug: Option<&PciHotplug>,
) -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &ZERO);
    let seg = Name::new("_SEG".into(), &pci.segment);
    let uid = Name::new("_UID".into(), &ZERO);
    let bbn = Name::new("_BBN".into(), &pci.bus_start);

    let buses = AddressSpace::new_bus_number(u16::from(pci.bus_start), u16::from(pci.bus_end));
    let config_ports = IO::new(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, PCI_CONFIG_IO_LEN);
    // The description was validated: the window is non-empty and lies below 4 GiB.
    let mmio32_base = u32::try_from(pci.mmio32.base).expect("validated mmio32 window");
    let mmio32_last = pci
        .mmio32
        .last()
        .and_then(|last| u32::try_from(last).ok())
        .expect("validated mmio32 window");
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_base,
        mmio32_last,
        None,
    );
    // The description was validated: the window is non-empty and does not wrap.
    let mmio64_last = pci.mmio64.last().expect("validated mmio64 window");
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::PreFetchable,
        true,
        pci.mmio64.base,
        mmio64_last,
        None,
    );
    // The description was validated: the I/O window is non-empty and ends at 0xffff at most.
    let io = pci
        .io
        .and_then(|w| Some(AddressSpace::new_io(w.base, w.last()?, None)));
    let mut resources: Vec<&dyn Aml> = vec![&buses, &config_ports];
    if let Some(io) = &io {
        resources.push(io);
    }
    resources.extend([&mmio32 as &dyn Aml, &mmio64]);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));

    let osc = osc_method(hotplug.is_none());
    let ports: Vec<RawAml> = pci
        .root_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let pxm = numa.and_then(|n| n.root_port_domains.get(i).copied());
            root_port(i, port, pxm, hotplug.is_some())
        })
        .collect();
    let bridges = vec!["PCI0"; pci.root_ports.len()];
    let hotplug_aml = hotplug.map(|h| hotplug_objects(h, &pci.root_ports, &bridges));

    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &osc];
    if let Some(objects) = &hotplug_aml {
        children.extend(objects.iter().map(|o| o as &dyn Aml));
    }
    children.extend(ports.iter().map(|port| port as &dyn Aml));
    serialise(&Device::new("PCI0".into(), children))
}

/// A memory window produced by a host bridge: 32-bit non-prefetchable below 4 GiB, 64-bit
/// prefetchable above.
fn window_descriptor(window: &MmioWindow) -> RawAml {
    // Validated: non-empty, not wrapping.
    let last = window.last().expect("validated window");
    match (u32::try_from(window.base), u32::try_from(last)) {
        (Ok(base), Ok(last)) => serialise(&AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            base,
            last,
            None,
        )),
        _ => serialise(&AddressSpace::new_memory(
            AddressSpaceCacheable::PreFetchable,
            true,
            window.base,
            last,
            None,
        )),
    }
}

/// The host bridges of a machine whose root ports are split over NUMA nodes: `\_SB.PCI0` (with
/// the configuration ports) and `\_SB.PXnn` for each further bridge, each with its bus range,
/// its ports' windows, its `_PXM` and its root ports. Linux gives a PCI device the node of its
/// host bridge, so this is what puts a device on a node.
/// The ACPI hotplug objects of `PCI0`: the register region, its fields and `PCNT`, which
/// notifies each port's slot under its host bridge (`bridges[i]` holds root port `i`).
fn hotplug_objects(hotplug: &PciHotplug, ports: &[RootPort], bridges: &[&str]) -> [RawAml; 3] {
    let (region, field) = dsdt_hotplug::registers(hotplug);
    [region, field, dsdt_hotplug::pcnt_method(ports, bridges)]
}

fn numa_host_bridges(
    pci: &PciHostBridge,
    numa: &Numa,
    hotplug: Option<&PciHotplug>,
) -> Vec<RawAml> {
    let names: Vec<String> = (0..numa.bridges.len())
        .map(|g| {
            if g == 0 {
                "PCI0".to_owned()
            } else {
                format!("PX{g:02X}")
            }
        })
        .collect();
    let mut port_bridges = vec!["PCI0"; pci.root_ports.len()];
    for (bridge, name) in numa.bridges.iter().zip(&names) {
        for &i in &bridge.ports {
            if let Some(slot) = port_bridges.get_mut(i) {
                *slot = name.as_str();
            }
        }
    }
    numa.bridges
        .iter()
        .enumerate()
        .map(|(g, bridge)| {
            let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
            let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
            let adr = Name::new("_ADR".into(), &ZERO);
            let seg = Name::new("_SEG".into(), &pci.segment);
            let uid = Name::new("_UID".into(), &(g as u32));
            let bbn = Name::new("_BBN".into(), &bridge.bus_start);
            let pxm = Name::new("_PXM".into(), &bridge.domain);
            let buses = AddressSpace::new_bus_number(
                u16::from(bridge.bus_start),
                u16::from(bridge.bus_end),
            );
            let config_ports =
                IO::new(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, PCI_CONFIG_IO_LEN);
            let windows: Vec<RawAml> = bridge.windows.iter().map(window_descriptor).collect();
            // Validated: every I/O window is non-empty and ends at port 0xffff at most.
            let io_windows: Vec<AddressSpace<u16>> = bridge
                .io_windows
                .iter()
                .filter_map(|w| Some(AddressSpace::new_io(w.base, w.last()?, None)))
                .collect();
            let mut resources: Vec<&dyn Aml> = vec![&buses];
            if g == 0 {
                resources.push(&config_ports);
            }
            resources.extend(io_windows.iter().map(|w| w as &dyn Aml));
            resources.extend(windows.iter().map(|w| w as &dyn Aml));
            let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
            let osc = osc_method(hotplug.is_none());
            let ports: Vec<RawAml> = bridge
                .ports
                .iter()
                .filter_map(|&i| {
                    let port = pci.root_ports.get(i)?;
                    let pxm = numa.root_port_domains.get(i).copied();
                    Some(root_port(i, port, pxm, hotplug.is_some()))
                })
                .collect();
            // The hotplug registers and PCNT live in PCI0, the first bridge.
            let hotplug_aml = hotplug
                .filter(|_| g == 0)
                .map(|h| hotplug_objects(h, &pci.root_ports, &port_bridges));
            let mut children: Vec<&dyn Aml> =
                vec![&hid, &cid, &adr, &seg, &uid, &bbn, &pxm, &crs, &osc];
            if let Some(objects) = &hotplug_aml {
                children.extend(objects.iter().map(|o| o as &dyn Aml));
            }
            children.extend(ports.iter().map(|port| port as &dyn Aml));
            serialise(&Device::new(Path::new(&names[g]), children))
        })
        .collect()
}

/// A QWordMemory resource descriptor consumed (not produced) by its device, non-cacheable and
/// read-write, with fixed minimum and maximum. `acpi_tables` only builds producer descriptors,
/// which Linux ignores in motherboard-resource devices.
struct QWordMemoryConsumer {
    base: u64,
    size: u64,
}

impl Aml for QWordMemoryConsumer {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        /// Large resource item: QWord address space descriptor.
        const QWORD_ADDRESS_SPACE: u8 = 0x8a;
        /// Length of the descriptor after its 3-byte header.
        const LEN: u16 = 43;
        /// Resource type: memory range.
        const MEMORY_RANGE: u8 = 0;
        /// General flags: consumer, positive decode, minimum and maximum fixed.
        const CONSUMER_MIN_MAX_FIXED: u8 = 1 | (1 << 2) | (1 << 3);
        /// Type-specific flags: read-write, non-cacheable.
        const READ_WRITE_NON_CACHEABLE: u8 = 1;

        sink.byte(QWORD_ADDRESS_SPACE);
        sink.word(LEN);
        sink.byte(MEMORY_RANGE);
        sink.byte(CONSUMER_MIN_MAX_FIXED);
        sink.byte(READ_WRITE_NON_CACHEABLE);
        sink.qword(0); // Granularity.
        sink.qword(self.base);
        sink.qword(self.base + (self.size - 1));
        sink.qword(0); // Translation offset.
        sink.qword(self.size);
    }
}

/// `\_SB.MRES`, motherboard resources reserving the ECAM region of the bus range: Linux uses
/// ECAM only if the MCFG region is reserved by a PNP0C01/PNP0C02 device.
fn motherboard_resources(pci: &PciHostBridge) -> RawAml {
    // The description was validated: the ECAM region exists.
    let (ecam_base, ecam_size) = pci.ecam_region().expect("validated ECAM region");
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let below_4g = (
        u32::try_from(ecam_base),
        u32::try_from(ecam_size),
        ecam_base.checked_add(ecam_size),
    );
    let crs = match below_4g {
        (Ok(base), Ok(size), Some(end)) if end <= 1 << 32 => Name::new(
            "_CRS".into(),
            &ResourceTemplate::new(vec![&Memory32Fixed::new(true, base, size)]),
        ),
        _ => Name::new(
            "_CRS".into(),
            &ResourceTemplate::new(vec![&QWordMemoryConsumer {
                base: ecam_base,
                size: ecam_size,
            }]),
        ),
    };
    serialise(&Device::new("MRES".into(), vec![&hid, &crs]))
}

/// `\_SB.COM1`, a 16550 UART with its I/O ports and edge-triggered, active-high ISA IRQ.
fn serial_port(serial: &SerialPort) -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &ZERO);
    let ports = IO::new(serial.port, serial.port, 1, 8);
    let irq = Interrupt::new(true, true, false, false, u32::from(serial.irq));
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ports, &irq]));
    serialise(&Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// Absolute path of the power button device, which the GED notifies.
const POWER_BUTTON_PATH: &str = "\\_SB_.PWRB";
/// Device-specific notification of a power button: "the button was pressed" (ACPI 6.5,
/// table 5.187).
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// `\_SB.PWRB`, a control-method power button (ACPI 6.5, section 4.8.2.2.1.2): it has no
/// registers of its own; the GED notifies it.
fn power_button() -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &ZERO);
    serialise(&Device::new("PWRB".into(), vec![&hid, &uid]))
}

/// `\_SB.GED0`, the Generic Event Device (ACPI 6.5, section 5.6.9) of the power button:
///
/// ```text
/// Name (_HID, "ACPI0013")
/// Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq } })
/// OperationRegion (GEVR, SystemIO, event_port, 1)
/// Field (GEVR, ByteAcc, NoLock, WriteAsZeros) { GEVT, 8 }
/// Method (_EVT, 1, Serialized) {
///     Local0 = GEVT                       // one read: the register clears on read
///     If ((Local0 & 1) == 1) { Notify (\_SB.PWRB, 0x80) }
/// }
/// ```
///
/// The OS calls `_EVT` with the interrupt's GSI whenever the interrupt fires (Linux: the evged
/// driver); the power button device then reports a power key press (Linux: the button driver).
fn generic_event_device(button: &PowerButton, pci_hotplug: bool) -> RawAml {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &ZERO);
    let irq = Interrupt::new(true, true, false, false, u32::from(button.irq));
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
    let region = OpRegion::new(
        "GEVR".into(),
        OpRegionSpace::SystemIO,
        &button.event_port,
        &ONE,
    );
    let field = Field::new(
        "GEVR".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GEVT", 8)],
    );

    let events = Local(0);
    let register = Path::new("GEVT");
    let read_events = Store::new(&events, &register);
    let button_bit = And::new(&ZERO, &events, &GED_EVENT_POWER_BUTTON);
    let pressed = Equal::new(&button_bit, &GED_EVENT_POWER_BUTTON);
    let button_path = Path::new(POWER_BUTTON_PATH);
    let notify = Notify::new(&button_path, &NOTIFY_BUTTON_PRESSED);
    let if_pressed = If::new(&pressed, vec![&notify]);
    let hotplug_bit = And::new(&ZERO, &events, &GED_EVENT_PCI_HOTPLUG);
    let hotplug = Equal::new(&hotplug_bit, &GED_EVENT_PCI_HOTPLUG);
    let call_pcnt = MethodCall::new(Path::new(dsdt_hotplug::PCNT_PATH), vec![]);
    let if_hotplug = If::new(&hotplug, vec![&call_pcnt]);
    let mut body: Vec<&dyn Aml> = vec![&read_events, &if_pressed];
    if pci_hotplug {
        body.push(&if_hotplug);
    }
    let evt = Method::new("_EVT".into(), 1, true, body);

    serialise(&Device::new(
        "GED0".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

/// `\_S5`: SLP_TYPa and SLP_TYPb for soft off.
fn s5(sleep_type: u8) -> RawAml {
    serialise(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&sleep_type, &sleep_type, &ZERO, &ZERO]),
    ))
}

/// Builds the DSDT of a validated description.
pub(crate) fn build(desc: &MachineDescription) -> Vec<u8> {
    let hotplug = desc.pci_hotplug.as_ref();
    let bridges = match &desc.numa {
        Some(numa) if !numa.bridges.is_empty() => numa_host_bridges(&desc.pci, numa, hotplug),
        numa => vec![pci_host_bridge(&desc.pci, numa.as_ref(), hotplug)],
    };
    let mres = motherboard_resources(&desc.pci);
    let com1 = desc.serial.as_ref().map(serial_port);
    let button = desc
        .power_button
        .as_ref()
        .map(|b| (power_button(), generic_event_device(b, hotplug.is_some())));
    let mut devices: Vec<&dyn Aml> = bridges.iter().map(|b| b as &dyn Aml).collect();
    devices.push(&mres);
    if let Some(com1) = &com1 {
        devices.push(com1);
    }
    if let Some((pwrb, ged)) = &button {
        devices.push(pwrb);
        devices.push(ged);
    }

    let mut aml = Vec::new();
    Scope::new("\\_SB_".into(), devices).to_aml_bytes(&mut aml);
    s5(desc.pm.s5_sleep_type).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::tests::example;
    use crate::description::MmioWindow;
    use crate::tests::{contains, read_u32, sum};

    /// NameOp followed by a 4-character name.
    fn name(n: &[u8; 4]) -> Vec<u8> {
        let mut v = vec![0x08];
        v.extend_from_slice(n);
        v
    }

    /// `Name(n, EISAID(..))` with the EISA id already compressed to its 4 bytes.
    fn eisa_name(n: &[u8; 4], id: [u8; 4]) -> Vec<u8> {
        let mut v = name(n);
        v.push(0x0c); // DWordPrefix
        v.extend_from_slice(&id);
        v
    }

    const PNP0A08: [u8; 4] = [0x41, 0xd0, 0x0a, 0x08];
    const PNP0A03: [u8; 4] = [0x41, 0xd0, 0x0a, 0x03];
    const PNP0C02: [u8; 4] = [0x41, 0xd0, 0x0c, 0x02];
    const PNP0501: [u8; 4] = [0x41, 0xd0, 0x05, 0x01];

    #[test]
    fn dsdt_has_revision_2_valid_length_and_checksum() {
        let dsdt = build(&example());
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        assert_eq!(read_u32(&dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(&dsdt), 0);
    }

    #[test]
    fn host_bridge_is_pcie_with_pci_compatible_id() {
        let dsdt = build(&example());
        assert!(contains(&dsdt, b"PCI0"));
        assert!(contains(&dsdt, &eisa_name(b"_HID", PNP0A08)));
        assert!(contains(&dsdt, &eisa_name(b"_CID", PNP0A03)));
    }

    #[test]
    fn host_bridge_has_segment_and_base_bus() {
        let mut desc = example();
        desc.pci.segment = 2;
        desc.pci.bus_start = 0x40;
        let dsdt = build(&desc);
        assert!(contains(&dsdt, &[name(b"_SEG"), vec![0x0a, 2]].concat()));
        assert!(contains(&dsdt, &[name(b"_BBN"), vec![0x0a, 0x40]].concat()));
    }

    #[test]
    fn host_bridge_crs_has_bus_range_config_ports_and_windows() {
        let mut desc = example();
        desc.pci.bus_end = 0x7f;
        let dsdt = build(&desc);
        // WordBusNumber 0..=0x7f, 0x80 buses.
        let buses = [
            0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0x7f, 0, 0, 0, 0x80, 0,
        ];
        assert!(contains(&dsdt, &buses));
        // IO (Decode16, 0xCF8, 0xCF8, 1, 8).
        assert!(contains(&dsdt, &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // DWordMemory, non-cacheable read-write, 0xC000_0000..=0xDFFF_FFFF.
        let mut mmio32 = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0];
        mmio32.extend_from_slice(&0xc000_0000u32.to_le_bytes());
        mmio32.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
        assert!(contains(&dsdt, &mmio32));
        // QWordMemory, prefetchable read-write.
        let mut mmio64 = vec![0x8a, 0x2b, 0x00, 0x00, 0x0c, 0x07];
        mmio64.extend_from_slice(&0u64.to_le_bytes());
        mmio64.extend_from_slice(&0x100_0000_0000u64.to_le_bytes());
        mmio64.extend_from_slice(&0x1ff_ffff_ffffu64.to_le_bytes());
        assert!(contains(&dsdt, &mmio64));
    }

    #[test]
    fn host_bridge_has_serialized_osc_with_pci_host_bridge_uuid() {
        let dsdt = build(&example());
        assert!(contains(&dsdt, &[b"_OSC".as_slice(), &[0x0c]].concat()));
        let uuid = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        assert!(contains(&dsdt, &uuid));
    }

    #[test]
    fn each_root_port_has_adr_and_no_sun() {
        let mut desc = example();
        desc.pci.root_ports[1].device = 0x1f;
        desc.pci.root_ports[1].function = 7;
        desc.pci.root_ports[1].slot_number = 0x1234;
        let dsdt = build(&desc);
        assert!(contains(&dsdt, b"RP08"));
        assert!(contains(
            &dsdt,
            &[name(b"_ADR"), vec![0x0c, 0, 0, 1, 0]].concat()
        ));
        assert!(contains(&dsdt, b"RPFF"));
        assert!(contains(
            &dsdt,
            &[name(b"_ADR"), vec![0x0c, 7, 0, 0x1f, 0]].concat()
        ));
        assert!(!contains(&dsdt, b"_SUN"));
    }

    #[test]
    fn root_ports_have_pxm_only_with_numa() {
        assert!(!contains(&build(&example()), b"_PXM"));
        let dsdt = build(&crate::description::tests::numa_example());
        let rp08 = dsdt.windows(4).position(|w| w == b"RP08").unwrap();
        let rp10 = dsdt.windows(4).position(|w| w == b"RP10").unwrap();
        let pxm = |domain: u32| serialise(&Name::new("_PXM".into(), &domain)).0;
        let (pxm0, pxm1) = (pxm(0), pxm(1));
        assert_ne!(pxm0, pxm1);
        assert!(contains(&dsdt[rp08..rp10], &pxm0), "port 0 in domain 0");
        assert!(contains(&dsdt[rp10..], &pxm1), "port 1 in domain 1");
    }

    /// The NUMA example with a host bridge per node: port 0 (00:01.0) on PCI0, port 1
    /// (80:01.0) on PX01.
    fn numa_two_bridges() -> MachineDescription {
        use crate::description::NumaBridge;
        let mut desc = crate::description::tests::numa_example();
        desc.pci.root_ports[1].device = 1;
        let numa = desc.numa.as_mut().unwrap();
        numa.bridges = vec![
            NumaBridge {
                domain: 0,
                bus_start: 0,
                bus_end: 0x7f,
                ports: vec![0],
                windows: vec![MmioWindow {
                    base: 0xc000_0000,
                    size: 0x100_0000,
                }],
                io_windows: vec![crate::description::IoWindow {
                    base: 0x1000,
                    size: 0x1000,
                }],
            },
            NumaBridge {
                domain: 1,
                bus_start: 0x80,
                bus_end: 0xff,
                ports: vec![1],
                windows: vec![
                    MmioWindow {
                        base: 0xc100_0000,
                        size: 0x100_0000,
                    },
                    MmioWindow {
                        base: 0x100_0000_0000,
                        size: 0x10_0000_0000,
                    },
                ],
                io_windows: vec![crate::description::IoWindow {
                    base: 0x2000,
                    size: 0x1000,
                }],
            },
        ];
        desc
    }

    #[test]
    fn a_host_bridge_per_node_with_its_buses_ports_windows_and_pxm() {
        let desc = numa_two_bridges();
        assert_eq!(desc.validate(), Ok(()));
        let dsdt = build(&desc);
        let pci0 = dsdt.windows(4).position(|w| w == b"PCI0").unwrap();
        let px01 = dsdt.windows(4).position(|w| w == b"PX01").unwrap();
        assert!(pci0 < px01);
        let (first, second) = (&dsdt[pci0..px01], &dsdt[px01..]);
        let pxm = |domain: u32| serialise(&Name::new("_PXM".into(), &domain)).0;
        assert!(contains(first, &pxm(0)) && contains(second, &pxm(1)));
        assert!(contains(first, b"RP08") && contains(second, b"RP08"));
        let bbn = serialise(&Name::new("_BBN".into(), &0x80u8)).0;
        assert!(contains(second, &bbn));
        // The second bridge forwards its 64-bit window, the first does not.
        let base64 = 0x100_0000_0000u64.to_le_bytes();
        assert!(contains(second, &base64) && !contains(first, &base64));
        // Each bridge forwards its ports' I/O windows: WordIO 0x1000-0x1fff, 0x2000-0x2fff.
        let io = |base: u16| {
            [
                0x88,
                0x0d,
                0x00,
                0x01,
                0x0c,
                0x03,
                0x00,
                0x00,
                base as u8,
                (base >> 8) as u8,
            ]
        };
        assert!(contains(first, &io(0x1000)) && !contains(first, &io(0x2000)));
        assert!(contains(second, &io(0x2000)) && !contains(second, &io(0x1000)));
        // Only PCI0 claims the configuration ports.
        let cf8 = [0x47, 0x01, 0xf8, 0x0c];
        assert!(contains(first, &cf8) && !contains(second, &cf8));
    }

    #[test]
    fn acpi_hotplug_with_a_host_bridge_per_node_notifies_each_slot_under_its_bridge() {
        let desc = MachineDescription {
            pci_hotplug: Some(crate::description::PciHotplug { port: 0x620 }),
            ..numa_two_bridges()
        };
        assert_eq!(desc.validate(), Ok(()));
        let dsdt = build(&desc);
        // PCNT in PCI0 names PX01 too: the bridge itself is the last PX01.
        let px01 = dsdt.windows(4).rposition(|w| w == b"PX01").unwrap();
        let (first, second) = (&dsdt[..px01], &dsdt[px01..]);
        // The registers and PCNT are PCI0's alone; both bridges keep native hotplug from the OS.
        assert!(contains(first, b"PCST") && !contains(second, b"PCST"));
        assert!(contains(first, b"_SB_PCI0RP08SLOT"));
        assert!(contains(first, b"_SB_PX01RP08SLOT"));
        // The second bridge's slot reads PCI0's registers by their absolute path.
        assert!(contains(second, b"SLOT") && contains(second, b"_SB_PCI0PP00"));
        assert!(contains(second, b"_SB_PCI0PCEJ"));
    }

    #[test]
    fn bad_host_bridges_are_rejected() {
        use crate::description::{Error, NumaBridge};
        let mut desc = crate::description::tests::numa_example();
        desc.numa.as_mut().unwrap().bridges = vec![NumaBridge {
            domain: 0,
            bus_start: 0,
            bus_end: 0xff,
            ports: vec![0],
            windows: Vec::new(),
            io_windows: Vec::new(),
        }];
        assert!(
            matches!(desc.validate(), Err(Error::Numa(_))),
            "port 1 in no bridge"
        );
    }

    #[test]
    fn only_a_root_port_with_an_intx_gsi_has_a_prt() {
        let dsdt = build(&example());
        let prts = dsdt.windows(4).filter(|w| *w == b"_PRT").count();
        assert_eq!(prts, 1);
        let mut desc = example();
        desc.pci.root_ports[0].intx_gsi = None;
        assert!(!contains(&build(&desc), b"_PRT"));
    }

    #[test]
    fn prt_routes_the_four_pins_of_device_0_to_the_gsi() {
        let mut desc = example();
        desc.pci.root_ports[0].intx_gsi = Some(0x17);
        let dsdt = build(&desc);
        // Name(_PRT, Package(4) { Package(4) { 0xFFFF, pin, Zero, 0x17 } x4 }).
        // Each entry: PackageOp, length, 4 elements, WordConst 0xFFFF, the pin (Zero, One,
        // BytePrefix 2, BytePrefix 3), Zero, BytePrefix 0x17.
        let pins: [&[u8]; 4] = [&[0x00], &[0x01], &[0x0a, 2], &[0x0a, 3]];
        for pin in pins {
            let body = [&[0x04, 0x0b, 0xff, 0xff][..], pin, &[0x00, 0x0a, 0x17]].concat();
            let entry = [&[0x12, body.len() as u8 + 1][..], &body].concat();
            assert!(contains(&dsdt, &entry), "entry for pin {pin:?}");
        }
    }

    #[test]
    fn host_bridge_crs_has_the_io_window() {
        // WordIO, fixed minimum and maximum, entire range: 0x1000..=0xFFFF.
        let io = [
            0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0x00, 0x10, 0xff, 0xff, 0, 0, 0x00, 0xf0,
        ];
        assert!(contains(&build(&example()), &io));
        let mut desc = example();
        desc.pci.io = None;
        assert!(!contains(&build(&desc), &io[..6]));
    }

    #[test]
    fn root_port_name_is_devfn_in_hex() {
        let port = RootPort {
            device: 3,
            function: 2,
            slot_number: 0,
            intx_gsi: None,
        };
        assert_eq!(root_port_name(&port), "RP1A");
    }

    #[test]
    fn motherboard_resources_reserve_ecam_below_4g() {
        let dsdt = build(&example());
        assert!(contains(&dsdt, &eisa_name(b"_HID", PNP0C02)));
        let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
        fixed.extend_from_slice(&0xe000_0000u32.to_le_bytes());
        fixed.extend_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(contains(&dsdt, &fixed));
    }

    #[test]
    fn motherboard_resources_reserve_only_the_bus_range() {
        let mut desc = example();
        desc.pci.bus_start = 0x10;
        desc.pci.bus_end = 0x1f;
        let dsdt = build(&desc);
        let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
        fixed.extend_from_slice(&0xe100_0000u32.to_le_bytes());
        fixed.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        assert!(contains(&dsdt, &fixed));
    }

    #[test]
    fn motherboard_resources_reserve_ecam_above_4g_as_consumer() {
        let mut desc = example();
        desc.pci.ecam_base = 0x8_0000_0000;
        desc.pci.mmio64 = MmioWindow {
            base: 0x100_0000_0000,
            size: 0x1000_0000,
        };
        let dsdt = build(&desc);
        let mut qword = vec![0x8a, 0x2b, 0x00, 0x00, 0x0d, 0x01];
        qword.extend_from_slice(&0u64.to_le_bytes());
        qword.extend_from_slice(&0x8_0000_0000u64.to_le_bytes());
        qword.extend_from_slice(&0x8_0fff_ffffu64.to_le_bytes());
        qword.extend_from_slice(&0u64.to_le_bytes());
        qword.extend_from_slice(&0x1000_0000u64.to_le_bytes());
        assert!(contains(&dsdt, &qword));
    }

    #[test]
    fn serial_port_is_described_with_io_and_irq() {
        let dsdt = build(&example());
        assert!(contains(&dsdt, b"COM1"));
        assert!(contains(&dsdt, &eisa_name(b"_HID", PNP0501)));
        assert!(contains(&dsdt, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        // Extended interrupt: consumer, edge, active high, exclusive, GSI 4.
        assert!(contains(&dsdt, &[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0]));
    }

    #[test]
    fn serial_port_is_absent_without_serial() {
        let mut desc = example();
        desc.serial = None;
        let dsdt = build(&desc);
        assert!(!contains(&dsdt, b"COM1"));
        assert!(!contains(&dsdt, &PNP0501));
    }

    #[test]
    fn s5_package_holds_the_sleep_type() {
        let dsdt = build(&example());
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
        ];
        assert!(contains(&dsdt, &s5));
    }

    const PNP0C0C: [u8; 4] = [0x41, 0xd0, 0x0c, 0x0c];

    #[test]
    fn power_button_is_a_control_method_button_device() {
        let dsdt = build(&example());
        assert!(contains(
            &dsdt,
            &[b"PWRB".as_slice(), &eisa_name(b"_HID", PNP0C0C)].concat()
        ));
    }

    #[test]
    fn ged_has_its_hid_and_an_edge_triggered_interrupt_on_its_irq() {
        let dsdt = build(&example());
        assert!(contains(
            &dsdt,
            &[name(b"_HID"), vec![0x0d], b"ACPI0013\0".to_vec()].concat()
        ));
        // Extended interrupt: consumer, edge, active high, exclusive, GSI 5.
        assert!(contains(&dsdt, &[0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0]));
    }

    #[test]
    fn ged_event_register_is_one_byte_of_system_io_at_the_event_port() {
        let dsdt = build(&example());
        // OperationRegion (GEVR, SystemIO, 0x0603, One).
        assert!(contains(
            &dsdt,
            &[0x5b, 0x80, b'G', b'E', b'V', b'R', 0x01, 0x0b, 0x03, 0x06, 0x01]
        ));
        // Field (GEVR, ByteAcc, NoLock, WriteAsZeros) { GEVT, 8 }.
        assert!(contains(
            &dsdt,
            &[0x5b, 0x81, 0x0b, b'G', b'E', b'V', b'R', 0x41, b'G', b'E', b'V', b'T', 8]
        ));
    }

    #[test]
    fn ged_evt_reads_the_register_once_and_notifies_the_power_button() {
        let dsdt = build(&example());
        let evt = [
            0x14, 0x21, b'_', b'E', b'V', b'T', 0x09, // Method (_EVT, 1, Serialized)
            0x70, b'G', b'E', b'V', b'T', 0x60, // Local0 = GEVT
            0xa0, 0x14, 0x93, 0x7b, 0x60, 0x01, 0x00, 0x01, // If ((Local0 & 1) == 1)
            0x86, 0x5c, 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a,
            0x80, // Notify (\_SB.PWRB, 0x80)
        ];
        assert!(contains(&dsdt, &evt));
    }

    #[test]
    fn power_button_and_ged_are_absent_without_a_power_button() {
        let mut desc = example();
        desc.power_button = None;
        let dsdt = build(&desc);
        assert!(!contains(&dsdt, b"PWRB"));
        assert!(!contains(&dsdt, b"GED0"));
        assert!(!contains(&dsdt, b"ACPI0013"));
    }
}
