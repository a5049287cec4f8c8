//! The guest's serial console on a pseudo-terminal (`--serial pty`): rvmm opens a pty pair, logs
//! the terminal's path (`/dev/pts/N`) and shows it in `info`; a terminal program (`screen`,
//! `minicom`, `picocom`) opens that path to use the console.
//!
//! - The terminal is in raw mode, so the guest gets bytes as they are typed and its output
//!   arrives unchanged.
//! - rvmm keeps the terminal side open itself: a pty master whose terminal nobody has open
//!   reports a hang-up to `poll` without end, which would spin the event loop. With it held,
//!   the master is readable only when someone types, whoever comes and goes.
//! - Output reaches the master through the console writer thread as for stdout: while nobody
//!   reads the terminal, the kernel's pty buffer (a few tens of KiB) keeps the latest output
//!   for the next reader; past it the writer's buffer fills and further output is dropped and
//!   counted, as for a stalled stdout, and the guest never waits.
//! - Input from the master goes to the UART through [`StdinConsole`], with its flow control.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use rvmm_devices::serial::Serial;

use crate::vm::console::StdinConsole;

/// A pseudo-terminal pair: the master rvmm reads and writes, the terminal (slave) held open.
#[derive(Debug)]
pub struct Pty {
    master: File,
    /// Held open so that the master never reports a hang-up (see the module documentation).
    _terminal: File,
    path: PathBuf,
}

impl Pty {
    /// Opens a new pty pair (`posix_openpt`, `grantpt`, `unlockpt`) and puts its terminal in raw
    /// mode.
    pub fn open() -> io::Result<Self> {
        // SAFETY: posix_openpt takes flags only; the result is checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: grantpt acts on the master fd we own; the result is checked.
        if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: unlockpt acts on the master fd we own; the result is checked.
        if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0u8; 128];
        // SAFETY: `name` is a writable buffer of the given length; ptsname_r writes a
        // NUL-terminated path into it or fails.
        let r =
            unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let path = PathBuf::from(
            String::from_utf8_lossy(name.get(..len).unwrap_or_default()).into_owned(),
        );
        let terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        set_raw(&terminal)?;
        Ok(Self {
            master,
            _terminal: terminal,
            path,
        })
    }

    /// The terminal's path, e.g. `/dev/pts/3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master, for the console writer thread to write the guest's output to.
    pub fn output(&self) -> io::Result<File> {
        self.master.try_clone()
    }
}

/// Raw mode on a terminal: no line editing, echo, signals or character translation.
fn set_raw(terminal: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it and the result is checked.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid terminal fd and a pointer to a termios.
    if unsafe { libc::tcgetattr(terminal.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only changes the flags of the termios it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: a valid terminal fd and a pointer to a termios.
    if unsafe { libc::tcsetattr(terminal.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The event-loop side of a pty console: the master's input to the UART.
pub struct PtyConsole {
    input: StdinConsole,
    /// Keeps the master (read by `input`) and the terminal open for the loop's life.
    _pty: Pty,
}

impl PtyConsole {
    /// Feeds what is typed on `pty` to `serial`.
    pub fn new(pty: Pty, serial: Arc<Mutex<Serial>>) -> io::Result<Self> {
        Ok(Self {
            input: StdinConsole::new(pty.master.as_raw_fd(), serial)?,
            _pty: pty,
        })
    }
}

impl MutEventSubscriber for PtyConsole {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.input.process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.input.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};

    use event_manager::{EventManager, SubscriberOps};
    use rvmm_devices::sync::MutexExt;
    use rvmm_devices::BusDevice;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn output_written_to_the_master_is_read_unchanged_on_the_terminal() {
        let pty = Pty::open().expect("pty");
        let mut terminal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.path())
            .expect("terminal");

        pty.output().unwrap().write_all(b"a\nb\r\n").unwrap();
        let mut got = [0u8; 5];
        terminal.read_exact(&mut got).unwrap();

        // Raw mode: no \n -> \r\n translation.
        assert_eq!(&got, b"a\nb\r\n");
        assert!(pty.path().starts_with("/dev/pts"));
    }

    #[test]
    fn a_terminal_that_closes_does_not_wake_the_loop() {
        let pty = Pty::open().expect("pty");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))));
        let path = pty.path().to_path_buf();
        let console = PtyConsole::new(pty, serial).unwrap();
        let mut manager = EventManager::<Arc<Mutex<PtyConsole>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(console)));

        let user = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        drop(user);

        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn typed_input_reaches_the_guest() {
        let pty = Pty::open().expect("pty");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))));
        let path = pty.path().to_path_buf();
        let console = PtyConsole::new(pty, serial.clone()).unwrap();
        let mut manager = EventManager::<Arc<Mutex<PtyConsole>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(console)));
        let mut user = std::fs::OpenOptions::new().write(true).open(&path).unwrap();

        user.write_all(b"x\r").unwrap();
        // The master becomes readable: one turn reads it and fills the FIFO.
        assert!(manager.run_with_timeout(5000).unwrap() > 0);
        let mut byte = [0u8];
        serial.locked().read(0, 0, &mut byte);

        assert_eq!(byte[0], b'x');
    }
}
