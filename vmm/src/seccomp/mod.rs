//! Per-thread seccomp filters (seccompiler): each rvmm thread allows only the syscalls its job
//! needs, installed by the thread itself once everything that only happens at start is done.
//!
//! | thread | filter | installed |
//! |---|---|---|
//! | `vcpuN` | [`ThreadKind::Vcpu`] | first thing in the thread |
//! | `rvmm-vmm` (event loop) | [`ThreadKind::EventLoop`] | before the loop's first wait |
//! | `rvmm-api` (accept) | [`ThreadKind::ApiAccept`] | first thing in the thread |
//! | `rvmm-api-conn` | [`ThreadKind::ApiConnection`] (on top of the inherited accept filter) | first thing in the thread |
//! | `rvmm-console` | [`ThreadKind::Console`] | first thing in the thread |
//! | `rvmm-signals` (the `rvmm` binary's) | [`ThreadKind::Signals`] | first thing in the thread |
//!
//! Filters are on by default ([`SeccompMode::On`]): a syscall outside the list raises SIGSYS and
//! rvmm's handler (`reporter.rs`) prints e.g. `rvmm: seccomp blocked syscall openat (257) on
//! thread vcpu0; run with --seccomp log to find every missing syscall` and exits with code 1.
//! [`SeccompMode::Log`] lets such syscalls through and has the kernel's audit subsystem record
//! them (type 1326, when audit is enabled); [`SeccompMode::Off`] installs nothing.
//! docs/seccomp.md lists what each thread may do and why.
//!
//! The thread that builds the VM and calls [`crate::Vm::run`] is never filtered: filters belong
//! to threads rvmm starts, so a program embedding rvmm keeps its own threads as they were.

mod filters;
mod ioctls;
mod malloc_arenas;
mod names;
mod reporter;

use std::fmt;
use std::io;
use std::str::FromStr;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

pub use names::syscall_name;

/// Test-only: when this environment variable is `1`, the event-loop thread makes a syscall its
/// filter forbids ([`SELFTEST_SYSCALL`]) right after installing the filter, to show how a
/// blocked syscall is reported. Has no effect with `--seccomp off`.
pub const SELFTEST_ENV: &str = "RVMM_SECCOMP_SELFTEST";

/// The syscall of the self-test: `getppid`, harmless and needed by no rvmm thread.
pub const SELFTEST_SYSCALL: i64 = libc::SYS_getppid;

/// Whether and how rvmm's threads are filtered (`rvmm run --seccomp on|off|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Filters installed; a syscall outside them is reported by name and ends rvmm.
    #[default]
    On,
    /// No filters.
    Off,
    /// Filters installed; a syscall outside them is allowed and logged by the kernel.
    Log,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            other => Err(SeccompError::Mode(other.to_owned())),
        }
    }
}

rvmm_pci::serde_as_string!(SeccompMode);

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        })
    }
}

/// The kinds of rvmm threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the device models' work on port and MMIO exits.
    Vcpu,
    /// The event loop: control requests, hotplug, VFIO interrupts, serial input.
    EventLoop,
    /// The control API's accept thread (starts connection threads).
    ApiAccept,
    /// A control API connection thread.
    ApiConnection,
    /// The console writer: guest console output to stdout or a file.
    Console,
    /// The `rvmm` binary's signal thread: reads SIGTERM/SIGINT from a signalfd and asks the VM
    /// (through a handle) to press the power button or power off.
    Signals,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::ApiAccept,
        ThreadKind::ApiConnection,
        ThreadKind::Console,
        ThreadKind::Signals,
    ];

    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::ApiAccept => "api-accept",
            ThreadKind::ApiConnection => "api-connection",
            ThreadKind::Console => "console",
            ThreadKind::Signals => "signals",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// `--seccomp` not understood.
    #[error("--seccomp {0:?} is not understood: use on, off or log")]
    Mode(String),
    /// A rule could not be built (a bug in the rule tables).
    #[error("cannot build a seccomp rule")]
    Rule(#[source] BackendError),
    /// A filter could not be compiled.
    #[error("cannot build the seccomp filter of {kind} threads")]
    Build {
        /// The thread kind.
        kind: ThreadKind,
        /// The compiler's error.
        #[source]
        source: BackendError,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler that reports blocked syscalls")]
    Handler(#[source] io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter on thread {thread}: {call} failed")]
    Apply {
        /// The thread's name.
        thread: String,
        /// The call that failed.
        call: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The compiled filter of one thread kind in one mode; [`ThreadFilter::apply`] installs it on
/// the calling thread. Build it before starting the thread, so that errors surface early.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    kind: ThreadKind,
    mode: SeccompMode,
    program: Option<BpfProgram>,
}

impl ThreadFilter {
    /// Compiles the filter of `kind` threads for `mode` (nothing for [`SeccompMode::Off`]).
    pub fn new(kind: ThreadKind, mode: SeccompMode) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => {
                return Ok(Self {
                    kind,
                    mode,
                    program: None,
                })
            }
            SeccompMode::On => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
        };
        // Before any filtered thread starts: it may otherwise be the one glibc makes read a
        // file to size its malloc arenas.
        malloc_arenas::settle();
        let build = |source| SeccompError::Build { kind, source };
        let filter = SeccompFilter::new(
            filters::rules(kind)?,
            mismatch,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(build)?;
        let program: BpfProgram = filter.try_into().map_err(build)?;
        Ok(Self {
            kind,
            mode,
            program: Some(program),
        })
    }

    /// The thread kind.
    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// The mode.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// The BPF program (`None` when filters are off).
    pub fn program(&self) -> Option<&BpfProgram> {
        self.program.as_ref()
    }

    /// Installs the filter on the calling thread (for good: a filter cannot be removed). With
    /// [`SeccompMode::On`], first installs the process's SIGSYS reporter and names this thread
    /// in its reports.
    pub fn apply(&self) -> Result<(), SeccompError> {
        let Some(program) = &self.program else {
            return Ok(());
        };
        let thread = std::thread::current()
            .name()
            .unwrap_or(self.kind.name())
            .to_owned();
        if self.mode == SeccompMode::On {
            reporter::install().map_err(SeccompError::Handler)?;
            reporter::set_thread_label(&thread);
        }
        seccompiler::apply_filter(program).map_err(|e| {
            let (call, source) = match e {
                seccompiler::Error::Prctl(source) => ("prctl(PR_SET_NO_NEW_PRIVS)", source),
                seccompiler::Error::Seccomp(source) => ("seccomp(SECCOMP_SET_MODE_FILTER)", source),
                other => ("seccomp", io::Error::other(other.to_string())),
            };
            SeccompError::Apply {
                thread: thread.clone(),
                call,
                source,
            }
        })?;
        log::debug!(
            "seccomp: {} filter ({}) installed on thread {thread}",
            self.kind,
            self.mode
        );
        Ok(())
    }
}

/// Whether the self-test was asked for (see [`SELFTEST_ENV`]).
pub fn selftest_requested() -> bool {
    std::env::var_os(SELFTEST_ENV).is_some_and(|v| v == "1")
}

/// The self-test: makes [`SELFTEST_SYSCALL`], which no filter allows. Under
/// [`SeccompMode::On`] the process ends here with the report; under `Log` the kernel logs it and
/// rvmm goes on.
pub fn run_selftest() {
    log::warn!(
        "{SELFTEST_ENV}=1: making the forbidden syscall {} to test the seccomp filter",
        syscall_name(SELFTEST_SYSCALL).unwrap_or("unknown")
    );
    // SAFETY: getppid takes no arguments and changes nothing.
    unsafe { libc::syscall(SELFTEST_SYSCALL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_builds_into_a_bpf_program() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                let filter = ThreadFilter::new(kind, mode).unwrap();
                assert!(
                    filter.program().is_some_and(|p| !p.is_empty()),
                    "{kind} {mode}"
                );
            }
        }
    }

    #[test]
    fn off_builds_no_program() {
        for kind in ThreadKind::ALL {
            let filter = ThreadFilter::new(kind, SeccompMode::Off).unwrap();
            assert!(filter.program().is_none());
        }
    }

    #[test]
    fn programs_fit_the_kernels_instruction_limit() {
        for kind in ThreadKind::ALL {
            let filter = ThreadFilter::new(kind, SeccompMode::On).unwrap();
            assert!(filter.program().unwrap().len() < 4096, "{kind}");
        }
    }

    #[test]
    fn off_applies_nothing() {
        ThreadFilter::new(ThreadKind::Vcpu, SeccompMode::Off)
            .unwrap()
            .apply()
            .unwrap();
    }

    #[test]
    fn filtered_threads_can_allocate_synchronize_and_exit() {
        for kind in ThreadKind::ALL {
            let filter = ThreadFilter::new(kind, SeccompMode::On).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("test-{kind}"))
                .spawn(move || {
                    filter.apply().unwrap();
                    // Large enough for malloc to mmap it, freed with munmap.
                    let block = vec![1u8; 8 << 20];
                    tx.send(block.iter().map(|&b| u64::from(b)).sum::<u64>())
                        .unwrap();
                })
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(rx.recv().unwrap(), 8 << 20, "{kind}");
        }
    }

    #[test]
    fn log_mode_lets_a_forbidden_syscall_through() {
        let filter = ThreadFilter::new(ThreadKind::Vcpu, SeccompMode::Log).unwrap();
        let ppid = std::thread::spawn(move || {
            filter.apply().unwrap();
            // SAFETY: getppid takes no arguments and changes nothing.
            unsafe { libc::syscall(SELFTEST_SYSCALL) }
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        assert_eq!(ppid, unsafe { libc::syscall(SELFTEST_SYSCALL) });
    }

    #[test]
    fn selftest_syscall_is_allowed_by_no_filter() {
        for kind in ThreadKind::ALL {
            let rules = filters::rules(kind).unwrap();
            assert!(!rules.contains_key(&SELFTEST_SYSCALL), "{kind}");
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [SeccompMode::On, SeccompMode::Off, SeccompMode::Log] {
            assert_eq!(mode.to_string().parse::<SeccompMode>().unwrap(), mode);
        }
        assert!("yes".parse::<SeccompMode>().is_err());
    }

    #[test]
    fn default_mode_is_on() {
        assert_eq!(SeccompMode::default(), SeccompMode::On);
    }
}
