//! The VMM's event loop: serial input from stdin ([`StdinConsole`]), a socket or a pty, the
//! VM-exit event, the control API and VFIO interrupts (the controller). Every change of the device
//! tree happens on this thread.

use std::sync::{Arc, Mutex};

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use rvmm_devices::serial::Serial;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::vm::console::{ConsoleHost, StdinConsole};
use crate::vm::console_pty::PtyConsole;
use crate::vm::console_socket::SocketConsole;
use crate::vm::exit::ExitSignal;

/// How long the loop waits for events at most before it looks at the exit request again.
const TICK_MS: i32 = 50;

/// Errors of the event loop.
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// epoll could not be set up or waited on.
    #[error("event loop: {what} failed: {source:?}")]
    Epoll {
        /// The operation.
        what: &'static str,
        /// The error of event-manager.
        source: event_manager::Error,
    },
    /// The console's input-drained eventfd could not be created.
    #[error("event loop: cannot set up the serial console input")]
    Console {
        /// The error of eventfd(2).
        #[source]
        source: std::io::Error,
    },
}

/// A subscriber of the loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop of one VM.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    saved_termios: Option<libc::termios>,
}

impl EventLoop {
    /// Creates the loop; it ends when `exit` is signalled.
    pub fn new(exit: Arc<ExitSignal>) -> Result<Self, EventLoopError> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|source| EventLoopError::Epoll {
                what: "creating the epoll instance",
                source,
            })?;
        manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
        Ok(Self {
            manager,
            exit,
            saved_termios: None,
        })
    }

    /// Feeds stdin to `serial` ([`StdinConsole`]); a terminal is put in raw mode until
    /// [`EventLoop::restore_terminal`].
    pub fn add_stdin_console(&mut self, serial: Arc<Mutex<Serial>>) -> Result<(), EventLoopError> {
        let console = StdinConsole::new(libc::STDIN_FILENO, serial)
            .map_err(|source| EventLoopError::Console { source })?;
        self.saved_termios = set_raw_mode();
        self.manager.add_subscriber(Arc::new(Mutex::new(console)));
        Ok(())
    }

    /// Serves the console's host side `host` for `serial`: stdin (a terminal in raw mode until
    /// [`EventLoop::restore_terminal`]), a socket's clients or a pty.
    pub fn add_console(
        &mut self,
        host: ConsoleHost,
        serial: Arc<Mutex<Serial>>,
    ) -> Result<(), EventLoopError> {
        let console = |source| EventLoopError::Console { source };
        match host {
            ConsoleHost::Stdin => self.add_stdin_console(serial)?,
            ConsoleHost::Socket {
                listener,
                shared,
                waker,
            } => {
                let socket =
                    SocketConsole::new(listener, shared, waker, serial).map_err(console)?;
                self.manager.add_subscriber(Arc::new(Mutex::new(socket)));
            }
            ConsoleHost::Pty(pty) => {
                let pty = PtyConsole::new(pty, serial).map_err(console)?;
                self.manager.add_subscriber(Arc::new(Mutex::new(pty)));
            }
            ConsoleHost::Nothing => {}
        }
        Ok(())
    }

    /// Adds a subscriber (e.g. the VM controller) to the loop; returns its id there.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) -> SubscriberId {
        self.manager.add_subscriber(subscriber)
    }

    /// Calls `f` with the `EventOps` of subscriber `id` while the loop is not running (a
    /// reboot in place changes the controller's fds this way).
    pub fn with_ops<R>(
        &mut self,
        id: SubscriberId,
        f: impl FnOnce(&mut EventOps) -> R,
    ) -> Result<R, EventLoopError> {
        let mut ops = self
            .manager
            .event_ops(id)
            .map_err(|source| EventLoopError::Epoll {
                what: "reaching a subscriber's events",
                source,
            })?;
        Ok(f(&mut ops))
    }

    /// Runs until a VM exit is requested.
    pub fn run(&mut self) -> Result<(), EventLoopError> {
        while self.exit.requested().is_none() {
            self.manager
                .run_with_timeout(TICK_MS)
                .map_err(|source| EventLoopError::Epoll {
                    what: "waiting for events",
                    source,
                })?;
        }
        Ok(())
    }

    /// Puts the terminal back as it was before raw mode.
    pub fn restore_terminal(&mut self) {
        if let Some(t) = self.saved_termios.take() {
            // SAFETY: tcsetattr reads the termios struct we saved from the same fd.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.restore_terminal();
    }
}

/// Raw mode on a terminal stdin; returns the previous settings (None when stdin is no terminal).
fn set_raw_mode() -> Option<libc::termios> {
    // SAFETY: isatty only inspects the fd.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return None;
    }
    // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a termios.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return None;
    }
    let saved = t;
    // Keep ISIG so Ctrl-C still stops rvmm; pass everything else to the guest.
    t.c_lflag &= !(libc::ICANON | libc::ECHO);
    t.c_iflag &= !(libc::ICRNL | libc::IXON);
    // SAFETY: valid fd and pointer to a termios.
    unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    Some(saved)
}

struct ExitWatcher {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The loop checks the reason after every wake-up; just consume the counter.
        let _ = self.exit.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}
