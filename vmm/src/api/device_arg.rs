//! The command-line form of an add-device request, shared by `rvmm ctl add-device`,
//! `rvmm run --device` and `rvmm run --vf`:
//!
//! ```text
//! path=HOST_DEVICE[,id=NAME][,group-fd=N]
//! vf=PF[,id=NAME][,mac=MAC][,vlan=N][,trust=on|off][,spoofchk=on|off]
//! ```
//!
//! `HOST_DEVICE` is a PCI address or its `/sys/bus/pci/devices/...` directory; `PF` is the same
//! or a network interface name. `group-fd=N` names an open descriptor of the device's VFIO group
//! (see [`crate::api::GroupFd`]). `pf=PF` is another spelling of `vf=PF` (the form `--vf` uses).
//! The result is the [`DeviceSpec`] the API takes, checked by the same rules as the JSON body.

use std::str::FromStr;

use thiserror::Error;

use rvmm_pci::bdf::shown;
use rvmm_pci::Bdf;

use rvmm_vfio::sriov::{MacAddress, MacError};

use crate::api::types::AddDeviceWire;
use crate::api::values::{parse_fd, parse_vlan, ValueError};
use crate::device::{DeviceId, DeviceSpec};

/// Errors of a device argument.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DeviceArgError {
    /// An entry without `=`.
    #[error("'{entry}' is not KEY=VALUE")]
    NotKeyValue {
        /// The entry.
        entry: String,
    },
    /// A key the form does not have.
    #[error(
        "unknown key '{key}': use path, vf (or pf), id, group-fd, mac, vlan, trust or spoofchk"
    )]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A key given twice (for `path` and `vf` also: a second device).
    #[error("'{key}' is given twice (one device per call)")]
    Repeated {
        /// The key.
        key: String,
    },
    /// An on/off switch with another value.
    #[error("'{key}={value}': use on or off")]
    Switch {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A value of the wrong shape.
    #[error("invalid {key}")]
    Value {
        /// The key.
        key: &'static str,
        /// Why.
        #[source]
        source: ValueError,
    },
    /// The entries do not make one device.
    #[error("{0}")]
    Device(String),
}

fn switch(key: &str, value: &str) -> Result<bool, DeviceArgError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(DeviceArgError::Switch {
            key: key.to_string(),
            value: shown(value),
        }),
    }
}

/// A MAC address a VF can be given.
fn mac_for_vf(s: &str) -> Result<MacAddress, MacError> {
    s.parse::<MacAddress>()?.for_vf()
}

/// Stores `value` in `slot`, refusing a second value for the same key.
fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), DeviceArgError> {
    if slot.is_some() {
        return Err(DeviceArgError::Repeated {
            key: key.to_string(),
        });
    }
    *slot = Some(value);
    Ok(())
}

fn value<T, E: Into<ValueError>>(key: &'static str, r: Result<T, E>) -> Result<T, DeviceArgError> {
    r.map_err(|e| DeviceArgError::Value {
        key,
        source: e.into(),
    })
}

impl FromStr for DeviceSpec {
    type Err = DeviceArgError;

    fn from_str(s: &str) -> Result<Self, DeviceArgError> {
        let mut w = AddDeviceWire::default();
        for (i, entry) in s.split(',').enumerate() {
            // A bare BDF or sysfs path may stand first, for `path=`.
            let (key, v) = match entry.split_once('=') {
                Some(kv) => kv,
                None if i == 0 && !entry.is_empty() => ("path", entry),
                None => {
                    return Err(DeviceArgError::NotKeyValue {
                        entry: shown(entry),
                    })
                }
            };
            match key {
                "path" => set(&mut w.path, key, value("path", Bdf::from_sysfs(v))?)?,
                "vf" | "pf" => set(&mut w.vf, key, value("vf", v.parse())?)?,
                "id" => set(&mut w.id, key, value("id", DeviceId::new(v))?)?,
                "mac" => set(&mut w.mac, key, value("mac", mac_for_vf(v))?)?,
                "vlan" => set(&mut w.vlan, key, value("vlan", parse_vlan(v))?)?,
                "trust" => set(&mut w.trust, key, switch(key, v)?)?,
                "spoofchk" => set(&mut w.spoofchk, key, switch(key, v)?)?,
                "group-fd" => set(&mut w.group_fd, key, value("group-fd", parse_fd(v))?)?,
                _ => return Err(DeviceArgError::UnknownKey { key: shown(key) }),
            }
        }
        DeviceSpec::try_from(w).map_err(DeviceArgError::Device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceSource;
    use rvmm_vfio::sriov::{PfSpec, VfPolicy, VfRequest};

    fn parse(s: &str) -> Result<DeviceSpec, DeviceArgError> {
        s.parse()
    }

    #[test]
    fn sysfs_path_with_id_parses() {
        assert_eq!(
            parse("path=/sys/bus/pci/devices/0000:01:00.0,id=nvme0"),
            Ok(DeviceSpec {
                id: Some(DeviceId::new("nvme0").expect("valid id")),
                source: DeviceSource::Host("0000:01:00.0".parse().expect("valid address")),
                group: None,
            })
        );
    }

    #[test]
    fn bare_bdf_path_parses_without_id() {
        let req = parse("path=01:00.0").expect("valid");
        assert_eq!(req.id, None);
        assert_eq!(
            req.source,
            DeviceSource::Host("0000:01:00.0".parse().expect("valid address"))
        );
    }

    #[test]
    fn leading_bare_address_is_the_path() {
        let req = parse("0000:01:00.0,id=nv").expect("valid");
        assert_eq!(req.id, Some(DeviceId::new("nv").expect("valid id")));
        assert_eq!(
            req.source,
            DeviceSource::Host("0000:01:00.0".parse().expect("valid address"))
        );
    }

    #[test]
    fn bare_entry_after_the_first_is_refused() {
        assert!(matches!(
            parse("id=nv,0000:01:00.0"),
            Err(DeviceArgError::NotKeyValue { .. })
        ));
    }

    #[test]
    fn vf_with_every_setting_parses() {
        let req = parse("vf=enp59s0f0,id=vf0,mac=52:54:00:00:00:02,vlan=100,trust=on,spoofchk=off")
            .expect("valid");
        assert_eq!(
            req.source,
            DeviceSource::Vf(VfRequest {
                pf: PfSpec::Netdev("enp59s0f0".into()),
                policy: VfPolicy {
                    mac: Some("52:54:00:00:00:02".parse().expect("valid MAC")),
                    vlan: Some(100),
                    trust: Some(true),
                    spoofchk: Some(false),
                },
            })
        );
    }

    #[test]
    fn pf_is_another_spelling_of_vf() {
        assert_eq!(
            parse("pf=0000:3b:00.0,id=net0,vlan=7"),
            parse("vf=0000:3b:00.0,id=net0,vlan=7")
        );
    }

    #[test]
    fn pf_and_vf_together_are_two_devices() {
        assert_eq!(
            parse("vf=eth0,pf=eth1"),
            Err(DeviceArgError::Repeated { key: "pf".into() })
        );
    }

    #[test]
    fn path_and_vf_together_are_two_devices() {
        let err = parse("path=01:00.0,vf=enp1s0").expect_err("two devices");
        assert!(err.to_string().contains("two devices"), "{err}");
    }

    #[test]
    fn second_path_is_refused() {
        assert_eq!(
            parse("path=01:00.0,path=02:00.0"),
            Err(DeviceArgError::Repeated { key: "path".into() })
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        assert_eq!(
            parse("path=01:00.0,rom=off"),
            Err(DeviceArgError::UnknownKey { key: "rom".into() })
        );
    }

    #[test]
    fn entry_without_equals_is_refused() {
        assert!(matches!(
            parse("path=01:00.0,,id=a"),
            Err(DeviceArgError::NotKeyValue { .. })
        ));
    }

    #[test]
    fn switch_other_than_on_off_is_refused() {
        assert!(matches!(
            parse("vf=enp1s0,trust=yes"),
            Err(DeviceArgError::Switch { .. })
        ));
    }

    #[test]
    fn malformed_values_name_their_key() {
        for (s, key) in [
            ("path=/dev/vfio/3", "path"),
            ("vf=a/b", "vf"),
            ("path=01:00.0,id=a b", "id"),
            ("vf=enp1s0,mac=ff:ff:ff:ff:ff:ff", "mac"),
            ("vf=enp1s0,vlan=5000", "vlan"),
        ] {
            match parse(s) {
                Err(DeviceArgError::Value { key: k, .. }) => assert_eq!(k, key, "{s}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn vf_settings_on_a_path_are_refused() {
        assert!(matches!(
            parse("path=01:00.0,mac=52:54:00:00:00:02"),
            Err(DeviceArgError::Device(_))
        ));
    }

    #[test]
    fn id_alone_is_no_device() {
        assert!(matches!(parse("id=a"), Err(DeviceArgError::Device(_))));
    }
}
