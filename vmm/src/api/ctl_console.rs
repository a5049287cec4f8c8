//! `rvmm ctl --api-socket API console`: attaches the terminal to a VM's socket console
//! (`rvmm run --serial socket=PATH`), found in the VM's `info`.
//!
//! - On a terminal, stdin is put in raw mode (every key, Ctrl-C included, goes to the guest) and
//!   [`ESCAPE`] (Ctrl-], as in telnet) detaches; a hint says so on stderr when it attaches. The
//!   terminal is restored on every way out: detach, the console closing, an error, and SIGINT,
//!   SIGTERM or SIGHUP (taken through a signalfd, so that they end the loop rather than the
//!   process).
//! - Without a terminal, stdin is copied to the console and the console to stdout until stdin
//!   ends or the console closes; no byte is an escape.
//! - Detaching (the escape, or the end of stdin) shuts the sending side of the connection and
//!   reads on until rvmm, which detaches a client at the end of its input, closes it (at most
//!   2 s): output rvmm sent before the detach is printed, and what it did not send it keeps for
//!   the next client, so a detach and re-attach loses nothing in between.
//! - A console another client holds answers with one line ([`REFUSAL`]) and closes: that is an
//!   error here, not output.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::api::client::{ApiClient, ClientError};
use crate::api::types::{ConsoleKind, VmInfo};
use crate::vm::console_socket::REFUSAL;

/// The byte that detaches an interactive console: Ctrl-].
pub const ESCAPE: u8 = 0x1d;
/// Bytes moved per read.
const CHUNK: usize = 16 * 1024;
/// How long detaching waits for rvmm to close the connection after the last output.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Errors of `rvmm ctl console`.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The VM's console is not on a socket.
    #[error("the VM's serial console is {kind:?}, not a socket: `rvmm ctl console` attaches to a VM started with `--serial socket=PATH`")]
    NotASocket {
        /// What it is.
        kind: ConsoleKind,
    },
    /// The VM's `info` does not say where its console is.
    #[error("the VM's info does not say where its console is (an older rvmm): connect to its --serial socket directly, e.g. `socat - UNIX:PATH`")]
    Unknown,
    /// The console socket cannot be reached.
    #[error("cannot connect to the console socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another client is attached.
    #[error("console refused: another client is attached (try again once it detaches)")]
    Refused,
    /// The terminal or a descriptor could not be set up or used.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Attaches to the socket console of the VM behind `client` until detached (see the module
/// documentation).
pub fn run(client: &ApiClient) -> Result<(), ClientError> {
    let info = client.info()?;
    let path = socket_path(&info)?;
    attach(&path).map_err(ClientError::from)
}

/// The console socket `info` names.
fn socket_path(info: &VmInfo) -> Result<PathBuf, ConsoleError> {
    let console = info.console.as_ref().ok_or(ConsoleError::Unknown)?;
    match (console.kind, &console.path) {
        (ConsoleKind::Socket, Some(path)) => Ok(PathBuf::from(path)),
        (ConsoleKind::Socket, None) => Err(ConsoleError::Unknown),
        (kind, _) => Err(ConsoleError::NotASocket { kind }),
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ConsoleError {
    move |source| ConsoleError::Io { what, source }
}

/// Connects to `path` and moves bytes both ways until detached.
pub fn attach(path: &Path) -> Result<(), ConsoleError> {
    let stream = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let signals = SignalFd::new().map_err(io_err("watch SIGINT, SIGTERM and SIGHUP"))?;
    // SAFETY: isatty only inspects the descriptor.
    let terminal = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    let raw = if terminal {
        Some(RawTerminal::enter().map_err(io_err("put the terminal in raw mode"))?)
    } else {
        None
    };
    if terminal {
        eprint!(
            "rvmm: attached to the console {}; Ctrl-] detaches\r\n",
            path.display()
        );
    }
    let ends = Ends {
        input: libc::STDIN_FILENO,
        output: &mut io::stdout().lock(),
        terminal,
    };
    let result = pump(&stream, &signals, ends);
    drop(raw);
    if terminal {
        match &result {
            Ok(Ended::Detached) => eprintln!("rvmm: detached"),
            Ok(Ended::ConsoleClosed) => eprintln!("rvmm: the console closed (the VM ended?)"),
            Ok(Ended::Signal(n)) => eprintln!("rvmm: detached on signal {n}"),
            Ok(Ended::InputDone) | Err(_) => {}
        }
    }
    result.map(drop)
}

/// Why the copying stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The escape was typed.
    Detached,
    /// stdin ended.
    InputDone,
    /// The console closed its side.
    ConsoleClosed,
    /// A signal asked to stop.
    Signal(u32),
}

/// The user's side of the console.
struct Ends<'a> {
    /// Read for input (stdin).
    input: RawFd,
    /// Where output goes (stdout).
    output: &'a mut dyn Write,
    /// Whether `input` is a terminal: then [`ESCAPE`] detaches and its end does not.
    terminal: bool,
}

/// Copies `ends.input` to `stream` and `stream` to `ends.output` until one side ends, the
/// escape is typed (on a terminal) or a signal arrives.
fn pump(stream: &UnixStream, signals: &SignalFd, ends: Ends) -> Result<Ended, ConsoleError> {
    let Ends {
        input: input_fd,
        output,
        terminal,
    } = ends;
    let mut refusal = RefusalCheck::default();
    let mut stdin_open = true;
    // Detaching: our sending side is shut, the console's last output is read until rvmm closes
    // the connection (or the deadline passes); then the session ends for this reason.
    let mut closing: Option<(Ended, Instant)> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut fds = [
            poll_fd(stream.as_raw_fd()),
            poll_fd(signals.fd.as_raw_fd()),
            poll_fd(if stdin_open { input_fd } else { -1 }),
        ];
        let timeout = match closing {
            Some((why, deadline)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(why);
                }
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
            }
            None => -1,
        };
        // SAFETY: `fds` is an array of pollfd of the given length; poll writes revents only.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("wait for the console or stdin")(e));
        }
        if fds[1].revents != 0 {
            return Ok(Ended::Signal(signals.take()));
        }
        if fds[0].revents != 0 {
            let n = match (&*stream).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A reset connection is a closed console.
                Err(_) => 0,
            };
            let out = refusal.feed(buf.get(..n).unwrap_or_default(), n == 0)?;
            if (!out.is_empty() && !write_out(output, &out)?) || n == 0 {
                return Ok(closing.map_or(Ended::ConsoleClosed, |(why, _)| why));
            }
        }
        if fds[2].revents != 0 {
            // SAFETY: `buf` is a writable buffer of the given length; read(2) writes at most that.
            let n = unsafe { libc::read(input_fd, buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("read stdin")(e));
            };
            if n == 0 {
                stdin_open = false;
                if !terminal {
                    closing = Some(start_closing(stream, Ended::InputDone));
                }
                continue;
            }
            let input = buf.get(..n).unwrap_or_default();
            let (input, escaped) = match input.iter().position(|&b| b == ESCAPE) {
                Some(at) if terminal => (input.get(..at).unwrap_or_default(), true),
                _ => (input, false),
            };
            if (&*stream).write_all(input).is_err() {
                return Ok(Ended::ConsoleClosed);
            }
            if escaped {
                stdin_open = false;
                closing = Some(start_closing(stream, Ended::Detached));
            }
        }
    }
}

/// Shuts our sending side of the console connection: rvmm detaches us and closes its side once
/// it has sent what it sent, so nothing sent to us is lost. Returns `why` with the deadline
/// for that close.
fn start_closing(stream: &UnixStream, why: Ended) -> (Ended, Instant) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    (why, Instant::now() + CLOSE_WAIT)
}

fn poll_fd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Writes to stdout; false when stdout is closed (nobody reads the console any more).
fn write_out(out: &mut dyn Write, bytes: &[u8]) -> Result<bool, ConsoleError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(io_err("write to stdout")(e)),
    }
}

/// Tells the server's refusal from console output: the first bytes are held back while they
/// match [`REFUSAL`]; the whole line followed by the end of the connection is a refusal.
#[derive(Default)]
struct RefusalCheck {
    held: Vec<u8>,
    /// The first bytes did not match: everything is output from now on.
    decided: bool,
}

impl RefusalCheck {
    /// Takes what arrived (`end`: the connection ended after it); returns what to print.
    fn feed(&mut self, bytes: &[u8], end: bool) -> Result<Vec<u8>, ConsoleError> {
        if self.decided {
            return Ok(bytes.to_vec());
        }
        self.held.extend_from_slice(bytes);
        let line = REFUSAL.as_bytes();
        let common = self.held.len().min(line.len());
        if self.held.get(..common) != line.get(..common) {
            self.decided = true;
            return Ok(std::mem::take(&mut self.held));
        }
        if end && self.held == line {
            return Err(ConsoleError::Refused);
        }
        if end || self.held.len() > line.len() {
            self.decided = true;
            return Ok(std::mem::take(&mut self.held));
        }
        Ok(Vec::new())
    }
}

/// stdin's terminal in raw mode; the settings it had are restored when this is dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it and the result is checked.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = t;
        // SAFETY: cfmakeraw only changes the flags of the termios it is given.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: a valid descriptor and a pointer to a termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: a valid descriptor and the termios read from it before.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// SIGINT, SIGTERM and SIGHUP as a descriptor: they are blocked while it lives (so that they
/// end the copying loop, which restores the terminal, instead of the process) and unblocked
/// when it is dropped.
struct SignalFd {
    fd: OwnedFd,
    mask: libc::sigset_t,
}

impl SignalFd {
    fn new() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset before use.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `mask` is a valid sigset_t; these calls only change it.
        unsafe {
            libc::sigemptyset(&mut mask);
            libc::sigaddset(&mut mask, libc::SIGINT);
            libc::sigaddset(&mut mask, libc::SIGTERM);
            libc::sigaddset(&mut mask, libc::SIGHUP);
        }
        // SAFETY: `mask` is a valid sigset_t; the old mask is not needed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: a new signalfd for `mask`; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &mask, libc::SFD_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: as above, undoing the block.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &mask, std::ptr::null_mut()) };
            return Err(e);
        }
        Ok(Self {
            // SAFETY: `fd` was just created and is owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            mask,
        })
    }

    /// The number of the signal that arrived.
    fn take(&self) -> u32 {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::addr_of_mut!(info).cast(),
                size,
            )
        };
        if usize::try_from(n).ok() == Some(size) {
            info.ssi_signo
        } else {
            0
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: `mask` is the valid sigset_t blocked in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.mask, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::api::types::{ConsoleInfo, RootPortUsage};

    fn info(kind: ConsoleKind, path: Option<&str>) -> VmInfo {
        VmInfo {
            version: "0".into(),
            cpus: 1,
            memory_bytes: 0,
            hugepages: false,
            root_ports: RootPortUsage { used: 0, total: 1 },
            devices: Vec::new(),
            resources: Default::default(),
            state: crate::vm::pause::VmState::Running,
            console: Some(ConsoleInfo {
                kind,
                path: path.map(Into::into),
            }),
            placement: None,
            hotplug: None,
        }
    }

    #[test]
    fn socket_path_comes_from_info() {
        let path = socket_path(&info(ConsoleKind::Socket, Some("/run/c.sock"))).unwrap();

        assert_eq!(path, PathBuf::from("/run/c.sock"));
    }

    #[test]
    fn other_consoles_are_refused_with_the_flag_to_use() {
        let err = socket_path(&info(ConsoleKind::Pty, Some("/dev/pts/1"))).unwrap_err();

        assert!(err.to_string().contains("--serial socket=PATH"), "{err}");
    }

    #[test]
    fn info_without_console_says_how_to_connect_directly() {
        let mut old = info(ConsoleKind::Socket, None);
        old.console = None;

        let err = socket_path(&old).unwrap_err();

        assert!(err.to_string().contains("socat"), "{err}");
    }

    #[test]
    fn refusal_line_then_end_is_an_error() {
        let mut check = RefusalCheck::default();
        let (a, b) = REFUSAL.as_bytes().split_at(10);

        assert_eq!(check.feed(a, false).unwrap(), b"");
        assert_eq!(check.feed(b, false).unwrap(), b"");
        assert!(matches!(check.feed(b"", true), Err(ConsoleError::Refused)));
    }

    #[test]
    fn other_output_passes_whole() {
        let mut check = RefusalCheck::default();

        assert_eq!(check.feed(b"[rv", false).unwrap(), b"");
        assert_eq!(check.feed(b"x hello", false).unwrap(), b"[rvx hello");
        assert_eq!(check.feed(b"[rvmm", false).unwrap(), b"[rvmm");
    }

    #[test]
    fn refusal_text_followed_by_more_output_is_output() {
        let mut check = RefusalCheck::default();
        let mut bytes = REFUSAL.as_bytes().to_vec();
        bytes.extend_from_slice(b"more");

        assert_eq!(check.feed(&bytes, false).unwrap(), bytes);
    }

    /// Runs `pump` with `input` (the write end is given to `type_in`) and a socket pair whose
    /// other end `console` plays the VM; returns how it ended and what reached the output.
    fn pumped(
        terminal: bool,
        type_in: impl FnOnce(std::io::PipeWriter, std::sync::mpsc::Receiver<()>) + Send + 'static,
        console: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (Result<Ended, ConsoleError>, Vec<u8>) {
        let (input, writer) = std::io::pipe().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        // Disconnected once the pump has returned: a typist that waits on it keeps its input
        // open for the whole session.
        let (pumped_tx, pumped_rx) = std::sync::mpsc::channel::<()>();
        let typist = std::thread::spawn(move || type_in(writer, pumped_rx));
        let vm = std::thread::spawn(move || console(theirs));
        let signals = SignalFd::new().unwrap();
        let mut output = Vec::new();
        let ended = pump(
            &ours,
            &signals,
            Ends {
                input: input.as_raw_fd(),
                output: &mut output,
                terminal,
            },
        );
        drop(pumped_tx);
        drop(ours);
        typist.join().unwrap();
        vm.join().unwrap();
        (ended, output)
    }

    #[test]
    fn piped_input_reaches_the_console_and_its_output_the_user_until_input_ends() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ended, output) = pumped(
            false,
            move |mut w, _pumped| {
                w.write_all(b"ls\n").unwrap();
                // Input ends once the console has answered.
                rx.recv().unwrap();
            },
            move |mut vm| {
                let mut got = [0u8; 3];
                vm.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"ls\n");
                vm.write_all(b"file\n").unwrap();
                // Input ends after the answer is readable: pump reads the console first when
                // both are ready.
                tx.send(()).unwrap();
                // The end of input arrives as the end of the client's sending side; output
                // sent before rvmm closes still reaches the user.
                assert_eq!(vm.read(&mut got).unwrap(), 0);
                vm.write_all(b"late\n").unwrap();
            },
        );

        assert_eq!(ended.unwrap(), Ended::InputDone);
        assert_eq!(output, b"file\nlate\n");
    }

    #[test]
    fn escape_on_a_terminal_detaches_after_sending_what_came_before() {
        let (ended, _) = pumped(
            true,
            |mut w, _pumped| w.write_all(b"ab\x1dcd").unwrap(),
            |mut vm| {
                let mut got = Vec::new();
                vm.read_to_end(&mut got).unwrap();
                assert_eq!(got, b"ab");
            },
        );

        assert_eq!(ended.unwrap(), Ended::Detached);
    }

    #[test]
    fn escape_byte_in_piped_input_is_just_input() {
        let (ended, _) = pumped(
            false,
            |mut w, _pumped| w.write_all(b"a\x1db").unwrap(),
            |mut vm| {
                let mut got = Vec::new();
                vm.read_to_end(&mut got).unwrap();
                assert_eq!(got, b"a\x1db");
            },
        );

        assert_eq!(ended.unwrap(), Ended::InputDone);
    }

    #[test]
    fn console_that_closes_ends_the_session() {
        let (ended, output) = pumped(
            false,
            |_w, pumped| {
                let _ = pumped.recv();
            },
            |mut vm| {
                vm.write_all(b"bye\r\n").unwrap();
            },
        );

        assert_eq!(ended.unwrap(), Ended::ConsoleClosed);
        assert_eq!(output, b"bye\r\n");
    }

    #[test]
    fn refused_attach_is_an_error_and_prints_nothing() {
        let (ended, output) = pumped(
            false,
            |_w, pumped| {
                let _ = pumped.recv();
            },
            |mut vm| {
                vm.write_all(REFUSAL.as_bytes()).unwrap();
            },
        );

        assert!(matches!(ended, Err(ConsoleError::Refused)), "{ended:?}");
        assert!(output.is_empty());
    }

    #[test]
    fn a_signal_ends_the_session() {
        let (input, _writer) = std::io::pipe().unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let signals = SignalFd::new().unwrap();
        // SAFETY: SIGTERM to this thread, which blocks it: it waits for the signalfd.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };

        let ended = pump(
            &ours,
            &signals,
            Ends {
                input: input.as_raw_fd(),
                output: &mut Vec::new(),
                terminal: true,
            },
        );

        assert_eq!(ended.unwrap(), Ended::Signal(libc::SIGTERM as u32));
    }
}
