//! Pre-opened VFIO group file descriptors: how a privileged control plane gives an unprivileged
//! rvmm a device without giving it the right to open `/dev/vfio/<group>`.
//!
//! The descriptor travels three ways: inherited by `rvmm run` (`--device path=BDF,group-fd=N`),
//! sent with an API request as `SCM_RIGHTS` ancillary data (`rvmm ctl add-device
//! path=BDF,group-fd=N` sends its own descriptor N; the JSON body says `"group_fd": N`), or handed
//! over in-process by a library user ([`GroupFd::Open`]).

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use thiserror::Error;

/// A VFIO group descriptor of an add-device request.
#[derive(Clone)]
pub enum GroupFd {
    /// A descriptor number in the sending process (the command line's `group-fd=N`, the wire's
    /// `"group_fd": N`), not yet held by this process.
    Number(RawFd),
    /// The descriptor itself, held by this process (shared by the devices of one group).
    Open(Arc<OwnedFd>),
}

impl GroupFd {
    /// The descriptor number (in the sender's process for [`GroupFd::Number`]).
    pub fn number(&self) -> RawFd {
        match self {
            GroupFd::Number(n) => *n,
            GroupFd::Open(fd) => fd.as_raw_fd(),
        }
    }

    /// The held descriptor, `None` while it is only a number.
    pub fn open(&self) -> Option<&Arc<OwnedFd>> {
        match self {
            GroupFd::Number(_) => None,
            GroupFd::Open(fd) => Some(fd),
        }
    }
}

impl PartialEq for GroupFd {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (GroupFd::Number(a), GroupFd::Number(b)) => a == b,
            (GroupFd::Open(a), GroupFd::Open(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for GroupFd {}

impl fmt::Debug for GroupFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupFd::Number(n) => write!(f, "GroupFd::Number({n})"),
            GroupFd::Open(fd) => write!(f, "GroupFd::Open(fd {})", fd.as_raw_fd()),
        }
    }
}

/// Errors of taking over inherited descriptors.
#[derive(Debug, Error)]
pub enum GroupFdError {
    /// Standard input, output and error are not group descriptors.
    #[error("group-fd={0}: descriptors 0, 1 and 2 are stdin, stdout and stderr; pass the VFIO group on descriptor 3 or above")]
    Stdio(RawFd),
    /// Nothing is open at that number.
    #[error("group-fd={fd}: rvmm has no descriptor {fd} open; open the group for it, e.g. `{fd}<>/dev/vfio/GROUP rvmm run ...` in a shell")]
    NotOpen {
        /// The number.
        fd: RawFd,
        /// What fcntl said.
        #[source]
        source: std::io::Error,
    },
}

/// Takes ownership of descriptors this process inherited, once per number: devices naming the
/// same number (devices of one IOMMU group) share it.
#[derive(Debug, Default)]
pub struct InheritedFds {
    taken: BTreeMap<RawFd, Arc<OwnedFd>>,
}

impl InheritedFds {
    /// Turns a [`GroupFd::Number`] into a [`GroupFd::Open`] holding our descriptor of that
    /// number (marked close-on-exec); an open one is returned as it is.
    pub fn adopt(&mut self, group: &GroupFd) -> Result<GroupFd, GroupFdError> {
        let fd = match group {
            GroupFd::Open(_) => return Ok(group.clone()),
            GroupFd::Number(fd) => *fd,
        };
        if let Some(held) = self.taken.get(&fd) {
            return Ok(GroupFd::Open(held.clone()));
        }
        if (0..=2).contains(&fd) {
            return Err(GroupFdError::Stdio(fd));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(GroupFdError::NotOpen {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: as above; setting FD_CLOEXEC keeps the descriptor from leaking into children.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: the descriptor is open (F_GETFD succeeded), was inherited for this purpose and
        // is taken over once: later requests for the same number share this `OwnedFd`.
        let owned = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        self.taken.insert(fd, owned.clone());
        Ok(GroupFd::Open(owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::IntoRawFd;

    fn open_fd() -> RawFd {
        std::fs::File::open("/dev/null")
            .expect("/dev/null opens")
            .into_raw_fd()
    }

    #[test]
    fn adopting_an_open_number_holds_that_descriptor() {
        let fd = open_fd();
        let mut fds = InheritedFds::default();

        let adopted = fds.adopt(&GroupFd::Number(fd)).expect("adopted");

        assert_eq!(adopted.open().map(|f| f.as_raw_fd()), Some(fd));
    }

    #[test]
    fn adopting_the_same_number_twice_shares_one_descriptor() {
        let fd = open_fd();
        let mut fds = InheritedFds::default();

        let first = fds.adopt(&GroupFd::Number(fd)).expect("adopted");
        let second = fds.adopt(&GroupFd::Number(fd)).expect("adopted again");

        assert_eq!(first, second);
    }

    #[test]
    fn adopting_a_closed_number_names_it() {
        // Far above any descriptor the test process opens (closing one of ours instead would
        // race with the other tests opening files).
        let fd = 1_000_000;
        let mut fds = InheritedFds::default();

        let err = fds.adopt(&GroupFd::Number(fd)).expect_err("closed");

        assert!(err
            .to_string()
            .contains(&format!("no descriptor {fd} open")));
    }

    #[test]
    fn adopting_stdio_is_refused() {
        let mut fds = InheritedFds::default();

        let err = fds.adopt(&GroupFd::Number(1)).expect_err("stdout");

        assert!(matches!(err, GroupFdError::Stdio(1)));
    }

    #[test]
    fn numbers_compare_by_value_and_open_descriptors_by_identity() {
        let a = Arc::new(
            // SAFETY: a fresh descriptor owned by this test.
            unsafe { OwnedFd::from_raw_fd(open_fd()) },
        );
        let b = Arc::new(
            // SAFETY: as above.
            unsafe { OwnedFd::from_raw_fd(open_fd()) },
        );

        assert_eq!(GroupFd::Number(7), GroupFd::Number(7));
        assert_eq!(GroupFd::Open(a.clone()), GroupFd::Open(a.clone()));
        assert_ne!(GroupFd::Open(a), GroupFd::Open(b));
    }
}
