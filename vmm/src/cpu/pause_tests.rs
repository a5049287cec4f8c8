//! The pause gate with fake vCPU threads: each "runs the guest" (counts steps) until it is
//! kicked, then looks at the gate as the real vCPU loop does.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::*;

/// Long enough for anything that should happen; a test only waits this long when it fails.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct FakeVcpu {
    /// Guest progress: grows while the fake is in "KVM_RUN".
    steps: AtomicU64,
    /// Set by a kick; "KVM_RUN" returns when it sees it.
    kicked: AtomicBool,
    /// Kicks to lose (as a signal sent just before KVM_RUN is).
    kicks_to_lose: AtomicUsize,
    /// Ignores kicks until cleared (a vCPU stuck in a long device access).
    stuck: AtomicBool,
    /// The guest powers off: the loop ends after its current run.
    power_off: AtomicBool,
}

impl FakeVcpu {
    fn steps(&self) -> u64 {
        self.steps.load(Ordering::Acquire)
    }

    /// "KVM_RUN": guest steps until kicked (a stuck fake only when no longer stuck) or stopped.
    fn run(&self, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if !self.stuck.load(Ordering::Acquire) && self.kicked.swap(false, Ordering::AcqRel) {
                return;
            }
            self.steps.fetch_add(1, Ordering::AcqRel);
            thread::sleep(Duration::from_millis(1));
        }
    }
}

struct Vm {
    gate: Arc<VcpuPause>,
    stop: Arc<AtomicBool>,
    vcpus: Vec<Arc<FakeVcpu>>,
    threads: Vec<JoinHandle<()>>,
}

impl Vm {
    fn with(vcpus: Vec<FakeVcpu>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(VcpuPause::new(stop.clone()));
        let vcpus: Vec<Arc<FakeVcpu>> = vcpus.into_iter().map(Arc::new).collect();
        let threads = vcpus
            .iter()
            .map(|fake| {
                let (gate, stop, fake) = (gate.clone(), stop.clone(), fake.clone());
                let (entered_tx, entered_rx) = std::sync::mpsc::channel();
                let thread = thread::spawn(move || {
                    let kicked = fake.clone();
                    let _member = gate.enter(Box::new(move || {
                        let lose = kicked.kicks_to_lose.load(Ordering::Acquire);
                        if lose > 0 {
                            kicked.kicks_to_lose.store(lose - 1, Ordering::Release);
                        } else {
                            kicked.kicked.store(true, Ordering::Release);
                        }
                    }));
                    entered_tx.send(()).expect("test waits");
                    // The vCPU loop of vcpu.rs, with a fake KVM_RUN.
                    while !stop.load(Ordering::Acquire) {
                        let pausing = gate.requested();
                        if !pausing {
                            fake.run(&stop);
                        }
                        if fake.power_off.load(Ordering::Acquire) {
                            break;
                        }
                        if pausing {
                            gate.park();
                        }
                    }
                });
                entered_rx.recv().expect("the fake vCPU entered the gate");
                thread
            })
            .collect();
        Self {
            gate,
            stop,
            vcpus,
            threads,
        }
    }

    fn running(n: usize) -> Self {
        Self::with((0..n).map(|_| FakeVcpu::default()).collect())
    }

    fn steps(&self) -> Vec<u64> {
        self.vcpus.iter().map(|v| v.steps()).collect()
    }

    fn parked(&self) -> usize {
        self.gate.lock().parked
    }

    /// Waits until every fake vCPU made progress since `before`.
    fn wait_until_all_run_past(&self, before: &[u64]) {
        let end = Instant::now() + PATIENCE;
        while self
            .steps()
            .iter()
            .zip(before)
            .any(|(now, then)| now <= then)
        {
            assert!(Instant::now() < end, "the vCPUs did not run again");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the VM as `Vm::run` does and joins every thread.
    fn stop_and_join(self) {
        self.gate.stop();
        let end = Instant::now() + PATIENCE;
        for t in self.threads {
            while !t.is_finished() {
                assert!(Instant::now() < end, "a vCPU thread did not leave");
                thread::sleep(Duration::from_millis(2));
            }
            t.join().expect("fake vCPU thread");
        }
    }
}

#[test]
fn pause_returns_once_every_vcpu_is_parked() {
    let vm = Vm::running(3);

    let result = vm.gate.pause(PATIENCE);

    assert_eq!(result, Ok(Paused::Now));
    assert_eq!(vm.parked(), 3);
    assert!(vm.gate.is_paused());
    vm.stop_and_join();
}

#[test]
fn paused_vcpus_make_no_progress() {
    let vm = Vm::running(2);
    vm.gate.pause(PATIENCE).expect("paused");
    let before = vm.steps();

    thread::sleep(Duration::from_millis(50));

    assert_eq!(vm.steps(), before);
    vm.stop_and_join();
}

#[test]
fn a_lost_kick_is_sent_again() {
    let vm = Vm::with(vec![
        FakeVcpu {
            kicks_to_lose: AtomicUsize::new(3),
            ..FakeVcpu::default()
        },
        FakeVcpu::default(),
    ]);

    let result = vm.gate.pause(PATIENCE);

    assert_eq!(result, Ok(Paused::Now));
    assert_eq!(vm.vcpus[0].kicks_to_lose.load(Ordering::Acquire), 0);
    vm.stop_and_join();
}

#[test]
fn resume_lets_the_vcpus_run_again() {
    let vm = Vm::running(2);
    vm.gate.pause(PATIENCE).expect("paused");
    let before = vm.steps();

    assert!(vm.gate.resume());

    assert!(!vm.gate.is_paused());
    vm.wait_until_all_run_past(&before);
    vm.stop_and_join();
}

#[test]
fn pause_and_resume_repeat() {
    let vm = Vm::running(2);
    for _ in 0..5 {
        assert_eq!(vm.gate.pause(PATIENCE), Ok(Paused::Now));
        assert_eq!(vm.parked(), 2);
        let before = vm.steps();
        assert!(vm.gate.resume());
        vm.wait_until_all_run_past(&before);
    }
    vm.stop_and_join();
}

#[test]
fn pausing_a_paused_vm_changes_nothing() {
    let vm = Vm::running(1);
    vm.gate.pause(PATIENCE).expect("paused");

    assert_eq!(vm.gate.pause(PATIENCE), Ok(Paused::Already));

    assert!(vm.gate.is_paused());
    vm.stop_and_join();
}

#[test]
fn resuming_a_running_vm_reports_it() {
    let vm = Vm::running(1);

    assert!(!vm.gate.resume());

    vm.stop_and_join();
}

#[test]
fn stop_while_paused_ends_every_vcpu() {
    let vm = Vm::running(3);
    vm.gate.pause(PATIENCE).expect("paused");

    vm.stop_and_join();
}

#[test]
fn pause_after_stop_is_refused() {
    let vm = Vm::running(1);
    vm.stop.store(true, Ordering::Release);

    assert_eq!(vm.gate.pause(PATIENCE), Err(PauseError::Stopping));

    vm.stop_and_join();
}

#[test]
fn a_vcpu_that_does_not_stop_undoes_the_pause() {
    let vm = Vm::with(vec![
        FakeVcpu {
            stuck: AtomicBool::new(true),
            ..FakeVcpu::default()
        },
        FakeVcpu::default(),
    ]);

    let result = vm.gate.pause(Duration::from_millis(100));

    assert!(
        matches!(
            result,
            Err(PauseError::NotParked {
                parked: 1,
                running: 2,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(!vm.gate.is_paused());
    let before = vm.steps();
    vm.wait_until_all_run_past(&before);
    vm.vcpus[0].stuck.store(false, Ordering::Release);
    vm.stop_and_join();
}

#[test]
fn stop_during_a_pause_ends_the_pause() {
    let vm = Vm::with(vec![FakeVcpu {
        stuck: AtomicBool::new(true),
        ..FakeVcpu::default()
    }]);
    let gate = vm.gate.clone();
    let pausing = thread::spawn(move || gate.pause(PATIENCE));
    while !vm.gate.requested() {
        thread::sleep(Duration::from_millis(1));
    }

    vm.gate.stop();

    assert_eq!(
        pausing.join().expect("pausing thread"),
        Err(PauseError::Stopping)
    );
    vm.stop_and_join();
}

#[test]
fn a_vcpu_that_left_its_loop_does_not_hold_up_a_pause() {
    let vm = Vm::running(2);
    vm.vcpus[0].power_off.store(true, Ordering::Release);
    vm.vcpus[0].kicked.store(true, Ordering::Release);
    let end = Instant::now() + PATIENCE;
    while !vm.threads[0].is_finished() {
        assert!(Instant::now() < end, "the powered-off vCPU did not leave");
        thread::sleep(Duration::from_millis(2));
    }

    let result = vm.gate.pause(PATIENCE);

    assert_eq!(result, Ok(Paused::Now));
    assert_eq!(vm.parked(), 1);
    vm.stop_and_join();
}
