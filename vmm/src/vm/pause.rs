//! Pausing and resuming a whole VM for the control API: the vCPUs parked at their gate
//! ([`VcpuPause`]), the guest's clock held still while they are, `vm-paused` and `vm-resumed`
//! published, and the answers the API gives (what is refused while paused, and why).
//!
//! The guest's clock: KVM's paravirtual clock (kvmclock) follows the host's monotonic clock, so
//! a guest paused for a minute would find a minute gone at resume (timers due in that minute
//! fire at once, its watchdogs may see a stall). As QEMU and Cloud Hypervisor do, the clock is
//! read (`KVM_GET_CLOCK`) once the vCPUs are parked and written back (`KVM_SET_CLOCK`) before
//! they run again: the guest's monotonic time does not advance while paused, and its wall
//! clock is behind by the pause until it syncs (NTP). The guest's TSC is not held.

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Event, EventBus, EventKind};
use crate::cpu::pause::{PauseError, Paused, VcpuPause};

/// How long a pause waits for every vCPU to leave `KVM_RUN` (they do within microseconds of
/// a kick; only a vCPU stuck in a host call takes longer).
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(3);

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Every vCPU is parked out of `KVM_RUN` (`PUT /v1/vm/pause`) until a resume.
    Paused,
}

/// The VM-wide clock a pause holds still (KVM's kvmclock; a fake in tests).
pub trait GuestClock: Send + Sync {
    /// `KVM_GET_CLOCK`.
    fn read(&self) -> Result<kvm_clock_data, kvm_ioctls::Error>;
    /// `KVM_SET_CLOCK`.
    fn write(&self, data: &kvm_clock_data) -> Result<(), kvm_ioctls::Error>;
}

impl GuestClock for VmFd {
    fn read(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
        self.get_clock()
    }

    fn write(&self, data: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
        self.set_clock(data)
    }
}

/// Pause and resume of one VM, driven by the controller on the event loop.
pub struct VmPause {
    vcpus: Arc<VcpuPause>,
    clock: Arc<dyn GuestClock>,
    /// The guest clock read at the pause, written back at the resume.
    saved_clock: Option<kvm_clock_data>,
    events: Arc<EventBus>,
    deadline: Duration,
}

impl VmPause {
    /// Pause control over the vCPUs of `vcpus`, holding `clock` still while paused and
    /// publishing on `events`.
    pub fn new(vcpus: Arc<VcpuPause>, clock: Arc<dyn GuestClock>, events: Arc<EventBus>) -> Self {
        Self {
            vcpus,
            clock,
            saved_clock: None,
            events,
            deadline: PAUSE_DEADLINE,
        }
    }

    /// Whether the guest runs.
    pub fn state(&self) -> VmState {
        if self.vcpus.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Pauses the VM: answers once every vCPU is parked. A paused VM stays paused and nothing
    /// is published (a PUT is idempotent). `busy` names a hotplug operation in flight, which
    /// refuses the pause: the guest could not advance it while paused and it would time out.
    pub fn pause(&mut self, busy: Option<String>) -> Result<(), ApiError> {
        if self.vcpus.is_paused() {
            return Ok(());
        }
        if let Some(busy) = busy {
            return Err(ApiError::Conflict(format!(
                "cannot pause the VM while {busy}: wait for that to finish, then pause"
            )));
        }
        match self.vcpus.pause(self.deadline) {
            Ok(Paused::Already) => return Ok(()),
            Ok(Paused::Now) => {}
            Err(PauseError::Stopping) => {
                return Err(ApiError::Unavailable("the VM is stopping".into()))
            }
            Err(e @ PauseError::NotParked { .. }) => {
                log::warn!("pause: {e}");
                return Err(ApiError::Timeout {
                    step: format!("waiting for every vCPU to stop ({e})"),
                    after_ms: u64::try_from(self.deadline.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
        match self.clock.read() {
            Ok(mut clock) => {
                // Written back as a plain value: no flags (e.g. KVM_CLOCK_REALTIME) that
                // would make KVM move it forward by the time paused.
                clock.flags = 0;
                self.saved_clock = Some(clock);
            }
            Err(e) => {
                self.vcpus.resume();
                return Err(ApiError::Internal(format!(
                    "cannot pause the VM: reading the guest clock (KVM_GET_CLOCK) failed: {e}; the VM runs on"
                )));
            }
        }
        log::info!("VM paused");
        self.events.publish(Event::now(EventKind::VmPaused));
        Ok(())
    }

    /// Resumes a paused VM; a running VM stays running and nothing is published.
    pub fn resume(&mut self) -> Result<(), ApiError> {
        if !self.vcpus.is_paused() {
            return Ok(());
        }
        if let Some(clock) = self.saved_clock.take() {
            if let Err(e) = self.clock.write(&clock) {
                // The guest then finds the time paused gone, as if it had run: better than
                // not running it.
                log::warn!(
                    "resume: cannot restore the guest clock (KVM_SET_CLOCK): {e}; its clock jumps by the time paused"
                );
            }
        }
        self.vcpus.resume();
        log::info!("VM resumed");
        self.events.publish(Event::now(EventKind::VmResumed));
        Ok(())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// Refuses `what` (a hotplug request) while the VM is paused.
    pub fn refuse_while_paused(&self, what: &str) -> Result<(), ApiError> {
        if self.vcpus.is_paused() {
            return Err(ApiError::Conflict(format!(
                "cannot {what} while the VM is paused: hotplug needs the guest running; resume it first (rvmm ctl resume)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "pause_tests.rs"]
mod tests;
