//! Pause and resume of a VM with a fake guest clock; the vCPU gate is the real one (with no
//! vCPU threads a pause is immediate; a member that never parks plays a stuck vCPU).

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::*;
use crate::api::{Received, Subscription};
use rvmm_devices::sync::MutexExt;

/// A guest clock that counts from 1000 on each read and records writes.
#[derive(Default)]
struct FakeClock {
    reads: Mutex<u64>,
    written: Mutex<Vec<kvm_clock_data>>,
    fail_reads: bool,
}

impl GuestClock for FakeClock {
    fn read(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
        if self.fail_reads {
            return Err(kvm_ioctls::Error::new(libc::EIO));
        }
        let mut reads = self.reads.locked();
        *reads += 1;
        Ok(kvm_clock_data {
            clock: 1000 * *reads,
            flags: kvm_bindings::KVM_CLOCK_TSC_STABLE,
            ..Default::default()
        })
    }

    fn write(&self, data: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
        self.written.locked().push(*data);
        Ok(())
    }
}

struct Setup {
    vm: VmPause,
    gate: Arc<VcpuPause>,
    clock: Arc<FakeClock>,
    events: Subscription,
}

fn setup_with(clock: FakeClock) -> Setup {
    let gate = Arc::new(VcpuPause::new(Arc::new(AtomicBool::new(false))));
    let clock = Arc::new(clock);
    let bus = Arc::new(EventBus::new());
    let events = bus.subscribe();
    Setup {
        vm: VmPause::new(gate.clone(), clock.clone(), bus),
        gate,
        clock,
        events,
    }
}

fn setup() -> Setup {
    setup_with(FakeClock::default())
}

/// The events published so far.
fn published(events: &Subscription) -> Vec<EventKind> {
    let mut kinds = Vec::new();
    while let Received::Event(e) = events.recv_timeout(Duration::from_millis(10)) {
        kinds.push(e.kind);
    }
    kinds
}

#[test]
fn pause_parks_the_vm_and_publishes_vm_paused() {
    let mut s = setup();

    let answer = s.vm.pause(None);

    assert_eq!(answer, Ok(()));
    assert_eq!(s.vm.state(), VmState::Paused);
    assert_eq!(published(&s.events), vec![EventKind::VmPaused]);
}

#[test]
fn pausing_a_paused_vm_is_answered_and_publishes_nothing() {
    let mut s = setup();
    s.vm.pause(None).expect("paused");
    published(&s.events);

    let answer = s.vm.pause(None);

    assert_eq!(answer, Ok(()));
    assert_eq!(s.vm.state(), VmState::Paused);
    assert_eq!(published(&s.events), Vec::new());
    assert_eq!(*s.clock.reads.locked(), 1, "the clock was read again");
}

#[test]
fn resume_runs_the_vm_and_publishes_vm_resumed() {
    let mut s = setup();
    s.vm.pause(None).expect("paused");

    let answer = s.vm.resume();

    assert_eq!(answer, Ok(()));
    assert_eq!(s.vm.state(), VmState::Running);
    assert_eq!(
        published(&s.events),
        vec![EventKind::VmPaused, EventKind::VmResumed]
    );
}

#[test]
fn resume_writes_back_the_clock_read_at_the_pause_without_flags() {
    let mut s = setup();
    s.vm.pause(None).expect("paused");

    s.vm.resume().expect("resumed");

    let written = s.clock.written.locked().clone();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].clock, 1000);
    assert_eq!(written[0].flags, 0);
}

#[test]
fn resuming_a_running_vm_is_answered_and_changes_nothing() {
    let mut s = setup();

    let answer = s.vm.resume();

    assert_eq!(answer, Ok(()));
    assert_eq!(s.vm.state(), VmState::Running);
    assert!(s.clock.written.locked().is_empty());
    assert_eq!(published(&s.events), Vec::new());
}

#[test]
fn pause_is_refused_while_a_hotplug_is_in_flight() {
    let mut s = setup();

    let answer = s.vm.pause(Some("device nvme0 is being added".into()));

    match answer {
        Err(ApiError::Conflict(m)) => {
            assert!(m.contains("device nvme0 is being added"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.vm.state(), VmState::Running);
    assert!(!s.gate.requested());
}

#[test]
fn hotplug_is_refused_while_paused_with_409() {
    let mut s = setup();
    s.vm.pause(None).expect("paused");

    let answer = s.vm.refuse_while_paused("hot-add device nvme0");

    let err = answer.expect_err("refused");
    assert_eq!(err.status(), 409);
    let text = err.to_string();
    assert!(
        text.contains("cannot hot-add device nvme0 while the VM is paused"),
        "{text}"
    );
    assert!(text.contains("rvmm ctl resume"), "{text}");
}

#[test]
fn hotplug_is_allowed_while_running_and_after_a_resume() {
    let mut s = setup();
    assert_eq!(s.vm.refuse_while_paused("hot-add"), Ok(()));
    s.vm.pause(None).expect("paused");
    s.vm.resume().expect("resumed");

    assert_eq!(s.vm.refuse_while_paused("hot-add"), Ok(()));
}

#[test]
fn a_clock_that_cannot_be_read_undoes_the_pause() {
    let mut s = setup_with(FakeClock {
        fail_reads: true,
        ..FakeClock::default()
    });

    let answer = s.vm.pause(None);

    assert!(
        matches!(&answer, Err(ApiError::Internal(m)) if m.contains("KVM_GET_CLOCK")),
        "{answer:?}"
    );
    assert_eq!(s.vm.state(), VmState::Running);
    assert_eq!(published(&s.events), Vec::new());
}

#[test]
fn a_vcpu_that_does_not_stop_times_out_and_the_vm_runs_on() {
    let mut s = setup();
    s.vm.deadline = Duration::from_millis(30);
    // A member that never parks: a vCPU stuck in a host call.
    let _stuck = s.gate.enter(Box::new(|| {}));

    let answer = s.vm.pause(None);

    match answer {
        Err(ApiError::Timeout { step, .. }) => {
            assert!(step.contains("only 0 of 1 vCPUs stopped"), "{step}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.vm.state(), VmState::Running);
    assert_eq!(published(&s.events), Vec::new());
}

#[test]
fn pause_of_a_stopping_vm_is_unavailable() {
    let mut s = setup();
    s.gate.stop();

    let answer = s.vm.pause(None);

    assert!(
        matches!(answer, Err(ApiError::Unavailable(_))),
        "{answer:?}"
    );
}
