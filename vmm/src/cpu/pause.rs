//! Where vCPU threads park while the VM is paused, and how the event loop pauses and resumes
//! them.
//!
//! A vCPU thread joins the gate when its loop starts ([`VcpuPause::enter`], with a way to kick
//! it out of `KVM_RUN`) and leaves it when its loop ends (the [`Member`] guard drops). Before
//! each `KVM_RUN` it looks at [`VcpuPause::requested`]; once it sees a pause it completes the
//! exit in progress (`immediate_exit`, see `vcpu.rs`) and calls [`VcpuPause::park`], which
//! blocks until the VM is resumed or stopped.
//!
//! [`VcpuPause::pause`] (the event loop) raises the request, then kicks every member until all
//! are parked — a kick sent just before a thread enters `KVM_RUN` is lost, so it is repeated —
//! and answers only then: every vCPU is out of `KVM_RUN` at a point between two exits, which is
//! the consistent state a pause promises. A vCPU that does not park within the deadline makes
//! the pause fail and the others run on. [`VcpuPause::stop`] wakes parked threads so that they
//! leave: a paused VM can always be shut down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rvmm_devices::sync::MutexExt;
use thiserror::Error;

/// How often the vCPUs not yet parked are kicked again while a pause waits for them.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Kicks one vCPU thread out of `KVM_RUN` (sends it the kick signal).
pub type Kick = Box<dyn Fn() + Send>;

/// Why a pause did not happen.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PauseError {
    /// The VM is stopping: its vCPUs are leaving anyway.
    #[error("the VM is stopping")]
    Stopping,
    /// Not every vCPU left `KVM_RUN` in time; the pause was undone.
    #[error("only {parked} of {running} vCPUs stopped within {} ms; the VM runs on", waited.as_millis())]
    NotParked {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs running their loop.
        running: usize,
        /// How long the pause waited.
        waited: Duration,
    },
}

/// What a successful [`VcpuPause::pause`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paused {
    /// Every vCPU is now parked.
    Now,
    /// The VM was paused already; nothing changed.
    Already,
}

struct State {
    /// A pause is requested (set by `pause` until `resume`).
    requested: bool,
    /// vCPU threads inside their loop, with their kicks. A thread leaves before it ends, so a
    /// kick never reaches a thread that is gone.
    members: BTreeMap<u64, Kick>,
    next_ticket: u64,
    /// Members blocked in `park`.
    parked: usize,
}

/// The pause gate of one VM's vCPUs.
pub struct VcpuPause {
    /// Mirrors `State::requested` for the vCPU loop's lock-free look before each `KVM_RUN`.
    requested: AtomicBool,
    /// The VM's stop flag (the vCPU loops' own).
    stop: Arc<AtomicBool>,
    state: Mutex<State>,
    /// Signalled when a thread parks or leaves, and when parked threads should wake.
    changed: Condvar,
}

/// A vCPU thread's membership of the gate; dropping it leaves the gate.
pub struct Member<'a> {
    gate: &'a VcpuPause,
    ticket: u64,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.members.remove(&self.ticket);
        drop(state);
        self.gate.changed.notify_all();
    }
}

impl VcpuPause {
    /// A gate for vCPU loops that end when `stop` is set.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self {
            requested: AtomicBool::new(false),
            stop,
            state: Mutex::new(State {
                requested: false,
                members: BTreeMap::new(),
                next_ticket: 0,
                parked: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Joins the calling vCPU thread to the gate; `kick` must make its `KVM_RUN` return while
    /// the returned [`Member`] lives (it is called with the gate locked, from the event loop).
    pub fn enter(&self, kick: Kick) -> Member<'_> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket = state.next_ticket.wrapping_add(1);
        state.members.insert(ticket, kick);
        Member { gate: self, ticket }
    }

    /// Whether a pause is requested: the vCPU loop looks before each `KVM_RUN`.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether the VM is paused (outside a [`VcpuPause::pause`] call: every vCPU is parked).
    pub fn is_paused(&self) -> bool {
        self.lock().requested
    }

    /// Called by a vCPU thread out of `KVM_RUN` once it saw [`VcpuPause::requested`]: blocks
    /// while the VM is paused and not stopping. Returns at once when the request is gone.
    pub fn park(&self) {
        let mut state = self.lock();
        if !state.requested || self.stopping() {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.requested && !self.stopping() {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.parked -= 1;
    }

    /// Pauses every vCPU: returns once all are parked, kicking those still running every
    /// [`KICK_INTERVAL`]. After `deadline` the pause is undone and
    /// [`PauseError::NotParked`] says how many made it. Pausing a paused VM changes nothing.
    pub fn pause(&self, deadline: Duration) -> Result<Paused, PauseError> {
        let started = Instant::now();
        let mut state = self.lock();
        if self.stopping() {
            return Err(PauseError::Stopping);
        }
        if state.requested {
            return Ok(Paused::Already);
        }
        state.requested = true;
        self.requested.store(true, Ordering::Release);
        loop {
            if self.stopping() {
                self.withdraw(&mut state);
                return Err(PauseError::Stopping);
            }
            if state.parked == state.members.len() {
                return Ok(Paused::Now);
            }
            let waited = started.elapsed();
            if waited >= deadline {
                let err = PauseError::NotParked {
                    parked: state.parked,
                    running: state.members.len(),
                    waited,
                };
                self.withdraw(&mut state);
                return Err(err);
            }
            // Parked members are kicked too: a signal only interrupts their wait, which
            // they go back to.
            for kick in state.members.values() {
                kick();
            }
            let wait = KICK_INTERVAL.min(deadline - waited);
            state = self
                .changed
                .wait_timeout(state, wait)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Takes back a pause request and wakes whoever parked.
    fn withdraw(&self, state: &mut State) {
        state.requested = false;
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Lets parked vCPUs run again; `false` when the VM was not paused.
    pub fn resume(&self) -> bool {
        let mut state = self.lock();
        if !state.requested {
            return false;
        }
        self.withdraw(&mut state);
        true
    }

    /// Makes the gate usable again after [`VcpuPause::stop`] once every vCPU thread has left
    /// (a reboot in place starts new ones): the stop flag cleared, no pause requested.
    pub fn rearm(&self) {
        let mut state = self.lock();
        state.requested = false;
        state.parked = 0;
        self.requested.store(false, Ordering::Release);
        self.stop.store(false, Ordering::Release);
    }

    /// Sets the stop flag and wakes parked vCPUs, which then leave their loops.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // Taking the lock orders the store before a parked thread's next look at the flag.
        drop(self.lock());
        self.changed.notify_all();
    }
}

#[cfg(test)]
#[path = "pause_tests.rs"]
mod tests;
