//! `--api-socket fd=N`: the control API on a listening unix socket rvmm inherited, already bound
//! (by a control plane, a service manager), instead of one rvmm binds itself.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The descriptor number of an `--api-socket` value of the form `fd=N`, if it is one.
pub fn inherited_fd(socket: &Path) -> Option<&str> {
    socket.to_str()?.strip_prefix("fd=")
}

/// Why an inherited descriptor cannot serve the API (the text says what to give instead).
pub fn adopt_listener(number: &str) -> Result<UnixListener, String> {
    let fd: RawFd = number.parse().ok().filter(|n| *n > 2).ok_or_else(|| {
        format!("--api-socket fd={number}: give an inherited descriptor number, 3 or above")
    })?;
    // SAFETY: fcntl on any number is harmless; F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "--api-socket fd={fd}: rvmm has no descriptor {fd} open ({})",
            io::Error::last_os_error()
        ));
    }
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given.
    let domain = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if domain != 0 || kind != libc::AF_UNIX {
        return Err(format!(
            "--api-socket fd={fd}: descriptor {fd} is not a unix socket; pass a bound, listening unix stream socket"
        ));
    }
    let mut listening: libc::c_int = 0;
    // SAFETY: as above.
    let accepting = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if accepting != 0 || listening == 0 {
        return Err(format!(
            "--api-socket fd={fd}: the socket does not listen; call listen() on it before passing it to rvmm"
        ));
    }
    // SAFETY: marking the descriptor close-on-exec only changes its flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open, a listening unix socket, and handed over to rvmm by its
    // caller: from here on rvmm owns it (nothing else in rvmm uses that number).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fd_form_names_a_descriptor() {
        assert_eq!(inherited_fd(Path::new("fd=3")), Some("3"));
        assert_eq!(inherited_fd(Path::new("/run/rvmm.sock")), None);
    }

    #[test]
    fn stdio_and_garbage_numbers_are_refused() {
        for n in ["0", "2", "-1", "x", ""] {
            let err = adopt_listener(n).expect_err(n);

            assert!(err.contains("3 or above"), "{n}: {err}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_listening_socket_is_refused() {
        let file = std::fs::File::open("/proc/self/exe").expect("open");
        let n = std::os::fd::AsRawFd::as_raw_fd(&file).to_string();

        let err = adopt_listener(&n).expect_err("a file");

        assert!(err.contains("not a unix socket"), "{err}");
    }
}
