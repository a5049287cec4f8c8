//! Port policy of a VF: the MAC address, VLAN, spoof checking and trust that the PF driver
//! enforces for it, and the stable MAC address rvmm derives when none is given.

use std::fmt;
use std::str::FromStr;

use rvmm_pci::bdf::shown;
use thiserror::Error;

/// Errors of a MAC address a user gives.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MacError {
    /// Not a MAC address.
    #[error("invalid MAC address '{given}': expected six hex octets like 52:54:00:12:34:56")]
    Syntax {
        /// What was given (cut to 80 characters).
        given: String,
    },
    /// A MAC address a VF cannot have.
    #[error("MAC address {mac} cannot be given to a VF: it is {what}; use a unicast address like 52:54:00:12:34:56")]
    NotUnicast {
        /// The address.
        mac: MacAddress,
        /// Why not ("all zeros", "multicast").
        what: &'static str,
    },
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether this is 00:00:00:00:00:00 (a VF without an administrative MAC address).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// This address if a VF can be given it (unicast, not all zeros).
    pub fn for_vf(self) -> Result<Self, MacError> {
        let what = if self.is_zero() {
            "all zeros"
        } else if self.0[0] & 1 != 0 {
            "multicast"
        } else {
            return Ok(self);
        };
        Err(MacError::NotUnicast { mac: self, what })
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = MacError;

    /// Parses six colon-separated pairs of hex digits, in either case (any address: see
    /// [`MacAddress::for_vf`] for what a VF may be given).
    fn from_str(s: &str) -> Result<Self, MacError> {
        let invalid = || MacError::Syntax { given: shown(s) };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(MacAddress(octets))
    }
}

#[cfg(feature = "serde")]
rvmm_pci::serde_as_string!(MacAddress);

/// One setting the PF applies to one of its VFs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfSetting {
    /// The administrative MAC address (00:00:00:00:00:00 removes it).
    Mac(MacAddress),
    /// The port VLAN the PF tags the VF's traffic with (0: none) and its 802.1p priority.
    Vlan {
        /// VLAN id, 0 to 4094.
        vlan: u16,
        /// Priority, 0 to 7.
        qos: u8,
    },
    /// Whether the PF drops frames the VF sends with a source MAC other than its own.
    SpoofCheck(bool),
    /// Whether the VF may change its MAC address and enter promiscuous mode.
    Trust(bool),
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl fmt::Display for VfSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfSetting::Mac(mac) => write!(f, "mac {mac}"),
            VfSetting::Vlan { vlan, qos: 0 } => write!(f, "vlan {vlan}"),
            VfSetting::Vlan { vlan, qos } => write!(f, "vlan {vlan} qos {qos}"),
            VfSetting::SpoofCheck(on) => write!(f, "spoofchk {}", on_off(*on)),
            VfSetting::Trust(on) => write!(f, "trust {}", on_off(*on)),
        }
    }
}

/// Everything the PF reports about one VF's port settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfSettings {
    /// Administrative MAC address (zero when none is set).
    pub mac: MacAddress,
    /// Port VLAN (0: none).
    pub vlan: u16,
    /// Port VLAN priority.
    pub qos: u8,
    /// Spoof checking.
    pub spoofchk: bool,
    /// Trust.
    pub trust: bool,
}

impl VfSettings {
    /// These settings with `setting` applied.
    pub fn with(mut self, setting: VfSetting) -> Self {
        match setting {
            VfSetting::Mac(mac) => self.mac = mac,
            VfSetting::Vlan { vlan, qos } => {
                self.vlan = vlan;
                self.qos = qos;
            }
            VfSetting::SpoofCheck(on) => self.spoofchk = on,
            VfSetting::Trust(on) => self.trust = on,
        }
        self
    }

    /// Each setting, in the order they are applied: MAC, VLAN, spoof checking, trust.
    pub fn all(&self) -> [VfSetting; 4] {
        [
            VfSetting::Mac(self.mac),
            VfSetting::Vlan {
                vlan: self.vlan,
                qos: self.qos,
            },
            VfSetting::SpoofCheck(self.spoofchk),
            VfSetting::Trust(self.trust),
        ]
    }

    /// The setting of the same kind as `setting` that these settings hold (what restores it).
    pub fn same_kind_as(&self, setting: VfSetting) -> VfSetting {
        match setting {
            VfSetting::Mac(_) => VfSetting::Mac(self.mac),
            VfSetting::Vlan { .. } => VfSetting::Vlan {
                vlan: self.vlan,
                qos: self.qos,
            },
            VfSetting::SpoofCheck(_) => VfSetting::SpoofCheck(self.spoofchk),
            VfSetting::Trust(_) => VfSetting::Trust(self.trust),
        }
    }
}

/// What a VM asks of its VF's port. Every setting is applied: one not given gets the PF's default
/// (no VLAN, spoof checking on, trust off), never what an earlier tenant left, and the MAC address
/// is derived from the VM and device when not given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfPolicy {
    /// MAC address.
    pub mac: Option<MacAddress>,
    /// Port VLAN (0: none).
    pub vlan: Option<u16>,
    /// Trust.
    pub trust: Option<bool>,
    /// Spoof checking.
    pub spoofchk: Option<bool>,
}

impl VfPolicy {
    /// Checks what a user asked for: a MAC address a VF can be given.
    pub fn check(&self) -> Result<(), MacError> {
        self.mac.map_or(Ok(()), |mac| mac.for_vf().map(|_| ()))
    }

    /// The settings of device `device` of VM `vm`, in the order they are applied: MAC, VLAN,
    /// spoof checking, trust; those not given are the PF's defaults.
    pub fn settings(&self, vm: &str, device: &str) -> [VfSetting; 4] {
        [
            VfSetting::Mac(self.mac.unwrap_or_else(|| derive_mac(vm, device))),
            VfSetting::Vlan {
                vlan: self.vlan.unwrap_or(0),
                qos: 0,
            },
            VfSetting::SpoofCheck(self.spoofchk.unwrap_or(true)),
            VfSetting::Trust(self.trust.unwrap_or(false)),
        ]
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes` from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The stable MAC address of device `device` of VM `vm`: a locally administered unicast address
/// (first octet `x2`, `x6`, `xa` or `xe`) from a fixed hash of both names, the same in every
/// rvmm version and on every host.
pub fn derive_mac(vm: &str, device: &str) -> MacAddress {
    // Lengths first, so ("ab", "c") and ("a", "bc") differ.
    let mut hash = fnv1a(FNV_OFFSET, &(vm.len() as u64).to_le_bytes());
    hash = fnv1a(hash, vm.as_bytes());
    hash = fnv1a(hash, &(device.len() as u64).to_le_bytes());
    hash = fnv1a(hash, device.as_bytes());
    // Final avalanche (the splitmix64 finalizer): every input bit reaches every output octet.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    let b = hash.to_be_bytes();
    MacAddress([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints_lowercase() {
        let mac: MacAddress = "52:54:00:AB:cd:01".parse().expect("valid MAC");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn malformed_macs_are_rejected() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "52-54-00-ab-cd-01",
            "+2:54:00:ab:cd:01",
        ] {
            assert!(
                matches!(s.parse::<MacAddress>(), Err(MacError::Syntax { .. })),
                "{s:?} was accepted"
            );
        }
    }

    #[test]
    fn zero_and_multicast_macs_cannot_be_given_to_a_vf() {
        for s in ["00:00:00:00:00:00", "01:00:5e:00:00:01"] {
            let mac: MacAddress = s.parse().expect("well-formed");
            assert!(
                matches!(mac.for_vf(), Err(MacError::NotUnicast { .. })),
                "{s} accepted"
            );
        }
        let policy = VfPolicy {
            mac: Some(MacAddress([1, 0, 0, 0, 0, 1])),
            ..VfPolicy::default()
        };
        assert!(policy.check().is_err());
    }

    #[test]
    fn derived_mac_is_locally_administered_unicast() {
        for (vm, device) in [("vm1", "net0"), ("", ""), ("a", "b"), ("vm-42", "dev7")] {
            let mac = derive_mac(vm, device);
            assert_eq!(mac.0[0] & 0x01, 0, "{mac} is multicast");
            assert_eq!(mac.0[0] & 0x02, 0x02, "{mac} is not locally administered");
        }
    }

    #[test]
    fn derived_mac_is_stable_across_builds() {
        // A fixed value: a change here changes every guest's MAC address.
        assert_eq!(derive_mac("vm1", "net0").to_string(), "a6:0e:34:7f:8d:6c");
    }

    #[test]
    fn derived_mac_differs_per_device_and_per_vm() {
        let base = derive_mac("vm1", "net0");
        assert_ne!(base, derive_mac("vm1", "net1"));
        assert_ne!(base, derive_mac("vm2", "net0"));
    }

    #[test]
    fn derived_mac_separates_the_two_names() {
        assert_ne!(derive_mac("ab", "c"), derive_mac("a", "bc"));
    }

    #[test]
    fn settings_not_given_are_the_pf_defaults_not_leftovers() {
        let policy = VfPolicy {
            vlan: Some(100),
            ..VfPolicy::default()
        };

        let settings = policy.settings("vm1", "net0");

        assert_eq!(
            settings,
            [
                VfSetting::Mac(derive_mac("vm1", "net0")),
                VfSetting::Vlan { vlan: 100, qos: 0 },
                VfSetting::SpoofCheck(true),
                VfSetting::Trust(false),
            ]
        );
    }

    #[test]
    fn given_mac_wins_over_the_derived_one() {
        let mac = MacAddress([0x52, 0x54, 0, 0, 0, 1]);
        let policy = VfPolicy {
            mac: Some(mac),
            trust: Some(true),
            spoofchk: Some(false),
            ..VfPolicy::default()
        };

        assert_eq!(
            policy.settings("vm1", "net0"),
            [
                VfSetting::Mac(mac),
                VfSetting::Vlan { vlan: 0, qos: 0 },
                VfSetting::SpoofCheck(false),
                VfSetting::Trust(true)
            ]
        );
    }

    #[test]
    fn previous_settings_give_the_setting_that_restores() {
        let previous = VfSettings {
            vlan: 7,
            qos: 3,
            spoofchk: true,
            ..VfSettings::default()
        };

        assert_eq!(
            previous.same_kind_as(VfSetting::Vlan { vlan: 100, qos: 0 }),
            VfSetting::Vlan { vlan: 7, qos: 3 }
        );
        assert_eq!(
            previous.same_kind_as(VfSetting::SpoofCheck(false)),
            VfSetting::SpoofCheck(true)
        );
    }

    #[test]
    fn settings_print_like_ip_link() {
        assert_eq!(VfSetting::Trust(false).to_string(), "trust off");
        assert_eq!(VfSetting::Vlan { vlan: 5, qos: 0 }.to_string(), "vlan 5");
        assert_eq!(
            VfSetting::Mac(MacAddress([0x52, 0x54, 0, 0xab, 0, 1])).to_string(),
            "mac 52:54:00:ab:00:01"
        );
    }
}
