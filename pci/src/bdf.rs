//! The one PCI function address of rvmm, for host devices and guest devices alike.
//!
//! Parsing is strict where a user gives an address (`DDDD:BB:DD.F`, or `BB:DD.F` for domain 0,
//! hex digits in either case) and accepts the kernel's sysfs spellings where a user or the
//! kernel gives a device's directory ([`Bdf::from_sysfs`]). With the `serde` feature it is a
//! JSON string in its canonical form.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Where the kernel lists PCI devices by address.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Longest piece of user input an error message repeats.
const MAX_SHOWN: usize = 80;

/// Errors of parsing a PCI address.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BdfError {
    /// Not a PCI address.
    #[error("invalid PCI address '{given}': expected DDDD:BB:DD.F or BB:DD.F in hex (device 00 to 1f, function 0 to 7)")]
    Address {
        /// What was given (cut to 80 characters).
        given: String,
    },
    /// Not a PCI address nor a device's sysfs directory.
    #[error("invalid host device '{given}': expected a PCI address like 0000:01:00.0 or {SYSFS_PCI_DEVICES}/0000:01:00.0")]
    HostDevice {
        /// What was given (cut to 80 characters).
        given: String,
    },
}

/// `input` for an error message: cut to [`MAX_SHOWN`] characters, so that a huge value does not
/// come back in full.
pub fn shown(input: &str) -> String {
    if input.chars().count() <= MAX_SHOWN {
        return input.to_string();
    }
    let mut cut: String = input.chars().take(MAX_SHOWN - 3).collect();
    cut.push_str("...");
    cut
}

/// A PCI function address: domain (segment), bus, device and function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl Bdf {
    /// The address, or `None` when `device` or `function` is out of range.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// Parses a device as a user or the kernel names it: an address ([`FromStr`]) or a sysfs
    /// directory whose last component is a full address (`/sys/bus/pci/devices/0000:01:00.0`,
    /// the canonical `/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`, a trailing `/`
    /// allowed). White space around it (a line read from a file) is ignored.
    pub fn from_sysfs(spec: &str) -> Result<Self, BdfError> {
        let invalid = || BdfError::HostDevice { given: shown(spec) };
        let trimmed = spec.trim();
        let name = match trimmed.strip_prefix("/sys/") {
            Some(rest) => {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                let (_, name) = rest.rsplit_once('/').ok_or_else(invalid)?;
                // A path names a device by its full address, domain included.
                if name.split(':').count() != 3 {
                    return Err(invalid());
                }
                name
            }
            None if trimmed.contains('/') => return Err(invalid()),
            None => trimmed,
        };
        name.parse().map_err(|_| invalid())
    }

    /// The sysfs directory of this (host) device.
    pub fn sysfs_path(&self) -> String {
        format!("{SYSFS_PCI_DEVICES}/{self}")
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Parses a hex field of at most `max_len` digits.
fn hex_field(s: &str, max_len: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Bdf {
    type Err = BdfError;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), hex digits in either case.
    fn from_str(s: &str) -> Result<Self, BdfError> {
        let invalid = || BdfError::Address { given: shown(s) };
        let mut parts = s.split(':');
        let (domain, bus, devfn) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(b), Some(df), None) => (d, b, df),
            (Some(b), Some(df), None, None) => ("0", b, df),
            _ => return Err(invalid()),
        };
        let (device, function) = devfn.split_once('.').ok_or_else(invalid)?;
        let field = |s: &str, len: usize| hex_field(s, len).ok_or_else(invalid);
        // The field widths bound domain and bus; `new` bounds device and function.
        Bdf::new(
            u16::try_from(field(domain, 4)?).map_err(|_| invalid())?,
            u8::try_from(field(bus, 2)?).map_err(|_| invalid())?,
            u8::try_from(field(device, 2)?).map_err(|_| invalid())?,
            u8::try_from(field(function, 1)?).map_err(|_| invalid())?,
        )
        .ok_or_else(invalid)
    }
}

/// Implements serde's `Serialize` as the type's `Display` string and `Deserialize` through its
/// `FromStr` (the error's text becomes the deserializer's message). The crate that uses it needs
/// `serde` as a dependency.
#[macro_export]
macro_rules! serde_as_string {
    ($t:ty) => {
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(
                &self,
                s: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                d: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str> as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}

#[cfg(feature = "serde")]
serde_as_string!(Bdf);

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(domain: u16, bus: u8, device: u8, function: u8) -> Bdf {
        Bdf::new(domain, bus, device, function).expect("valid test address")
    }

    #[test]
    fn full_address_parses_and_prints_canonically() {
        assert_eq!("0000:3B:1f.7".parse(), Ok(bdf(0, 0x3b, 0x1f, 7)));
        assert_eq!(bdf(0x10, 0x3b, 0x1f, 7).to_string(), "0010:3b:1f.7");
    }

    #[test]
    fn short_address_means_domain_zero() {
        assert_eq!("01:00.1".parse(), Ok(bdf(0, 1, 0, 1)));
    }

    #[test]
    fn device_32_and_function_8_are_rejected() {
        assert!("0000:01:20.0".parse::<Bdf>().is_err());
        assert!("0000:01:00.8".parse::<Bdf>().is_err());
    }

    #[test]
    fn malformed_addresses_are_rejected() {
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
            assert!(s.parse::<Bdf>().is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn long_input_is_cut_in_error_messages() {
        let err = "x".repeat(1000).parse::<Bdf>().expect_err("not an address");
        assert!(err.to_string().len() < 250, "{err}");
        assert!(err.to_string().contains("xxx..."), "{err}");
    }

    #[test]
    fn sysfs_directories_give_their_address() {
        let want = Ok(bdf(0, 1, 0, 0));
        for s in [
            "/sys/bus/pci/devices/0000:01:00.0",
            "/sys/bus/pci/devices/0000:01:00.0/",
            "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0",
            "0000:01:00.0",
            "01:00.0",
            " 0000:01:00.0\n",
        ] {
            assert_eq!(Bdf::from_sysfs(s), want, "{s:?}");
        }
    }

    #[test]
    fn other_paths_are_not_devices() {
        for s in [
            "/sys/bus/pci/devices/0000:01:00.0/driver",
            "/sys/bus/pci/devices0000:01:00.0",
            "/sys/bus/pci/devices/01:00.0",
            "/dev/vfio/12",
            "../0000:01:00.0",
            "/sys/",
        ] {
            assert!(Bdf::from_sysfs(s).is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn sysfs_path_is_under_bus_pci_devices() {
        assert_eq!(
            bdf(0, 2, 3, 1).sysfs_path(),
            "/sys/bus/pci/devices/0000:02:03.1"
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn address_round_trips_through_a_json_string() {
        let b = bdf(0, 2, 0, 0);
        let json = serde_json::to_string(&b).expect("serializable");
        assert_eq!(json, "\"0000:02:00.0\"");
        assert_eq!(serde_json::from_str::<Bdf>(&json).ok(), Some(b));
    }
}
