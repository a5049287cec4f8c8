//! Request, response and event types of the control API, one per endpoint. Each is the JSON
//! document of docs/api.yaml; requests reject unknown fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rvmm_pci::Bdf;
use rvmm_vfio::sriov::{MacAddress, PfSpec, VfPolicy, VfRequest};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::api::values::MAX_VLAN;
use crate::device::{DeviceId, DeviceSource, DeviceSpec, DeviceState, GroupFd};
use crate::vm::exit::VmExit;
use crate::vm::pause::VmState;

/// Deadline of a graceful removal when the request gives none.
pub const DEFAULT_REMOVE_TIMEOUT_MS: u64 = 10_000;
/// Longest deadline a removal may ask for.
pub const MAX_REMOVE_TIMEOUT_MS: u64 = 600_000;

/// The JSON shape of `PUT /v1/vm/add-device`, a [`DeviceSpec`]: either
/// `{"path": HOST_DEVICE, "id"?, "group_fd"?}` or
/// `{"vf": PF, "id"?, "mac"?, "vlan"?, "trust"?, "spoofchk"?}`. `group_fd` says that the request
/// carries the device's VFIO group descriptor as `SCM_RIGHTS` data (its value is the sender's
/// descriptor number).
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddDeviceWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) id: Option<DeviceId>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "host_device"
    )]
    pub(super) path: Option<Bdf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) vf: Option<PfSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) mac: Option<MacAddress>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "vlan"
    )]
    pub(super) vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) trust: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) spoofchk: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "group_fd"
    )]
    pub(super) group_fd: Option<i32>,
}

/// `group_fd`: a descriptor number, 0 or more.
fn group_fd<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    let v = u64::deserialize(d)?;
    i32::try_from(v).map(Some).map_err(|_| {
        serde::de::Error::custom(format!("group_fd {v} is not a file descriptor number"))
    })
}

/// `path`: a PCI address or its sysfs directory.
fn host_device<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bdf>, D::Error> {
    let s = String::deserialize(d)?;
    Bdf::from_sysfs(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `vlan`: 0 to 4094.
fn vlan<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let v = u64::deserialize(d)?;
    u16::try_from(v)
        .ok()
        .filter(|v| *v <= MAX_VLAN)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid VLAN id {v}: use 0 (no VLAN) to {MAX_VLAN}"
            ))
        })
}

impl TryFrom<AddDeviceWire> for DeviceSpec {
    type Error = String;

    fn try_from(w: AddDeviceWire) -> Result<Self, String> {
        let has_vf_settings =
            w.mac.is_some() || w.vlan.is_some() || w.trust.is_some() || w.spoofchk.is_some();
        let source = match (w.path, w.vf) {
            (Some(_), Some(_)) => {
                return Err("two devices in one call: give either \"path\" or \"vf\", one device per call".into())
            }
            (None, None) => {
                return Err("no device given: give \"path\" (a host PCI device) or \"vf\" (an SR-IOV physical function to take a VF of)".into())
            }
            (Some(_), None) if has_vf_settings => {
                return Err("\"mac\", \"vlan\", \"trust\" and \"spoofchk\" apply only to a \"vf\" device".into())
            }
            (None, Some(_)) if w.group_fd.is_some() => {
                return Err("\"group_fd\" applies only to a \"path\" device: rvmm opens the VF it picks itself".into())
            }
            (Some(bdf), None) => DeviceSource::Host(bdf),
            (None, Some(pf)) => {
                let policy = VfPolicy {
                    mac: w.mac,
                    vlan: w.vlan,
                    trust: w.trust,
                    spoofchk: w.spoofchk,
                };
                policy.check().map_err(|e| e.to_string())?;
                DeviceSource::Vf(VfRequest { pf, policy })
            }
        };
        Ok(DeviceSpec {
            id: w.id,
            source,
            group: w.group_fd.map(GroupFd::Number),
        })
    }
}

impl From<&DeviceSpec> for AddDeviceWire {
    fn from(spec: &DeviceSpec) -> Self {
        let mut w = AddDeviceWire {
            id: spec.id.clone(),
            group_fd: spec.group.as_ref().map(GroupFd::number),
            ..AddDeviceWire::default()
        };
        match &spec.source {
            DeviceSource::Host(bdf) => w.path = Some(*bdf),
            DeviceSource::Vf(vf) => {
                w.vf = Some(vf.pf.clone());
                w.mac = vf.policy.mac;
                w.vlan = vf.policy.vlan;
                w.trust = vf.policy.trust;
                w.spoofchk = vf.policy.spoofchk;
            }
        }
        w
    }
}

/// `PUT /v1/vm/add-device` takes a [`DeviceSpec`] in the shape of [`AddDeviceWire`].
impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AddDeviceWire::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = AddDeviceWire::deserialize(d)?;
        DeviceSpec::try_from(wire).map_err(serde::de::Error::custom)
    }
}

/// `PUT /v1/vm/remove-device`: hot-remove one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDeviceRequest {
    /// The device.
    pub id: DeviceId,
    /// Remove at once without asking the guest (it sees the device vanish).
    #[serde(default)]
    pub surprise: bool,
    /// How long the guest gets to release the device before the removal turns into a surprise
    /// removal (1 to 600000 ms; ignored with `surprise`).
    #[serde(
        default = "default_remove_timeout",
        deserialize_with = "remove_timeout"
    )]
    pub timeout_ms: u64,
}

impl RemoveDeviceRequest {
    /// The graceful-removal deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Checks what a caller may have built by hand (the JSON decoder checks the same): a
    /// timeout of 1 to [`MAX_REMOVE_TIMEOUT_MS`] ms.
    pub fn check(&self) -> Result<(), String> {
        check_remove_timeout(self.timeout_ms)
    }
}

/// The one rule for a removal's `timeout_ms`.
fn check_remove_timeout(v: u64) -> Result<(), String> {
    if (1..=MAX_REMOVE_TIMEOUT_MS).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "invalid timeout_ms {v}: use 1 to {MAX_REMOVE_TIMEOUT_MS}"
        ))
    }
}

fn default_remove_timeout() -> u64 {
    DEFAULT_REMOVE_TIMEOUT_MS
}

fn remove_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    check_remove_timeout(v)
        .map(|()| v)
        .map_err(serde::de::Error::custom)
}

/// `PUT /v1/vm/shutdown`: takes no fields (an empty body or `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {}

/// `PUT /v1/vm/pause` and `PUT /v1/vm/resume`: take no fields (an empty body or `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}
/// `PUT /v1/vm/power-button`: takes no fields (an empty body or `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerButtonRequest {}

/// A passthrough device: the answer of add-device and an entry of info.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its name.
    pub id: DeviceId,
    /// Its address in the guest.
    pub bdf: Bdf,
    /// Its address on the host.
    pub host_bdf: Bdf,
    /// The Physical Slot Number of the root port it sits behind.
    pub slot: u16,
    /// The guest address of that root port.
    pub root_port: Bdf,
    /// Where it is in its hotplug life.
    pub state: DeviceState,
    /// Set for a VF taken from an SR-IOV physical function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<VfInfo>,
}

/// How a VF device was set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfInfo {
    /// Host address of its physical function.
    pub pf: Bdf,
    /// Its VF index on that physical function.
    pub index: u16,
    /// Its MAC address, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    /// Its VLAN id, when set (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Whether it is trusted, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<bool>,
    /// Whether spoof checking is on, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoofchk: Option<bool>,
}

/// Why a device left the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemovalReason {
    /// A graceful removal: the guest powered the slot off.
    GuestEjected,
    /// A surprise removal asked for through the API.
    Surprise,
    /// The host asked for the device back (the VFIO request interrupt).
    HostRequest,
    /// The device failed (the VFIO error interrupt).
    DeviceError,
    /// The guest did not release the device before the deadline; it was surprise-removed.
    TimeoutEscalated,
    /// The guest rebooted while it was being asked to release the device: the guest that was
    /// asked is gone, so the removal was completed before the VM restarted.
    Reboot,
}

/// How a device error that rvmm forwarded to the guest ended (`device-error` event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceErrorOutcome {
    /// The guest's AER recovery finished and the device works: it stays.
    Recovered,
    /// The device is gone, the host reset it, the guest could not be told, or the guest did not
    /// recover it in time: it was surprise-removed (a `device-removed` event, reason
    /// `device-error`, came first).
    Removed,
}

/// `PUT /v1/vm/remove-device` answer: the device is released from the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveDeviceResponse {
    /// The device.
    pub id: DeviceId,
    /// Its former address in the guest.
    pub bdf: Bdf,
    /// Its address on the host, now free.
    pub host_bdf: Bdf,
    /// How the removal ended.
    pub reason: RemovalReason,
    /// Milliseconds from the request to the release.
    pub duration_ms: u64,
}

/// Use of the hotplug-capable root ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPortUsage {
    /// Ports with a device.
    pub used: u8,
    /// All ports.
    pub total: u8,
}

/// `GET /v1/vm/info` answer: the configuration and every passthrough device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// rvmm's version.
    pub version: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Whether guest RAM is on hugetlb pages.
    pub hugepages: bool,
    /// Root port use.
    pub root_ports: RootPortUsage,
    /// Every passthrough device, in slot order.
    pub devices: Vec<DeviceInfo>,
    /// What the VM holds on the host.
    pub resources: VmResources,
    /// Whether the guest runs or is paused.
    pub state: VmState,
    /// Where the guest's serial console is (absent in answers of older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleInfo>,
    /// Where guest RAM and the vCPU threads are on the host and why (absent in answers of
    /// older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::placement::Placement>,
    /// How hotplug reaches the guest, `--hotplug` (absent in answers of older servers, which
    /// only have native).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<crate::hotplug::HotplugMode>,
}

/// Where the guest's serial console is, as `--serial` chose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    /// What it is.
    pub kind: ConsoleKind,
    /// The file, socket or terminal (file, socket and pty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The kinds of serial console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    /// rvmm's stdin and stdout.
    Stdio,
    /// Output appended to a file, no input.
    File,
    /// A unix socket one client at a time attaches to (`rvmm ctl console`).
    Socket,
    /// A pseudo-terminal.
    Pty,
    /// No serial port.
    Off,
}

/// What the VM holds on the host right now (for leak checks after hotplug cycles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResources {
    /// File descriptors open in the rvmm process.
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE`: the budget `open_fds` counts against.
    pub fd_limit: u64,
    /// KVM memory slots used for device memory.
    pub memory_slots: u64,
    /// MSI routes in the KVM GSI routing table.
    pub msi_routes: u64,
    /// GSIs allocated for MSI routes.
    pub msi_gsis: u64,
    /// MSI/MSI-X vectors live on the host (an eventfd and a host interrupt each) over all
    /// passthrough devices: MSI-X vectors become live as the guest unmasks them.
    #[serde(default)]
    pub host_vectors: u64,
}

/// Why the VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownReason {
    /// The guest powered off, or the API asked for a shutdown.
    PowerOff,
    /// The guest asked for a reset (rvmm ends the VM rather than rebooting it).
    Reset,
    /// A vCPU failed.
    Crash,
    /// The guest did not power off within the shutdown timeout after its power button was
    /// pressed (`rvmm run` on SIGTERM or SIGINT), and rvmm powered it off.
    ShutdownTimeout,
    /// rvmm powered the guest off at once on a signal (a second SIGTERM or SIGINT, or Ctrl-C on
    /// an interactive console).
    Signal,
    /// rvmm stopped the VM because of an error of its own (its event loop failed).
    Error,
}

impl From<VmExit> for ShutdownReason {
    fn from(exit: VmExit) -> Self {
        match exit {
            VmExit::PowerOff => ShutdownReason::PowerOff,
            VmExit::Reset => ShutdownReason::Reset,
            VmExit::Crash => ShutdownReason::Crash,
            VmExit::ShutdownTimeout => ShutdownReason::ShutdownTimeout,
            VmExit::Signal => ShutdownReason::Signal,
        }
    }
}

/// One line of `GET /v1/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened: milliseconds since the Unix epoch, UTC.
    pub timestamp_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// `kind`, stamped with the current time.
    pub fn now(kind: EventKind) -> Self {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self { timestamp_ms, kind }
    }
}

/// What an [`Event`] reports; the `event` field names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// The vCPUs started: the first event of every VM.
    VmStarted {
        /// Number of vCPUs.
        cpus: u8,
    },
    /// The guest has the device (same fields as the add-device answer).
    DeviceAdded(DeviceInfo),
    /// The device is being taken back from the guest.
    DeviceRemoving {
        /// The device.
        id: DeviceId,
        /// Its guest address.
        bdf: Bdf,
        /// Its host address.
        host_bdf: Bdf,
        /// Whether the guest is not asked first.
        surprise: bool,
    },
    /// The device is released from the VM.
    DeviceRemoved {
        /// The device.
        id: DeviceId,
        /// Its former guest address.
        bdf: Bdf,
        /// Its host address.
        host_bdf: Bdf,
        /// Why it left.
        reason: RemovalReason,
    },
    /// The host reported an error on the device (the VFIO error interrupt) and it was handled:
    /// recovered by the guest after rvmm forwarded it as an AER error, or removed.
    DeviceError {
        /// The device.
        id: DeviceId,
        /// Its guest address.
        bdf: Bdf,
        /// Its host address.
        host_bdf: Bdf,
        /// How it ended.
        outcome: DeviceErrorOutcome,
    },
    /// Every vCPU is parked (`PUT /v1/vm/pause`).
    VmPaused,
    /// The vCPUs run again (`PUT /v1/vm/resume`).
    VmResumed,
    /// The guest reset and the VM restarted in place (`--on-reboot restart`): vCPUs, platform
    /// and passthrough devices reset, the payload loaded again; memory, devices and the API
    /// stayed.
    VmRebooted {
        /// Reboots of this VM so far, this one included.
        reboots: u64,
        /// Hot-adds in flight at the reset, rolled back (the guest they waited for is gone).
        rolled_back: Vec<DeviceId>,
        /// Graceful removals in flight at the reset, completed (`device-removed` with reason
        /// `reboot` came first).
        removed: Vec<DeviceId>,
    },
    /// The VM ended; the stream ends after this event.
    VmShutdown {
        /// Why.
        reason: ShutdownReason,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(json: &str) -> Result<DeviceSpec, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    fn remove(json: &str) -> Result<RemoveDeviceRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().expect("valid test address")
    }

    #[test]
    fn add_by_sysfs_path_gives_the_host_address() {
        let req = add(r#"{"path": "/sys/bus/pci/devices/0000:01:00.0", "id": "nvme0"}"#);
        assert_eq!(
            req,
            Ok(DeviceSpec {
                id: Some(DeviceId::new("nvme0").expect("valid id")),
                source: DeviceSource::Host(bdf("0000:01:00.0")),
                group: None,
            })
        );
    }

    #[test]
    fn add_vf_keeps_its_settings() {
        let req = add(r#"{"vf": "enp1s0", "mac": "52:54:00:00:00:01", "vlan": 10, "trust": true, "spoofchk": false}"#)
            .expect("valid request");
        let DeviceSource::Vf(vf) = req.source else {
            panic!("not a VF: {:?}", req.source);
        };
        assert_eq!(vf.pf, PfSpec::Netdev("enp1s0".into()));
        assert_eq!(vf.policy.vlan, Some(10));
        assert_eq!(vf.policy.trust, Some(true));
        assert_eq!(vf.policy.spoofchk, Some(false));
        assert_eq!(
            vf.policy.mac.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:00:00:01")
        );
    }

    #[test]
    fn add_with_path_and_vf_is_two_devices() {
        let err = add(r#"{"path": "01:00.0", "vf": "enp1s0"}"#).expect_err("two devices");
        assert!(err.contains("two devices in one call"), "{err}");
    }

    #[test]
    fn add_with_a_repeated_path_is_rejected() {
        let err = add(r#"{"path": "01:00.0", "path": "02:00.0"}"#).expect_err("two paths");
        assert!(err.contains("duplicate field `path`"), "{err}");
    }

    #[test]
    fn add_with_unknown_field_is_rejected() {
        let err = add(r#"{"path": "01:00.0", "hotplug": true}"#).expect_err("unknown field");
        assert!(err.contains("unknown field `hotplug`"), "{err}");
    }

    #[test]
    fn add_without_device_is_rejected() {
        let err = add(r#"{"id": "x"}"#).expect_err("no device");
        assert!(err.contains("no device given"), "{err}");
    }

    #[test]
    fn add_path_with_vf_settings_is_rejected() {
        let err = add(r#"{"path": "01:00.0", "vlan": 3}"#).expect_err("vlan on a path");
        assert!(err.contains("apply only to a \"vf\" device"), "{err}");
    }

    #[test]
    fn add_vf_with_a_multicast_mac_is_rejected() {
        let err = add(r#"{"vf": "enp1s0", "mac": "01:00:5e:00:00:01"}"#).expect_err("multicast");
        assert!(
            err.contains("cannot be given to a VF: it is multicast"),
            "{err}"
        );
    }

    #[test]
    fn add_with_vlan_4095_is_rejected() {
        let err = add(r#"{"vf": "enp1s0", "vlan": 4095}"#).expect_err("vlan out of range");
        assert!(err.contains("invalid VLAN id 4095"), "{err}");
    }

    #[test]
    fn add_request_round_trips_through_json() {
        let req = add(r#"{"vf": "0000:3b:00.0", "id": "vf0", "vlan": 0}"#).expect("valid");
        let json = serde_json::to_string(&req).expect("serializable");
        assert_eq!(json, r#"{"id":"vf0","vf":"0000:3b:00.0","vlan":0}"#);
        assert_eq!(add(&json), Ok(req));
    }

    #[test]
    fn remove_defaults_to_graceful_with_ten_seconds() {
        let req = remove(r#"{"id": "nvme0"}"#).expect("valid");
        assert!(!req.surprise);
        assert_eq!(req.timeout_ms, DEFAULT_REMOVE_TIMEOUT_MS);
    }

    #[test]
    fn remove_with_zero_timeout_is_rejected() {
        let err = remove(r#"{"id": "nvme0", "timeout_ms": 0}"#).expect_err("zero timeout");
        assert!(err.contains("invalid timeout_ms 0"), "{err}");
    }

    #[test]
    fn remove_with_unknown_field_is_rejected() {
        let err = remove(r#"{"id": "nvme0", "force": true}"#).expect_err("unknown field");
        assert!(err.contains("unknown field `force`"), "{err}");
    }

    #[test]
    fn shutdown_takes_an_empty_object_only() {
        assert!(serde_json::from_str::<ShutdownRequest>("{}").is_ok());
        assert!(serde_json::from_str::<ShutdownRequest>(r#"{"now": true}"#).is_err());
    }

    #[test]
    fn event_serializes_flat_with_its_name_and_timestamp() {
        let event = Event {
            timestamp_ms: 1_700_000_000_123,
            kind: EventKind::DeviceRemoved {
                id: DeviceId::new("nvme0").expect("valid id"),
                bdf: bdf("0000:02:00.0"),
                host_bdf: bdf("0000:01:00.0"),
                reason: RemovalReason::TimeoutEscalated,
            },
        };
        let json = serde_json::to_string(&event).expect("serializable");
        assert_eq!(
            json,
            r#"{"timestamp_ms":1700000000123,"event":"device-removed","id":"nvme0","bdf":"0000:02:00.0","host_bdf":"0000:01:00.0","reason":"timeout-escalated"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).ok(), Some(event));
    }

    #[test]
    fn device_added_event_carries_the_device_fields() {
        let event = Event::now(EventKind::DeviceAdded(DeviceInfo {
            id: DeviceId::new("nvme0").expect("valid id"),
            bdf: bdf("0000:02:00.0"),
            host_bdf: bdf("0000:01:00.0"),
            slot: 1,
            root_port: bdf("0000:00:01.0"),
            state: DeviceState::Present,
            vf: None,
        }));
        let value = serde_json::to_value(&event).expect("serializable");
        assert_eq!(value["event"], "device-added");
        assert_eq!(value["slot"], 1);
        assert_eq!(value["state"], "present");
        assert!(value["timestamp_ms"].as_u64().is_some_and(|t| t > 0));
    }

    #[test]
    fn pause_events_carry_only_their_name_and_time() {
        let json = serde_json::to_string(&Event {
            timestamp_ms: 5,
            kind: EventKind::VmPaused,
        })
        .expect("serializable");
        assert_eq!(json, r#"{"timestamp_ms":5,"event":"vm-paused"}"#);
        let back: Event =
            serde_json::from_str(r#"{"timestamp_ms":6,"event":"vm-resumed"}"#).expect("valid");
        assert_eq!(back.kind, EventKind::VmResumed);
    }

    #[test]
    fn vm_exit_maps_to_shutdown_reason() {
        assert_eq!(ShutdownReason::from(VmExit::Reset), ShutdownReason::Reset);
    }
}
