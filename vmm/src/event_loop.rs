//! The VMM's event loop: serial input from stdin, the VM-exit event and (later) the control API and
//! VFIO interrupts. Every change of the device tree happens on this thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use rvmm_devices::serial::Serial;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::exit::ExitSignal;

/// How often the loop wakes up without events (to retry console input the UART had no room for).
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
}

/// A subscriber of the loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop of one VM.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    console: Option<Arc<Mutex<StdinConsole>>>,
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
            console: None,
            saved_termios: None,
        })
    }

    /// Feeds stdin to `serial`; a terminal is put in raw mode until [`EventLoop::restore_terminal`].
    pub fn add_stdin_console(&mut self, serial: Arc<Mutex<Serial>>) -> Result<(), EventLoopError> {
        self.saved_termios = set_raw_mode();
        let console = Arc::new(Mutex::new(StdinConsole {
            serial,
            pending: Vec::new(),
            closed: false,
        }));
        self.manager.add_subscriber(console.clone());
        self.console = Some(console);
        Ok(())
    }

    /// Adds a subscriber (e.g. the VM controller) to the loop.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
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
            if let Some(c) = &self.console {
                c.lock().unwrap_or_else(|e| e.into_inner()).flush_pending();
            }
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

/// Reads what `fd` has (at most 256 bytes) straight from the descriptor and appends it to
/// `pending`; returns the count (0 at end of file). Not through `std::io::stdin()`: its buffer
/// would take more than one call returns and keep the rest where epoll cannot see it, so input
/// longer than one read would wait for the next keystroke.
fn read_fd(fd: RawFd, pending: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a writable buffer of the given length; read(2) writes at most that much.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    pending.extend_from_slice(buf.get(..n).unwrap_or_default());
    Ok(n)
}

struct StdinConsole {
    serial: Arc<Mutex<Serial>>,
    pending: Vec<u8>,
    closed: bool,
}

impl StdinConsole {
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..taken.min(self.pending.len()));
    }
}

impl MutEventSubscriber for StdinConsole {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.pending.len() < 4096 {
            match read_fd(libc::STDIN_FILENO, &mut self.pending) {
                Ok(0) => self.closed = true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => {
                    log::warn!("serial console input stopped: {e}");
                    self.closed = true;
                }
            }
        }
        if self.closed || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
        }
        self.flush_pending();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin.as_raw_fd(), EventSet::IN)) {
            // /dev/null and regular files cannot be polled: the guest just gets no input.
            log::debug!("stdin is not pollable ({e:?}); the serial console has no input");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn input_longer_than_one_read_stays_on_the_descriptor_for_the_next() {
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        writer.write_all(&[b'x'; 300]).expect("written");
        let mut pending = Vec::new();

        let first = read_fd(reader.as_raw_fd(), &mut pending).expect("first read");
        let second = read_fd(reader.as_raw_fd(), &mut pending).expect("second read");

        assert_eq!((first, second, pending.len()), (256, 44, 300));
    }

    #[test]
    fn closed_writer_reads_as_end_of_file() {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(writer);
        let mut pending = Vec::new();

        assert_eq!(read_fd(reader.as_raw_fd(), &mut pending).expect("read"), 0);
    }
}
