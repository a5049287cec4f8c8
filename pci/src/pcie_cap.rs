//! The PCI Express capability (version 2) of a hot-plug capable root port: layout, register
//! bits and write masks.

use crate::config::{ConfigSpace, Result};

/// Capability ID of the PCI Express capability.
pub const PCIE_CAP_ID: u8 = 0x10;
/// Length of a version 2 PCI Express capability.
pub const PCIE_CAP_LEN: usize = 0x3c;

/// PCI Express Capabilities register.
pub const FLAGS: usize = 0x02;
/// Device Capabilities.
pub const DEVCAP: usize = 0x04;
/// Device Control.
pub const DEVCTL: usize = 0x08;
/// Device Status.
pub const DEVSTA: usize = 0x0a;
/// Link Capabilities.
pub const LNKCAP: usize = 0x0c;
/// Link Control.
pub const LNKCTL: usize = 0x10;
/// Link Status.
pub const LNKSTA: usize = 0x12;
/// Slot Capabilities.
pub const SLTCAP: usize = 0x14;
/// Slot Control.
pub const SLTCTL: usize = 0x18;
/// Slot Status.
pub const SLTSTA: usize = 0x1a;
/// Root Control.
pub const RTCTL: usize = 0x1c;
/// Root Capabilities.
pub const RTCAP: usize = 0x1e;
/// Root Status.
pub const RTSTA: usize = 0x20;
/// Device Capabilities 2.
pub const DEVCAP2: usize = 0x24;
/// Device Control 2.
pub const DEVCTL2: usize = 0x28;
/// Link Capabilities 2.
pub const LNKCAP2: usize = 0x2c;
/// Link Control 2.
pub const LNKCTL2: usize = 0x30;
/// Link Status 2.
pub const LNKSTA2: usize = 0x32;
/// Slot Capabilities 2.
pub const SLTCAP2: usize = 0x34;

/// Capability version 2.
const FLAGS_VERSION_2: u16 = 0x2;
/// Device/port type: root port of a root complex.
const FLAGS_TYPE_ROOT_PORT: u16 = 0x4 << 4;
/// Slot Implemented.
pub const FLAGS_SLOT: u16 = 1 << 8;

/// Device Capabilities: Role-Based Error Reporting (max payload 128 bytes).
const DEVCAP_RBER: u32 = 1 << 15;
/// Device Control bits a root port implements: error reporting enables, relaxed ordering,
/// max payload size, no snoop, max read request size.
const DEVCTL_WRITABLE: u16 = 0x001f | 0x00e0 | 0x0800 | 0x7000;
/// Device Control reset value: relaxed ordering and no snoop enabled, 512-byte read requests.
const DEVCTL_DEFAULT: u16 = 0x0010 | 0x0800 | 0x2000;
/// Device Status error bits (RW1C).
const DEVSTA_RW1C: u16 = 0x000f;

/// Link Capabilities: Data Link Layer Link Active Reporting Capable.
pub const LNKCAP_DLLLARC: u32 = 1 << 20;
/// Link Capabilities: ASPM Optionality Compliance.
const LNKCAP_ASPM_COMPLIANCE: u32 = 1 << 22;
/// Link Control bits: ASPM control, read completion boundary, link disable, common clock,
/// extended synch, hardware autonomous width disable, bandwidth interrupt enables.
const LNKCTL_WRITABLE: u16 = 0x0003 | 0x0008 | 0x0010 | 0x0040 | 0x0080 | 0x0200 | 0x0c00;
/// Link Status: Slot Clock Configuration.
const LNKSTA_SLOT_CLOCK: u16 = 1 << 12;
/// Link Status: Data Link Layer Link Active.
pub const LNKSTA_DLLLA: u16 = 1 << 13;
/// Link Status bandwidth management bits (RW1C).
const LNKSTA_RW1C: u16 = 0xc000;

/// Slot Capabilities: Attention Button Present.
pub const SLTCAP_ABP: u32 = 1 << 0;
/// Slot Capabilities: Power Controller Present.
pub const SLTCAP_PCP: u32 = 1 << 1;
/// Slot Capabilities: MRL Sensor Present.
pub const SLTCAP_MRLSP: u32 = 1 << 2;
/// Slot Capabilities: Attention Indicator Present.
pub const SLTCAP_AIP: u32 = 1 << 3;
/// Slot Capabilities: Power Indicator Present.
pub const SLTCAP_PIP: u32 = 1 << 4;
/// Slot Capabilities: Hot-Plug Surprise.
pub const SLTCAP_HPS: u32 = 1 << 5;
/// Slot Capabilities: Hot-Plug Capable.
pub const SLTCAP_HPC: u32 = 1 << 6;
/// Slot Capabilities: No Command Completed Support.
pub const SLTCAP_NCCS: u32 = 1 << 18;
/// Slot Capabilities: Physical Slot Number field shift (13 bits).
pub const SLTCAP_PSN_SHIFT: u32 = 19;
/// Largest Physical Slot Number.
pub const MAX_SLOT_NUMBER: u16 = 0x1fff;

/// Slot Control: Attention Button Pressed Enable.
pub const SLTCTL_ABPE: u16 = 1 << 0;
/// Slot Control: Power Fault Detected Enable.
pub const SLTCTL_PFDE: u16 = 1 << 1;
/// Slot Control: MRL Sensor Changed Enable.
pub const SLTCTL_MRLSCE: u16 = 1 << 2;
/// Slot Control: Presence Detect Changed Enable.
pub const SLTCTL_PDCE: u16 = 1 << 3;
/// Slot Control: Command Completed Interrupt Enable.
pub const SLTCTL_CCIE: u16 = 1 << 4;
/// Slot Control: Hot-Plug Interrupt Enable.
pub const SLTCTL_HPIE: u16 = 1 << 5;
/// Slot Control: Attention Indicator Control field.
pub const SLTCTL_AIC: u16 = 3 << 6;
/// Slot Control: Power Indicator Control field.
pub const SLTCTL_PIC: u16 = 3 << 8;
/// Slot Control: power indicator on.
pub const SLTCTL_PIC_ON: u16 = 1 << 8;
/// Slot Control: power indicator blinking.
pub const SLTCTL_PIC_BLINK: u16 = 2 << 8;
/// Slot Control: power indicator off.
pub const SLTCTL_PIC_OFF: u16 = 3 << 8;
/// Slot Control: attention indicator on.
pub const SLTCTL_AIC_ON: u16 = 1 << 6;
/// Slot Control: attention indicator off.
pub const SLTCTL_AIC_OFF: u16 = 3 << 6;
/// Slot Control: Power Controller Control (1 = power off).
pub const SLTCTL_PCC: u16 = 1 << 10;
/// Slot Control: Electromechanical Interlock Control (no interlock: reads zero).
pub const SLTCTL_EIC: u16 = 1 << 11;
/// Slot Control: Data Link Layer State Changed Enable.
pub const SLTCTL_DLLSCE: u16 = 1 << 12;
/// Slot Control bits the guest may write.
const SLTCTL_WRITABLE: u16 = SLTCTL_ABPE
    | SLTCTL_PFDE
    | SLTCTL_MRLSCE
    | SLTCTL_PDCE
    | SLTCTL_CCIE
    | SLTCTL_HPIE
    | SLTCTL_AIC
    | SLTCTL_PIC
    | SLTCTL_PCC
    | SLTCTL_DLLSCE;

/// Slot Status: Attention Button Pressed.
pub const SLTSTA_ABP: u16 = 1 << 0;
/// Slot Status: Power Fault Detected.
pub const SLTSTA_PFD: u16 = 1 << 1;
/// Slot Status: MRL Sensor Changed.
pub const SLTSTA_MRLSC: u16 = 1 << 2;
/// Slot Status: Presence Detect Changed.
pub const SLTSTA_PDC: u16 = 1 << 3;
/// Slot Status: Command Completed.
pub const SLTSTA_CC: u16 = 1 << 4;
/// Slot Status: MRL Sensor State.
pub const SLTSTA_MRLSS: u16 = 1 << 5;
/// Slot Status: Presence Detect State.
pub const SLTSTA_PDS: u16 = 1 << 6;
/// Slot Status: Data Link Layer State Changed.
pub const SLTSTA_DLLSC: u16 = 1 << 8;
/// Slot Status event bits (RW1C).
pub const SLTSTA_EVENTS: u16 =
    SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC;

/// Root Control bits: system error enables and PME interrupt enable.
const RTCTL_WRITABLE: u16 = 0x000f;
/// Root Status: PME Status (RW1C).
const RTSTA_PME_STATUS: u32 = 1 << 16;
/// Device Capabilities 2: Completion Timeout Disable Supported.
const DEVCAP2_CTD: u32 = 1 << 4;
/// Device Control 2: Completion Timeout Disable.
const DEVCTL2_CTD: u16 = 1 << 4;

/// Indicator states of the Slot Control indicator fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Indicator {
    /// Reserved encoding 00b.
    Reserved,
    /// On (01b).
    On,
    /// Blinking (10b).
    Blink,
    /// Off (11b).
    Off,
}

impl Indicator {
    fn from_bits(bits: u16) -> Self {
        match bits & 3 {
            1 => Self::On,
            2 => Self::Blink,
            3 => Self::Off,
            _ => Self::Reserved,
        }
    }

    /// The power indicator state encoded in `slot_control`.
    pub fn power(slot_control: u16) -> Self {
        Self::from_bits(slot_control >> 8)
    }

    /// The attention indicator state encoded in `slot_control`.
    pub fn attention(slot_control: u16) -> Self {
        Self::from_bits(slot_control >> 6)
    }
}

/// Link speeds, as encoded in Link Capabilities and Link Status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSpeed {
    /// 2.5 GT/s.
    Gen1 = 1,
    /// 5 GT/s.
    Gen2 = 2,
    /// 8 GT/s.
    Gen3 = 3,
    /// 16 GT/s.
    Gen4 = 4,
    /// 32 GT/s.
    Gen5 = 5,
}

/// Link widths, as encoded in Link Capabilities and Link Status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkWidth {
    /// One lane.
    X1 = 1,
    /// Two lanes.
    X2 = 2,
    /// Four lanes.
    X4 = 4,
    /// Eight lanes.
    X8 = 8,
    /// Sixteen lanes.
    X16 = 16,
    /// Thirty-two lanes.
    X32 = 32,
}

/// What the PCI Express capability of a root port advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCapParams {
    /// Physical Slot Number (13 bits; larger values are truncated by the caller's validation).
    pub slot_number: u16,
    /// Port Number in Link Capabilities.
    pub port_number: u8,
    /// Maximum (and current) link speed.
    pub link_speed: LinkSpeed,
    /// Maximum (and negotiated) link width.
    pub link_width: LinkWidth,
}

/// Adds the PCI Express capability of a hot-plug capable root port to `cfg` and returns its
/// offset. The slot starts empty with power off and both indicators off.
///
/// Slot Capabilities: attention button, power controller, attention and power indicators,
/// hot-plug capable, no surprise, command completion supported, no MRL sensor or interlock.
pub fn add_root_port_capability(cfg: &mut ConfigSpace, params: &PcieCapParams) -> Result<usize> {
    let cap = cfg.add_capability(PCIE_CAP_ID, PCIE_CAP_LEN)?;
    cfg.set_u16(
        cap + FLAGS,
        FLAGS_VERSION_2 | FLAGS_TYPE_ROOT_PORT | FLAGS_SLOT,
    );

    cfg.set_u32(cap + DEVCAP, DEVCAP_RBER);
    cfg.set_u16(cap + DEVCTL, DEVCTL_DEFAULT);
    cfg.set_writable_u16(cap + DEVCTL, DEVCTL_WRITABLE);
    cfg.set_rw1c_u16(cap + DEVSTA, DEVSTA_RW1C);

    let speed = params.link_speed as u32;
    let width = params.link_width as u32;
    cfg.set_u32(
        cap + LNKCAP,
        speed
            | (width << 4)
            | LNKCAP_DLLLARC
            | LNKCAP_ASPM_COMPLIANCE
            | (u32::from(params.port_number) << 24),
    );
    cfg.set_writable_u16(cap + LNKCTL, LNKCTL_WRITABLE);
    cfg.set_u16(
        cap + LNKSTA,
        (speed as u16) | ((width as u16) << 4) | LNKSTA_SLOT_CLOCK,
    );
    cfg.set_rw1c_u16(cap + LNKSTA, LNKSTA_RW1C);

    let psn = u32::from(params.slot_number & MAX_SLOT_NUMBER);
    cfg.set_u32(
        cap + SLTCAP,
        SLTCAP_ABP | SLTCAP_PCP | SLTCAP_AIP | SLTCAP_PIP | SLTCAP_HPC | (psn << SLTCAP_PSN_SHIFT),
    );
    // Empty slot: power off, indicators off (what Linux expects of an empty powered slot).
    cfg.set_u16(cap + SLTCTL, SLTCTL_PCC | SLTCTL_PIC_OFF | SLTCTL_AIC_OFF);
    cfg.set_writable_u16(cap + SLTCTL, SLTCTL_WRITABLE);
    cfg.set_rw1c_u16(cap + SLTSTA, SLTSTA_EVENTS);

    cfg.set_writable_u16(cap + RTCTL, RTCTL_WRITABLE);
    cfg.set_rw1c_u32(cap + RTSTA, RTSTA_PME_STATUS);

    cfg.set_u32(cap + DEVCAP2, DEVCAP2_CTD);
    cfg.set_writable_u16(cap + DEVCTL2, DEVCTL2_CTD);

    // Supported Link Speeds Vector: every speed up to the maximum.
    let speeds = ((1u32 << speed) - 1) << 1;
    cfg.set_u32(cap + LNKCAP2, speeds);
    cfg.set_u16(cap + LNKCTL2, speed as u16);
    cfg.set_writable_u16(cap + LNKCTL2, 0xffff);
    Ok(cap)
}

/// Maps Slot Control enable bits to the Slot Status event bits they enable.
pub fn enabled_events(slot_control: u16) -> u16 {
    let direct =
        slot_control & (SLTCTL_ABPE | SLTCTL_PFDE | SLTCTL_MRLSCE | SLTCTL_PDCE | SLTCTL_CCIE);
    let dllsc = if slot_control & SLTCTL_DLLSCE != 0 {
        SLTSTA_DLLSC
    } else {
        0
    };
    direct | dllsc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PcieCapParams {
        PcieCapParams {
            slot_number: 7,
            port_number: 3,
            link_speed: LinkSpeed::Gen4,
            link_width: LinkWidth::X16,
        }
    }

    fn cap() -> (ConfigSpace, usize) {
        let mut cfg = ConfigSpace::new();
        let cap = add_root_port_capability(&mut cfg, &params()).unwrap();
        (cfg, cap)
    }

    #[test]
    fn flags_describe_a_version_2_root_port_with_a_slot() {
        let (cfg, cap) = cap();
        assert_eq!(cfg.read_u8(cap), PCIE_CAP_ID);
        assert_eq!(cfg.read_u16(cap + FLAGS), 0x0142);
    }

    #[test]
    fn link_capabilities_report_speed_width_and_active_reporting() {
        let (cfg, cap) = cap();
        let lnkcap = cfg.read_u32(cap + LNKCAP);
        assert_eq!(lnkcap & 0xf, 4);
        assert_eq!((lnkcap >> 4) & 0x3f, 16);
        assert_ne!(lnkcap & LNKCAP_DLLLARC, 0);
        assert_eq!(lnkcap >> 24, 3);
        assert_eq!(cfg.read_u32(cap + LNKCAP2), 0b1_1110);
    }

    #[test]
    fn link_status_reports_speed_and_width_without_link() {
        let (cfg, cap) = cap();
        let lnksta = cfg.read_u16(cap + LNKSTA);
        assert_eq!(lnksta & 0xf, 4);
        assert_eq!((lnksta >> 4) & 0x3f, 16);
        assert_eq!(lnksta & LNKSTA_DLLLA, 0);
    }

    #[test]
    fn slot_capabilities_advertise_the_chosen_features() {
        let (cfg, cap) = cap();
        let sltcap = cfg.read_u32(cap + SLTCAP);
        for bit in [SLTCAP_ABP, SLTCAP_PCP, SLTCAP_AIP, SLTCAP_PIP, SLTCAP_HPC] {
            assert_ne!(sltcap & bit, 0, "bit {bit:#x}");
        }
        for bit in [SLTCAP_HPS, SLTCAP_NCCS, SLTCAP_MRLSP] {
            assert_eq!(sltcap & bit, 0, "bit {bit:#x}");
        }
        assert_eq!(sltcap >> SLTCAP_PSN_SHIFT, 7);
    }

    #[test]
    fn slot_control_starts_powered_off_with_indicators_off() {
        let (cfg, cap) = cap();
        let ctl = cfg.read_u16(cap + SLTCTL);
        assert_ne!(ctl & SLTCTL_PCC, 0);
        assert_eq!(Indicator::power(ctl), Indicator::Off);
        assert_eq!(Indicator::attention(ctl), Indicator::Off);
    }

    #[test]
    fn slot_control_eic_reads_zero_after_write() {
        let (mut cfg, cap) = cap();
        cfg.write_register((cap + SLTCTL) / 4, 0, &[0xff, 0xff]);
        assert_eq!(cfg.read_u16(cap + SLTCTL), 0x17ff);
    }

    #[test]
    fn slot_status_presence_is_read_only() {
        let (mut cfg, cap) = cap();
        cfg.set_u16(cap + SLTSTA, SLTSTA_PDS | SLTSTA_PDC);
        cfg.write_register((cap + SLTSTA) / 4, 2, &[0xff, 0xff]);
        assert_eq!(cfg.read_u16(cap + SLTSTA), SLTSTA_PDS);
    }

    #[test]
    fn enabled_events_map_dllsce_to_dllsc() {
        assert_eq!(enabled_events(SLTCTL_DLLSCE), SLTSTA_DLLSC);
        assert_eq!(
            enabled_events(SLTCTL_PDCE | SLTCTL_CCIE | SLTCTL_HPIE),
            SLTSTA_PDC | SLTSTA_CC
        );
    }

    #[test]
    fn indicator_encodings_decode() {
        assert_eq!(Indicator::power(0x100), Indicator::On);
        assert_eq!(Indicator::power(0x200), Indicator::Blink);
        assert_eq!(Indicator::attention(0xc0), Indicator::Off);
        assert_eq!(Indicator::attention(0), Indicator::Reserved);
    }
}
