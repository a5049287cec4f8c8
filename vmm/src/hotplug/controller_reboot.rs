//! The controller's part of a reboot in place: hotplug operations in flight are finished
//! first, then every root port and passthrough device is reset to the state the next guest
//! must find at boot. Called with the vCPUs stopped and the event loop not running.

use std::time::Instant;

use event_manager::EventOps;
use rvmm_devices::sync::MutexExt;

use super::{Controller, Op, Removal};
use crate::api::{ApiError, RemovalReason};
use crate::device::{DeviceId, DeviceState};

/// What a reboot did to the hotplug operations in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebootOutcome {
    /// Hot-adds that waited for the guest, rolled back.
    pub rolled_back: Vec<DeviceId>,
    /// Graceful removals under way, completed.
    pub removed: Vec<DeviceId>,
    /// Devices whose reset failed (they stay attached; the guest may find them unusable).
    pub reset_failed: Vec<DeviceId>,
}

impl Controller {
    /// Prepares the devices for a reboot: a hot-add in flight is rolled back (the guest it
    /// waited for is gone; its client gets an error), a graceful removal in flight is
    /// completed (`device-removed`, reason `reboot`); then every root port goes back to its
    /// power-on state with its device present as at cold boot (hot-added ones too, in the same
    /// slot), and every passthrough device is reset (see
    /// [`rvmm_vfio::VfioPciDevice::reset_for_reboot`]). Devices, DMA mappings and VF leases
    /// stay.
    pub fn prepare_reboot(&mut self, ops: &mut EventOps) -> RebootOutcome {
        let mut outcome = RebootOutcome::default();
        for (id, op) in std::mem::take(&mut self.ops) {
            // Out of the slot without an event to the guest: there is no guest.
            if let Some(port) = self.passthrough.get(&id).map(|d| d.port) {
                if let Some(port) = self.segment.port(port) {
                    if let Err(e) = port.locked().take_device_at_reset() {
                        log::error!("device {id}: cannot reset its root port: {e}");
                    }
                }
            }
            match op {
                Op::WaitingForSlot { reply, .. } | Op::WaitingForGuest { reply, .. } => {
                    log::warn!("hot-add of {id} rolled back: the guest rebooted before taking it");
                    self.roll_back_add(&id, ops);
                    if let Some(r) = reply {
                        r.reply(Err(ApiError::Unavailable(format!(
                            "hot-add of {id} rolled back: the guest rebooted before it took the device"
                        ))));
                    }
                    outcome.rolled_back.push(id);
                }
                Op::Removing(Removal { started, reply, .. }) => {
                    log::info!("removal of {id} completed: the guest rebooted during it");
                    let r = self.remove_now(&id, RemovalReason::Reboot, false, started, ops);
                    if let (Some(reply), Some(r)) = (reply, r) {
                        reply.reply(Ok(r));
                    }
                    outcome.removed.push(id);
                }
            }
        }
        self.add_started.clear();
        self.end_recoveries_at_reboot();
        self.arm_timer();
        for index in 0..self.segment.ports().len() {
            let Some(port) = self.segment.port(index) else {
                continue;
            };
            if let Err(e) = port.locked().reset_to_power_on() {
                log::error!("root port {}: cannot reset it: {e}", index + 1);
            }
        }
        let started = Instant::now();
        let ids: Vec<DeviceId> = self.passthrough.devices().map(|d| d.id.clone()).collect();
        for id in ids {
            let Some(d) = self.passthrough.get_mut(&id) else {
                continue;
            };
            d.state = DeviceState::Present;
            let methods = reset_methods(&d.host.sysfs_path);
            match d.device.reset_for_reboot() {
                Ok(()) => log::info!(
                    "device {id} (host {}): reset through VFIO_DEVICE_RESET (host reset methods: {methods})",
                    d.host.bdf
                ),
                Err(e) => {
                    log::error!(
                        "device {id} (host {}): reset failed: {}",
                        d.host.bdf,
                        rvmm_devices::error_chain(&e)
                    );
                    outcome.reset_failed.push(id);
                }
            }
        }
        log::info!("passthrough devices reset in {:?}", started.elapsed());
        outcome
    }
}

/// The host's reset methods for the device (`reset_method` in sysfs: `flr`, `pm`, `bus`, ...),
/// which the kernel tries in order on `VFIO_DEVICE_RESET`.
fn reset_methods(sysfs_path: &std::path::Path) -> String {
    std::fs::read_to_string(sysfs_path.join("reset_method"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}
