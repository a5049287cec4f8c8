//! `--event-log PATH|fd=N`: every event of the bus, as the JSON lines of `rvmm ctl events`,
//! written from the start of the VM to its end.
//!
//! The log is an [`EventSink`] attached to the bus before anything is published, so it misses
//! nothing a client connected later would. Publishing only queues the event (up to
//! [`EVENT_LOG_BACKLOG`]); a thread of its own (`rvmm-event-log`, under the console writer's
//! seccomp filter) writes it, so a file on a slow disk or a pipe nobody reads never stalls the
//! event loop or a vCPU. Events that find the queue full are dropped and counted; the writer
//! says how many in rvmm's log. The log ends after `vm-shutdown` and is flushed (up to a
//! deadline) before rvmm exits.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rvmm_devices::sync::MutexExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{Event, EventSink};
use crate::seccomp::ThreadFilter;

/// Events queued for the writer at most; more are dropped and counted.
pub const EVENT_LOG_BACKLOG: usize = 4096;

/// Where `--event-log` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventLogTarget {
    /// A file, created if needed and appended to.
    Path(PathBuf),
    /// A descriptor rvmm inherited, open for writing (a pipe, a file, a socket).
    Fd(RawFd),
}

/// Errors of opening the event log.
#[derive(Debug, Error)]
pub enum EventLogError {
    /// An empty value or a bad `fd=` number.
    #[error("--event-log {0:?} is not understood: give a file path or fd=N (an inherited descriptor, 3 or above)")]
    Parse(String),
    /// Standard input, output and error are refused.
    #[error("--event-log fd={0}: descriptors 0, 1 and 2 are stdin, stdout and stderr; pass the log on descriptor 3 or above (e.g. `3>events.jsonl rvmm run ... --event-log fd=3`)")]
    Stdio(RawFd),
    /// Nothing is open at that number.
    #[error("--event-log fd={fd}: rvmm has no descriptor {fd} open; open it for rvmm, e.g. `{fd}>events.jsonl rvmm run ...` in a shell")]
    NotOpen {
        /// The number.
        fd: RawFd,
        /// What fcntl said.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor is also a device's group descriptor.
    #[error("--event-log fd={0} is also given as a device's group-fd; give the event log its own descriptor")]
    Shared(RawFd),
    /// The file cannot be opened.
    #[error("cannot open the event log {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread cannot start.
    #[error("cannot start the event log writer thread")]
    Thread(#[source] std::io::Error),
}

impl std::fmt::Display for EventLogTarget {
    /// The command-line form: the path, or `fd=N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventLogTarget::Path(path) => write!(f, "{}", path.display()),
            EventLogTarget::Fd(fd) => write!(f, "fd={fd}"),
        }
    }
}

rvmm_pci::serde_as_string!(EventLogTarget);

impl std::str::FromStr for EventLogTarget {
    type Err = EventLogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(EventLogError::Parse(s.to_owned()));
        }
        match s.strip_prefix("fd=") {
            Some(n) => n
                .parse::<RawFd>()
                .ok()
                .filter(|n| *n >= 0)
                .map(EventLogTarget::Fd)
                .ok_or_else(|| EventLogError::Parse(s.to_owned())),
            None => Ok(EventLogTarget::Path(PathBuf::from(s))),
        }
    }
}

impl EventLogTarget {
    /// Opens the target: an inherited descriptor is taken over (marked close-on-exec), a path
    /// opened for appending. Call it before rvmm opens anything of its own, so that an
    /// inherited number can only be one the caller handed over.
    pub fn open(&self) -> Result<File, EventLogError> {
        match self {
            EventLogTarget::Path(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| EventLogError::Open {
                    path: path.clone(),
                    source,
                }),
            EventLogTarget::Fd(fd) => adopt(*fd).map(File::from),
        }
    }
}

fn adopt(fd: RawFd) -> Result<OwnedFd, EventLogError> {
    if (0..=2).contains(&fd) {
        return Err(EventLogError::Stdio(fd));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(EventLogError::NotOpen {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: as above; setting FD_CLOEXEC keeps the descriptor from leaking into children.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open (F_GETFD succeeded), was inherited for this purpose and is
    // taken over once (the caller refuses a number a device's group-fd holds).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the event log has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLogCounts {
    /// Events written.
    pub written: u64,
    /// Events dropped because the writer could not keep up (or the log failed).
    pub dropped: u64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Event>,
    closed: bool,
    finished: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    written: AtomicU64,
    dropped: AtomicU64,
}

impl EventSink for Shared {
    fn deliver(&self, event: &Event) {
        let mut state = self.state.locked();
        if state.closed {
            return;
        }
        if state.queue.len() >= EVENT_LOG_BACKLOG {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.queue.push_back(event.clone());
        drop(state);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.locked().closed = true;
        self.changed.notify_all();
    }
}

/// The event log: the sink to attach to the bus and its writer thread.
pub struct EventLog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EventLog {
    /// Starts the writer thread over `out`; it installs `filter` first. Attach
    /// [`EventLog::sink`] to the bus.
    pub fn start(out: Box<dyn Write + Send>, filter: ThreadFilter) -> Result<Self, EventLogError> {
        let shared = Arc::new(Shared::default());
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rvmm-event-log".into())
            .spawn(move || {
                match filter.apply() {
                    Ok(()) => write_all(&for_thread, out),
                    Err(e) => log::error!("event log writer: {}", rvmm_devices::error_chain(&e)),
                }
                for_thread.state.locked().finished = true;
                for_thread.changed.notify_all();
            })
            .map_err(EventLogError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// What to attach to the event bus.
    pub fn sink(&self) -> Arc<dyn EventSink> {
        self.shared.clone()
    }

    /// Events written and dropped so far.
    pub fn counts(&self) -> EventLogCounts {
        counts(&self.shared)
    }

    /// A reader of [`EventLog::counts`] that can be kept by others (the controller).
    pub fn counts_reader(&self) -> EventLogCountsReader {
        EventLogCountsReader(self.shared.clone())
    }

    /// Ends the log (no event after those queued) and waits at most `timeout` for the writer
    /// to write them: a reader that never reads does not hold up the end of rvmm.
    pub fn finish(mut self, timeout: Duration) {
        self.end(timeout);
    }

    fn end(&mut self, timeout: Duration) {
        if self.thread.is_none() {
            return;
        }
        self.shared.close();
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.locked();
        while !state.finished {
            let now = Instant::now();
            if now >= deadline {
                log::warn!(
                    "event log: {} events not written: its reader is not reading",
                    state.queue.len()
                );
                self.thread = None;
                return;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        drop(state);
        let c = self.counts();
        if c.dropped > 0 {
            log::warn!(
                "event log: {} of {} events were dropped: its reader was too slow",
                c.dropped,
                c.dropped + c.written
            );
        }
        if let Some(thread) = self.thread.take() {
            // It has ended: joining does not wait.
            let _ = thread.join();
        }
    }
}

/// How long dropping an unfinished log (a VM that failed before its end) waits for the writer.
const DROP_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for EventLog {
    fn drop(&mut self) {
        // Not finished (the VM failed or was not run): what is queued is still written.
        self.end(DROP_TIMEOUT);
    }
}

/// Reads the counts of an [`EventLog`] from elsewhere.
#[derive(Clone)]
pub struct EventLogCountsReader(Arc<Shared>);

impl EventLogCountsReader {
    /// Events written and dropped so far.
    pub fn counts(&self) -> EventLogCounts {
        counts(&self.0)
    }
}

fn counts(shared: &Shared) -> EventLogCounts {
    EventLogCounts {
        written: shared.written.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
    }
}

/// The writer thread: writes queued events as JSON lines until the log is closed and empty.
fn write_all(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut reported_drops = 0;
    let mut failed = false;
    loop {
        let batch: Vec<Event> = {
            let mut state = shared.state.locked();
            while state.queue.is_empty() && !state.closed {
                state = match shared.changed.wait(state) {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            if state.queue.is_empty() {
                break;
            }
            state.queue.drain(..).collect()
        };
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if dropped > reported_drops {
            log::warn!(
                "event log: {} events dropped: its reader is not keeping up",
                dropped - reported_drops
            );
            reported_drops = dropped;
        }
        for event in batch {
            if failed {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut line = match serde_json::to_vec(&event) {
                Ok(line) => line,
                Err(e) => {
                    log::error!("event log: cannot encode an event: {e}");
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            line.push(b'\n');
            match out.write_all(&line).and_then(|()| out.flush()) {
                Ok(()) => {
                    shared.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::error!("event log: write failed, no more events are written: {e}");
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    failed = true;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "event_log_tests.rs"]
mod tests;
