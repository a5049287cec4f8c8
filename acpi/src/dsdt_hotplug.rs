//! The DSDT's part of ACPI PCI hotplug (`--hotplug acpi`):
//!
//! ```text
//! \_SB.PCI0.PCST       OperationRegion (SystemIO) of the hotplug registers
//!                      Field { PU00..PU03 (Device Check, read-to-clear), PD00..PD03 (Eject
//!                      Request, read-to-clear), PB00..PB03 (Bus Check, read-to-clear),
//!                      PP00..PP03 (presence), PCEJ (_EJ0 writes the slot index), POST (_OST) }
//! \_SB.PCI0.PCNT       reads each notification dword once and notifies: Bus Check (0) the root
//!                      port of a slot whose device left without the OS's consent, Device Check
//!                      (1) a slot with a new device, Eject Request (3) a slot whose device the
//!                      VMM asks for
//! \_SB.PCI0.RPxx.SLOT  the slot below each root port (device 0 of its secondary bus): _ADR 0,
//!                      _SUN, _STA (0x0F with a device, 0 without), _EJ0, _OST
//! ```
//!
//! The GED's `_EVT` calls `PCNT` for its PCI hotplug event bit. Linux's `acpiphp` attaches to
//! the slots (they have `_EJ0`) once `_OSC` has kept native PCIe hotplug from it.

use acpi_tables::aml::{
    And, Arg, Device, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Local, Method, Name, NotEqual, Notify, OpRegion, OpRegionSpace, Or, Path, Return, Store, ZERO,
};

use crate::description::{PciHotplug, RootPort, PCI_HOTPLUG_REGISTERS_LEN};
use crate::dsdt::{root_port_name, serialise, RawAml};

/// Name of the slot device under each root port.
pub(crate) const SLOT_NAME: &str = "SLOT";
/// Absolute path of the notify method the GED calls.
pub(crate) const PCNT_PATH: &str = "\\_SB_.PCI0.PCNT";
/// `_STA` of a slot with a device: present, enabled, shown, functioning.
const STA_PRESENT: u8 = 0x0f;
/// Notification: Bus Check.
const NOTIFY_BUS_CHECK: u8 = 0;
/// Notification: Device Check.
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notification: Eject Request.
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// Dwords per bitmap register.
const BITMAP_DWORDS: usize = 4;

/// The field name of dword `dword` of bitmap `prefix` ("PU", "PD", "PB", "PP").
fn bitmap_field(prefix: &str, dword: usize) -> String {
    format!("{prefix}{dword:02}")
}

fn name4(name: &str) -> [u8; 4] {
    let mut out = [b'_'; 4];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b;
    }
    out
}

/// Bit of slot `index` in its bitmap dword, and that dword.
fn slot_bit(index: usize) -> (usize, u32) {
    (index / 32, 1 << (index % 32))
}

/// The register block: `PCST` and its field.
pub(crate) fn registers(hotplug: &PciHotplug) -> (RawAml, RawAml) {
    let region = serialise(&OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemIO,
        &hotplug.port,
        &PCI_HOTPLUG_REGISTERS_LEN,
    ));
    let mut fields = Vec::new();
    for prefix in ["PU", "PD", "PB", "PP"] {
        for dword in 0..BITMAP_DWORDS {
            fields.push(FieldEntry::Named(name4(&bitmap_field(prefix, dword)), 32));
        }
    }
    fields.push(FieldEntry::Named(*b"PCEJ", 32));
    fields.push(FieldEntry::Named(*b"POST", 32));
    let field = serialise(&Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        fields,
    ));
    (region, field)
}

/// Where the register fields are: `PCI0`, the first host bridge.
const REGISTERS_SCOPE: &str = "\\_SB_.PCI0";

/// The absolute path of root port `port` under host bridge `bridge`, or of its slot.
fn port_path(bridge: &str, port: &RootPort, slot: bool) -> Path {
    let base = format!("\\_SB_.{bridge}.{}", root_port_name(port));
    if slot {
        Path::new(&format!("{base}.{SLOT_NAME}"))
    } else {
        Path::new(&base)
    }
}

/// `PCNT`: one pass over each notification bitmap, Bus Checks first (a device that left must
/// be dropped before a new one in the same slot is looked for), then Device Checks, then
/// Eject Requests. `bridges[i]` names the host bridge of root port `i`.
pub(crate) fn pcnt_method(ports: &[RootPort], bridges: &[&str]) -> RawAml {
    let dwords = ports.len().div_ceil(32).min(BITMAP_DWORDS);
    let bitmap = Local(0);
    let mut body: Vec<RawAml> = Vec::new();
    for (prefix, notify, slot) in [
        ("PB", NOTIFY_BUS_CHECK, false),
        ("PU", NOTIFY_DEVICE_CHECK, true),
        ("PD", NOTIFY_EJECT_REQUEST, true),
    ] {
        for dword in 0..dwords {
            let field = Path::new(&bitmap_field(prefix, dword));
            body.push(serialise(&Store::new(&bitmap, &field)));
            for (index, port) in ports.iter().enumerate() {
                let (d, bit) = slot_bit(index);
                if d != dword {
                    continue;
                }
                let set = And::new(&ZERO, &bitmap, &bit);
                let bridge = bridges.get(index).copied().unwrap_or("PCI0");
                let target = port_path(bridge, port, slot);
                let notify = Notify::new(&target, &notify);
                body.push(serialise(&If::new(&set, vec![&notify])));
            }
        }
    }
    let children: Vec<&dyn acpi_tables::Aml> = body.iter().map(|b| b as _).collect();
    serialise(&Method::new("PCNT".into(), 0, true, children))
}

/// The ejectable slot below root port `port` (index `index` in the register bitmaps).
pub(crate) fn slot_device(index: usize, port: &RootPort) -> RawAml {
    let (dword, bit) = slot_bit(index);
    // The slot is device 0, function 0 of the port's secondary bus.
    let adr = Name::new("_ADR".into(), &ZERO);
    let sun = Name::new("_SUN".into(), &u32::from(port.slot_number));

    // Absolute paths: with a host bridge per NUMA node, the slot may be outside PCI0, where
    // the registers are.
    let presence = Path::new(&format!("{REGISTERS_SCOPE}.{}", bitmap_field("PP", dword)));
    let present_bit = And::new(&ZERO, &presence, &bit);
    let present = NotEqual::new(&present_bit, &ZERO);
    let return_present = Return::new(&STA_PRESENT);
    let if_present = If::new(&present, vec![&return_present]);
    let return_absent = Return::new(&ZERO);
    let sta = Method::new("_STA".into(), 0, false, vec![&if_present, &return_absent]);

    let slot_index = u32::try_from(index).unwrap_or(u32::MAX);
    let eject_register = Path::new(&format!("{REGISTERS_SCOPE}.PCEJ"));
    let write_eject = Store::new(&eject_register, &slot_index);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&write_eject]);

    // POST = (index << 16) | ((Arg1 & 0xff) << 8) | (Arg0 & 0xff)
    let slot_bits = slot_index << 16;
    let event = And::new(&ZERO, &Arg(0), &0xffu8);
    let status = And::new(&ZERO, &Arg(1), &0xffu8);
    let status_shifted = acpi_tables::aml::ShiftLeft::new(&ZERO, &status, &8u8);
    let low = Or::new(&ZERO, &status_shifted, &event);
    let value = Or::new(&ZERO, &low, &slot_bits);
    let ost_register = Path::new(&format!("{REGISTERS_SCOPE}.POST"));
    let write_ost = Store::new(&ost_register, &value);
    let ost = Method::new("_OST".into(), 3, false, vec![&write_ost]);

    serialise(&Device::new(
        Path::new(SLOT_NAME),
        vec![&adr, &sun, &sta, &ej0, &ost],
    ))
}

#[cfg(test)]
#[path = "dsdt_hotplug_tests.rs"]
mod tests;
