//! The control API: HTTP/1.1 + JSON on a unix socket, described by docs/api.yaml.
//!
//! | endpoint | body | answer |
//! |---|---|---|
//! | `GET /v1/vm/info` | – | [`VmInfo`] |
//! | `PUT /v1/vm/add-device` | [`DeviceSpec`] | [`DeviceInfo`], once the guest has the device |
//! | `PUT /v1/vm/remove-device` | [`RemoveDeviceRequest`] | [`RemoveDeviceResponse`], once released |
//! | `PUT /v1/vm/shutdown` | none or `{}` | 204 |
//! | `PUT /v1/vm/pause` | none or `{}` | 204, once every vCPU is parked |
//! | `PUT /v1/vm/resume` | none or `{}` | 204 |
//! | `PUT /v1/vm/power-button` | none or `{}` | 204, once the ACPI power button is pressed |
//! | `GET /v1/events` | – | a stream of [`Event`] JSON lines |
//! | `GET /v1/vm/counters` | – | [`Counters`] |
//!
//! Errors are `{"error": "message"}` with the status of [`ApiError::status`].
//!
//! The same socket serves Cloud Hypervisor's REST API under `/api/v1/` ([`ch`], docs/api.md).
//!
//! Threads: [`ApiServer`] accepts on its own thread and serves each connection on another, calling
//! an [`ApiHandler`]. The VMM's handler is a [`QueuedHandler`]: it queues each request into an
//! [`ApiRequestQueue`] that the event loop polls, so every change of the VM happens on the event
//! loop, which answers each [`PendingRequest`] when it is done. Events reach open streams through
//! an [`EventBus`]. [`ApiClient`] is the client `rvmm ctl` uses.

use crate::device::DeviceSpec;
use crate::observe::Counters;

pub mod ch;
pub mod client;
pub mod ctl;
pub mod ctl_console;
pub mod device_arg;
pub mod error;
pub mod events;
pub mod fd_passing;
pub mod http;
pub mod listen_fd;
pub mod queue;
pub mod server;
pub mod types;
pub mod values;

#[cfg(test)]
mod openapi_tests;

pub use client::{ApiClient, ClientError};
pub use device_arg::DeviceArgError;
pub use error::{ApiError, ErrorBody};
pub use events::{EventBus, EventSink, Received, Subscription};
pub use queue::{ApiRequestQueue, PendingRequest, QueueTimeouts, QueuedHandler, Responder};
pub use server::{ApiServer, ServerConfig, ServerError};
pub use types::{
    ConsoleInfo, ConsoleKind, DeviceErrorOutcome, DeviceInfo, Event, EventKind, RemovalReason,
    RemoveDeviceRequest, RemoveDeviceResponse, RootPortUsage, ShutdownReason, VfInfo, VmInfo,
};
pub use values::ValueError;

/// What the API server asks of the VMM. Calls come from the server's connection threads, several
/// at once; each blocks until its operation is done.
pub trait ApiHandler: Send + Sync {
    /// The configuration and every passthrough device.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Hot-adds one device; returns when the guest has it.
    fn add_device(&self, req: DeviceSpec) -> Result<DeviceInfo, ApiError>;
    /// [`ApiHandler::add_device`] for a client that may go away before the answer: the VMM
    /// asks `client_gone` while it waits, and once it says yes, rolls the add back as it does at
    /// the add's deadline (a device nobody waits for is not left half-added). The control API
    /// server calls this with a check of the client's connection; the default ignores it.
    fn add_device_for(
        &self,
        req: DeviceSpec,
        client_gone: &dyn Fn() -> bool,
    ) -> Result<DeviceInfo, ApiError> {
        let _ = client_gone;
        self.add_device(req)
    }
    /// Hot-removes one device; returns when it is released from the VM.
    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError>;
    /// Stops the VM; returns once the shutdown is under way.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Pauses the VM; returns once every vCPU is parked out of `KVM_RUN`. Pausing a paused
    /// VM succeeds and changes nothing.
    fn pause(&self) -> Result<(), ApiError>;
    /// Resumes a paused VM. Resuming a running VM succeeds and changes nothing.
    fn resume(&self) -> Result<(), ApiError>;
    /// Presses the VM's ACPI power button; returns once it is pressed. The guest then shuts
    /// down the way it was configured to (or not at all).
    fn power_button(&self) -> Result<(), ApiError>;
    /// Resets the VM as a guest reset does (reboot in place with `--on-reboot restart`, the end
    /// of the VM with `exit`); returns once the reset is requested. Refused while paused.
    fn reboot(&self) -> Result<(), ApiError> {
        Err(ApiError::Conflict(
            "this VM cannot be reset on request".to_owned(),
        ))
    }
    /// A stream of every event from now on; it ends when the VM ends.
    fn subscribe(&self) -> Subscription;
    /// What the VM has done since it started (exits, interrupts, hotplug operations, memory).
    /// The VMM's handler answers it; a handler that keeps no counters says so with a 404.
    fn counters(&self) -> Result<Counters, ApiError> {
        Err(ApiError::UnknownPath {
            path: server::COUNTERS_PATH.to_owned(),
        })
    }
    /// The VMM-level verbs of Cloud Hypervisor's API (create, boot, delete a VM), when this
    /// handler's VMM creates its VM through the API ([`crate::manager`]); `None` (the
    /// default) for a VM built by its caller.
    fn vmm(&self) -> Option<&dyn ch::VmmControl> {
        None
    }
}
