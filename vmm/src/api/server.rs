//! The API server: a unix socket, one thread accepting connections and one thread per
//! connection (an events stream keeps its thread for as long as it runs), each request routed to
//! the [`ApiHandler`].

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::api::error::ApiError;
use crate::api::events::{Received, Subscription};
use crate::api::fd_passing::{FdReceivingStream, MAX_REQUEST_FDS};
use crate::api::http::{self, Limits, LineStream, Request, Response};
use crate::api::types::{EmptyRequest, PowerButtonRequest, RemoveDeviceRequest, ShutdownRequest};
use crate::api::ApiHandler;
use crate::device::DeviceSpec;
use crate::device::GroupFd;
use crate::seccomp::{SeccompError, SeccompMode, ThreadFilter, ThreadKind};

/// `GET`: the configuration and every device.
pub const INFO_PATH: &str = "/v1/vm/info";
/// `PUT`: hot-add one device.
pub const ADD_DEVICE_PATH: &str = "/v1/vm/add-device";
/// `PUT`: hot-remove one device.
pub const REMOVE_DEVICE_PATH: &str = "/v1/vm/remove-device";
/// `PUT`: stop the VM.
pub const SHUTDOWN_PATH: &str = "/v1/vm/shutdown";
/// `PUT`: pause the VM.
pub const PAUSE_PATH: &str = "/v1/vm/pause";
/// `PUT`: resume the VM.
pub const RESUME_PATH: &str = "/v1/vm/resume";
/// `PUT`: press the ACPI power button.
pub const POWER_BUTTON_PATH: &str = "/v1/vm/power-button";
/// Resets the VM (`PUT`).
pub const REBOOT_PATH: &str = "/v1/vm/reboot";
/// `GET`: the event stream.
pub const EVENTS_PATH: &str = "/v1/events";
/// `GET`: exits, interrupts, hotplug operations, memory, uptime.
pub const COUNTERS_PATH: &str = "/v1/vm/counters";

/// How often an idle events stream checks whether its client left or the server stops.
const STREAM_TICK: Duration = Duration::from_millis(250);
/// How long a connection thread drains unread request bytes before closing.
const CLOSE_DRAIN: Duration = Duration::from_millis(200);
/// Most unread bytes drained before closing.
const MAX_DRAIN: usize = 1 << 20;
/// How long stopping waits for connections in progress to finish their answers.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v1/vm/info`.
    Info,
    /// `PUT /v1/vm/add-device`.
    AddDevice,
    /// `PUT /v1/vm/remove-device`.
    RemoveDevice,
    /// `PUT /v1/vm/shutdown`.
    Shutdown,
    /// `PUT /v1/vm/power-button`.
    PowerButton,
    /// `PUT /v1/vm/reboot`.
    Reboot,
    /// `GET /v1/events`.
    Events,
    /// `GET /v1/vm/counters`.
    Counters,
    /// `PUT /v1/vm/pause`.
    Pause,
    /// `PUT /v1/vm/resume`.
    Resume,
}

/// Every endpoint with its path and method.
pub const ROUTES: [(&str, &str, Endpoint); 10] = [
    (INFO_PATH, "GET", Endpoint::Info),
    (ADD_DEVICE_PATH, "PUT", Endpoint::AddDevice),
    (REMOVE_DEVICE_PATH, "PUT", Endpoint::RemoveDevice),
    (SHUTDOWN_PATH, "PUT", Endpoint::Shutdown),
    (POWER_BUTTON_PATH, "PUT", Endpoint::PowerButton),
    (REBOOT_PATH, "PUT", Endpoint::Reboot),
    (EVENTS_PATH, "GET", Endpoint::Events),
    (COUNTERS_PATH, "GET", Endpoint::Counters),
    (PAUSE_PATH, "PUT", Endpoint::Pause),
    (RESUME_PATH, "PUT", Endpoint::Resume),
];

/// The endpoint of `method target`.
pub fn route(method: &str, target: &str) -> Result<Endpoint, ApiError> {
    if target.contains('?') {
        return Err(ApiError::BadRequest(
            "query parameters are not supported: put the request in the JSON body".into(),
        ));
    }
    let (_, allowed, endpoint) = ROUTES
        .iter()
        .find(|(path, ..)| *path == target)
        .ok_or_else(|| ApiError::UnknownPath {
            path: target.to_string(),
        })?;
    if method != *allowed {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: target.to_string(),
            allowed,
        });
    }
    Ok(*endpoint)
}

/// Errors of starting the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A live server answers on the socket.
    #[error("the API socket {path} is in use by another running rvmm (pick another path or stop that one)")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("{path} exists and is not a socket: refusing to replace it with the API socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The API threads' seccomp filters could not be built or installed.
    #[error("cannot filter the API threads")]
    Seccomp(#[source] SeccompError),
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

/// Tunables of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Request size and time limits.
    pub limits: Limits,
    /// Requests served at once; more are answered 503. An events stream leaves this pool once
    /// it is open, so streams never crowd out requests.
    pub max_connections: usize,
    /// Events streams open at once; more are answered 503.
    pub max_event_streams: usize,
    /// Time a client gets to take each write of a response.
    pub write_timeout: Duration,
    /// Seccomp filters of the accept and connection threads. Off by default: a server started
    /// on its own calls a handler whose syscalls rvmm cannot know; a [`crate::Vm`] starts its
    /// server with the VM's mode.
    pub seccomp: SeccompMode,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: 32,
            max_event_streams: 8,
            write_timeout: Duration::from_secs(10),
            seccomp: SeccompMode::Off,
        }
    }
}

/// What every connection thread shares.
struct Shared {
    handler: Arc<dyn ApiHandler>,
    config: ServerConfig,
    stopping: AtomicBool,
    connections: AtomicUsize,
    streams: AtomicUsize,
    /// Installed first thing in each connection thread.
    connection_filter: ThreadFilter,
}

/// A running API server; stopping or dropping it closes the socket and removes its file.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we created, to remove only our own (none for an
    /// inherited socket).
    file_id: Option<(u64, u64)>,
    stop: Arc<EventFd>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `socket_path` with the default [`ServerConfig`].
    pub fn start(
        socket_path: &Path,
        handler: Arc<dyn ApiHandler>,
    ) -> Result<ApiServer, ServerError> {
        Self::start_with(socket_path, handler, ServerConfig::default())
    }

    /// Listens on `socket_path` (owner-only access). A stale socket file left by a dead rvmm is
    /// replaced; a socket a live process answers on, or any other file, is refused. A path of
    /// the form `fd=N` is the inherited, bound and listening socket N
    /// ([`crate::api::listen_fd`]); no file is created or removed for it.
    pub fn start_with(
        socket_path: &Path,
        handler: Arc<dyn ApiHandler>,
        config: ServerConfig,
    ) -> Result<ApiServer, ServerError> {
        let io_err = |what| {
            move |source| ServerError::Io {
                what,
                path: socket_path.to_path_buf(),
                source,
            }
        };
        let (listener, file_id) = match crate::api::listen_fd::inherited_fd(socket_path) {
            Some(number) => {
                let listener = crate::api::listen_fd::adopt_listener(number)
                    .map_err(|e| io_err("take over the API socket")(io::Error::other(e)))?;
                (listener, None)
            }
            None => {
                remove_stale_socket(socket_path)?;
                let listener =
                    UnixListener::bind(socket_path).map_err(io_err("bind the API socket"))?;
                std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err("restrict access to the API socket"))?;
                let meta = std::fs::symlink_metadata(socket_path)
                    .map_err(io_err("inspect the API socket"))?;
                (listener, Some((meta.dev(), meta.ino())))
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err("configure the API socket"))?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create the stop event for"))?,
        );
        let filter = |kind| ThreadFilter::new(kind, config.seccomp).map_err(ServerError::Seccomp);
        let accept_filter = filter(ThreadKind::ApiAccept)?;
        let shared = Arc::new(Shared {
            handler,
            config,
            stopping: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            connection_filter: filter(ThreadKind::ApiConnection)?,
        });
        let (filtered_tx, filtered_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            thread::Builder::new()
                .name("rvmm-api".into())
                .spawn(move || {
                    let filtered = accept_filter.apply();
                    let ok = filtered.is_ok();
                    let _ = filtered_tx.send(filtered);
                    if ok {
                        accept_loop(&listener, &stop, &shared);
                    }
                })
                .map_err(io_err("start the thread serving"))?
        };
        let filtered = filtered_rx.recv().unwrap_or_else(|_| {
            Err(SeccompError::Apply {
                thread: "rvmm-api".into(),
                call: "starting the thread",
                source: io::Error::other("the API thread ended before installing its filter"),
            })
        });
        if let Err(e) = filtered {
            let _ = thread.join();
            if file_id.is_some() {
                let _ = std::fs::remove_file(socket_path);
            }
            return Err(ServerError::Seccomp(e));
        }
        log::info!("control API listening on {}", socket_path.display());
        Ok(ApiServer {
            path: socket_path.to_path_buf(),
            file_id,
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends open events streams (properly, after the events already
    /// published) and removes the socket file. Waits up to 2 s for connections in progress to
    /// send their answers, so that e.g. the answer to a shutdown request reaches its client
    /// before rvmm exits; later ones finish on their own threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the API server thread: {e}");
            return;
        }
        if thread.join().is_err() {
            log::error!("the API server thread panicked");
        }
        let deadline = Instant::now() + STOP_GRACE;
        while self.shared.connections.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.file_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove the API socket {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                what: "inspect",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing the stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ServerError::Io {
                what: "remove the stale socket",
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ServerError::Io {
            what: "check whether another rvmm listens on",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Waits until `fd` is readable or `stop` is signalled; returns whether `stop` was.
fn wait_for(fd: RawFd, stop: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call, and its
        // length is passed with it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the client of `stream` has hung up (checked without reading or blocking).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut fd, 1, 0) };
    r > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Whether the client of `stream` has closed its connection (both directions: a client that
/// only shut its sending side after the request still waits for the answer).
fn peer_closed(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut fd, 1, 0) };
    r > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Ends our side of the connection and reads away what the client still sends (within `budget`),
/// so that closing does not reset the connection and lose the response: a unix socket closed
/// with unread data makes the peer's next read fail with ECONNRESET.
fn close_gracefully(stream: &UnixStream, budget: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + budget;
    let mut buf = [0u8; 4096];
    let mut drained = 0usize;
    while drained < MAX_DRAIN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => drained = drained.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Answers `err` and closes without waiting for the client: the accept thread must not spend
/// time on connections it refuses. The short answer fits in a fresh socket's buffer; what the
/// client has sent already is read away, so that closing does not reset the connection.
fn refuse_at_once(stream: &mut UnixStream, err: &ApiError) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = Response::error(err).write_to(stream);
    let _ = stream.shutdown(Shutdown::Write);
    let mut buf = [0u8; 4096];
    let mut drained = 0usize;
    while drained < MAX_DRAIN {
        match (&*stream).read(&mut buf) {
            Ok(n) if n > 0 => drained += n,
            _ => return,
        }
    }
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, shared: &Arc<Shared>) {
    loop {
        match wait_for(listener.as_raw_fd(), stop) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                log::error!("control API stopped: waiting for connections failed: {e}");
                return;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => spawn_connection(stream, shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning on the readable listener.
                    log::warn!("control API: cannot accept a connection: {e}");
                    thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// An open events stream: counted among the streams, and out of the request pool (given back
/// when the stream ends, so that the connection's own slot balances).
struct StreamSlot<'a>(&'a Shared);

impl<'a> StreamSlot<'a> {
    fn take(shared: &'a Shared) -> Option<Self> {
        let open = shared.streams.fetch_add(1, Ordering::AcqRel);
        if open >= shared.config.max_event_streams {
            shared.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        Some(Self(shared))
    }
}

impl Drop for StreamSlot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_add(1, Ordering::AcqRel);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements the connection count when a connection thread ends.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn spawn_connection(mut stream: UnixStream, shared: &Arc<Shared>) {
    let active = shared.connections.fetch_add(1, Ordering::AcqRel);
    let slot = ConnectionSlot(shared.clone());
    if active >= shared.config.max_connections {
        drop(slot);
        let err = ApiError::Unavailable(format!(
            "too many API connections (at most {}): try again later",
            shared.config.max_connections
        ));
        refuse_at_once(&mut stream, &err);
        return;
    }
    let spawned = thread::Builder::new()
        .name("rvmm-api-conn".into())
        .spawn(move || {
            let slot = slot;
            match slot.0.connection_filter.apply() {
                Ok(()) => serve_connection(stream, &slot.0),
                Err(e) => log::error!("control API: connection dropped: {e}"),
            }
        });
    if let Err(e) = spawned {
        log::warn!("control API: cannot start a connection thread: {e}");
    }
}

/// What a request results in.
pub enum Outcome {
    /// A response to write.
    Reply(Response),
    /// An events stream to serve.
    Stream(Subscription),
}

fn serve_connection(stream: UnixStream, shared: &Shared) {
    serve_request(&stream, shared);
    close_gracefully(&stream, CLOSE_DRAIN);
}

fn serve_request(mut stream: &UnixStream, shared: &Shared) {
    if let Err(e) = stream.set_write_timeout(Some(shared.config.write_timeout)) {
        log::warn!("control API: cannot set a write timeout: {e}");
        return;
    }
    let mut receiving = FdReceivingStream::new(stream);
    let read = http::read_request(&mut receiving, &shared.config.limits);
    let fds = receiving.into_fds();
    let request = match read {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            log::info!("control API: rejected a request: {e}");
            let _ = Response::error(&e).write_to(&mut stream);
            return;
        }
    };
    let client_gone = || peer_closed(stream);
    let outcome = dispatch(&request, fds, shared.handler.as_ref(), &client_gone)
        .unwrap_or_else(|e| Outcome::Reply(Response::error(&e)));
    match outcome {
        Outcome::Reply(response) => {
            log::info!(
                "control API: {} {} -> {}",
                request.method,
                request.target,
                response.status
            );
            if let Err(e) = response.write_to(&mut stream) {
                log::info!("control API: the client left before the answer: {e}");
            }
        }
        Outcome::Stream(subscription) => {
            let Some(_slot) = StreamSlot::take(shared) else {
                let err = ApiError::Unavailable(format!(
                    "too many events streams (at most {}): close one or try again later",
                    shared.config.max_event_streams
                ));
                let _ = Response::error(&err).write_to(&mut stream);
                return;
            };
            log::info!("control API: events stream opened");
            if let Err(e) = stream_events(stream, &subscription, request.http11, shared) {
                log::info!("control API: events stream closed: {e}");
            }
        }
    }
}

/// Decodes a request body into `T` as every endpoint with a body does: an empty (or
/// whitespace-only) body and malformed JSON are [`ApiError::BadRequest`]. Public for the fuzz
/// targets (tests/fuzz), which feed it what [`http::read_request`] parsed.
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the request body is empty: expected a JSON object".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

fn no_body(request: &Request) -> Result<(), ApiError> {
    if request.body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{} {} takes no request body",
            request.method, request.target
        )))
    }
}

/// Joins the descriptor that came with an add-device request to its `"group_fd"`: both or
/// neither.
fn with_group(mut req: DeviceSpec, fd: Option<OwnedFd>) -> Result<DeviceSpec, ApiError> {
    req.group = match (req.group.take(), fd) {
        (Some(_), Some(fd)) => Some(GroupFd::Open(Arc::new(fd))),
        (Some(group), None) => {
            return Err(ApiError::BadRequest(format!(
                "\"group_fd\": {} came without a descriptor: send the VFIO group descriptor with the request as SCM_RIGHTS data (rvmm ctl add-device ...,group-fd=N does)",
                group.number()
            )))
        }
        (None, Some(_)) => {
            return Err(ApiError::BadRequest(
                "a file descriptor came with the request but the body has no \"group_fd\"".into(),
            ))
        }
        (None, None) => None,
    };
    Ok(req)
}

/// Answers one request; `fds` are the descriptors that came with it and how many more were
/// dropped; `client_gone` tells whether the client has closed its connection (an add it no
/// longer waits for is rolled back). Public for the fuzz target that drives it with a
/// recording handler.
pub fn dispatch(
    request: &Request,
    (mut fds, dropped): (Vec<OwnedFd>, usize),
    handler: &dyn ApiHandler,
    client_gone: &dyn Fn() -> bool,
) -> Result<Outcome, ApiError> {
    let reply = |value: Result<_, ApiError>| value.map(Outcome::Reply);
    if let Some(ch_endpoint) = crate::api::ch::route(&request.method, &request.target) {
        let ch_endpoint = ch_endpoint?;
        if !fds.is_empty() || dropped > 0 {
            return Err(ApiError::BadRequest(format!(
                "{} {} takes no file descriptors",
                request.method, request.target
            )));
        }
        return Ok(Outcome::Reply(crate::api::ch::dispatch(
            ch_endpoint,
            request,
            handler,
            client_gone,
        )));
    }
    let endpoint = route(&request.method, &request.target)?;
    if dropped > 0 {
        return Err(ApiError::BadRequest(format!(
            "the request carried {} file descriptors; add-device takes at most {MAX_REQUEST_FDS}",
            fds.len() + dropped
        )));
    }
    if !fds.is_empty() && endpoint != Endpoint::AddDevice {
        return Err(ApiError::BadRequest(format!(
            "{} {} takes no file descriptors",
            request.method, request.target
        )));
    }
    match endpoint {
        Endpoint::Info => {
            no_body(request)?;
            reply(handler.info().map(|i| Response::json(200, &i)))
        }
        Endpoint::AddDevice => {
            let req = with_group(json_body(&request.body)?, fds.pop())?;
            reply(
                handler
                    .add_device_for(req, client_gone)
                    .map(|d| Response::json(200, &d)),
            )
        }
        Endpoint::RemoveDevice => {
            let req: RemoveDeviceRequest = json_body(&request.body)?;
            reply(handler.remove_device(req).map(|r| Response::json(200, &r)))
        }
        Endpoint::Shutdown => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                json_body::<ShutdownRequest>(&request.body)?;
            }
            reply(handler.shutdown().map(|()| Response::no_content()))
        }
        Endpoint::PowerButton => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                json_body::<PowerButtonRequest>(&request.body)?;
            }
            reply(handler.power_button().map(|()| Response::no_content()))
        }
        Endpoint::Reboot => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                json_body::<EmptyRequest>(&request.body)?;
            }
            reply(handler.reboot().map(|()| Response::no_content()))
        }
        Endpoint::Events => {
            no_body(request)?;
            Ok(Outcome::Stream(handler.subscribe()))
        }
        Endpoint::Counters => {
            no_body(request)?;
            reply(handler.counters().map(|c| Response::json(200, &c)))
        }
        Endpoint::Pause | Endpoint::Resume => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                json_body::<EmptyRequest>(&request.body)?;
            }
            let done = if endpoint == Endpoint::Pause {
                handler.pause()
            } else {
                handler.resume()
            };
            reply(done.map(|()| Response::no_content()))
        }
    }
}

/// Sends every event of `subscription` as a JSON line until the bus ends it, the client leaves
/// or the server stops.
fn stream_events(
    stream: &UnixStream,
    subscription: &Subscription,
    http11: bool,
    shared: &Shared,
) -> io::Result<()> {
    let mut out = LineStream::start(stream, http11)?;
    loop {
        // Once the server stops, the events already published are still sent (the VM's last,
        // `vm-shutdown`, is published before the server stops), then the stream ends.
        let stopping = shared.stopping.load(Ordering::Acquire);
        let wait = if stopping {
            Duration::ZERO
        } else {
            STREAM_TICK
        };
        match subscription.recv_timeout(wait) {
            Received::Event(event) => {
                let line = serde_json::to_vec(&event).map_err(io::Error::other)?;
                out.send_line(&line)?;
            }
            Received::Idle if stopping => break,
            Received::Idle => {
                if peer_gone(stream) {
                    return Ok(());
                }
            }
            Received::Ended => {
                if subscription.lagged() {
                    let err = ApiError::Unavailable(
                        "this events stream fell too far behind and missed events: reconnect"
                            .into(),
                    );
                    let line = serde_json::to_vec(&err.body()).map_err(io::Error::other)?;
                    out.send_line(&line)?;
                }
                break;
            }
        }
    }
    out.finish()
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
