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
}

impl VmExit {
    /// The process exit code `rvmm run` uses: 0 power-off, 3 reset/reboot, 4 crash
    /// (1 is an rvmm error before or outside the guest, 2 a command-line error).
    pub fn exit_code(self) -> i32 {
        match self {
            VmExit::PowerOff => 0,
            VmExit::Reset => 3,
            VmExit::Crash => 4,
        }
    }

    fn code(self) -> u8 {
        match self {
            VmExit::PowerOff => 1,
            VmExit::Reset => 2,
            VmExit::Crash => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(VmExit::PowerOff),
            2 => Some(VmExit::Reset),
            3 => Some(VmExit::Crash),
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

    /// Asks the VM to stop for `why`; later requests are ignored.
    pub fn request(&self, why: VmExit) {
        if self
            .reason
            .compare_exchange(0, why.code(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if let Err(e) = self.event.write(1) {
                log::error!("cannot wake the event loop for VM exit: {e}");
            }
        }
    }

    /// The reason, once a stop was requested.
    pub fn requested(&self) -> Option<VmExit> {
        VmExit::from_code(self.reason.load(Ordering::SeqCst))
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
}
