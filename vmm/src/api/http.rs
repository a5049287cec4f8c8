//! Just enough HTTP/1.1 for the control API: one request per connection (every response says
//! `Connection: close`), bodies by Content-Length only, hard limits on size and time, chunked
//! responses for the event stream. Malformed input gives an [`ApiError`], never a panic.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::api::error::ApiError;

/// Most headers a request may have.
const MAX_HEADERS: usize = 32;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;

/// Bounds on what a client may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers, in bytes.
    pub max_head: usize,
    /// Request body, in bytes.
    pub max_body: usize,
    /// Time for the whole request to arrive.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 8 * 1024,
            max_body: 64 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target, e.g. `/v1/vm/info`.
    pub target: String,
    /// Whether the client speaks HTTP/1.1 (else 1.0: no chunked responses).
    pub http11: bool,
    /// The body (empty without Content-Length).
    pub body: Vec<u8>,
}

/// The few headers the server acts on.
struct Head {
    method: String,
    target: String,
    http11: bool,
    len: usize,
    content_length: Option<u64>,
    expect_continue: bool,
}

/// A stream the request is read from: a socket whose read timeout can be set.
pub trait TimedRead: Read + Write {
    /// Sets the read timeout for the following reads.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

impl TimedRead for &std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

fn io_error(e: &io::Error, limits: &Limits) -> ApiError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ApiError::RequestTimeout {
            limit_ms: u64::try_from(limits.request_timeout.as_millis()).unwrap_or(u64::MAX),
        },
        _ => ApiError::BadRequest(format!("cannot read the request: {e}")),
    }
}

/// Reads once more before `deadline`; `Ok(0)` at end of stream.
fn read_some<S: TimedRead>(
    stream: &mut S,
    buf: &mut [u8],
    deadline: Instant,
    limits: &Limits,
) -> Result<usize, ApiError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_error(&io::ErrorKind::TimedOut.into(), limits));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| io_error(&e, limits))?;
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map_err(|e| io_error(&e, limits)),
        }
    }
}

fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::HeadersTooLarge {
                limit: limits.max_head,
            })
        }
        Err(e) => return Err(ApiError::BadRequest(format!("malformed HTTP request: {e}"))),
    };
    let mut content_length = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("malformed Content-Length header".into()))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(ApiError::BadRequest(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::LengthRequired);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(Some(Head {
        // httparse has checked that method and path are present and made of token characters.
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        http11: req.version == Some(1),
        len,
        content_length,
        expect_continue,
    }))
}

/// Reads one request within `limits`. `Ok(None)` when the client closed the connection without
/// sending anything (as a liveness probe of the socket does).
pub fn read_request<S: TimedRead>(
    stream: &mut S,
    limits: &Limits,
) -> Result<Option<Request>, ApiError> {
    let deadline = Instant::now() + limits.request_timeout;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    let head = loop {
        let n = read_some(stream, &mut chunk, deadline, limits)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ApiError::BadRequest(
                "the connection closed in the middle of the request".into(),
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(head) = parse_head(&buf, limits)? {
            if head.len > limits.max_head {
                return Err(ApiError::HeadersTooLarge {
                    limit: limits.max_head,
                });
            }
            break head;
        }
        if buf.len() > limits.max_head {
            return Err(ApiError::HeadersTooLarge {
                limit: limits.max_head,
            });
        }
    };
    let length = head.content_length.unwrap_or(0);
    let length = usize::try_from(length)
        .ok()
        .filter(|l| *l <= limits.max_body)
        .ok_or(ApiError::PayloadTooLarge {
            length,
            limit: limits.max_body,
        })?;
    let mut body = buf.split_off(head.len.min(buf.len()));
    if body.len() < length && head.expect_continue && head.http11 {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|e| io_error(&e, limits))?;
    }
    while body.len() < length {
        let want = (length - body.len()).min(READ_CHUNK);
        let n = read_some(
            stream,
            chunk.get_mut(..want).unwrap_or_default(),
            deadline,
            limits,
        )?;
        if n == 0 {
            return Err(ApiError::BadRequest(format!(
                "the body ended after {} of {length} bytes",
                body.len()
            )));
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    // Bytes past Content-Length (a pipelined request) are ignored: the connection closes.
    body.truncate(length);
    Ok(Some(Request {
        method: head.method,
        target: head.target,
        http11: head.http11,
        body,
    }))
}

/// The reason phrase of the status codes the server sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A response with a complete body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers (e.g. `Allow`).
    pub headers: Vec<(&'static str, String)>,
    /// `application/json` body; no body (and no Content-Type) when empty.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response: `value` serialized, with a final newline.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Self {
                    status,
                    headers: Vec::new(),
                    body,
                }
            }
            Err(e) => Self::error(&ApiError::Internal(format!(
                "cannot encode the response: {e}"
            ))),
        }
    }

    /// The response for `err`: its status and `{"error": ...}` body.
    pub fn error(err: &ApiError) -> Self {
        let mut r = Self::json(err.status(), &err.body());
        if let ApiError::MethodNotAllowed { allowed, .. } = err {
            r.headers.push(("Allow", (*allowed).to_string()));
        }
        r
    }

    /// An empty 204 response.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Writes the response (always closing the connection after it).
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: rvmm\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.status != 204 {
            if !self.body.is_empty() {
                out.push_str("Content-Type: application/json\r\n");
            }
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        w.write_all(&bytes)?;
        w.flush()
    }
}

/// A streamed `200` response of JSON lines: chunked for HTTP/1.1, close-delimited for 1.0.
pub struct LineStream<W: Write> {
    out: W,
    chunked: bool,
}

impl<W: Write> LineStream<W> {
    /// Sends the response head.
    pub fn start(mut out: W, http11: bool) -> io::Result<Self> {
        let framing = if http11 {
            "Transfer-Encoding: chunked\r\n"
        } else {
            ""
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nServer: rvmm\r\nConnection: close\r\n\
             Content-Type: application/x-ndjson\r\nCache-Control: no-store\r\n{framing}\r\n"
        )?;
        out.flush()?;
        Ok(Self {
            out,
            chunked: http11,
        })
    }

    /// Sends one line (`line` without its newline).
    pub fn send_line(&mut self, line: &[u8]) -> io::Result<()> {
        let mut data = Vec::with_capacity(line.len() + 16);
        if self.chunked {
            data.extend_from_slice(format!("{:x}\r\n", line.len() + 1).as_bytes());
        }
        data.extend_from_slice(line);
        data.push(b'\n');
        if self.chunked {
            data.extend_from_slice(b"\r\n");
        }
        self.out.write_all(&data)?;
        self.out.flush()
    }

    /// Ends the stream properly (the last chunk), so the client can tell it from a lost
    /// connection.
    pub fn finish(mut self) -> io::Result<()> {
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// An in-memory connection: reads from `input` in pieces of `step` bytes.
    struct Fake {
        input: Cursor<Vec<u8>>,
        step: usize,
        output: Vec<u8>,
    }

    impl Fake {
        fn new(input: &[u8]) -> Self {
            Self {
                input: Cursor::new(input.to_vec()),
                step: usize::MAX,
                output: Vec::new(),
            }
        }
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl TimedRead for Fake {
        fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    fn read(input: &[u8]) -> Result<Option<Request>, ApiError> {
        read_request(&mut Fake::new(input), &Limits::default())
    }

    #[test]
    fn request_with_body_is_parsed() {
        let req = read(b"PUT /v1/vm/add-device HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .expect("valid")
            .expect("a request");
        assert_eq!(req.method, "PUT");
        assert_eq!(req.target, "/v1/vm/add-device");
        assert!(req.http11);
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn request_arriving_byte_by_byte_is_parsed() {
        let mut fake = Fake::new(b"GET /v1/vm/info HTTP/1.0\r\n\r\n");
        fake.step = 1;
        let req = read_request(&mut fake, &Limits::default())
            .expect("valid")
            .expect("a request");
        assert_eq!(req.target, "/v1/vm/info");
        assert!(!req.http11);
    }

    #[test]
    fn closed_connection_without_bytes_is_no_request() {
        assert_eq!(read(b""), Ok(None));
    }

    #[test]
    fn garbage_is_a_bad_request() {
        assert!(matches!(
            read(b"\x00\x01 nonsense\r\n\r\n"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn truncated_head_is_a_bad_request() {
        assert!(matches!(
            read(b"GET /v1/vm/info HTTP/1.1\r\nHost"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn short_body_is_a_bad_request() {
        assert!(matches!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn oversized_body_is_refused_before_reading_it() {
        assert_eq!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            Err(ApiError::PayloadTooLarge {
                length: 65537,
                limit: 65536
            })
        );
    }

    #[test]
    fn content_length_beyond_u64_is_a_bad_request() {
        assert!(matches!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 9000));
        assert!(matches!(
            read(&input),
            Err(ApiError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn too_many_headers_are_refused() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            input.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        assert!(matches!(
            read(&input),
            Err(ApiError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn chunked_request_body_needs_a_length() {
        assert_eq!(
            read(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Err(ApiError::LengthRequired)
        );
    }

    #[test]
    fn conflicting_content_lengths_are_refused() {
        assert!(matches!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn signed_content_length_is_refused() {
        assert!(matches!(
            read(b"PUT / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn expect_continue_gets_an_interim_response() {
        let mut fake =
            Fake::new(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        // The body comes after the interim response: here it never does.
        let _ = read_request(&mut fake, &Limits::default());
        assert_eq!(fake.output, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn error_response_has_status_json_body_and_length() {
        let mut out = Vec::new();
        Response::error(&ApiError::Conflict("slot busy".into()))
            .write_to(&mut out)
            .expect("written");
        let text = String::from_utf8(out).expect("ASCII");
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(text.contains("Content-Length: 22\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"error\":\"slot busy\"}\n"),
            "{text}"
        );
    }

    #[test]
    fn method_not_allowed_names_the_allowed_method() {
        let r = Response::error(&ApiError::MethodNotAllowed {
            method: "GET".into(),
            path: "/v1/vm/shutdown".into(),
            allowed: "PUT",
        });
        assert_eq!(r.headers, vec![("Allow", "PUT".to_string())]);
    }

    #[test]
    fn chunked_line_stream_frames_each_line_and_ends() {
        let mut out = Vec::new();
        let mut s = LineStream::start(&mut out, true).expect("head");
        s.send_line(b"{}").expect("line");
        s.finish().expect("end");
        let text = String::from_utf8(out).expect("ASCII");
        assert!(text.ends_with("\r\n\r\n3\r\n{}\n\r\n0\r\n\r\n"), "{text:?}");
    }
}
