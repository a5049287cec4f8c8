//! Claims on VFs between rvmm processes: one file per VF under `/run/rvmm/vf/`, held with an
//! exclusive `flock` for as long as the VM has the VF.
//!
//! `flock` makes a claim atomic (two rvmm processes started at the same moment never both get a
//! VF) and ties it to the open file: when the holder exits or crashes the kernel drops the lock,
//! so no claim outlives its process. Locks belong to the open file, not the process, so two
//! claims on one VF conflict inside one process too. The file is opened close-on-exec (Rust's
//! default), so a child process never inherits a claim. It holds `pid=`, `vm=` and `device=`
//! lines naming the holder, and `baseline_*=` lines: the VF's port settings and driver before any
//! rvmm changed them, written (and synced) before the holder changes anything. A release that
//! restored the VF leaves only the baseline lines behind (removing the file would race with a
//! process that has just opened it); a holder that died without releasing leaves its holder lines
//! too, which tells the next claimer to restore the baseline first. A VF whose restore failed is
//! quarantined: a `quarantined=` line with the reason, and no rvmm hands it out until an operator
//! who has checked the VF removes the file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use rvmm_pci::Bdf;

use super::bind::DriverState;
use super::policy::{MacAddress, VfSettings};

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

/// What a VF had before any rvmm changed it: restored on every release.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    /// Its port settings.
    pub settings: VfSettings,
    /// Its driver and `driver_override`.
    pub driver: DriverState,
}

/// What a claim file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimFile {
    /// Who holds (or held, if it died without releasing) the VF; `None` after a release.
    pub holder: Option<Holder>,
    /// The VF's baseline, once an rvmm has taken it.
    pub baseline: Option<Baseline>,
    /// Why the VF is out of use, if it is.
    pub quarantined: Option<String>,
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn parse_switch(v: &str) -> Option<bool> {
    match v {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// A driver name as the file holds it: `none` (or nothing) for none; control characters become
/// `?`, as when it is written.
fn name_or_none(v: &str) -> Option<String> {
    (v != "none" && !v.is_empty()).then(|| one_line(v))
}

impl ClaimFile {
    /// Parses the text of a claim file. Unknown lines are ignored; the baseline counts only
    /// when all of it is there and well-formed (a file cut short holds no baseline).
    pub fn parse(text: &str) -> Self {
        let holder = Holder::parse(text);
        let mut file = ClaimFile {
            holder: holder.pid.map(|_| holder),
            ..ClaimFile::default()
        };
        let (mut mac, mut vlan, mut qos, mut spoofchk, mut trust) = (None, None, None, None, None);
        let (mut driver, mut driver_override) = (None, None);
        for line in text.lines() {
            let Some((key, v)) = line.split_once('=') else {
                continue;
            };
            match key {
                "baseline_mac" => mac = v.parse::<MacAddress>().ok(),
                "baseline_vlan" => vlan = v.parse::<u16>().ok(),
                "baseline_qos" => qos = v.parse::<u8>().ok(),
                "baseline_spoofchk" => spoofchk = parse_switch(v),
                "baseline_trust" => trust = parse_switch(v),
                "baseline_driver" => driver = Some(name_or_none(v)),
                "baseline_override" => driver_override = Some(name_or_none(v)),
                "quarantined" => file.quarantined = Some(v.to_string()),
                _ => {}
            }
        }
        if let (Some(mac), Some(vlan), Some(qos), Some(spoofchk), Some(trust), Some(d), Some(o)) =
            (mac, vlan, qos, spoofchk, trust, driver, driver_override)
        {
            file.baseline = Some(Baseline {
                settings: VfSettings {
                    mac,
                    vlan,
                    qos,
                    spoofchk,
                    trust,
                },
                driver: DriverState {
                    driver: d,
                    driver_override: o,
                },
            });
        }
        file
    }

    /// The file's text: `record` as the holder (none after a release), then the baseline and
    /// the quarantine reason, if any.
    pub fn text_for(&self, record: Option<&ClaimRecord>) -> String {
        let mut text = record.map(ClaimRecord::to_file_text).unwrap_or_default();
        if let Some(b) = &self.baseline {
            let s = &b.settings;
            let or_none = |v: &Option<String>| one_line(v.as_deref().unwrap_or("none"));
            text.push_str(&format!(
                "baseline_mac={}\nbaseline_vlan={}\nbaseline_qos={}\nbaseline_spoofchk={}\n\
                 baseline_trust={}\nbaseline_driver={}\nbaseline_override={}\n",
                s.mac,
                s.vlan,
                s.qos,
                on_off(s.spoofchk),
                on_off(s.trust),
                or_none(&b.driver.driver),
                or_none(&b.driver.driver_override),
            ));
        }
        if let Some(reason) = &self.quarantined {
            text.push_str(&format!("quarantined={}\n", one_line(reason)));
        }
        text
    }
}

/// A VF this process holds; dropping it releases the claim, leaving behind what
/// [`Claim::record`] or [`Claim::quarantine`] said (or the file as it was found, if neither was
/// called: a VF looked at and not taken is left as it was).
#[derive(Debug)]
pub struct Claim {
    file: File,
    path: PathBuf,
    found: ClaimFile,
    /// The text the file gets when the claim is dropped.
    leave: String,
}

impl Claim {
    /// The claim file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file said when the VF was claimed: a holder there died without releasing it.
    pub fn found(&self) -> &ClaimFile {
        &self.found
    }

    /// Records `record` as the holder and `baseline` as what every release restores, synced to
    /// the file before the caller changes the VF; a release then leaves the baseline behind.
    pub fn record(&mut self, record: &ClaimRecord, baseline: &Baseline) -> Result<()> {
        let file = ClaimFile {
            holder: None,
            baseline: Some(baseline.clone()),
            quarantined: None,
        };
        self.write(&file.text_for(Some(record)))?;
        self.leave = file.text_for(None);
        Ok(())
    }

    /// Takes the VF out of use for every rvmm: the file keeps the baseline and says why.
    pub fn quarantine(&mut self, reason: &str) -> Result<()> {
        let file = ClaimFile {
            holder: None,
            baseline: self
                .found
                .baseline
                .clone()
                .or_else(|| ClaimFile::parse(&self.leave).baseline),
            quarantined: Some(reason.to_string()),
        };
        self.leave = file.text_for(None);
        let leave = self.leave.clone();
        self.write(&leave)
    }

    fn write(&mut self, text: &str) -> Result<()> {
        let path = self.path.clone();
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(text.as_bytes()))
            .and_then(|()| self.file.sync_all())
            .map_err(|source| ClaimError::File {
                action: "write",
                path,
                source,
            })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Rewrite the file while still holding the lock, so nobody reads a stale holder; closing
        // the file then releases the lock.
        let leave = std::mem::take(&mut self.leave);
        if let Err(e) = self.write(&leave) {
            log::warn!("cannot rewrite VF claim file {}: {e}", self.path.display());
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
    /// It is quarantined, for this reason.
    Quarantined(String),
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
        let mut found_text = String::new();
        file.read_to_string(&mut found_text)
            .map_err(|e| err("read", e))?;
        let found = ClaimFile::parse(&found_text);
        if let Some(reason) = found.quarantined.clone() {
            // Leave the file as it is; the lock goes with the file.
            return Ok(ClaimOutcome::Quarantined(reason));
        }
        let mut claim = Claim {
            file,
            path: path.clone(),
            leave: found_text,
            found,
        };
        // Name the holder at once (keeping a recorded baseline), so that others can say who has it.
        let holding = ClaimFile {
            holder: None,
            baseline: claim.found.baseline.clone(),
            quarantined: None,
        };
        claim.write(&holding.text_for(Some(record)))?;
        Ok(ClaimOutcome::Claimed(claim))
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

    fn baseline() -> Baseline {
        Baseline {
            settings: VfSettings {
                mac: MacAddress([0x52, 0x54, 0, 0, 0, 9]),
                vlan: 5,
                qos: 1,
                spoofchk: true,
                trust: false,
            },
            driver: DriverState {
                driver: Some("igbvf".into()),
                driver_override: None,
            },
        }
    }

    #[test]
    fn claim_file_round_trips_holder_baseline_and_quarantine() {
        let file = ClaimFile {
            holder: None,
            baseline: Some(baseline()),
            quarantined: Some("restore failed".into()),
        };

        let parsed = ClaimFile::parse(&file.text_for(Some(&record(42, "vm1"))));

        assert_eq!(parsed.baseline, file.baseline);
        assert_eq!(parsed.quarantined, file.quarantined);
        assert_eq!(parsed.holder.and_then(|h| h.pid), Some(42));
    }

    #[test]
    fn claim_file_cut_short_has_no_baseline() {
        let text = ClaimFile {
            holder: None,
            baseline: Some(baseline()),
            quarantined: None,
        }
        .text_for(None);
        let cut = &text[..text.find("baseline_trust").unwrap()];

        assert_eq!(ClaimFile::parse(cut).baseline, None);
        assert_eq!(ClaimFile::parse("baseline_vlan=9999999\n").baseline, None);
    }

    #[test]
    fn quarantined_vf_is_not_claimed_and_its_file_is_left_alone() {
        let tmp = TempDir::new();
        let claims = tmp.claims();
        let text = ClaimFile {
            holder: None,
            baseline: Some(baseline()),
            quarantined: Some("restore failed".into()),
        }
        .text_for(None);
        fs::create_dir_all(claims.path_of(&vf()).parent().unwrap()).unwrap();
        fs::write(claims.path_of(&vf()), &text).unwrap();

        let outcome = claims.try_claim(&vf(), &record(1, "vm1")).unwrap();

        assert!(matches!(outcome, ClaimOutcome::Quarantined(ref r) if r == "restore failed"));
        assert_eq!(fs::read_to_string(claims.path_of(&vf())).unwrap(), text);
    }

    #[test]
    fn claim_dropped_without_a_record_leaves_the_file_as_found() {
        let tmp = TempDir::new();
        let claims = tmp.claims();
        let found = "pid=999999\nvm=dead\ndevice=net0\n";
        fs::create_dir_all(claims.path_of(&vf()).parent().unwrap()).unwrap();
        fs::write(claims.path_of(&vf()), found).unwrap();

        let ClaimOutcome::Claimed(claim) = claims.try_claim(&vf(), &record(1, "vm1")).unwrap()
        else {
            panic!("not claimed");
        };
        assert_eq!(
            claim.found().holder.as_ref().and_then(|h| h.pid),
            Some(999_999)
        );
        drop(claim);

        assert_eq!(fs::read_to_string(claims.path_of(&vf())).unwrap(), found);
    }
}
