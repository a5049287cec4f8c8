//! A client of the control API: one connection per call, typed helpers per endpoint and an
//! events reader. `rvmm ctl` and the integration tests use it.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::api::error::ErrorBody;
use crate::api::fd_passing::write_with_fds;
use crate::api::server::{
    ADD_DEVICE_PATH, COUNTERS_PATH, EVENTS_PATH, INFO_PATH, PAUSE_PATH, POWER_BUTTON_PATH,
    REBOOT_PATH, REMOVE_DEVICE_PATH, RESUME_PATH, SHUTDOWN_PATH,
};
use crate::api::types::{DeviceInfo, Event, RemoveDeviceRequest, RemoveDeviceResponse, VmInfo};
use crate::device::DeviceSpec;
use crate::device::GroupFd;
use crate::observe::Counters;

/// How long a call waits for its answer (hot-add waits for the guest, so this is generous; the
/// server answers its own timeouts well before).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest response head the client reads.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body or event line the client reads.
const MAX_BODY: u64 = 16 * 1024 * 1024;
/// Longest chunk-size line of a chunked body.
const MAX_CHUNK_LINE: u64 = 1024;

/// Errors of an API call.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "cannot connect to the API socket {path} (is `rvmm run --api-socket {path}` running?)"
    )]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("no answer from rvmm within {} s", timeout.as_secs())]
    Timeout {
        /// The limit.
        timeout: Duration,
    },
    /// Reading or writing the connection failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The server's answer is not the HTTP it should be.
    #[error("malformed answer from rvmm: {0}")]
    Protocol(String),
    /// The server refused or failed the request.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer is not the JSON document the endpoint returns.
    #[error("unexpected answer from rvmm")]
    Decode(#[source] serde_json::Error),
    /// `rvmm ctl console` failed.
    #[error(transparent)]
    Console(#[from] crate::api::ctl_console::ConsoleError),
    /// The request could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// The event stream broke off before its end.
    #[error("the event stream ended without its end marker: rvmm stopped or the connection broke")]
    Truncated,
    /// The server ended the event stream with an error.
    #[error("{0}")]
    Stream(String),
}

fn io_err(what: &'static str, timeout: Duration) -> impl FnOnce(io::Error) -> ClientError {
    move |source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout { timeout },
        _ => ClientError::Io { what, source },
    }
}

/// Whether a failed write means the server closed its end (it may have answered already).
fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// A successful answer: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status (2xx).
    pub status: u16,
    /// The body (empty for 204).
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as a typed document.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(ClientError::Decode)
    }
}

/// How a response body is framed.
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A client of one API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client of the API at `socket`, waiting [`DEFAULT_TIMEOUT`] for answers.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client waiting `timeout` for answers.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.display().to_string(),
            source,
        })
    }

    /// Sends `method path` with an optional JSON body (and the descriptors `fds` as
    /// `SCM_RIGHTS` data) and reads the head of the answer.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
        timeout: Option<Duration>,
    ) -> Result<(u16, Framing, BufReader<UnixStream>), ClientError> {
        let wait = timeout.unwrap_or(Duration::ZERO);
        let stream = self.connect()?;
        stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| stream.set_read_timeout(timeout))
            .map_err(io_err("configure the connection", wait))?;
        let body = body.unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        let sent = write_with_fds(&stream, &bytes, fds);
        let mut reader = BufReader::new(stream);
        if let Err(e) = sent {
            // A server that refuses a connection (503 when it has too many) may answer and
            // close before it reads the request: its answer is what counts.
            if !peer_closed(&e) {
                return Err(io_err("send the request", wait)(e));
            }
            return match read_head(&mut reader, wait) {
                Ok((status, framing)) => Ok((status, framing, reader)),
                Err(_) => Err(io_err("send the request", wait)(e)),
            };
        }
        loop {
            let (status, framing) = read_head(&mut reader, wait)?;
            // Skip interim answers (100 Continue).
            if !(100..200).contains(&status) {
                return Ok((status, framing, reader));
            }
        }
    }

    /// Calls an endpoint: the answer when it is 2xx, else [`ClientError::Api`] with the
    /// server's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        self.call_with_fds(method, path, body, &[], timeout)
    }

    /// Sends `method path` with an optional body and returns the answer whatever its status
    /// (`rvmm ctl raw`: any path of the socket, Cloud Hypervisor's `/api/v1/...` too).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let (status, framing, reader) = self.send(method, path, body, &[], Some(timeout))?;
        let body = read_body(reader, framing, timeout)?;
        Ok(Answer { status, body })
    }

    /// [`ApiClient::call`] with descriptors sent along as `SCM_RIGHTS` data.
    pub fn call_with_fds(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let (status, framing, reader) = self.send(method, path, body, fds, Some(timeout))?;
        let body = read_body(reader, framing, timeout)?;
        if (200..300).contains(&status) {
            return Ok(Answer { status, body });
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error,
            Err(_) if body.is_empty() => format!("request failed with HTTP {status}"),
            Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
        };
        Err(ClientError::Api { status, message })
    }

    fn put<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        self.call("PUT", path, Some(&body), timeout)
    }

    /// `GET /v1/vm/info`, as the raw answer.
    pub fn info_raw(&self) -> Result<Answer, ClientError> {
        self.call("GET", INFO_PATH, None, self.timeout)
    }

    /// `GET /v1/vm/info`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.info_raw()?.json()
    }

    /// `PUT /v1/vm/add-device`, as the raw answer. A group descriptor of the request
    /// (`group-fd=N`: this process's descriptor N) is sent along with it.
    pub fn add_device_raw(&self, req: &DeviceSpec) -> Result<Answer, ClientError> {
        let body = serde_json::to_vec(req).map_err(ClientError::Encode)?;
        let fds: Vec<RawFd> = req.group.iter().map(GroupFd::number).collect();
        self.call_with_fds("PUT", ADD_DEVICE_PATH, Some(&body), &fds, self.timeout)
    }

    /// `PUT /v1/vm/add-device`.
    pub fn add_device(&self, req: &DeviceSpec) -> Result<DeviceInfo, ClientError> {
        self.add_device_raw(req)?.json()
    }

    /// `PUT /v1/vm/remove-device`, as the raw answer; waits the removal's deadline on top of
    /// the client's timeout.
    pub fn remove_device_raw(&self, req: &RemoveDeviceRequest) -> Result<Answer, ClientError> {
        let timeout = self.timeout.saturating_add(req.timeout());
        self.put(REMOVE_DEVICE_PATH, req, timeout)
    }

    /// `PUT /v1/vm/remove-device`.
    pub fn remove_device(
        &self,
        req: &RemoveDeviceRequest,
    ) -> Result<RemoveDeviceResponse, ClientError> {
        self.remove_device_raw(req)?.json()
    }

    /// `GET /v1/vm/counters`, as the raw answer.
    pub fn counters_raw(&self) -> Result<Answer, ClientError> {
        self.call("GET", COUNTERS_PATH, None, self.timeout)
    }

    /// `GET /v1/vm/counters`.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        self.counters_raw()?.json()
    }

    /// `PUT /v1/vm/shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call("PUT", SHUTDOWN_PATH, None, self.timeout)
            .map(drop)
    }

    /// `PUT /v1/vm/pause`: returns once every vCPU is parked.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.call("PUT", PAUSE_PATH, None, self.timeout).map(drop)
    }

    /// `PUT /v1/vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.call("PUT", RESUME_PATH, None, self.timeout).map(drop)
    }

    /// `PUT /v1/vm/reboot`: returns once the reset is requested.
    pub fn reboot(&self) -> Result<(), ClientError> {
        self.call("PUT", REBOOT_PATH, None, self.timeout).map(drop)
    }

    /// `PUT /v1/vm/power-button`: returns once the button is pressed.
    pub fn power_button(&self) -> Result<(), ClientError> {
        self.call("PUT", POWER_BUTTON_PATH, None, self.timeout)
            .map(drop)
    }

    /// `GET /v1/events`: a reader of the stream, which blocks until events come.
    pub fn events(&self) -> Result<EventStream, ClientError> {
        let (status, framing, reader) = self.send("GET", EVENTS_PATH, None, &[], None)?;
        if !(200..300).contains(&status) {
            let body = read_body(reader, framing, self.timeout)?;
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("request failed with HTTP {status}"));
            return Err(ClientError::Api { status, message });
        }
        let inner: Box<dyn BufRead + Send> = match framing {
            Framing::Chunked => Box::new(BufReader::new(ChunkedReader::new(reader))),
            Framing::Length(n) => Box::new(reader.take(n)),
            Framing::UntilClose => Box::new(reader),
        };
        Ok(EventStream { inner })
    }
}

/// Reads and parses the response head.
fn read_head<R: BufRead>(reader: &mut R, timeout: Duration) -> Result<(u16, Framing), ClientError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let left = MAX_HEAD.saturating_sub(head.len());
        if left == 0 {
            return Err(ClientError::Protocol(
                "the response head is too large".into(),
            ));
        }
        let n = reader
            .by_ref()
            .take(left as u64)
            .read_until(b'\n', &mut head)
            .map_err(io_err("read the answer", timeout))?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the connection closed before an answer".into(),
            ));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol("incomplete response head".into()))
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    }
    let status = resp.code.unwrap_or_default();
    let mut framing = Framing::UntilClose;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.eq_ignore_ascii_case(b"chunked") {
                return Err(ClientError::Protocol(
                    "unsupported transfer encoding".into(),
                ));
            }
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked)
        {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ClientError::Protocol("malformed Content-Length".into()))?;
            framing = Framing::Length(n);
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok((status, framing))
}

/// Reads a whole body of at most [`MAX_BODY`] bytes.
fn read_body<R: BufRead>(
    reader: R,
    framing: Framing,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    let result = match framing {
        Framing::Length(n) if n > MAX_BODY => {
            return Err(ClientError::Protocol(format!(
                "a body of {n} bytes is too large"
            )))
        }
        Framing::Length(n) => {
            let read = reader.take(n).read_to_end(&mut body);
            match read {
                Ok(got) if (got as u64) < n => {
                    return Err(ClientError::Protocol("the body was cut short".into()))
                }
                other => other,
            }
        }
        Framing::Chunked => ChunkedReader::new(reader)
            .take(MAX_BODY)
            .read_to_end(&mut body),
        Framing::UntilClose => reader.take(MAX_BODY).read_to_end(&mut body),
    };
    result.map_err(io_err("read the answer", timeout))?;
    Ok(body)
}

/// Decodes a chunked body; a stream that ends before the last chunk is an `UnexpectedEof`.
pub struct ChunkedReader<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    /// Decodes the chunked body read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        self.inner
            .by_ref()
            .take(MAX_CHUNK_LINE)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the chunked body ended early",
            ));
        }
        line.truncate(line.len().saturating_sub(1));
        if line.ends_with(b"\r") {
            line.truncate(line.len().saturating_sub(1));
        }
        Ok(line)
    }

    fn invalid(what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed chunked body: {what}"),
        )
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let line = self.line()?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 15)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| Self::invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers up to the empty line.
                while !self.line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(buf.get_mut(..want).unwrap_or_default())?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the chunked body ended early",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 && !self.line()?.is_empty() {
            return Err(Self::invalid("no line end after a chunk"));
        }
        Ok(n)
    }
}

/// The JSON lines of `GET /v1/events`.
pub struct EventStream {
    inner: Box<dyn BufRead + Send>,
}

impl EventStream {
    /// The next line as sent, without its newline; `None` at the proper end of the stream.
    pub fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        let mut line = Vec::new();
        let n = self
            .inner
            .as_mut()
            .take(MAX_BODY)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ClientError::Truncated,
                _ => ClientError::Io {
                    what: "read the event stream",
                    source: e,
                },
            })?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with(b"\n") {
            return Err(ClientError::Truncated);
        }
        line.pop();
        let line = String::from_utf8(line)
            .map_err(|_| ClientError::Protocol("an event line is not UTF-8".into()))?;
        if let Ok(err) = serde_json::from_str::<ErrorBody>(&line) {
            return Err(ClientError::Stream(err.error));
        }
        Ok(Some(line))
    }

    /// The next event; `None` at the proper end of the stream.
    pub fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        match self.next_line()? {
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(ClientError::Decode),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dechunk(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkedReader::new(input).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunked_body_is_decoded() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n").ok(),
            Some(b"abcde".to_vec())
        );
    }

    #[test]
    fn chunked_body_without_last_chunk_is_truncated() {
        let err = dechunk(b"3\r\nabc\r\n").expect_err("no last chunk");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn chunk_cut_short_is_truncated() {
        let err = dechunk(b"a\r\nabc").expect_err("short chunk");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bad_chunk_size_is_invalid() {
        for input in [&b"zz\r\n"[..], b"\r\n", b"fffffffffffffffff\r\n"] {
            let err = dechunk(input).expect_err("bad size");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{input:?}");
        }
    }

    #[test]
    fn chunk_without_line_end_is_invalid() {
        let err = dechunk(b"1\r\nab\r\n0\r\n\r\n").expect_err("missing CRLF");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn response_head_gives_status_and_framing() {
        let mut r = &b"HTTP/1.1 409 Conflict\r\nContent-Length: 5\r\n\r\nhello"[..];
        let (status, framing) = read_head(&mut r, DEFAULT_TIMEOUT).expect("valid head");
        assert_eq!(status, 409);
        assert!(matches!(framing, Framing::Length(5)));
    }

    #[test]
    fn response_without_head_end_is_a_protocol_error() {
        let mut r = &b"HTTP/1.1 200 OK\r\n"[..];
        assert!(matches!(
            read_head(&mut r, DEFAULT_TIMEOUT),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn answer_of_a_server_that_closed_before_reading_the_request_is_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let body = br#"{"error":"too many API connections"}"#;
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            std::io::Write::write_all(&mut conn, head.as_bytes()).expect("head");
            std::io::Write::write_all(&mut conn, body).expect("body");
            // Closed without reading anything: the client's write fails (EPIPE or reset).
        });
        let client = ApiClient::new(&path);
        // More than a socket buffer holds: the write cannot complete before the server closes.
        let big = vec![b'x'; 1 << 20];
        let (status, message) =
            match client.call("PUT", "/v1/vm/shutdown", Some(&big), DEFAULT_TIMEOUT) {
                Err(ClientError::Api { status, message }) => (status, message),
                other => panic!("not the server's answer: {other:?}"),
            };
        server.join().expect("server");
        assert_eq!(status, 503);
        assert_eq!(message, "too many API connections");
    }

    #[test]
    fn error_line_in_the_event_stream_is_an_error() {
        let mut s = EventStream {
            inner: Box::new(&b"{\"error\":\"fell behind\"}\n"[..]),
        };
        assert!(matches!(s.next_line(), Err(ClientError::Stream(m)) if m == "fell behind"));
    }

    #[test]
    fn partial_event_line_is_truncated() {
        let mut s = EventStream {
            inner: Box::new(&b"{\"event\""[..]),
        };
        assert!(matches!(s.next_line(), Err(ClientError::Truncated)));
    }
}
