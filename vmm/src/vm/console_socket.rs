//! The guest's serial console on a unix socket (`--serial socket=PATH[,buffer=SIZE]`): one client
//! at a time attaches (`socat - UNIX:PATH`, `rvmm ctl console`), detaches and attaches again
//! without the guest noticing.
//!
//! - **Output** goes through the console writer thread as for stdout (`console_out.rs`): its sink
//!   here is a [`SocketSink`], which sends to the attached client, or keeps the output in a
//!   [`Ring`] of `buffer` bytes ([`DEFAULT_RING_SIZE`]) while nobody is attached, dropping the
//!   oldest bytes when it is full. A client that attaches is sent the ring first (with a line
//!   saying how much older output was dropped, if any), then the live output. A client that
//!   stops reading fills the writer's buffer, and further output is dropped and counted, as for
//!   a stalled stdout: the guest never waits.
//! - **Input** from the client goes to the UART through [`ConsoleInput`] (the pending buffer and
//!   flow control stdin has). It is read only while fewer than its limit of bytes wait for the
//!   guest; meanwhile only the client's hang-up is watched.
//! - **The listener** is served by the event loop ([`SocketConsole`], a subscriber): a client
//!   that connects while another is attached gets the one line [`REFUSAL`] and is closed. A
//!   client that closes its connection (or only its sending side), or that fails a send, is
//!   detached; what it was not sent is kept for the next one.
//! - **The socket file** is created with owner-only access; a stale one (nobody listening) is
//!   replaced at start, a live one refused, and it is removed when the VM ends.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use rvmm_devices::serial::Serial;
use rvmm_devices::sync::MutexExt;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::vm::console::{ConsoleInput, ReadOutcome};
use crate::vm::console_out::ConsoleWaker;

/// Output kept while no client is attached when `buffer=` is not given: 64 KiB.
pub const DEFAULT_RING_SIZE: u64 = 64 << 10;
/// The largest `buffer=`: 64 MiB.
pub const MAX_RING_SIZE: u64 = 64 << 20;
/// The line a client gets when another one is attached; the connection is closed after it.
pub const REFUSAL: &str =
    "[rvmm: console refused: another client is attached; try again once it detaches]\r\n";

/// Errors of setting up a socket console.
#[derive(Debug, Error)]
pub enum SocketConsoleError {
    /// Another process listens on the path.
    #[error("the console socket {0} is in use by another running process (pick another path or stop that one)")]
    InUse(PathBuf),
    /// The path is something other than a socket.
    #[error("{0} exists and is not a socket: refusing to replace it with the console socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Output kept for the next client: at most `limit` bytes, the oldest dropped first.
#[derive(Debug)]
pub struct Ring {
    bytes: VecDeque<u8>,
    limit: usize,
    /// Bytes dropped since the ring was last taken.
    dropped: u64,
}

impl Ring {
    /// An empty ring of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            limit,
            dropped: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the limit.
    pub fn push(&mut self, data: &[u8]) {
        let keep = data.len().min(self.limit);
        let skipped = data.len() - keep;
        let overflow = (self.bytes.len() + keep).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.bytes
            .extend(data.get(skipped..).unwrap_or_default().iter());
        self.dropped = self.dropped.saturating_add((skipped + overflow) as u64);
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Everything held, for a client that attaches: preceded by a line saying how many older
    /// bytes were dropped, if any. Empties the ring.
    pub fn take_replay(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 128);
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            out.extend_from_slice(
                format!(
                    "[rvmm: {dropped} older bytes of console output dropped while no client was attached (the last {} are kept)]\r\n",
                    self.limit
                )
                .as_bytes(),
            );
        }
        out.extend(self.bytes.drain(..));
        out
    }
}

/// What the event loop and the writer thread share: the attached client and the ring.
#[derive(Debug)]
struct Attachment {
    client: Option<Arc<UnixStream>>,
    /// The client attached since the last send: it gets the ring first.
    replay: bool,
    ring: Ring,
}

/// A socket console's shared state (see the module documentation).
#[derive(Debug)]
pub struct SocketShared {
    state: Mutex<Attachment>,
}

impl SocketShared {
    /// No client attached, a ring of `ring_size` bytes.
    pub fn new(ring_size: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Attachment {
                client: None,
                replay: false,
                ring: Ring::new(ring_size),
            }),
        })
    }

    /// Whether a client is attached.
    pub fn attached(&self) -> bool {
        self.state.locked().client.is_some()
    }

    /// Attaches `client` unless one is attached (then gives it back).
    fn attach(&self, client: Arc<UnixStream>) -> Result<(), Arc<UnixStream>> {
        let mut state = self.state.locked();
        if state.client.is_some() {
            return Err(client);
        }
        state.client = Some(client);
        state.replay = true;
        Ok(())
    }

    /// Detaches `client` if it is the one attached.
    fn detach(&self, client: &Arc<UnixStream>) {
        let mut state = self.state.locked();
        if state
            .client
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, client))
        {
            state.client = None;
            state.replay = false;
        }
    }
}

/// The console writer's sink: the attached client, or the ring (see the module documentation).
pub struct SocketSink {
    shared: Arc<SocketShared>,
}

impl SocketSink {
    /// A sink over `shared`.
    pub fn new(shared: Arc<SocketShared>) -> Self {
        Self { shared }
    }

    /// Sends `data` to the attached client (after the ring, if it has just attached) or keeps
    /// it in the ring. Never fails: a client that cannot be sent to is detached, and what it
    /// was not sent is kept.
    fn deliver(&mut self, data: &[u8]) {
        let (client, out) = {
            let mut state = self.shared.state.locked();
            let Some(client) = state.client.clone() else {
                state.ring.push(data);
                return;
            };
            let mut out = if std::mem::take(&mut state.replay) {
                state.ring.take_replay()
            } else {
                Vec::new()
            };
            out.extend_from_slice(data);
            (client, out)
        };
        if out.is_empty() {
            return;
        }
        // Sent without the lock: a client that reads slowly blocks this thread only.
        let sent = send_all(client.as_raw_fd(), &out);
        if sent < out.len() {
            log::info!("console client detached (it stopped taking output)");
            let mut state = self.shared.state.locked();
            if state
                .client
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &client))
            {
                state.client = None;
                state.replay = false;
            }
            // Kept for the next client (which, if it is attached already, gets the ring first).
            state.ring.push(out.get(sent..).unwrap_or_default());
        }
    }
}

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deliver(buf);
        Ok(buf.len())
    }

    /// Replays the ring to a client that has just attached (the writer calls it when woken).
    fn flush(&mut self) -> io::Result<()> {
        self.deliver(&[]);
        Ok(())
    }
}

/// Sends `data` on the socket `fd`, blocking as needed; returns how much was sent (less than
/// all when the peer went away). `MSG_NOSIGNAL`: a departed client is an error, not SIGPIPE.
fn send_all(fd: RawFd, data: &[u8]) -> usize {
    let mut sent = 0;
    while let Some(rest) = data.get(sent..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is a readable buffer of the given length; send(2) only reads it.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        match usize::try_from(n) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sent
}

/// The console's listening socket; the file is removed when it is dropped (if it is still
/// ours).
#[derive(Debug)]
pub struct ConsoleListener {
    listener: UnixListener,
    path: PathBuf,
    file_id: (u64, u64),
}

impl ConsoleListener {
    /// Listens on `path` (owner-only access, non-blocking accepts). A stale socket file (nobody
    /// listening) is replaced; a socket a live process answers on, or any other file, is
    /// refused.
    pub fn bind(path: &Path) -> Result<Self, SocketConsoleError> {
        let io_err = |what| {
            move |source| SocketConsoleError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(io_err("bind the console socket"))?;
        let this = |listener| -> Result<Self, SocketConsoleError> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err("restrict access to the console socket"))?;
            let meta =
                std::fs::symlink_metadata(path).map_err(io_err("inspect the console socket"))?;
            let listener: UnixListener = listener;
            listener
                .set_nonblocking(true)
                .map_err(io_err("configure the console socket"))?;
            Ok(Self {
                listener,
                path: path.to_path_buf(),
                file_id: (meta.dev(), meta.ino()),
            })
        };
        this(listener).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConsoleListener {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!(
                    "cannot remove the console socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Removes a socket file nobody listens on; refuses a live socket and other files. Whether a
/// process listens is read from `/proc/net/unix` rather than by connecting: a connection would
/// attach to a live rvmm's console and take the output it keeps for its next client. Only when
/// that table cannot tell (unreadable, or a listener bound by a relative name that may be this
/// file) is a connection tried.
fn remove_stale_socket(path: &Path) -> Result<(), SocketConsoleError> {
    let io_err = |what| {
        move |source| SocketConsoleError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketConsoleError::NotASocket(path.to_path_buf()));
    }
    match listening_at(path) {
        Some(true) => return Err(SocketConsoleError::InUse(path.to_path_buf())),
        Some(false) => {
            log::info!("removing the stale console socket {}", path.display());
            return std::fs::remove_file(path).map_err(io_err("remove the stale socket"));
        }
        None => {}
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketConsoleError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing the stale console socket {}", path.display());
            std::fs::remove_file(path).map_err(io_err("remove the stale socket"))
        }
        Err(e) => Err(io_err("check whether another process listens on")(e)),
    }
}

/// Whether a process listens on the unix socket at `path`, from the kernel's table of unix
/// sockets; `None` when the table cannot tell.
fn listening_at(path: &Path) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    listening_in(&table, path)
}

/// [`listening_at`] on the text of `/proc/net/unix`: a listening socket (flag `__SO_ACCEPTCON`,
/// 0x10000) bound to the same file. Absolute names are compared after resolving their
/// directories; a relative name with the same file name makes the answer unknown.
fn listening_in(table: &str, path: &Path) -> Option<bool> {
    const ACCEPTCON: u32 = 0x1_0000;
    let canonical = |p: &Path| -> Option<PathBuf> {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty())?;
        Some(dir.canonicalize().ok()?.join(p.file_name()?))
    };
    let ours = canonical(path)?;
    let mut unknown = false;
    // Num RefCount Protocol Flags Type St Inode [Path]
    for line in table.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let flags = fields.nth(3);
        // The name is what follows the inode (a name with runs of spaces is not told apart).
        let bound = fields
            .nth(2)
            .map(|_inode| fields.collect::<Vec<_>>().join(" "));
        let (Some(flags), Some(bound)) = (flags, bound) else {
            continue;
        };
        let Ok(flags) = u32::from_str_radix(flags, 16) else {
            continue;
        };
        if flags & ACCEPTCON == 0 || bound.is_empty() || bound.starts_with('@') {
            continue;
        }
        let bound = Path::new(&bound);
        if bound.is_absolute() {
            if canonical(bound).is_some_and(|b| b == ours) {
                return Some(true);
            }
        } else if bound.file_name() == ours.file_name() {
            unknown = true;
        }
    }
    (!unknown).then_some(false)
}

/// What the event loop watches on the attached client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interest {
    /// Its input and hang-up.
    Input,
    /// Only its hang-up: the guest has not taken the input read so far.
    HangUp,
}

/// The client the event loop serves.
struct Client {
    stream: Arc<UnixStream>,
    interest: Interest,
}

/// The event-loop side of a socket console: accepts clients, feeds their input to the UART,
/// detaches them (see the module documentation).
pub struct SocketConsole {
    listener: ConsoleListener,
    shared: Arc<SocketShared>,
    waker: ConsoleWaker,
    feed: ConsoleInput,
    client: Option<Client>,
}

impl SocketConsole {
    /// Serves `listener` for `serial`; `shared` is also the console writer's [`SocketSink`],
    /// woken through `waker` when a client attaches.
    pub fn new(
        listener: ConsoleListener,
        shared: Arc<SocketShared>,
        waker: ConsoleWaker,
        serial: Arc<Mutex<Serial>>,
    ) -> io::Result<Self> {
        Ok(Self {
            listener,
            shared,
            waker,
            feed: ConsoleInput::new(serial)?,
            client: None,
        })
    }

    /// Takes every waiting connection: the first attaches if nobody is, the others are refused.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE: the connection waits in the backlog; the next one retries.
                    log::warn!("cannot accept a console client: {e}");
                    return;
                }
            };
            let stream = Arc::new(stream);
            if self.client.is_some() {
                refuse(&stream);
                continue;
            }
            if let Err(stream) = self.shared.attach(stream.clone()) {
                refuse(&stream);
                continue;
            }
            if let Err(e) = ops.add(Events::new_raw(
                stream.as_raw_fd(),
                Interest::Input.events(),
            )) {
                log::warn!("cannot watch the console client: {e:?}");
                self.shared.detach(&stream);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                continue;
            }
            log::info!(
                "console client attached on {}",
                self.listener.path.display()
            );
            self.client = Some(Client {
                stream,
                interest: Interest::Input,
            });
            self.waker.wake();
        }
    }

    /// Detaches the client: output goes to the ring again. A writer blocked sending to it is
    /// released by the shutdown.
    fn detach(&mut self, ops: &mut EventOps, why: &str) {
        let Some(client) = self.client.take() else {
            return;
        };
        let fd = client.stream.as_raw_fd();
        if let Err(e) = ops.remove(Events::empty_raw(fd)) {
            log::warn!("cannot stop watching the console client: {e:?}");
        }
        self.shared.detach(&client.stream);
        let _ = client.stream.shutdown(std::net::Shutdown::Both);
        log::info!("console client detached ({why})");
    }

    /// Reads the client when it is readable; detaches it at its end of file or on an error.
    fn serve_client(&mut self, events: EventSet, ops: &mut EventOps) {
        let Some(client) = &self.client else {
            return;
        };
        let fd = client.stream.as_raw_fd();
        if client.interest == Interest::HangUp {
            // Watched for its hang-up only: the input it sent that the guest has not taken
            // stays unread on the socket and goes with it.
            if events.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
                self.detach(ops, "it hung up while the guest was not taking input");
            }
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
            && self.feed.read_from(fd) == ReadOutcome::Closed
        {
            self.detach(ops, "it closed the connection");
            return;
        }
        if events.contains(EventSet::ERROR) {
            self.detach(ops, "connection error");
        }
    }

    /// Reads the client while the guest takes input; else watches its hang-up only.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = if self.feed.has_room() {
            Interest::Input
        } else {
            Interest::HangUp
        };
        let Some(client) = &mut self.client else {
            return;
        };
        if client.interest == want {
            return;
        }
        match ops.modify(Events::new_raw(client.stream.as_raw_fd(), want.events())) {
            Ok(()) => client.interest = want,
            Err(e) => log::warn!("cannot change what is watched on the console client: {e:?}"),
        }
    }
}

impl Interest {
    fn events(self) -> EventSet {
        match self {
            Interest::Input => EventSet::IN | EventSet::READ_HANG_UP,
            Interest::HangUp => EventSet::READ_HANG_UP,
        }
    }
}

/// Sends [`REFUSAL`] to a client that cannot attach and closes it; what it sent already is
/// read away first, so that closing does not reset the connection before it reads the line.
fn refuse(stream: &UnixStream) {
    log::info!("console client refused: another client is attached");
    let fd = stream.as_raw_fd();
    let line = REFUSAL.as_bytes();
    // SAFETY: `line` is a readable buffer of the given length; send(2) only reads it.
    let _ = unsafe {
        libc::send(
            fd,
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: `buf` is a writable buffer of the given length; recv(2) writes at most that.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

impl MutEventSubscriber for SocketConsole {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.feed.drained().as_raw_fd() {
            self.feed.take_drained();
        } else if fd == self.listener.listener.as_raw_fd() {
            self.accept(ops);
        } else if self
            .client
            .as_ref()
            .is_some_and(|c| c.stream.as_raw_fd() == fd)
        {
            self.serve_client(events.event_set(), ops);
        }
        self.feed.flush();
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.feed.drained(), EventSet::IN)) {
            log::error!("cannot watch the serial input FIFO: {e:?}; the console has no input");
        }
        if let Err(e) = ops.add(Events::new(&self.listener.listener, EventSet::IN)) {
            log::error!(
                "cannot watch the console socket {}: {e:?}; no client can attach",
                self.listener.path.display()
            );
        }
    }
}

#[cfg(test)]
#[path = "console_socket_tests.rs"]
mod tests;
