//! Cloud Hypervisor's REST API (`/api/v1/...`) on rvmm's API socket, beside rvmm's own `/v1`
//! API: the paths, methods, request bodies, answers and status codes of that API's OpenAPI
//! document for the verbs rvmm has, mapped onto rvmm's handler (docs/api.md has the table).
//!
//! VM-level verbs go to the [`ApiHandler`] like rvmm's own endpoints; the VMM-level ones
//! (`vm.create`, `vm.boot`, `vm.delete`, `vm.shutdown`, `vmm.shutdown`) to the
//! [`VmmControl`] the handler may offer: an rvmm started without a VM (`rvmm run --api-socket`
//! alone) has one ([`crate::manager`]); one started with `--kernel` runs the VM of its command
//! line and answers them as a VMM whose VM cannot take them.

pub mod config;
pub mod info;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::http::{Request, Response};
use crate::api::server::json_body;
use crate::api::types::{RemoveDeviceRequest, DEFAULT_REMOVE_TIMEOUT_MS};
use crate::api::ApiHandler;
use crate::device::{DeviceId, DeviceSpec};
use crate::vm::config::VmConfig;

/// Where that API's paths begin.
pub const PREFIX: &str = "/api/v1/";

/// The verbs, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChEndpoint {
    /// `GET vmm.ping`.
    Ping,
    /// `PUT vmm.shutdown`.
    VmmShutdown,
    /// `PUT vm.create`.
    Create,
    /// `PUT vm.boot`.
    Boot,
    /// `PUT vm.delete`.
    Delete,
    /// `GET vm.info`.
    Info,
    /// `GET vm.counters`.
    Counters,
    /// `PUT vm.pause`.
    Pause,
    /// `PUT vm.resume`.
    Resume,
    /// `PUT vm.shutdown`.
    Shutdown,
    /// `PUT vm.reboot`.
    Reboot,
    /// `PUT vm.power-button`.
    PowerButton,
    /// `PUT vm.add-device`.
    AddDevice,
    /// `PUT vm.remove-device`.
    RemoveDevice,
}

/// Every verb with its path (after [`PREFIX`]) and method.
pub const CH_ROUTES: [(&str, &str, ChEndpoint); 14] = [
    ("vmm.ping", "GET", ChEndpoint::Ping),
    ("vmm.shutdown", "PUT", ChEndpoint::VmmShutdown),
    ("vm.create", "PUT", ChEndpoint::Create),
    ("vm.boot", "PUT", ChEndpoint::Boot),
    ("vm.delete", "PUT", ChEndpoint::Delete),
    ("vm.info", "GET", ChEndpoint::Info),
    ("vm.counters", "GET", ChEndpoint::Counters),
    ("vm.pause", "PUT", ChEndpoint::Pause),
    ("vm.resume", "PUT", ChEndpoint::Resume),
    ("vm.shutdown", "PUT", ChEndpoint::Shutdown),
    ("vm.reboot", "PUT", ChEndpoint::Reboot),
    ("vm.power-button", "PUT", ChEndpoint::PowerButton),
    ("vm.add-device", "PUT", ChEndpoint::AddDevice),
    ("vm.remove-device", "PUT", ChEndpoint::RemoveDevice),
];

/// The verb of `method target`; `None` when the target is not under [`PREFIX`] (rvmm's own
/// API then routes it).
pub fn route(method: &str, target: &str) -> Option<Result<ChEndpoint, ApiError>> {
    let name = target.strip_prefix(PREFIX)?;
    let found = CH_ROUTES.iter().find(|(path, ..)| *path == name);
    Some(match found {
        None => Err(ApiError::UnknownPath {
            path: target.to_owned(),
        }),
        Some((_, allowed, _)) if method != *allowed => Err(ApiError::MethodNotAllowed {
            method: method.to_owned(),
            path: target.to_owned(),
            allowed,
        }),
        Some((.., endpoint)) => Ok(*endpoint),
    })
}

/// Where the VM is in its life, as that API names it (`VmState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChVmState {
    /// Created, not booted.
    Created,
    /// Booted, its vCPUs run.
    Running,
    /// Booted, its vCPUs are parked.
    Paused,
    /// Ended (powered off, shut down); it can be booted again or deleted.
    Shutdown,
}

/// A failed verb: an HTTP status of that API's document and the message for the person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChError {
    /// The status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl ChError {
    /// 404: there is no VM to act on (that API's "not created").
    pub fn not_created(what: &str) -> Self {
        Self {
            status: 404,
            message: format!("{what}: no VM is created; create one first (PUT {PREFIX}vm.create)"),
        }
    }

    /// 405: the VM cannot take this action in its state (that API's status for it).
    pub fn not_allowed(message: impl Into<String>) -> Self {
        Self {
            status: 405,
            message: message.into(),
        }
    }

    /// 400: the request itself is refused (a field rvmm does not support, a bad value).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }

    /// The HTTP answer: the status and rvmm's `{"error": ...}` body.
    pub fn response(&self) -> Response {
        let mut r = Response::json(
            self.status,
            &crate::api::error::ErrorBody {
                error: self.message.clone(),
                step: None,
            },
        );
        r.status = self.status;
        r
    }
}

impl From<ApiError> for ChError {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status(),
            message: e.to_string(),
        }
    }
}

/// The VMM-level verbs of an rvmm that creates and deletes its VM through the API.
pub trait VmmControl: Send + Sync {
    /// Creates the VM (memory reserved, machine built, cold-plugged devices attached); its
    /// vCPUs do not run yet. Refused while a VM exists.
    fn create(&self, config: VmConfig) -> Result<(), ChError>;
    /// Attaches a device to the created, not yet booted VM (present when the guest starts).
    fn add_device_cold(&self, spec: DeviceSpec) -> Result<(), ChError>;
    /// Boots the created VM (or boots again one that was shut down).
    fn boot(&self) -> Result<(), ChError>;
    /// Shuts the VM down; returns once it has ended (its configuration is kept).
    fn shutdown_vm(&self) -> Result<(), ChError>;
    /// Shuts the VM down if it runs and forgets it: everything it held is released.
    fn delete(&self) -> Result<(), ChError>;
    /// Shuts the VM down if it runs and ends rvmm after this answer.
    fn shutdown_vmm(&self) -> Result<(), ChError>;
    /// The VM's state and configuration; `None` when no VM is created.
    fn status(&self) -> Option<(ChVmState, VmConfig)>;
}

/// `vmm.ping`'s answer (`VmmPingResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// How rvmm was built (the crate version).
    pub build_version: String,
    /// rvmm's version.
    pub version: String,
    /// rvmm's process id.
    pub pid: i64,
    /// What this rvmm can do.
    pub features: Vec<String>,
}

impl PingResponse {
    /// This process.
    pub fn current() -> Self {
        Self {
            build_version: format!("rvmm {}", env!("CARGO_PKG_VERSION")),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: i64::from(std::process::id()),
            features: ["kvm", "vfio", "pci_hotplug", "sriov"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// `vm.remove-device`'s body (`VmRemoveDevice`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChRemoveDevice {
    /// The device.
    pub id: Option<String>,
}

/// A verb without a body takes none, or an empty JSON object.
fn no_body(request: &Request) -> Result<(), ChError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(&request.body) {
        Ok(Value::Object(m)) if m.is_empty() => Ok(()),
        _ => Err(ChError::bad_request(format!(
            "PUT {} takes no request body",
            request.target
        ))),
    }
}

/// Answers one verb of that API.
pub fn dispatch(
    endpoint: ChEndpoint,
    request: &Request,
    handler: &dyn ApiHandler,
    client_gone: &dyn Fn() -> bool,
) -> Response {
    answer(endpoint, request, handler, client_gone).unwrap_or_else(|e| e.response())
}

fn vmm<'a>(handler: &'a dyn ApiHandler, what: &str) -> Result<&'a dyn VmmControl, ChError> {
    handler.vmm().ok_or_else(|| {
        ChError::not_allowed(format!(
            "{what}: this rvmm runs the VM of its command line (--kernel), which it created and booted at start; start rvmm with --api-socket alone to create VMs through the API"
        ))
    })
}

/// The VM's state: the VMM's when it keeps one, else the running VM's own.
fn state(handler: &dyn ApiHandler, what: &str) -> Result<ChVmState, ChError> {
    match handler.vmm() {
        Some(vmm) => vmm
            .status()
            .map(|(s, _)| s)
            .ok_or_else(|| ChError::not_created(what)),
        None => Ok(ChVmState::Running),
    }
}

/// Refuses an action that needs booted vCPUs in `Created` or `Shutdown` (that API's 405).
fn booted(handler: &dyn ApiHandler, what: &str) -> Result<(), ChError> {
    match state(handler, what)? {
        ChVmState::Running | ChVmState::Paused => Ok(()),
        other => Err(ChError::not_allowed(format!(
            "{what}: the VM is {other:?}, not booted; boot it first (PUT {PREFIX}vm.boot)"
        ))),
    }
}

fn answer(
    endpoint: ChEndpoint,
    request: &Request,
    handler: &dyn ApiHandler,
    client_gone: &dyn Fn() -> bool,
) -> Result<Response, ChError> {
    if !matches!(
        endpoint,
        ChEndpoint::Create | ChEndpoint::AddDevice | ChEndpoint::RemoveDevice
    ) {
        no_body(request)?;
    }
    let done = |r: Result<(), ChError>| r.map(|()| Response::no_content());
    match endpoint {
        ChEndpoint::Ping => Ok(Response::json(200, &PingResponse::current())),
        ChEndpoint::VmmShutdown => done(vmm(handler, "vmm.shutdown")?.shutdown_vmm()),
        ChEndpoint::Create => {
            let body: Value = json_body(&request.body)?;
            let config = config::vm_config(&body).map_err(ChError::bad_request)?;
            done(vmm(handler, "vm.create")?.create(config))
        }
        ChEndpoint::Boot => done(vmm(handler, "vm.boot")?.boot()),
        ChEndpoint::Delete => done(vmm(handler, "vm.delete")?.delete()),
        ChEndpoint::Shutdown => match handler.vmm() {
            Some(vmm) => done(vmm.shutdown_vm()),
            None => done(handler.shutdown().map_err(ChError::from)),
        },
        ChEndpoint::Info => info::vm_info(handler).map(|i| Response::json(200, &i)),
        ChEndpoint::Counters => {
            booted(handler, "vm.counters")?;
            let counters = handler.counters()?;
            Ok(Response::json(200, &info::counters(&counters)))
        }
        ChEndpoint::Pause => {
            booted(handler, "vm.pause")?;
            if state(handler, "vm.pause")? == ChVmState::Paused {
                return Err(ChError::not_allowed("vm.pause: the VM is already paused"));
            }
            done(handler.pause().map_err(ChError::from))
        }
        ChEndpoint::Resume => {
            booted(handler, "vm.resume")?;
            if handler.vmm().is_some() && state(handler, "vm.resume")? != ChVmState::Paused {
                return Err(ChError::not_allowed("vm.resume: the VM is not paused"));
            }
            done(handler.resume().map_err(ChError::from))
        }
        ChEndpoint::PowerButton => {
            booted(handler, "vm.power-button")?;
            done(handler.power_button().map_err(ChError::from))
        }
        ChEndpoint::Reboot => {
            booted(handler, "vm.reboot")?;
            done(handler.reboot().map_err(ChError::from))
        }
        ChEndpoint::AddDevice => {
            let body: Value = json_body(&request.body)?;
            let spec = config::device_config(&body, "the device").map_err(ChError::bad_request)?;
            if let Some(vmm) = handler.vmm() {
                if state(handler, "vm.add-device")? == ChVmState::Created {
                    // That API's cold add: 204, the device is there when the guest starts.
                    return done(vmm.add_device_cold(spec));
                }
            }
            booted(handler, "vm.add-device")?;
            let added = handler.add_device_for(spec, client_gone)?;
            Ok(Response::json(200, &info::PciDeviceInfo::from(&added)))
        }
        ChEndpoint::RemoveDevice => {
            let body: ChRemoveDevice = json_body(&request.body)?;
            let id = body
                .id
                .ok_or_else(|| ChError::bad_request("id: required: the device to remove"))?;
            let id = DeviceId::new(&id).map_err(|e| ChError::bad_request(format!("id: {e}")))?;
            booted(handler, "vm.remove-device")?;
            handler.remove_device(RemoveDeviceRequest {
                id,
                surprise: false,
                timeout_ms: DEFAULT_REMOVE_TIMEOUT_MS,
            })?;
            Ok(Response::no_content())
        }
    }
}

#[cfg(test)]
#[path = "ch_tests.rs"]
mod tests;
