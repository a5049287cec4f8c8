//! Device errors the guest recovers from (docs/hotplug.md, "Device errors").
//!
//! vfio-pci signals the VFIO error interrupt when the host's AER core reports an error on the
//! device (its `error_detected` handler). If the device still answers, rvmm forwards the error
//! to the guest: an uncorrectable non-fatal error in the device's emulated AER capability
//! ([`rvmm_vfio::aer`]) and an ERR_NONFATAL message on its root port
//! ([`rvmm_pci::RootPort::report_uncorrectable`]). The guest's AER core runs the driver's error
//! handlers (a reset it asks for — secondary bus reset, FLR — resets the real device through
//! VFIO) and ends by clearing the device's uncorrectable status, which wakes the controller
//! through the device's AER notifier. Recovered if the device then still has the Bus Master
//! Enable the guest set (the host did not reset it behind the guest); otherwise, or when the
//! device is gone, the guest cannot be told, or the deadline passes first: the surprise removal
//! the error interrupt always meant before. Either way a `device-error` event says which.
//!
//! The error interrupt carries no severity. The host's recovery of a fatal error resets the
//! link below the root port after the interrupt; that reset is what "the host reset it" catches.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use event_manager::EventOps;
use rvmm_pci::AerSignal;
use rvmm_vfio::aer::DeviceHealth;

use super::{Controller, VfioIrq};
use crate::api::{DeviceErrorOutcome, EventKind};
use crate::device::{DeviceId, DeviceState};
use rvmm_devices::sync::MutexExt;

/// How long the guest has to recover a device from a forwarded error before it is removed.
pub const ERROR_RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A forwarded error the guest is recovering from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Recovery {
    /// When the device is removed if the guest has not recovered it.
    deadline: Instant,
    /// When the error was forwarded.
    started: Instant,
    /// The uncorrectable status bit the guest was given.
    bit: u32,
}

/// The errors the guest is recovering from, by device.
pub(super) type Recoveries = BTreeMap<DeviceId, Recovery>;

/// Why a device error ended in removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// A hot-add or removal of the device was in flight.
    Busy,
    /// Its config space does not answer.
    Gone,
    /// It lost the guest's bus master enable: the host reset it.
    ResetByHost,
    /// It has no AER capability the guest could read the error from.
    NoAer,
    /// The guest masked every non-fatal error it could be given, or made them fatal.
    GuestMasked,
    /// The guest's AER service does not take error interrupts from the root port.
    NotListening,
    /// The guest did not recover it within [`ERROR_RECOVERY_TIMEOUT`].
    Timeout,
}

impl Failure {
    fn describe(self) -> &'static str {
        match self {
            Failure::Busy => "it was being added or removed",
            Failure::Gone => "it no longer answers",
            Failure::ResetByHost => "the host reset it (the guest's setup of it is lost)",
            Failure::NoAer => "it has no AER capability to report the error in",
            Failure::GuestMasked => "the guest masked the non-fatal errors it could be given",
            Failure::NotListening => {
                "the guest's AER service does not take error interrupts from its root port"
            }
            Failure::Timeout => "the guest did not recover it in time",
        }
    }
}

/// One look at a recovery in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The guest is still at it.
    Waiting,
    /// The guest cleared the error and the device kept its setup.
    Recovered,
    /// It ends in removal.
    Failed(Failure),
}

/// The deadline of a recovery whose deadline passed while the VM was paused.
fn paused_deadline(now: Instant) -> Instant {
    now + ERROR_RECOVERY_TIMEOUT
}

/// Where a recovery stands: the guest's uncorrectable status (`None`: the device lost its AER
/// capability, i.e. it was released), the device's health (asked only once the guest cleared
/// the error) and the time.
fn recovery_step(
    recovery: &Recovery,
    status: Option<u32>,
    health: impl FnOnce() -> DeviceHealth,
    now: Instant,
) -> Step {
    let Some(status) = status else {
        return Step::Failed(Failure::Gone);
    };
    if status & recovery.bit == 0 {
        return match health() {
            DeviceHealth::Usable => Step::Recovered,
            DeviceHealth::Gone => Step::Failed(Failure::Gone),
            DeviceHealth::Reset => Step::Failed(Failure::ResetByHost),
        };
    }
    if now >= recovery.deadline {
        Step::Failed(Failure::Timeout)
    } else {
        Step::Waiting
    }
}

impl Controller {
    /// The host reported an error on device `id` (VFIO error interrupt): forward it to the
    /// guest, or remove the device at once when that cannot help.
    pub(super) fn device_error(&mut self, id: &DeviceId, ops: &mut EventOps) {
        if self.recoveries.contains_key(id) {
            log::info!("device {id}: another error while the guest recovers from the last one");
            return;
        }
        match self.forward_error(id) {
            Ok(recovery) => {
                log::warn!(
                    "device {id}: error reported by the host, forwarded to the guest \
                     (AER uncorrectable non-fatal, status {:#x}); waiting {} s for its recovery",
                    recovery.bit,
                    ERROR_RECOVERY_TIMEOUT.as_secs()
                );
                self.recoveries.insert(id.clone(), recovery);
                self.arm_timer();
            }
            Err(failure) => self.error_removal(id, failure, ops),
        }
    }

    /// Tells the guest of the error: AER status in the device, an error message on its port.
    fn forward_error(&mut self, id: &DeviceId) -> Result<Recovery, Failure> {
        if self.ops.contains_key(id) {
            return Err(Failure::Busy);
        }
        let d = self.passthrough.get(id).ok_or(Failure::Gone)?;
        if d.state != DeviceState::Present {
            return Err(Failure::Busy);
        }
        match d.device.health() {
            DeviceHealth::Usable => {}
            DeviceHealth::Gone => return Err(Failure::Gone),
            DeviceHealth::Reset => return Err(Failure::ResetByHost),
        }
        if d.device.aer_uncorrectable_status().is_none() {
            return Err(Failure::NoAer);
        }
        let bit = d.device.inject_aer_nonfatal().ok_or(Failure::GuestMasked)?;
        let port = self.segment.port(d.port).ok_or(Failure::Gone)?;
        let signal = port.locked().report_uncorrectable(false);
        if signal == AerSignal::NotEnabled {
            return Err(Failure::NotListening);
        }
        let now = Instant::now();
        Ok(Recovery {
            deadline: now + ERROR_RECOVERY_TIMEOUT,
            started: now,
            bit,
        })
    }

    /// Looks at every recovery in progress: recovered, removed, or still waiting. While the VM
    /// is paused the guest cannot recover anything: a deadline that passes then is moved to a
    /// full [`ERROR_RECOVERY_TIMEOUT`] later.
    pub(super) fn check_recoveries(&mut self, now: Instant, ops: &mut EventOps) {
        let paused = self.vm_paused();
        let ids: Vec<DeviceId> = self.recoveries.keys().cloned().collect();
        for id in ids {
            let Some(recovery) = self.recoveries.get_mut(&id) else {
                continue;
            };
            if paused && now >= recovery.deadline {
                recovery.deadline = paused_deadline(now);
                log::info!("device {id}: the VM is paused: its error recovery deadline moves on");
                continue;
            }
            let recovery = *recovery;
            let Some(d) = self.passthrough.get(&id) else {
                self.recoveries.remove(&id);
                continue;
            };
            let status = d.device.aer_uncorrectable_status();
            let device = d.device.clone();
            match recovery_step(&recovery, status, || device.health(), now) {
                Step::Waiting => {}
                Step::Recovered => {
                    self.recoveries.remove(&id);
                    log::info!(
                        "device {id}: the guest recovered it from the error in {} ms",
                        recovery.started.elapsed().as_millis()
                    );
                    self.publish_error(&id, DeviceErrorOutcome::Recovered);
                }
                Step::Failed(failure) => {
                    self.recoveries.remove(&id);
                    self.error_removal(&id, failure, ops);
                }
            }
        }
    }

    /// The earliest recovery deadline.
    pub(super) fn next_recovery_deadline(&self) -> Option<Instant> {
        self.recoveries.values().map(|r| r.deadline).min()
    }

    /// A reboot ends every recovery: the device is reset with the VM and the next guest finds
    /// it as at boot, so the error is over for the VM.
    pub(super) fn end_recoveries_at_reboot(&mut self) {
        let ids: Vec<DeviceId> = std::mem::take(&mut self.recoveries).into_keys().collect();
        for id in ids {
            log::info!("device {id}: the guest rebooted while recovering it from an error");
            self.publish_error(&id, DeviceErrorOutcome::Recovered);
        }
    }

    /// Surprise-removes device `id` after an error that forwarding could not help, then says so.
    fn error_removal(&mut self, id: &DeviceId, failure: Failure, ops: &mut EventOps) {
        let Some(d) = self.passthrough.get(id) else {
            return;
        };
        let (bdf, host_bdf) = (d.guest_bdf, d.host.bdf);
        log::warn!(
            "device {id}: error reported by the host, not recovered: {}",
            failure.describe()
        );
        self.host_event(id, VfioIrq::Error, ops);
        self.publish(EventKind::DeviceError {
            id: id.clone(),
            bdf,
            host_bdf,
            outcome: DeviceErrorOutcome::Removed,
        });
    }

    fn publish_error(&self, id: &DeviceId, outcome: DeviceErrorOutcome) {
        if let Some(d) = self.passthrough.get(id) {
            self.publish(EventKind::DeviceError {
                id: id.clone(),
                bdf: d.guest_bdf,
                host_bdf: d.host.bdf,
                outcome,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIT: u32 = 1 << 14;

    fn recovery(now: Instant) -> Recovery {
        Recovery {
            deadline: now + ERROR_RECOVERY_TIMEOUT,
            started: now,
            bit: BIT,
        }
    }

    fn unused() -> DeviceHealth {
        panic!("health is only asked once the guest cleared the error")
    }

    #[test]
    fn the_guest_is_waited_for_while_the_error_is_set() {
        let now = Instant::now();

        let step = recovery_step(&recovery(now), Some(BIT), unused, now);

        assert_eq!(step, Step::Waiting);
    }

    #[test]
    fn a_cleared_error_on_a_usable_device_is_recovered() {
        let now = Instant::now();

        let step = recovery_step(&recovery(now), Some(0), || DeviceHealth::Usable, now);

        assert_eq!(step, Step::Recovered);
    }

    #[test]
    fn other_status_bits_left_set_do_not_hold_up_the_recovery() {
        let now = Instant::now();

        let step = recovery_step(&recovery(now), Some(1 << 20), || DeviceHealth::Usable, now);

        assert_eq!(step, Step::Recovered);
    }

    #[test]
    fn a_device_the_host_reset_is_removed_even_when_the_guest_cleared_the_error() {
        let now = Instant::now();

        let step = recovery_step(&recovery(now), Some(0), || DeviceHealth::Reset, now);

        assert_eq!(step, Step::Failed(Failure::ResetByHost));
    }

    #[test]
    fn a_device_gone_during_the_recovery_is_removed() {
        let now = Instant::now();

        assert_eq!(
            recovery_step(&recovery(now), Some(0), || DeviceHealth::Gone, now),
            Step::Failed(Failure::Gone)
        );
        assert_eq!(
            recovery_step(&recovery(now), None, unused, now),
            Step::Failed(Failure::Gone)
        );
    }

    #[test]
    fn the_deadline_ends_in_removal() {
        let now = Instant::now();
        let r = recovery(now);

        let step = recovery_step(&r, Some(BIT), unused, r.deadline);

        assert_eq!(step, Step::Failed(Failure::Timeout));
    }

    #[test]
    fn a_recovery_finished_at_the_deadline_still_counts() {
        let now = Instant::now();
        let r = recovery(now);

        let step = recovery_step(&r, Some(0), || DeviceHealth::Usable, r.deadline);

        assert_eq!(step, Step::Recovered);
    }

    #[test]
    fn a_deadline_passed_while_paused_gives_the_guest_a_full_period_more() {
        let now = Instant::now();
        let r = Recovery {
            deadline: paused_deadline(now),
            ..recovery(now)
        };
        assert_eq!(r.deadline, now + ERROR_RECOVERY_TIMEOUT);
        let step = recovery_step(&r, Some(BIT), unused, now + Duration::from_secs(1));
        assert_eq!(step, Step::Waiting);
    }
}
