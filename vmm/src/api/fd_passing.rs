//! File descriptors sent with an API request as `SCM_RIGHTS` ancillary data on the unix socket:
//! the client attaches them to the first bytes of its request, the server collects whatever
//! arrives while it reads the request.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::api::http::TimedRead;

/// Most descriptors one request may carry; more are closed as they arrive.
pub const MAX_REQUEST_FDS: usize = 1;

/// A connection read through `recvmsg`, keeping the descriptors that come with the bytes.
pub struct FdReceivingStream<'a> {
    stream: &'a UnixStream,
    fds: Vec<OwnedFd>,
    dropped: usize,
}

impl<'a> FdReceivingStream<'a> {
    /// Wraps a connection.
    pub fn new(stream: &'a UnixStream) -> Self {
        Self {
            stream,
            fds: Vec::new(),
            dropped: 0,
        }
    }

    /// The descriptors received so far (at most [`MAX_REQUEST_FDS`]) and how many more were
    /// sent and closed.
    pub fn into_fds(self) -> (Vec<OwnedFd>, usize) {
        (self.fds, self.dropped)
    }
}

impl Read for FdReceivingStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw: [RawFd; 4] = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`, which we borrow mutably and any bytes may be written
        // to; `raw` has room for the descriptors recvmsg may return.
        let (n, count) = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for &fd in raw.iter().take(count) {
            // SAFETY: recvmsg installed `fd` in our table for us; it is owned from here on.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Close-on-exec, like every descriptor rvmm opens itself (recv_with_fds does not
            // ask recvmsg for MSG_CMSG_CLOEXEC).
            // SAFETY: fcntl on a descriptor we own; only its descriptor flags change.
            if unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                log::warn!(
                    "cannot make a received descriptor close-on-exec: {}",
                    io::Error::last_os_error()
                );
            }
            if self.fds.len() < MAX_REQUEST_FDS {
                self.fds.push(owned);
            } else {
                self.dropped += 1;
            }
        }
        Ok(n)
    }
}

impl Write for FdReceivingStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.stream).flush()
    }
}

impl TimedRead for FdReceivingStream<'_> {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }
}

/// Writes `bytes` to `stream`, the descriptors `fds` attached to the first chunk that goes out.
pub fn write_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    if !fds.is_empty() {
        sent = stream
            .send_with_fds(&[bytes], fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    let rest = bytes.get(sent..).unwrap_or_default();
    (&*stream).write_all(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::{AsRawFd, IntoRawFd};

    fn read_all(stream: &mut FdReceivingStream<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = stream.read(&mut buf).expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn descriptor_sent_with_the_bytes_is_received_with_them() {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let file = tempfile::tempfile().expect("temp file");
        write_with_fds(&client, b"PUT /v1 HTTP/1.1\r\n\r\n", &[file.as_raw_fd()]).expect("sent");
        drop(client);

        let mut stream = FdReceivingStream::new(&server);
        let bytes = read_all(&mut stream);
        let (fds, dropped) = stream.into_fds();

        assert_eq!(bytes, b"PUT /v1 HTTP/1.1\r\n\r\n");
        assert_eq!((fds.len(), dropped), (1, 0));
    }

    #[test]
    fn descriptors_beyond_the_limit_are_closed_and_counted() {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let a = tempfile::tempfile().expect("temp file").into_raw_fd();
        let b = tempfile::tempfile().expect("temp file").into_raw_fd();
        write_with_fds(&client, b"x", &[a, b]).expect("sent");
        // SAFETY: both were opened above and are ours to close.
        drop(unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) });
        drop(client);

        let mut stream = FdReceivingStream::new(&server);
        read_all(&mut stream);
        let (fds, dropped) = stream.into_fds();

        assert_eq!((fds.len(), dropped), (1, 1));
    }

    #[test]
    fn plain_request_brings_no_descriptor() {
        let (client, server) = UnixStream::pair().expect("socket pair");
        write_with_fds(&client, b"GET /v1/vm/info HTTP/1.1\r\n\r\n", &[]).expect("sent");
        drop(client);

        let mut stream = FdReceivingStream::new(&server);
        read_all(&mut stream);

        assert_eq!(stream.into_fds().1, 0);
        assert!(FdReceivingStream::new(&server).into_fds().0.is_empty());
    }
}
