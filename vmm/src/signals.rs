//! How `rvmm run` ends a VM on SIGTERM and SIGINT. Part of the binary, not of the library: a
//! program embedding rvmm owns its process's signals and can do the same through a VM handle.
//!
//! `main` blocks both signals before anything starts a thread ([`block`]), so that every thread
//! inherits the mask and the signals wait for the signal thread (`rvmm-signals`), which reads
//! them from a signalfd and acts through a [`QueuedHandler`] of the VM:
//!
//! - SIGTERM, and SIGINT when the console is not an interactive terminal: press the ACPI power
//!   button; if the VM is still running `--shutdown-timeout-ms` later, power it off
//!   (`vm-shutdown` reason `shutdown-timeout`);
//! - a second signal of either kind: power off at once (reason `signal`);
//! - SIGINT with the console on an interactive terminal (Ctrl-C; the console keeps ISIG): power
//!   off at once (reason `signal`), since the keys go to the guest and Ctrl-C is how a user at
//!   the terminal stops rvmm.
//!
//! A power-off goes through the VM's one way out ([`rvmm::Vm::run`]: devices and VF leases
//! released, terminal restored, `vm-shutdown` published). The thread runs under its own seccomp
//! filter ([`ThreadKind::Signals`]: the base set plus `read` and `poll`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rvmm::api::{ApiError, ApiHandler, QueuedHandler};
use rvmm::seccomp::{SeccompError, SeccompMode, ThreadFilter, ThreadKind};
use rvmm::vm::exit::ForcedPowerOff;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Errors of setting up the signal handling.
#[derive(Debug, Error)]
pub enum SignalError {
    /// The signals could not be blocked or the signalfd created.
    #[error("cannot {what} for SIGTERM and SIGINT")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The signal thread's seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// The signals `rvmm run` handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Terminate,
    /// SIGINT.
    Interrupt,
}

impl Signal {
    fn from_number(signo: u32) -> Option<Self> {
        match i32::try_from(signo).ok()? {
            libc::SIGTERM => Some(Signal::Terminate),
            libc::SIGINT => Some(Signal::Interrupt),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
        }
    }
}

/// What to do about the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Press the power button.
    PressButton,
    /// Power off now.
    PowerOff(ForcedPowerOff),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No signal yet.
    Running,
    /// The button was pressed; the guest has until the deadline.
    Pressed { deadline: Instant },
    /// A power-off was asked for.
    PoweringOff,
}

/// The decisions of the signal thread, apart from signals and the VM.
#[derive(Debug)]
pub struct Policy {
    interactive: bool,
    timeout: Duration,
    state: State,
}

impl Policy {
    /// `interactive`: the console is an interactive terminal (Ctrl-C powers off at once);
    /// `timeout`: how long the guest gets after the power button.
    pub fn new(interactive: bool, timeout: Duration) -> Self {
        Self {
            interactive,
            timeout,
            state: State::Running,
        }
    }

    /// What `signal`, received at `now`, asks for.
    pub fn on_signal(&mut self, signal: Signal, now: Instant) -> Action {
        let interactive_interrupt = self.interactive && signal == Signal::Interrupt;
        match self.state {
            State::Running if !interactive_interrupt => {
                self.state = State::Pressed {
                    deadline: now.checked_add(self.timeout).unwrap_or(now),
                };
                Action::PressButton
            }
            _ => self.power_off(ForcedPowerOff::Signal),
        }
    }

    /// The button could not be pressed: the guest cannot be asked, so power off at once.
    pub fn on_button_failed(&mut self) -> Action {
        self.power_off(ForcedPowerOff::Signal)
    }

    /// When the guest's time runs out, while it runs.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Pressed { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// At `now`: the power-off of a guest whose time ran out.
    pub fn on_tick(&mut self, now: Instant) -> Option<Action> {
        match self.state {
            State::Pressed { deadline } if now >= deadline => {
                Some(self.power_off(ForcedPowerOff::ShutdownTimeout))
            }
            _ => None,
        }
    }

    fn power_off(&mut self, why: ForcedPowerOff) -> Action {
        self.state = State::PoweringOff;
        Action::PowerOff(why)
    }
}

/// What the signal thread asks of the VM.
pub trait PowerControl {
    /// Presses the power button.
    fn press_power_button(&self) -> Result<(), ApiError>;
    /// Powers the VM off now.
    fn force_power_off(&self, why: ForcedPowerOff) -> Result<(), ApiError>;
}

impl PowerControl for QueuedHandler {
    fn press_power_button(&self) -> Result<(), ApiError> {
        self.power_button()
    }

    fn force_power_off(&self, why: ForcedPowerOff) -> Result<(), ApiError> {
        QueuedHandler::force_power_off(self, why)
    }
}

/// The set of SIGTERM and SIGINT.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it starts after:
/// call it before anything starts a thread. They then wait for [`ShutdownSignals`].
pub fn block() -> Result<(), SignalError> {
    let set = signal_set();
    // SAFETY: `set` is a valid sigset_t; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SignalError::Setup {
            what: "block the signals",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// A non-blocking signalfd of SIGTERM and SIGINT.
fn signalfd() -> Result<OwnedFd, SignalError> {
    let set = signal_set();
    // SAFETY: -1 asks for a new fd; `set` is a valid sigset_t.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(SignalError::Setup {
            what: "create a signalfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The next pending signal of `fd`, `None` when none is pending.
fn read_signal(fd: RawFd) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let len = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `len` bytes into `info`, which is `len` bytes long.
    let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), len) };
    (usize::try_from(n).ok() == Some(len)).then_some(info.ssi_signo)
}

/// Waits until `fds` are readable or `timeout` passes (`None`: no timeout); returns which are.
fn wait_readable(fds: [RawFd; 2], timeout: Option<Duration>) -> [bool; 2] {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let timeout_ms = timeout.map_or(-1, |t| {
        // Rounded up, so that the deadline has passed when poll returns.
        i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
    });
    // SAFETY: `polled` is an array of two valid pollfd structs.
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), 2, timeout_ms) };
    if rc <= 0 {
        // A timeout, or EINTR (the vCPU kick signal may land on any thread).
        return [false; 2];
    }
    polled.map(|p| p.revents != 0)
}

/// The signal thread of `rvmm run`.
pub struct ShutdownSignals {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ShutdownSignals {
    /// Starts the thread: it installs its seccomp filter (`seccomp`), then acts on SIGTERM and
    /// SIGINT (blocked before with [`block`]) through `vm` as `policy` decides.
    pub fn start(
        vm: QueuedHandler,
        policy: Policy,
        seccomp: SeccompMode,
    ) -> Result<Self, SignalError> {
        let filter = ThreadFilter::new(ThreadKind::Signals, seccomp)?;
        let setup = |what| move |source| SignalError::Setup { what, source };
        let signals = signalfd()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("create the stop event"))?;
        let stop_fd = stop.try_clone().map_err(setup("create the stop event"))?;
        let thread = std::thread::Builder::new()
            .name("rvmm-signals".into())
            .spawn(move || {
                if let Err(e) = filter.apply() {
                    log::error!(
                        "signal thread: {}; SIGTERM and SIGINT are not handled",
                        rvmm_devices::error_chain(&e)
                    );
                    return;
                }
                serve(&signals, &stop_fd, &vm, policy);
            })
            .map_err(setup("start the signal thread"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the signal thread: {e}");
            return;
        }
        if thread.join().is_err() {
            log::error!("the signal thread panicked");
        }
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The signal thread's loop: until `stop`, acts on every signal of `signals` and on the
/// policy's deadline.
fn serve(signals: &OwnedFd, stop: &EventFd, vm: &dyn PowerControl, mut policy: Policy) {
    loop {
        if let Some(action) = policy.on_tick(Instant::now()) {
            act(vm, &mut policy, action, None);
            continue;
        }
        let timeout = policy
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        let [signal_ready, stop_ready] =
            wait_readable([signals.as_raw_fd(), stop.as_raw_fd()], timeout);
        if stop_ready {
            return;
        }
        if !signal_ready {
            continue;
        }
        while let Some(signo) = read_signal(signals.as_raw_fd()) {
            let Some(signal) = Signal::from_number(signo) else {
                continue;
            };
            let action = policy.on_signal(signal, Instant::now());
            act(vm, &mut policy, action, Some(signal));
        }
    }
}

/// Carries out `action` for `signal` (`None`: the deadline).
fn act(vm: &dyn PowerControl, policy: &mut Policy, action: Action, signal: Option<Signal>) {
    let cause = signal.map_or("shutdown timeout", Signal::name);
    match action {
        Action::PressButton => match vm.press_power_button() {
            Ok(()) => log::info!(
                "{cause}: pressed the power button; the guest has {} ms to power off \
                 (another SIGTERM or SIGINT powers it off at once)",
                policy.timeout.as_millis()
            ),
            Err(e) => {
                log::error!("{cause}: cannot press the power button ({e}); powering off");
                let action = policy.on_button_failed();
                act(vm, policy, action, signal);
            }
        },
        Action::PowerOff(why) => {
            match why {
                ForcedPowerOff::ShutdownTimeout => log::warn!(
                    "the guest did not power off within {} ms of the power button; powering \
                     it off",
                    policy.timeout.as_millis()
                ),
                ForcedPowerOff::Signal => log::info!("{cause}: powering the guest off"),
            }
            if let Err(e) = vm.force_power_off(why) {
                log::error!("{cause}: cannot power the guest off: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn first_sigterm_presses_the_button_and_sets_the_deadline() {
        let mut policy = Policy::new(false, TIMEOUT);
        let now = Instant::now();

        assert_eq!(
            policy.on_signal(Signal::Terminate, now),
            Action::PressButton
        );

        assert_eq!(policy.deadline(), Some(now + TIMEOUT));
    }

    #[test]
    fn guest_gets_until_the_deadline_then_is_powered_off() {
        let mut policy = Policy::new(false, TIMEOUT);
        let now = Instant::now();
        policy.on_signal(Signal::Terminate, now);

        assert_eq!(
            policy.on_tick(now + TIMEOUT - Duration::from_millis(1)),
            None
        );
        assert_eq!(
            policy.on_tick(now + TIMEOUT),
            Some(Action::PowerOff(ForcedPowerOff::ShutdownTimeout))
        );
        assert_eq!(policy.deadline(), None);
        assert_eq!(policy.on_tick(now + TIMEOUT * 2), None);
    }

    #[test]
    fn second_signal_powers_off_at_once() {
        for second in [Signal::Terminate, Signal::Interrupt] {
            let mut policy = Policy::new(false, TIMEOUT);
            let now = Instant::now();
            policy.on_signal(Signal::Terminate, now);

            assert_eq!(
                policy.on_signal(second, now),
                Action::PowerOff(ForcedPowerOff::Signal),
                "{second:?}"
            );
            assert_eq!(policy.deadline(), None);
        }
    }

    #[test]
    fn sigint_without_a_terminal_presses_the_button() {
        let mut policy = Policy::new(false, TIMEOUT);

        assert_eq!(
            policy.on_signal(Signal::Interrupt, Instant::now()),
            Action::PressButton
        );
    }

    #[test]
    fn ctrl_c_at_an_interactive_console_powers_off_at_once() {
        let mut policy = Policy::new(true, TIMEOUT);

        assert_eq!(
            policy.on_signal(Signal::Interrupt, Instant::now()),
            Action::PowerOff(ForcedPowerOff::Signal)
        );
    }

    #[test]
    fn sigterm_at_an_interactive_console_still_presses_the_button() {
        let mut policy = Policy::new(true, TIMEOUT);

        assert_eq!(
            policy.on_signal(Signal::Terminate, Instant::now()),
            Action::PressButton
        );
    }

    #[test]
    fn signals_after_a_power_off_ask_again() {
        let mut policy = Policy::new(false, TIMEOUT);
        let now = Instant::now();
        policy.on_signal(Signal::Terminate, now);
        policy.on_tick(now + TIMEOUT);

        assert_eq!(
            policy.on_signal(Signal::Terminate, now + TIMEOUT),
            Action::PowerOff(ForcedPowerOff::Signal)
        );
    }

    #[test]
    fn only_sigterm_and_sigint_are_handled() {
        assert_eq!(
            Signal::from_number(libc::SIGTERM as u32),
            Some(Signal::Terminate)
        );
        assert_eq!(
            Signal::from_number(libc::SIGINT as u32),
            Some(Signal::Interrupt)
        );
        assert_eq!(Signal::from_number(libc::SIGHUP as u32), None);
    }

    /// Records what the signal thread asked for; the button fails when told to.
    #[derive(Default)]
    struct Recorder {
        button_fails: bool,
        calls: Mutex<Vec<String>>,
    }

    impl PowerControl for Recorder {
        fn press_power_button(&self) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push("press".into());
            if self.button_fails {
                return Err(ApiError::Unavailable("the VM is stopping".into()));
            }
            Ok(())
        }

        fn force_power_off(&self, why: ForcedPowerOff) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push(format!("{why:?}"));
            Ok(())
        }
    }

    #[test]
    fn a_button_that_cannot_be_pressed_powers_off_at_once() {
        let vm = Recorder {
            button_fails: true,
            ..Recorder::default()
        };
        let mut policy = Policy::new(false, TIMEOUT);
        let action = policy.on_signal(Signal::Terminate, Instant::now());

        act(&vm, &mut policy, action, Some(Signal::Terminate));

        assert_eq!(*vm.calls.lock().unwrap(), ["press", "Signal"]);
        assert_eq!(policy.deadline(), None);
    }

    #[test]
    fn thread_stops_when_asked_without_a_signal() {
        let signals = signalfd().expect("signalfd");
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let vm = Recorder::default();
        stop.write(1).expect("stop");

        serve(&signals, &stop, &vm, Policy::new(false, TIMEOUT));

        assert!(vm.calls.lock().unwrap().is_empty());
    }
}
