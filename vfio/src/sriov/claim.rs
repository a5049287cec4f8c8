//! Claims on VFs between rvmm processes: one file per VF under `/run/rvmm/vf/`, held with an
//! exclusive `flock` for as long as the VM has the VF.
//!
//! `flock` makes a claim atomic (two rvmm processes started at the same moment never both get a
//! VF) and ties it to the open file: when the holder exits or crashes the kernel drops the lock,
//! so no claim outlives its process. Locks belong to the open file, not the process, so two
//! claims on one VF conflict inside one process too. The file is opened close-on-exec (Rust's
//! default), so a child process never inherits a claim. It holds `pid=`, `vm=` and `device=`
//! lines naming the holder; a released claim leaves an empty file behind (removing it would race
//! with a process that has just opened it).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use rvmm_pci::Bdf;

/// Where rvmm keeps its VF claims.
pub const CLAIM_DIR: &str = "/run/rvmm/vf";

/// Errors of claiming a VF.
#[derive(Debug, Error)]
pub enum ClaimError {
    /// The claim directory cannot be created.
    #[error("cannot create the VF claim directory {path}; run as root or make it writable for this user")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A claim file cannot be opened, locked or written.
    #[error("cannot {action} VF claim file {path}")]
    File {
        /// What failed ("open", "lock", "write").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Result of claiming.
pub type Result<T> = std::result::Result<T, ClaimError>;

/// Who claims a VF: written into the claim file for the error another rvmm shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The holder's process id.
    pub pid: u32,
    /// Its VM.
    pub vm: String,
    /// The device id in that VM.
    pub device: String,
}

/// One line of a claim file: no line breaks or other control characters.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl ClaimRecord {
    /// A record for this process.
    pub fn this_process(vm: &str, device: &str) -> Self {
        Self {
            pid: std::process::id(),
            vm: vm.to_string(),
            device: device.to_string(),
        }
    }

    fn to_file_text(&self) -> String {
        format!(
            "pid={}\nvm={}\ndevice={}\n",
            self.pid,
            one_line(&self.vm),
            one_line(&self.device)
        )
    }
}

/// Who holds a claim, as far as its file and `/proc` tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    /// Process id.
    pub pid: Option<u32>,
    /// Its command name.
    pub comm: Option<String>,
    /// Its VM.
    pub vm: Option<String>,
    /// The device id in that VM.
    pub device: Option<String>,
}

impl Holder {
    /// Parses the text of a claim file; unknown lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut holder = Holder::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => holder.pid = v.trim().parse().ok(),
                Some(("vm", v)) => holder.vm = Some(v.to_string()),
                Some(("device", v)) => holder.device = Some(v.to_string()),
                _ => {}
            }
        }
        holder
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.comm) {
            (Some(pid), Some(comm)) => write!(f, "pid {pid} ({comm})")?,
            (Some(pid), None) => write!(f, "pid {pid}")?,
            (None, _) => f.write_str("a process that is just claiming it")?,
        }
        if let Some(vm) = &self.vm {
            write!(f, ", VM {vm}")?;
        }
        if let Some(device) = &self.device {
            write!(f, " as {device}")?;
        }
        Ok(())
    }
}

/// A VF this process holds; dropping it releases the claim.
#[derive(Debug)]
pub struct Claim {
    file: File,
    path: PathBuf,
}

impl Claim {
    /// The claim file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Empty the file while still holding the lock, so nobody reads a stale holder; closing
        // the file then releases the lock.
        if let Err(e) = self.file.set_len(0) {
            log::warn!("cannot empty VF claim file {}: {e}", self.path.display());
        }
    }
}

/// The outcome of trying to claim a VF.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The VF is ours until the claim is dropped.
    Claimed(Claim),
    /// Another claim holds it.
    Held(Holder),
}

/// The directory of claim files.
#[derive(Clone, Debug)]
pub struct ClaimDir {
    dir: PathBuf,
    proc_root: PathBuf,
}

impl Default for ClaimDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ClaimDir {
    /// The host's claims ([`CLAIM_DIR`], holders looked up in `/proc`).
    pub fn new() -> Self {
        Self::with_paths(CLAIM_DIR, "/proc")
    }

    /// Claims in `dir`, holders' command names from `proc_root/<pid>/comm` (tests).
    pub fn with_paths(dir: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            proc_root: proc_root.into(),
        }
    }

    /// The claim file of VF `bdf`.
    pub fn path_of(&self, bdf: &Bdf) -> PathBuf {
        self.dir.join(format!("{bdf}.lock"))
    }

    /// Claims VF `bdf` for `record` unless another claim holds it. Never blocks.
    pub fn try_claim(&self, bdf: &Bdf, record: &ClaimRecord) -> Result<ClaimOutcome> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(|source| ClaimError::CreateDir {
                path: self.dir.clone(),
                source,
            })?;
        let path = self.path_of(bdf);
        let err = |action, source| ClaimError::File {
            action,
            path: path.clone(),
            source,
        };
        // Rust opens files with O_CLOEXEC; no truncation before the lock is ours.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|e| err("open", e))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(ClaimOutcome::Held(self.holder(&mut file)));
            }
            return Err(err("lock", e));
        }
        let text = record.to_file_text();
        file.set_len(0)
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(|e| err("write", e))?;
        Ok(ClaimOutcome::Claimed(Claim { file, path }))
    }

    /// The holder named by a locked claim file.
    fn holder(&self, file: &mut File) -> Holder {
        let mut text = String::new();
        let read = file.rewind().and_then(|()| file.read_to_string(&mut text));
        if let Err(e) = read {
            log::debug!("cannot read a VF claim file: {e}");
        }
        let mut holder = Holder::parse(&text);
        holder.comm = holder.pid.and_then(|pid| {
            fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
                .ok()
                .map(|c| c.trim().to_string())
        });
        holder
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "rvmm-claim-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(path.join("proc")).unwrap();
            Self(path)
        }

        fn claims(&self) -> ClaimDir {
            ClaimDir::with_paths(self.0.join("run/rvmm/vf"), self.0.join("proc"))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn vf() -> Bdf {
        "0000:01:10.0".parse().unwrap()
    }

    fn record(pid: u32, vm: &str) -> ClaimRecord {
        ClaimRecord {
            pid,
            vm: vm.into(),
            device: "net0".into(),
        }
    }

    #[test]
    fn second_claim_on_one_vf_is_held_even_in_the_same_process() {
        let tmp = TempDir::new();
        let claims = tmp.claims();

        let first = claims.try_claim(&vf(), &record(10, "a")).unwrap();
        let second = claims.try_claim(&vf(), &record(11, "b")).unwrap();

        assert!(matches!(first, ClaimOutcome::Claimed(_)));
        assert!(matches!(second, ClaimOutcome::Held(_)));
    }

    #[test]
    fn held_claim_names_the_holder_pid_comm_and_vm() {
        let tmp = TempDir::new();
        fs::create_dir_all(tmp.0.join("proc/4242")).unwrap();
        fs::write(tmp.0.join("proc/4242/comm"), "rvmm\n").unwrap();
        let claims = tmp.claims();
        let _first = claims.try_claim(&vf(), &record(4242, "web1")).unwrap();

        let ClaimOutcome::Held(holder) = claims.try_claim(&vf(), &record(1, "x")).unwrap() else {
            panic!("the second claim was granted");
        };

        assert_eq!(holder.to_string(), "pid 4242 (rvmm), VM web1 as net0");
    }

    #[test]
    fn dropped_claim_frees_the_vf() {
        let tmp = TempDir::new();
        let claims = tmp.claims();
        let first = claims.try_claim(&vf(), &record(10, "a")).unwrap();

        drop(first);
        let again = claims.try_claim(&vf(), &record(11, "b")).unwrap();

        assert!(matches!(again, ClaimOutcome::Claimed(_)));
    }

    #[test]
    fn released_claim_leaves_an_empty_file() {
        let tmp = TempDir::new();
        let claims = tmp.claims();
        let claim = claims.try_claim(&vf(), &record(10, "a")).unwrap();

        drop(claim);

        assert_eq!(fs::read_to_string(claims.path_of(&vf())).unwrap(), "");
    }

    #[test]
    fn claims_on_different_vfs_do_not_conflict() {
        let tmp = TempDir::new();
        let claims = tmp.claims();
        let other: Bdf = "0000:01:10.2".parse().unwrap();

        let _first = claims.try_claim(&vf(), &record(10, "a")).unwrap();
        let second = claims.try_claim(&other, &record(10, "a")).unwrap();

        assert!(matches!(second, ClaimOutcome::Claimed(_)));
    }

    #[test]
    fn racing_threads_get_exactly_one_claim() {
        let tmp = TempDir::new();
        let claims = Arc::new(tmp.claims());
        let start = Arc::new(Barrier::new(8));

        let threads: Vec<_> = (0..8)
            .map(|i| {
                let claims = claims.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    claims.try_claim(&vf(), &record(i, "vm")).unwrap()
                })
            })
            .collect();
        let outcomes: Vec<ClaimOutcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();

        let granted = outcomes
            .iter()
            .filter(|o| matches!(o, ClaimOutcome::Claimed(_)))
            .count();
        assert_eq!(granted, 1);
    }

    #[test]
    fn record_values_stay_on_one_line() {
        let text = record(1, "evil\nvm=other").to_file_text();

        assert_eq!(Holder::parse(&text).vm.as_deref(), Some("evil?vm=other"));
    }

    #[test]
    fn unwritable_claim_directory_is_a_clear_error() {
        let tmp = TempDir::new();
        fs::write(tmp.0.join("run"), b"a file, not a directory").unwrap();

        let err = tmp
            .claims()
            .try_claim(&vf(), &record(1, "a"))
            .expect_err("cannot create a directory under a file");

        assert!(matches!(err, ClaimError::CreateDir { .. }), "{err}");
    }
}
