//! The nouns of a passthrough device, defined once for the whole VMM: its id in the VM
//! ([`DeviceId`]), what a user asks for ([`DeviceSpec`]: a host device or a VF of a physical
//! function, with its VFIO group descriptor when a control plane opened it) and where it is in its
//! hotplug life ([`DeviceState`]). The control API, the command line and the library take and
//! give these types; the API serializes them at its edge. [`passthrough`] attaches and releases
//! the devices (host checks, the VFIO container, BAR placement in a root port's windows).

pub mod bar_windows;
pub mod group_fd;
pub mod passthrough;

use std::fmt;
use std::str::FromStr;

use rvmm_pci::bdf::shown;
use rvmm_pci::Bdf;
use rvmm_vfio::sriov::VfRequest;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use group_fd::{GroupFd, GroupFdError, InheritedFds};

/// Longest device id.
pub const MAX_ID_LEN: usize = 64;

/// The one deadline of a hot-add, counted from the moment it is asked for: opening the device,
/// waiting for the guest to enable hotplug on the slot (at most [`ADD_SLOT_READY_TIMEOUT`] of it)
/// and for the guest to power the slot on and enable the device. The controller gives up and
/// rolls back at this deadline; the control API waits a little longer for that answer, so that a
/// client never hears a timeout for an add that then succeeds.
pub const ADD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(55);
/// The part of [`ADD_DEADLINE`] a hot-add waits for the guest to enable hotplug on the slot
/// (while it boots, say).
pub const ADD_SLOT_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(40);

/// A device id that is not one.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("invalid device id '{given}': use 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit")]
pub struct DeviceIdError {
    /// What was given (cut to 80 characters).
    pub given: String,
}

/// The name of a passthrough device in this VM, chosen by the user or by the VMM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `id`: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, the first a letter or
    /// digit.
    pub fn new(id: &str) -> Result<Self, DeviceIdError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(id.to_string()))
        } else {
            Err(DeviceIdError { given: shown(id) })
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
    type Err = DeviceIdError;

    fn from_str(s: &str) -> Result<Self, DeviceIdError> {
        Self::new(s)
    }
}

rvmm_pci::serde_as_string!(DeviceId);

/// Where a passthrough device comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSource {
    /// A host device bound to vfio-pci.
    Host(Bdf),
    /// A free VF of an SR-IOV physical function, given the port policy before the guest sees it.
    Vf(VfRequest),
}

/// A passthrough device as asked for: the body of an add-device request, `--device` and `--vf` on
/// the command line (`path=BDF[,id=NAME][,group-fd=N]`, `vf=PF[,id=NAME][,mac=..][,vlan=..]
/// [,trust=..][,spoofchk=..]`; see [`crate::api::device_arg`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Name in the VM; generated when absent.
    pub id: Option<DeviceId>,
    /// The device.
    pub source: DeviceSource,
    /// The device's VFIO group descriptor, when the caller opened it (only for a host device);
    /// `None`: rvmm opens `/dev/vfio/<group>` itself.
    pub group: Option<GroupFd>,
}

impl DeviceSpec {
    /// Checks what a caller may have built by hand (the JSON decoder and the command line check
    /// the same): a VF's MAC address must be one a VF can be given, a group descriptor goes only
    /// with a host device.
    pub fn check(&self) -> Result<(), String> {
        match &self.source {
            DeviceSource::Vf(vf) => {
                if self.group.is_some() {
                    return Err(
                        "group-fd applies only to path= devices: rvmm opens the VF it picks itself"
                            .into(),
                    );
                }
                vf.policy.check().map_err(|e| e.to_string())
            }
            DeviceSource::Host(_) => Ok(()),
        }
    }

    /// A host device, named by the VMM, whose group rvmm opens itself.
    pub fn host(bdf: Bdf) -> Self {
        Self {
            id: None,
            source: DeviceSource::Host(bdf),
            group: None,
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl fmt::Display for DeviceSpec {
    /// The command-line form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            DeviceSource::Host(bdf) => write!(f, "path={bdf}")?,
            DeviceSource::Vf(vf) => write!(f, "vf={}", vf.pf)?,
        }
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        if let Some(group) = &self.group {
            write!(f, ",group-fd={}", group.number())?;
        }
        if let DeviceSource::Vf(vf) = &self.source {
            let p = &vf.policy;
            if let Some(mac) = p.mac {
                write!(f, ",mac={mac}")?;
            }
            if let Some(vlan) = p.vlan {
                write!(f, ",vlan={vlan}")?;
            }
            if let Some(trust) = p.trust {
                write!(f, ",trust={}", on_off(trust))?;
            }
            if let Some(spoofchk) = p.spoofchk {
                write!(f, ",spoofchk={}", on_off(spoofchk))?;
            }
        }
        Ok(())
    }
}

/// Where an attached device is in its hotplug life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// Opened and placed; the guest has not taken it yet.
    Adding,
    /// The guest has it.
    Present,
    /// Removal under way (attention button pressed, waiting for the guest).
    Removing,
}

#[cfg(test)]
mod tests {
    use super::*;

    use rvmm_vfio::sriov::{MacAddress, PfSpec, VfPolicy};

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
    fn long_id_is_cut_in_the_error_message() {
        let err = DeviceId::new(&"x".repeat(1000)).expect_err("too long");
        assert!(err.to_string().len() < 250, "{err}");
        assert!(err.to_string().contains("xxx..."), "{err}");
    }

    #[test]
    fn invalid_id_in_json_reports_the_reason() {
        let err = serde_json::from_str::<DeviceId>("\"a b\"").expect_err("invalid id");
        assert!(err.to_string().contains("invalid device id 'a b'"), "{err}");
    }

    #[test]
    fn host_spec_prints_its_address() {
        let spec = DeviceSpec {
            id: Some(DeviceId::new("disk0").expect("valid")),
            ..DeviceSpec::host("0000:01:00.0".parse().expect("valid"))
        };
        assert_eq!(spec.to_string(), "path=0000:01:00.0,id=disk0");
    }

    #[test]
    fn vf_spec_prints_as_its_argument() {
        let spec = DeviceSpec {
            id: None,
            source: DeviceSource::Vf(VfRequest {
                pf: PfSpec::Netdev("enp1s0".into()),
                policy: VfPolicy {
                    mac: Some(MacAddress([0x52, 0x54, 0, 0, 0, 1])),
                    vlan: Some(7),
                    trust: Some(false),
                    spoofchk: Some(true),
                },
            }),
            group: None,
        };
        assert_eq!(
            spec.to_string(),
            "vf=enp1s0,mac=52:54:00:00:00:01,vlan=7,trust=off,spoofchk=on"
        );
    }
}
