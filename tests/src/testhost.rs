//! Running a test host: the `TestHost` builder over `resources/testhost.sh`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{chain, Error, Result};
use crate::output::{clean_line, Line, RunEnd, TestHostOutput};
use crate::{paths, prepare};

/// Status of `resources/testhost.sh` when its own timeout killed QEMU (GNU timeout).
const TIMEOUT_STATUS: i32 = 124;
/// Status of `resources/testhost.sh` when its watcher ended a test host that froze.
const FROZE_STATUS: i32 = 125;
/// Extra time the harness grants the script beyond its own timeout before killing it.
const KILL_GRACE: Duration = Duration::from_secs(30);

/// A test host to boot: its hardware and the scenario it runs.
#[derive(Clone, Debug)]
pub struct TestHost {
    name: String,
    memory: String,
    nvme_drives: u32,
    nvme_size: String,
    igb: bool,
    spare_root_ports: u32,
    kernel_args: String,
    qemu_args: Vec<String>,
    cpus: u32,
    numa: bool,
    e1000_pair: bool,
    scenario: String,
    needs_rvmm: bool,
}

/// Environment variable that sets the test hosts' default vCPU count.
pub const CPUS_ENV: &str = "RVMM_TESTHOST_CPUS";

/// Environment variable that sets how many test host vCPUs may run at once on this machine,
/// across the processes that share a build directory (default 1: one test host at a time). Each
/// test host vCPU is a TCG thread that keeps one core of the machine busy, so the number of cores
/// is the most that makes sense; `resources/run-tests.sh` sets it for its parallel lanes.
pub const SLOTS_ENV: &str = "RVMM_TESTHOST_SLOTS";

/// How many test host vCPUs may run at once: `$RVMM_TESTHOST_SLOTS`, else 1.
pub fn slots() -> u32 {
    std::env::var(SLOTS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// The test hosts' vCPU count unless a test sets one: `$RVMM_TESTHOST_CPUS`, else 1. With two,
/// QEMU 10.0's multi-threaded TCG running nested SVM guests has, once in a few runs, hit
/// `iotlb_to_section` assertions, stopped a test host CPU's timer interrupts (RCU stalls),
/// triple-faulted rvmm's guests at boot and corrupted the test host kernel's memory; one vCPU
/// (one TCG thread) has not, and the guests still get their 2 vCPUs (threads of the test host).
pub fn default_cpus() -> u32 {
    std::env::var(CPUS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

impl TestHost {
    /// A test host named `name` (the log is `build/logs/<name>.log`; characters other than
    /// ASCII letters, digits, `-` and `_` become `_`) with 3 GiB of RAM, one 64 MiB NVMe drive,
    /// an igb NIC and no scenario.
    pub fn new(name: &str) -> Self {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        TestHost {
            name,
            memory: "3G".to_string(),
            nvme_drives: 1,
            nvme_size: "64M".to_string(),
            igb: true,
            spare_root_ports: 0,
            kernel_args: String::new(),
            qemu_args: Vec::new(),
            cpus: default_cpus(),
            numa: false,
            e1000_pair: false,
            scenario: String::new(),
            needs_rvmm: false,
        }
    }

    /// Test host RAM in QEMU's syntax (`3G`, `4096M`).
    pub fn memory(mut self, size: &str) -> Self {
        self.memory = size.to_string();
        self
    }

    /// Number of emulated NVMe drives, each on its own root port.
    pub fn nvme_drives(mut self, count: u32) -> Self {
        self.nvme_drives = count;
        self
    }

    /// Size of each NVMe drive's (sparse, fresh) image in QEMU's syntax.
    pub fn nvme_size(mut self, size: &str) -> Self {
        self.nvme_size = size.to_string();
        self
    }

    /// Whether the test host has an igb NIC (SR-IOV PF `8086:10c9`, VFs `8086:10ca`).
    pub fn igb(mut self, enabled: bool) -> Self {
        self.igb = enabled;
        self
    }

    /// Empty root ports in addition to those of the devices.
    pub fn spare_root_ports(mut self, count: u32) -> Self {
        self.spare_root_ports = count;
        self
    }

    /// More test host kernel parameters.
    pub fn kernel_args(mut self, args: &str) -> Self {
        self.kernel_args = args.to_string();
        self
    }

    /// One more QEMU argument.
    pub fn qemu_arg(mut self, arg: &str) -> Self {
        self.qemu_args.push(arg.to_string());
        self
    }

    /// Test host vCPUs (default: `$RVMM_TESTHOST_CPUS`, else 1).
    pub fn cpus(mut self, count: u32) -> Self {
        self.cpus = count;
        self
    }

    /// Two host NUMA nodes, one CPU and half the RAM each (so two test host vCPUs), and one
    /// more NVMe drive (serial `nvme-node1`, its `numa_node` 1) on a root port behind a PCIe
    /// expander bus on node 1 (`resources/testhost.sh --numa`). Such a test host runs with
    /// `idle=poll` (two vCPUs) and `numa_balancing=disable`: without them its kernel died or
    /// stalled in about half the runs under QEMU's multi-threaded TCG (see `testhost.sh`); it
    /// takes both of the machine's test host slots.
    pub fn two_numa_nodes(mut self) -> Self {
        self.numa = true;
        self.cpus = 2;
        self
    }

    /// Two e1000 NICs (`8086:100e`: INTx only, an I/O BAR), each on its own root port, joined by
    /// a QEMU hub (`resources/testhost.sh --e1000`).
    pub fn e1000_pair(mut self) -> Self {
        self.e1000_pair = true;
        self
    }

    /// The scenario: a busybox `sh` script run as `/scenario.sh` in the test host, with the
    /// helpers of `resources/host/host-lib.sh` loaded.
    pub fn scenario(mut self, script: &str) -> Self {
        self.scenario = script.to_string();
        self
    }

    /// Whether the scenario runs rvmm: then a missing rvmm binary is an error before the run,
    /// and a test host that reports `HOST rvmm missing` is unusable.
    pub fn needs_rvmm(mut self, needed: bool) -> Self {
        self.needs_rvmm = needed;
        self
    }

    /// Boots the test host, runs the scenario and returns the console once QEMU has exited or
    /// `timeout` has passed. Panics loudly (reason, log path, console tail) if a prerequisite is
    /// missing or the test host is unusable (no `/dev/kvm`, no rvmm when needed).
    #[track_caller]
    pub fn run(&self, timeout: Duration) -> TestHostOutput {
        match self.try_run(timeout) {
            Ok(output) => output,
            Err(error) => panic!("{}", chain(&error)),
        }
    }

    /// Like [`TestHost::run`], returning what went wrong instead of panicking.
    pub fn try_run(&self, timeout: Duration) -> Result<TestHostOutput> {
        if find_in_path("qemu-system-x86_64").is_none() {
            return Err(Error::QemuMissing);
        }
        let rvmm = paths::rvmm_binary();
        if self.needs_rvmm && !rvmm.is_file() {
            return Err(Error::RvmmMissing { path: rvmm });
        }
        prepare::prepare_images()?;

        let workdir = paths::run_dir().join(&self.name);
        create_dir(&workdir)?;
        create_dir(&paths::logs_dir())?;
        let scenario = workdir.join("scenario.sh");
        write_file(&scenario, &self.scenario)?;
        let log_path = paths::logs_dir().join(format!("{}.log", self.name));

        let _slots = lock_slots(&paths::build_dir(), self.cpus, slots())?;
        let output = self.execute(&workdir, &scenario, &log_path, timeout)?;
        eprintln!("{}", output.summary());
        self.check_ready(&output)?;
        Ok(output)
    }

    fn command(&self, workdir: &Path, scenario: &Path, timeout: Duration) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(paths::resources_dir().join("testhost.sh"))
            .arg("--scenario")
            .arg(scenario)
            .arg("--workdir")
            .arg(workdir)
            .args(["--memory", &self.memory])
            .args(["--nvme", &self.nvme_drives.to_string()])
            .args(["--nvme-size", &self.nvme_size])
            .arg(if self.igb { "--igb" } else { "--no-igb" })
            .args(["--spare-ports", &self.spare_root_ports.to_string()])
            .args(["--timeout", &timeout.as_secs().max(1).to_string()])
            .args(["--append", &self.kernel_args])
            .args(["--cpus", &self.cpus.to_string()])
            .args(self.numa.then_some("--numa"))
            .args(self.e1000_pair.then_some("--e1000"))
            .arg("--")
            .args(&self.qemu_args)
            .env("RVMM_BUILD_DIR", paths::build_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a run that outlives the deadline is killed whole.
            .process_group(0);
        command
    }

    fn execute(
        &self,
        workdir: &Path,
        scenario: &Path,
        log_path: &Path,
        timeout: Duration,
    ) -> Result<TestHostOutput> {
        let mut log = File::create(log_path).map_err(|source| Error::Io {
            action: "create",
            path: log_path.to_path_buf(),
            source,
        })?;
        let mut command = self.command(workdir, scenario, timeout);
        let start = Instant::now();
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            command: format!("{command:?}"),
            source,
        })?;
        let (sender, receiver) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            forward_lines(stdout, start, sender.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            forward_lines(stderr, start, sender);
        }

        let deadline = start + timeout + KILL_GRACE;
        let (lines, killed) = collect_lines(&receiver, &mut child, deadline, &mut log, log_path)?;
        let status = child.wait().map_err(|source| Error::Io {
            action: "wait for",
            path: paths::resources_dir().join("testhost.sh"),
            source,
        })?;
        let end = if killed {
            RunEnd::TimedOut
        } else {
            match status.code() {
                Some(TIMEOUT_STATUS) => RunEnd::TimedOut,
                Some(FROZE_STATUS) => RunEnd::Froze,
                Some(code) => RunEnd::Exited(code),
                None => RunEnd::Killed,
            }
        };
        let output = TestHostOutput::new(&self.name, log_path, lines, end, start.elapsed());
        let _ = writeln!(log, "--- {}", output.summary());
        Ok(output)
    }

    fn check_ready(&self, output: &TestHostOutput) -> Result<()> {
        let all = output.all();
        let reason = if all.host("up").is_none() {
            Some("the test host never reached its init ('HOST up' is missing)".to_string())
        } else if all.host("kvm").is_none_or(|marker| marker.value != "ok") {
            Some("/dev/kvm does not exist in the test host (kvm-amd did not load)".to_string())
        } else if all.host("ready").is_none() {
            Some(
                "the test host init did not finish its checks ('HOST ready' is missing)"
                    .to_string(),
            )
        } else if self.needs_rvmm
            && all
                .host("rvmm")
                .is_none_or(|marker| marker.value != "present")
        {
            Some("the test host initramfs has no rvmm binary".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::HostNotReady {
                name: self.name.clone(),
                reason,
                context: output.context(),
            }),
            None => Ok(()),
        }
    }
}

/// Sends each line read from `stream` with its arrival time until the stream ends.
fn forward_lines(stream: impl Read + Send + 'static, start: Instant, sender: Sender<Line>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = clean_line(&String::from_utf8_lossy(&raw));
                    if sender
                        .send(Line {
                            at: start.elapsed(),
                            text,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
}

/// Receives console lines, appending each to the log as it arrives, until both streams end or
/// the deadline passes (then the process group is killed). Returns the lines and whether the
/// harness had to kill the run.
fn collect_lines(
    receiver: &Receiver<Line>,
    child: &mut Child,
    deadline: Instant,
    log: &mut File,
    log_path: &Path,
) -> Result<(Vec<Line>, bool)> {
    let mut lines = Vec::new();
    let mut killed = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(wait.max(Duration::from_millis(10))) {
            Ok(line) => {
                writeln!(log, "{}", line.text).map_err(|source| Error::Io {
                    action: "write",
                    path: log_path.to_path_buf(),
                    source,
                })?;
                lines.push(line);
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                if !killed && Instant::now() >= deadline {
                    kill_group(child);
                    killed = true;
                    let _ = writeln!(log, "--- harness: deadline passed, test host killed");
                }
            }
        }
    }
    Ok((lines, killed))
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals the process group the child leads (it was
        // spawned with process_group(0)); it has no memory effects on this process.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}

/// Waits until `cpus` of the machine's `slots` test host slots are this run's (all of them when
/// `cpus >= slots`), across threads and processes that share the build directory `dir`: slot `i`
/// is an flock(2) on `<dir>/testhost.lock` (slot 0) or `<dir>/testhost.lock.<i>`. A run that needs every
/// slot takes them in order and waits on each; one that needs fewer takes whichever are free,
/// looking again every 200 ms. The slots are released when the returned files are closed.
fn lock_slots(dir: &Path, cpus: u32, slots: u32) -> Result<Vec<File>> {
    let slots = slots.max(1);
    let needed = cpus.clamp(1, slots) as usize;
    if needed == slots as usize {
        let mut held = Vec::new();
        for slot in 0..slots {
            let (file, path) = open_slot(dir, slot)?;
            flock(&file, &path, libc::LOCK_EX)?;
            held.push(file);
        }
        return Ok(held);
    }
    loop {
        // Locks taken in a round that does not get enough are released by dropping the files.
        let mut held = Vec::new();
        for slot in 0..slots {
            let (file, path) = open_slot(dir, slot)?;
            if flock(&file, &path, libc::LOCK_EX | libc::LOCK_NB)? {
                held.push(file);
                if held.len() == needed {
                    return Ok(held);
                }
            }
        }
        drop(held);
        thread::sleep(Duration::from_millis(200));
    }
}

/// The lock file of slot `slot` and its path.
fn open_slot(dir: &Path, slot: u32) -> Result<(File, PathBuf)> {
    let name = match slot {
        0 => "testhost.lock".to_string(),
        n => format!("testhost.lock.{n}"),
    };
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            action: "open",
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// flock(2) with `operation`, retried when a signal interrupts it. Returns false when
/// `LOCK_NB` was given and another process holds the lock.
fn flock(file: &File, path: &Path, operation: i32) -> Result<bool> {
    loop {
        // SAFETY: flock(2) on a file descriptor the caller owns for the call's duration.
        let result = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if result == 0 {
            return Ok(true);
        }
        let source = std::io::Error::last_os_error();
        match source.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(false),
            _ => {
                return Err(Error::Io {
                    action: "lock",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| Error::Io {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(|source| Error::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_made_safe_for_file_names() {
        let host = TestHost::new("boot::bz image/1");

        assert_eq!(host.name, "boot__bz_image_1");
    }

    #[test]
    fn command_passes_the_hardware_to_the_script() {
        let host = TestHost::new("x")
            .memory("4G")
            .nvme_drives(2)
            .igb(false)
            .spare_root_ports(3)
            .cpus(1)
            .qemu_arg("-d")
            .qemu_arg("guest_errors");

        let command = host.command(
            Path::new("/w"),
            Path::new("/w/s.sh"),
            Duration::from_secs(90),
        );
        let args: Vec<String> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();

        let joined = args.join(" ");
        assert!(joined.contains("--memory 4G --nvme 2 --nvme-size 64M --no-igb --spare-ports 3"));
        assert!(joined.contains("--cpus 1"));
        assert!(joined.contains("--timeout 90"));
        assert!(joined.ends_with("-- -d guest_errors"));
    }

    /// A fresh directory for lock files, unique to the test.
    fn lock_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rvmm-slots-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Whether slot `slot` of `dir` is free (taken and released again at once).
    fn slot_is_free(dir: &Path, slot: u32) -> bool {
        let (file, path) = open_slot(dir, slot).unwrap();
        flock(&file, &path, libc::LOCK_EX | libc::LOCK_NB).unwrap()
    }

    #[test]
    fn one_slot_serializes_as_before() {
        let dir = lock_dir("one");

        let held = lock_slots(&dir, 2, 1).unwrap();

        assert_eq!(held.len(), 1);
        assert!(dir.join("testhost.lock").is_file());
        assert!(!slot_is_free(&dir, 0));
        drop(held);
        assert!(slot_is_free(&dir, 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_cpu_runs_take_different_slots() {
        let dir = lock_dir("two");

        let first = lock_slots(&dir, 1, 2).unwrap();
        let second = lock_slots(&dir, 1, 2).unwrap();

        assert_eq!((first.len(), second.len()), (1, 1));
        assert!(!slot_is_free(&dir, 0));
        assert!(!slot_is_free(&dir, 1));
        drop(first);
        assert!(slot_is_free(&dir, 0));
        assert!(!slot_is_free(&dir, 1));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_run_needing_every_slot_waits_for_all() {
        let dir = lock_dir("all");
        let (_, path) = open_slot(&dir, 1).unwrap();
        let other = File::open(&path).unwrap();
        assert!(flock(&other, &path, libc::LOCK_EX).unwrap());

        let (sender, receiver) = mpsc::channel();
        let waiter_dir = dir.clone();
        let waiter = thread::spawn(move || {
            let held = lock_slots(&waiter_dir, 2, 2).unwrap();
            sender.send(held.len()).unwrap();
            held
        });

        assert!(receiver.recv_timeout(Duration::from_millis(300)).is_err());
        drop(other);
        assert_eq!(receiver.recv_timeout(Duration::from_secs(10)), Ok(2));
        let held = waiter.join().unwrap();
        assert!(!slot_is_free(&dir, 0));
        assert!(!slot_is_free(&dir, 1));
        drop(held);
        assert!(slot_is_free(&dir, 1));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn program_in_path_is_found() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-program-rvmm").is_none());
    }
}
