use super::*;
use crate::description::tests::{example, example_acpi_hotplug};
use crate::dsdt::build;
use crate::tests::contains;

fn bytes(aml: &RawAml) -> Vec<u8> {
    let mut v = Vec::new();
    acpi_tables::Aml::to_aml_bytes(aml, &mut v);
    v
}

fn port(device: u8, slot_number: u16) -> RootPort {
    RootPort {
        device,
        function: 0,
        slot_number,
        intx_gsi: None,
    }
}

#[test]
fn slot_has_adr_zero_sun_sta_ej0_and_ost() {
    let slot = bytes(&slot_device(0, &port(1, 7)));
    // Device (SLOT)
    assert_eq!(slot[0..2], [0x5b, 0x82]);
    assert!(contains(&slot, b"SLOT"));
    // Name (_ADR, Zero)
    assert!(contains(&slot, &[0x08, b'_', b'A', b'D', b'R', 0x00]));
    // Name (_SUN, 7)
    assert!(contains(&slot, &[0x08, b'_', b'S', b'U', b'N', 0x0a, 7]));
    // Method (_STA, 0, NotSerialized)
    //     { If ((\_SB.PCI0.PP00 & One) != Zero) { Return (0x0F) } Return (Zero) }
    let mut sta = vec![
        b'_', b'S', b'T', b'A', 0x00, // flags: 0 args, not serialized
        0xa0, 0x19, 0x92, 0x93, 0x7b, b'\\', 0x2f, 0x03, // If (!(And (\ three segments
    ];
    sta.extend_from_slice(b"_SB_PCI0PP00");
    sta.extend_from_slice(&[
        0x01, 0x00, 0x00, // One, no target) == Zero))
        0xa4, 0x0a, 0x0f, // Return (0x0F)
        0xa4, 0x00, // Return (Zero)
    ]);
    assert!(contains(&slot, &sta));
    // Method (_EJ0, 1) { \_SB.PCI0.PCEJ = Zero }
    let mut ej0 = vec![b'_', b'E', b'J', b'0', 0x01, 0x70, 0x00, b'\\', 0x2f, 0x03];
    ej0.extend_from_slice(b"_SB_PCI0PCEJ");
    assert!(contains(&slot, &ej0));
    // Method (_OST, 3)
    assert!(contains(&slot, &[b'_', b'O', b'S', b'T', 0x03]));
}

#[test]
fn slot_index_selects_the_presence_dword_bit_and_eject_value() {
    let slot = bytes(&slot_device(37, &port(5, 38)));
    // (\_SB.PCI0.PP01 & 0x20) for slot 37 = bit 5 of dword 1.
    assert!(contains(&slot, b"_SB_PCI0PP01\x0a\x20\x00"));
    // \_SB.PCI0.PCEJ = 37
    assert!(contains(&slot, b"\x70\x0a\x25\\\x2f\x03_SB_PCI0PCEJ"));
    // _OST puts the slot index at bit 16: Or (..., 37 << 16).
    assert!(contains(&slot, &[0x0c, 0x00, 0x00, 37, 0x00]));
}

#[test]
fn registers_are_a_system_io_region_of_dword_fields() {
    let (region, field) = registers(&PciHotplug { port: 0x620 });
    // OperationRegion (PCST, SystemIO, 0x0620, 0x48)
    assert_eq!(
        bytes(&region),
        [0x5b, 0x80, b'P', b'C', b'S', b'T', 0x01, 0x0b, 0x20, 0x06, 0x0a, 0x48]
    );
    let field = bytes(&field);
    // DWordAcc, NoLock, WriteAsZeros; PU00 is the first 32-bit field.
    assert!(contains(
        &field,
        &[b'P', b'C', b'S', b'T', 0x43, b'P', b'U', b'0', b'0', 0x20]
    ));
    for name in [b"PD03", b"PB00", b"PP02", b"PCEJ", b"POST"] {
        assert!(contains(&field, name), "{}", String::from_utf8_lossy(name));
    }
}

#[test]
fn pcnt_notifies_bus_check_the_port_device_check_and_eject_request_the_slot() {
    let ports = [port(1, 1), port(2, 2)];
    let pcnt = bytes(&pcnt_method(&ports, &["PCI0"; 2]));
    // Local0 = PB00; If (Local0 & 2) { Notify (\_SB.PCI0.RP10, Zero) }
    assert!(contains(&pcnt, &[0x70, b'P', b'B', b'0', b'0', 0x60]));
    let mut bus_check = vec![0x7b, 0x60, 0x0a, 0x02, 0x00, 0x86, b'\\', 0x2f, 0x03];
    bus_check.extend_from_slice(b"_SB_PCI0RP10");
    bus_check.push(0x00);
    assert!(contains(&pcnt, &bus_check));
    // Device Check on slot 0: Notify (\_SB.PCI0.RP08.SLOT, One)
    let mut device_check = vec![0x7b, 0x60, 0x01, 0x00, 0x86, b'\\', 0x2f, 0x04];
    device_check.extend_from_slice(b"_SB_PCI0RP08SLOT");
    device_check.push(0x01);
    assert!(contains(&pcnt, &device_check));
    // Eject Request on slot 1: Notify (\_SB.PCI0.RP10.SLOT, 3)
    let mut eject = vec![0x86, b'\\', 0x2f, 0x04];
    eject.extend_from_slice(b"_SB_PCI0RP10SLOT");
    eject.extend_from_slice(&[0x0a, 0x03]);
    assert!(contains(&pcnt, &eject));
    // Bus Checks are read before Device Checks, and those before Eject Requests.
    let pos = |needle: &[u8]| pcnt.windows(needle.len()).position(|w| w == needle);
    assert!(pos(b"PB00") < pos(b"PU00"));
    assert!(pos(b"PU00") < pos(b"PD00"));
    // Two ports: only dword 0 of each bitmap is read.
    assert!(!contains(&pcnt, b"PU01"));
}

#[test]
fn pcnt_notifies_a_slot_under_the_host_bridge_of_its_port() {
    let ports = [port(1, 1), port(2, 2)];
    let pcnt = bytes(&pcnt_method(&ports, &["PCI0", "PX01"]));
    assert!(contains(&pcnt, b"_SB_PCI0RP08SLOT"));
    assert!(contains(&pcnt, b"_SB_PX01RP10SLOT"));
    assert!(!contains(&pcnt, b"_SB_PCI0RP10"));
}

#[test]
fn pcnt_reads_one_dword_per_32_ports() {
    let ports: Vec<RootPort> = (0..40u16)
        .map(|i| RootPort {
            device: (i / 8) as u8,
            function: (i % 8) as u8,
            slot_number: i + 1,
            intx_gsi: None,
        })
        .collect();
    let pcnt = bytes(&pcnt_method(&ports, &["PCI0"; 40]));
    assert!(contains(&pcnt, b"PU01"));
    assert!(!contains(&pcnt, b"PU02"));
}

#[test]
fn acpi_hotplug_dsdt_has_slots_registers_and_ged_calls_pcnt() {
    let dsdt = build(&example_acpi_hotplug());
    assert!(contains(&dsdt, b"PCST"));
    assert!(contains(&dsdt, b"PCNT"));
    assert!(contains(&dsdt, b"SLOT"));
    assert!(contains(&dsdt, b"_EJ0"));
    // _EVT: If ((Local0 & 2) == 2) { \_SB.PCI0.PCNT () }
    let mut call = vec![0xa0, 0x18, 0x93, 0x7b, 0x60, 0x0a, 0x02, 0x00, 0x0a, 0x02];
    call.extend_from_slice(&[b'\\', 0x2f, 0x03]);
    call.extend_from_slice(b"_SB_PCI0PCNT");
    assert!(contains(&dsdt, &call));
}

#[test]
fn acpi_hotplug_osc_keeps_native_hotplug_from_the_os() {
    let dsdt = build(&example_acpi_hotplug());
    // If (Arg2 >= 3) { CreateDWordField (Arg3, 8, CDW3); CDW3 &= 0xFFFFFFFC }
    let mask = [
        0x8a, 0x6b, 0x0a, 0x08, b'C', b'D', b'W', b'3', // CreateDWordField (Arg3, 8, CDW3)
        0x7b, b'C', b'D', b'W', b'3', 0x0c, 0xfc, 0xff, 0xff, 0xff, b'C', b'D', b'W', b'3',
    ];
    assert!(contains(&dsdt, &mask));
}

#[test]
fn native_dsdt_has_no_acpi_hotplug() {
    let dsdt = build(&example());
    for name in [b"PCST", b"PCNT", b"SLOT", b"_EJ0", b"CDW3"] {
        assert!(!contains(&dsdt, name), "{}", String::from_utf8_lossy(name));
    }
}
