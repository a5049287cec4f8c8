//! Validated value types of the control API: PCI addresses, device ids, MAC addresses and
//! references to SR-IOV physical functions. Each parses from and serializes to a JSON string, so
//! a request that deserializes is already well-formed (shape only: nothing here touches the host).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Where the kernel lists PCI devices by address.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// Longest device id.
pub const MAX_ID_LEN: usize = 64;
/// Longest Linux network interface name (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Highest VLAN id a VF can be given (4095 is reserved).
pub const MAX_VLAN: u16 = 4094;

/// Errors of parsing an API value.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ValueError {
    /// Not a PCI address.
    #[error("invalid PCI address '{given}': expected DDDD:BB:DD.F or BB:DD.F in hex (device 00 to 1f, function 0 to 7)")]
    Bdf {
        /// What was given.
        given: String,
    },
    /// Not a host device reference.
    #[error("invalid host device '{given}': expected a PCI address like 0000:01:00.0 or {SYSFS_PCI_DEVICES}/0000:01:00.0")]
    HostDevice {
        /// What was given.
        given: String,
    },
    /// Not a physical function reference.
    #[error("invalid SR-IOV physical function '{given}': expected a PCI address like 0000:3b:00.0, {SYSFS_PCI_DEVICES}/0000:3b:00.0 or a network interface name of at most {MAX_IFNAME_LEN} characters")]
    PhysicalFunction {
        /// What was given.
        given: String,
    },
    /// Not a usable device id.
    #[error("invalid device id '{given}': use 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit")]
    DeviceId {
        /// What was given.
        given: String,
    },
    /// Not a MAC address.
    #[error("invalid MAC address '{given}': expected six hex octets like 52:54:00:12:34:56")]
    Mac {
        /// What was given.
        given: String,
    },
    /// A MAC address a VF cannot have.
    #[error("MAC address {mac} cannot be given to a VF: it is {what}; use a unicast address like 52:54:00:12:34:56")]
    MacNotUnicast {
        /// The address.
        mac: MacAddr,
        /// Why not ("all zeros", "multicast").
        what: &'static str,
    },
    /// A VLAN id out of range.
    #[error("invalid VLAN id {given}: use 0 (no VLAN) to {MAX_VLAN}")]
    Vlan {
        /// What was given.
        given: String,
    },
    /// Not a file descriptor number.
    #[error("invalid descriptor '{given}': expected a file descriptor number like 5")]
    Fd {
        /// What was given.
        given: String,
    },
}

/// Longest piece of user input an error message repeats.
const MAX_SHOWN: usize = 80;

/// `input` for an error message: cut to [`MAX_SHOWN`] characters, so that a huge value does
/// not come back in full.
pub(crate) fn shown(input: &str) -> String {
    if input.chars().count() <= MAX_SHOWN {
        return input.to_string();
    }
    let mut cut: String = input.chars().take(MAX_SHOWN - 3).collect();
    cut.push_str("...");
    cut
}

/// Parses a hex field of at most `max_len` digits.
fn hex_field(s: &str, max_len: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// A PCI function address (domain:bus:device.function), on the host or in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl PciBdf {
    /// The address, or `None` when `device` or `function` is out of range.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// Parses a host device as given by a user: a PCI address or its sysfs directory
    /// (`/sys/bus/pci/devices/0000:01:00.0`, a trailing `/` allowed).
    pub fn from_host_spec(spec: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::HostDevice { given: shown(spec) };
        let name = match spec.strip_prefix(SYSFS_PCI_DEVICES) {
            Some(rest) => rest
                .strip_prefix('/')
                .map(|r| r.strip_suffix('/').unwrap_or(r))
                .ok_or_else(invalid)?,
            None if spec.contains('/') => return Err(invalid()),
            None => spec,
        };
        name.parse().map_err(|_| invalid())
    }

    /// The sysfs directory of this (host) device.
    pub fn sysfs_path(&self) -> String {
        format!("{SYSFS_PCI_DEVICES}/{self}")
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciBdf {
    type Err = ValueError;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), hex digits in either case.
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::Bdf { given: shown(s) };
        let mut parts = s.split(':');
        let (domain, bus, devfn) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(b), Some(df), None) => (d, b, df),
            (Some(b), Some(df), None, None) => ("0", b, df),
            _ => return Err(invalid()),
        };
        let (device, function) = devfn.split_once('.').ok_or_else(invalid)?;
        let domain = hex_field(domain, 4).ok_or_else(invalid)?;
        let bus = hex_field(bus, 2).ok_or_else(invalid)?;
        let device = hex_field(device, 2).ok_or_else(invalid)?;
        let function = hex_field(function, 1).ok_or_else(invalid)?;
        // The field widths bound domain and bus; `new` bounds device and function.
        PciBdf::new(
            u16::try_from(domain).map_err(|_| invalid())?,
            u8::try_from(bus).map_err(|_| invalid())?,
            u8::try_from(device).map_err(|_| invalid())?,
            u8::try_from(function).map_err(|_| invalid())?,
        )
        .ok_or_else(invalid)
    }
}

impl From<rvmm_pci::PciAddress> for PciBdf {
    /// A guest address: rvmm has one PCI segment, domain 0.
    fn from(a: rvmm_pci::PciAddress) -> Self {
        Self {
            domain: 0,
            bus: a.bus,
            device: a.device,
            function: a.function,
        }
    }
}

/// Implements `Serialize` as the `Display` string and `Deserialize` through `FromStr`.
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(PciBdf);

/// The name of a passthrough device in this VM, chosen by the user or by the VMM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `id`: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, the first a letter or
    /// digit.
    pub fn new(id: &str) -> Result<Self, ValueError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(id.to_string()))
        } else {
            Err(ValueError::DeviceId { given: shown(id) })
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        Self::new(s)
    }
}

string_serde!(DeviceId);

/// An Ethernet MAC address a VF is given: unicast, not all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = ValueError;

    /// Parses six colon-separated hex octets and refuses addresses a VF cannot use.
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::Mac { given: shown(s) };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            // Two hex digits always fit a byte.
            *octet = hex_field(part, 2)
                .and_then(|v| u8::try_from(v).ok())
                .ok_or_else(invalid)?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        let mac = MacAddr(octets);
        if octets == [0; 6] {
            return Err(ValueError::MacNotUnicast {
                mac,
                what: "all zeros",
            });
        }
        if octets[0] & 1 != 0 {
            return Err(ValueError::MacNotUnicast {
                mac,
                what: "multicast",
            });
        }
        Ok(mac)
    }
}

string_serde!(MacAddr);

/// An SR-IOV physical function whose VFs the VMM hands out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PhysicalFunction {
    /// By PCI address.
    Pci(PciBdf),
    /// By the name of its network interface (e.g. `enp59s0f0`).
    Netdev(String),
}

impl fmt::Display for PhysicalFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhysicalFunction::Pci(bdf) => bdf.fmt(f),
            PhysicalFunction::Netdev(name) => f.write_str(name),
        }
    }
}

impl FromStr for PhysicalFunction {
    type Err = ValueError;

    /// A PCI address or sysfs path (anything with `/` or `:`), else a network interface name as
    /// Linux accepts it (1 to 15 bytes, no `/`, `:` or white space, not `.` or `..`).
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let invalid = || ValueError::PhysicalFunction { given: shown(s) };
        if s.contains(['/', ':']) {
            return PciBdf::from_host_spec(s)
                .map(PhysicalFunction::Pci)
                .map_err(|_| invalid());
        }
        let ok = !s.is_empty()
            && s.len() <= MAX_IFNAME_LEN
            && s != "."
            && s != ".."
            && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(PhysicalFunction::Netdev(s.to_string()))
        } else {
            Err(invalid())
        }
    }
}

string_serde!(PhysicalFunction);

/// Parses a VLAN id (0 means none).
pub fn parse_vlan(s: &str) -> Result<u16, ValueError> {
    s.parse::<u16>()
        .ok()
        .filter(|v| *v <= MAX_VLAN)
        .ok_or_else(|| ValueError::Vlan { given: shown(s) })
}

/// A file descriptor number (`group-fd=N`).
pub fn parse_fd(s: &str) -> Result<i32, ValueError> {
    s.parse::<i32>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ValueError::Fd { given: shown(s) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(domain: u16, bus: u8, device: u8, function: u8) -> PciBdf {
        PciBdf::new(domain, bus, device, function).expect("valid test address")
    }

    #[test]
    fn long_input_is_cut_in_error_messages() {
        let err = DeviceId::new(&"x".repeat(1000)).expect_err("too long");
        assert!(err.to_string().len() < 250, "{err}");
        assert!(err.to_string().contains("xxx..."), "{err}");
    }

    #[test]
    fn full_bdf_parses_and_prints_canonically() {
        assert_eq!("0000:3B:1f.7".parse(), Ok(bdf(0, 0x3b, 0x1f, 7)));
        assert_eq!(bdf(0x10, 0x3b, 0x1f, 7).to_string(), "0010:3b:1f.7");
    }

    #[test]
    fn short_bdf_means_domain_zero() {
        assert_eq!("01:00.1".parse(), Ok(bdf(0, 1, 0, 1)));
    }

    #[test]
    fn bdf_with_device_32_is_rejected() {
        assert!("0000:01:20.0".parse::<PciBdf>().is_err());
    }

    #[test]
    fn bdf_with_function_8_is_rejected() {
        assert!("0000:01:00.8".parse::<PciBdf>().is_err());
    }

    #[test]
    fn malformed_bdfs_are_rejected() {
        for s in [
            "",
            "01",
            "01:00",
            "0:0:0:0.0",
            "00000:01:00.0",
            "0000:001:00.0",
            "0000:01:00.",
            "0000:01:.0",
            "+0000:01:00.0",
            "0000:01:00.0 ",
            "zz:00.0",
            "01:00.-1",
        ] {
            assert!(s.parse::<PciBdf>().is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn sysfs_path_gives_its_address() {
        let want = Ok(bdf(0, 1, 0, 0));
        assert_eq!(
            PciBdf::from_host_spec("/sys/bus/pci/devices/0000:01:00.0"),
            want
        );
        assert_eq!(
            PciBdf::from_host_spec("/sys/bus/pci/devices/0000:01:00.0/"),
            want
        );
        assert_eq!(PciBdf::from_host_spec("0000:01:00.0"), want);
    }

    #[test]
    fn other_paths_are_not_host_devices() {
        for s in [
            "/sys/bus/pci/devices/0000:01:00.0/driver",
            "/sys/bus/pci/devices0000:01:00.0",
            "/dev/vfio/12",
            "../0000:01:00.0",
        ] {
            assert!(PciBdf::from_host_spec(s).is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn device_id_allows_names_like_nvme0_and_vf_1() {
        for s in ["nvme0", "vf-1", "a", "net_0.1", &"x".repeat(MAX_ID_LEN)] {
            assert!(DeviceId::new(s).is_ok(), "{s:?} was rejected");
        }
    }

    #[test]
    fn device_id_rejects_empty_long_and_odd_names() {
        for s in [
            "",
            "-a",
            ".a",
            "a b",
            "a/b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(DeviceId::new(s).is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn mac_parses_and_prints_lowercase() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().expect("valid MAC");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn multicast_mac_is_rejected() {
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(ValueError::MacNotUnicast { .. })
        ));
    }

    #[test]
    fn zero_mac_is_rejected() {
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(ValueError::MacNotUnicast { .. })
        ));
    }

    #[test]
    fn malformed_macs_are_rejected() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "52-54-00-ab-cd-01",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn physical_function_is_an_address_path_or_interface() {
        assert_eq!(
            "0000:3b:00.0".parse(),
            Ok(PhysicalFunction::Pci(bdf(0, 0x3b, 0, 0)))
        );
        assert_eq!(
            "/sys/bus/pci/devices/0000:3b:00.0".parse(),
            Ok(PhysicalFunction::Pci(bdf(0, 0x3b, 0, 0)))
        );
        assert_eq!(
            "enp59s0f0".parse(),
            Ok(PhysicalFunction::Netdev("enp59s0f0".into()))
        );
    }

    #[test]
    fn physical_function_rejects_bad_interface_names() {
        for s in ["", ".", "..", "a b", "sixteen-chars-xx", "3b:00"] {
            assert!(s.parse::<PhysicalFunction>().is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn vlan_range_is_0_to_4094() {
        assert_eq!(parse_vlan("0"), Ok(0));
        assert_eq!(parse_vlan("4094"), Ok(4094));
        assert!(parse_vlan("4095").is_err());
        assert!(parse_vlan("-1").is_err());
    }

    #[test]
    fn values_round_trip_through_json_strings() {
        let b = bdf(0, 2, 0, 0);
        let json = serde_json::to_string(&b).expect("serializable");
        assert_eq!(json, "\"0000:02:00.0\"");
        assert_eq!(serde_json::from_str::<PciBdf>(&json).ok(), Some(b));
    }

    #[test]
    fn invalid_value_in_json_reports_the_reason() {
        let err = serde_json::from_str::<DeviceId>("\"a b\"").expect_err("invalid id");
        assert!(err.to_string().contains("invalid device id 'a b'"), "{err}");
    }
}
