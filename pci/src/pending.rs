//! A device announced in its slot while the VMM is still opening it.
//!
//! A hot-added passthrough device takes the VMM 100 ms and more to open (the host kernel resets
//! the function when its VFIO descriptor opens, and guest RAM may have to be pinned for DMA),
//! while the guest's first look at a new device comes well after the announcement: Linux's
//! pciehp waits 20 ms and then 100 ms after the link comes up before it reads the vendor ID, as
//! the PCIe spec asks. Announcing the device first and opening it meanwhile overlaps the two.
//!
//! [`pending_device`] gives a [`PendingDevice`], which goes into the slot at once, and a
//! [`PendingHandle`], with which the VMM hands over the real device when it is open
//! ([`PendingHandle::ready`]). Until then a config access waits, as a root complex completes a
//! request to a device that answers Configuration Request Retry Status by retrying it: the
//! guest cannot tell, except by the time the access took. If the VMM fails to open the device
//! ([`PendingHandle::fail`], or the handle is dropped), or the wait runs past its limit, accesses
//! find no device (reads all ones, writes dropped) and the VMM takes the device out of the slot.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rvmm_devices::sync::MutexExt;

use crate::device::PciDevice;
use crate::root_port::slot::SlotDevice;
use crate::root_port::ABSENT;

enum State {
    /// The VMM is still opening the device.
    Opening,
    /// Open: accesses go to it.
    Ready(SlotDevice),
    /// Failed to open, or a config access gave up waiting: no device.
    Gone,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// How long one config access waits for the device at most.
    max_wait: Duration,
}

impl Shared {
    /// The device to forward an access to, waiting while it opens; `None`: no device.
    fn wait(&self) -> Option<SlotDevice> {
        let started = Instant::now();
        let mut state = self.state.locked();
        loop {
            match &*state {
                State::Ready(device) => return Some(device.clone()),
                State::Gone => return None,
                State::Opening => {}
            }
            let waited = started.elapsed();
            if waited >= self.max_wait {
                log::warn!(
                    "a guest config access waited {waited:?} for a device still being opened: \
                     the guest sees no device in the slot"
                );
                *state = State::Gone;
                return None;
            }
            state = match self.changed.wait_timeout(state, self.max_wait - waited) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn settle(&self, to: State) -> bool {
        let mut state = self.state.locked();
        let settled = matches!(*state, State::Opening);
        if settled {
            *state = to;
        }
        self.changed.notify_all();
        settled
    }
}

/// The slot's view of a device being opened: config accesses wait for it (see the module
/// documentation).
pub struct PendingDevice {
    shared: Arc<Shared>,
}

/// The VMM's side of a [`PendingDevice`]: hands over the open device, or reports the failure.
/// Dropping it unused counts as a failure.
pub struct PendingHandle {
    shared: Arc<Shared>,
}

/// A device in the making: the [`PendingDevice`] for the slot and the [`PendingHandle`] that
/// completes it. A config access waits at most `max_wait` for it.
pub fn pending_device(max_wait: Duration) -> (PendingDevice, PendingHandle) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::Opening),
        changed: Condvar::new(),
        max_wait,
    });
    (
        PendingDevice {
            shared: shared.clone(),
        },
        PendingHandle { shared },
    )
}

impl PendingDevice {
    /// The device as the slot holds it.
    pub fn into_slot_device(self) -> SlotDevice {
        Arc::new(Mutex::new(self))
    }
}

impl PendingHandle {
    /// Hands over the open device: waiting accesses go on to it. False when the guest gave up
    /// waiting first (it saw an empty slot): the device never reached it.
    pub fn ready(self, device: SlotDevice) -> bool {
        self.shared.settle(State::Ready(device))
    }

    /// The device could not be opened: accesses find no device.
    pub fn fail(self) {
        self.shared.settle(State::Gone);
    }
}

impl Drop for PendingHandle {
    fn drop(&mut self) {
        // After ready() or fail() this changes nothing.
        self.shared.settle(State::Gone);
    }
}

impl PciDevice for PendingDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.shared
            .wait()
            .map_or(ABSENT, |d| d.locked().read_config_register(reg))
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if let Some(d) = self.shared.wait() {
            d.locked().write_config_register(reg, offset, data);
        }
    }

    fn reset(&mut self) {
        if let Some(d) = self.shared.wait() {
            d.locked().reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A function whose registers read as their index, recording the last write.
    #[derive(Default)]
    struct Echo {
        written: Option<(usize, u64, Vec<u8>)>,
        resets: u32,
    }

    impl PciDevice for Echo {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            reg as u32
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.written = Some((reg, offset, data.to_vec()));
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    /// Reads register `reg` of `slot` on another thread (a vCPU's config access).
    fn read_in_thread(slot: &SlotDevice, reg: usize) -> thread::JoinHandle<u32> {
        let slot = slot.clone();
        thread::spawn(move || slot.locked().read_config_register(reg))
    }

    #[test]
    fn an_access_waits_until_the_device_is_ready_and_then_reaches_it() {
        let (pending, handle) = pending_device(Duration::from_secs(10));
        let slot = pending.into_slot_device();
        let reader = read_in_thread(&slot, 3);
        thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "the read must wait for the device");
        let echo = Arc::new(Mutex::new(Echo::default()));
        assert!(handle.ready(echo.clone()));
        assert_eq!(reader.join().unwrap(), 3);
        slot.locked().write_config_register(1, 2, &[0xab]);
        slot.locked().reset();
        let echo = echo.locked();
        assert_eq!(echo.written, Some((1, 2, vec![0xab])));
        assert_eq!(echo.resets, 1);
    }

    #[test]
    fn a_failed_open_reads_as_no_device_and_drops_writes() {
        let (pending, handle) = pending_device(Duration::from_secs(10));
        let slot = pending.into_slot_device();
        let reader = read_in_thread(&slot, 0);
        handle.fail();
        assert_eq!(reader.join().unwrap(), ABSENT);
        slot.locked().write_config_register(1, 0, &[1]);
        assert_eq!(slot.locked().read_config_register(0), ABSENT);
    }

    #[test]
    fn a_dropped_handle_is_a_failed_open() {
        let (pending, handle) = pending_device(Duration::from_secs(10));
        drop(handle);
        assert_eq!(
            pending.into_slot_device().locked().read_config_register(0),
            ABSENT
        );
    }

    #[test]
    fn an_access_that_waits_too_long_finds_no_device_and_the_late_device_is_refused() {
        let (pending, handle) = pending_device(Duration::from_millis(20));
        let slot = pending.into_slot_device();
        assert_eq!(slot.locked().read_config_register(0), ABSENT);
        // The guest has seen an empty slot: the device must not appear behind its back.
        assert!(!handle.ready(Arc::new(Mutex::new(Echo::default()))));
        assert_eq!(slot.locked().read_config_register(0), ABSENT);
    }

    #[test]
    fn a_ready_device_is_reached_at_once() {
        let (pending, handle) = pending_device(Duration::ZERO);
        assert!(handle.ready(Arc::new(Mutex::new(Echo::default()))));
        assert_eq!(
            pending.into_slot_device().locked().read_config_register(7),
            7
        );
    }
}
