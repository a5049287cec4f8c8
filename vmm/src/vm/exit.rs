//! How a VM ends, and the signal every part of the VMM uses to ask for that end.

use std::sync::atomic::{AtomicU8, Ordering};

use rvmm_devices::VmEvents;
use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped. The binary maps each to its exit code (see [`VmExit::exit_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5) or the control API asked for a shutdown.
    PowerOff,
    /// The guest asked for a reset (reboot, i8042, ACPI reset register, triple fault).
    Reset,
    /// A vCPU failed (KVM internal error or failed entry): the guest cannot go on.
    Crash,
    /// The guest did not power off within the shutdown timeout after its power button was
    /// pressed, and the VM's owner powered it off ([`ForcedPowerOff::ShutdownTimeout`]).
    ShutdownTimeout,
    /// The VM's owner powered it off at once on a signal ([`ForcedPowerOff::Signal`]).
    Signal,
}

/// Why the VM's owner powers the VM off without waiting for the guest (see
/// [`crate::api::QueuedHandler::force_power_off`]): the two ways `rvmm run` ends a VM on a
/// signal when the guest does not power off itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedPowerOff {
    /// The power button was pressed and the guest did not power off in time.
    ShutdownTimeout,
    /// A signal asked for an immediate power-off (a second SIGTERM or SIGINT, or Ctrl-C on an
    /// interactive console).
    Signal,
}

impl From<ForcedPowerOff> for VmExit {
    fn from(why: ForcedPowerOff) -> Self {
        match why {
            ForcedPowerOff::ShutdownTimeout => VmExit::ShutdownTimeout,
            ForcedPowerOff::Signal => VmExit::Signal,
        }
    }
}

impl VmExit {
    /// The process exit code `rvmm run` uses: 0 power-off, 3 reset/reboot, 4 crash, 5 powered
    /// off by rvmm without the guest's shutdown (shutdown timeout or signal)
    /// (1 is an rvmm error before or outside the guest, 2 a command-line error).
    pub fn exit_code(self) -> i32 {
        match self {
            VmExit::PowerOff => 0,
            VmExit::Reset => 3,
            VmExit::Crash => 4,
            VmExit::ShutdownTimeout | VmExit::Signal => 5,
        }
    }

    fn code(self) -> u8 {
        match self {
            VmExit::PowerOff => 1,
            VmExit::Reset => 2,
            VmExit::Crash => 3,
            VmExit::ShutdownTimeout => 4,
            VmExit::Signal => 5,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(VmExit::PowerOff),
            2 => Some(VmExit::Reset),
            3 => Some(VmExit::Crash),
            4 => Some(VmExit::ShutdownTimeout),
            5 => Some(VmExit::Signal),
            _ => None,
        }
    }
}

/// The first request to stop the VM wins; the event fd wakes the event loop.
pub struct ExitSignal {
    reason: AtomicU8,
    event: EventFd,
}

impl ExitSignal {
    /// Creates the signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: AtomicU8::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop for `why`; later requests are ignored, except that any other
    /// reason replaces a pending reset: a reset may become a reboot in place, and a power-off
    /// or crash asked for meanwhile must end the VM rather than be lost to the reboot.
    pub fn request(&self, why: VmExit) {
        let code = why.code();
        let reset = VmExit::Reset.code();
        let taken = self
            .reason
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                (current == 0 || (current == reset && code != reset)).then_some(code)
            })
            .is_ok();
        if taken {
            if let Err(e) = self.event.write(1) {
                log::error!("cannot wake the event loop for VM exit: {e}");
            }
        }
    }

    /// The reason, once a stop was requested.
    pub fn requested(&self) -> Option<VmExit> {
        VmExit::from_code(self.reason.load(Ordering::SeqCst))
    }

    /// Takes back a reset request for a reboot in place: returns whether the request was a
    /// reset, which is then withdrawn (and the event consumed) so that the restarted VM can be
    /// stopped again. Any other request stays.
    pub fn take_reset(&self) -> bool {
        let reset = VmExit::Reset.code();
        let taken = self
            .reason
            .compare_exchange(reset, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if taken {
            // Consumed so that the event loop does not wake for a request that is gone.
            let _ = self.event.read();
        }
        taken
    }

    /// The event fd that becomes readable when a stop is requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl VmEvents for ExitSignal {
    fn reset(&self) {
        self.request(VmExit::Reset);
    }
    fn power_off(&self) {
        self.request(VmExit::PowerOff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.requested(), None);
        s.power_off();
        s.reset();
        assert_eq!(s.requested(), Some(VmExit::PowerOff));
        assert_eq!(s.event().read().unwrap(), 1);
    }

    #[test]
    fn a_taken_reset_lets_the_next_request_through() {
        let s = ExitSignal::new().unwrap();
        s.reset();

        assert!(s.take_reset());

        assert_eq!(s.requested(), None);
        s.power_off();
        assert_eq!(s.requested(), Some(VmExit::PowerOff));
    }

    #[test]
    fn a_stop_replaces_a_pending_reset() {
        let s = ExitSignal::new().unwrap();
        s.reset();

        s.request(VmExit::Signal);

        assert_eq!(s.requested(), Some(VmExit::Signal));
        assert!(!s.take_reset());
    }

    #[test]
    fn only_a_reset_is_taken_back() {
        let s = ExitSignal::new().unwrap();
        s.power_off();

        assert!(!s.take_reset());

        assert_eq!(s.requested(), Some(VmExit::PowerOff));
    }

    #[test]
    fn every_reason_survives_the_signal() {
        for why in [
            VmExit::PowerOff,
            VmExit::Reset,
            VmExit::Crash,
            VmExit::ShutdownTimeout,
            VmExit::Signal,
        ] {
            let s = ExitSignal::new().unwrap();
            s.request(why);
            assert_eq!(s.requested(), Some(why));
        }
    }

    #[test]
    fn forced_power_offs_exit_with_code_5() {
        assert_eq!(VmExit::from(ForcedPowerOff::ShutdownTimeout).exit_code(), 5);
        assert_eq!(VmExit::from(ForcedPowerOff::Signal).exit_code(), 5);
        assert_eq!(VmExit::PowerOff.exit_code(), 0);
    }
}
