//! The guest's console output, which must never block a vCPU: the UART writes into a bounded
//! in-memory buffer ([`ConsoleOutput`], a `Write`), and a thread of its own (`rvmm-console`)
//! writes the buffer to the real sink (stdout or a file), blocking there if it must.
//!
//! - A reader of rvmm's stdout that stalls fills the buffer ([`BUFFER_LIMIT`]); further output is
//!   dropped and counted, and when the sink takes bytes again a line says how much was lost.
//!   The guest, the event loop and shutdown go on meanwhile.
//! - A file sink has a size limit ([`DEFAULT_FILE_LIMIT`] unless `max_size=` says otherwise):
//!   past it, one line says that output was dropped and nothing more is written, so a guest
//!   cannot fill the host's disk.
//! - A sink that changes on its own (a socket console a client attaches to) is woken through a
//!   [`ConsoleWaker`]: the thread then calls the sink's `flush` with no new bytes, so that it can
//!   replay what it kept for the new client.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rvmm_devices::sync::MutexExt;

use crate::seccomp::ThreadFilter;

/// Console output held for a slow sink at most, in bytes.
pub const BUFFER_LIMIT: usize = 1 << 20;
/// The size limit of `--serial file=PATH` when `max_size=` is not given.
pub const DEFAULT_FILE_LIMIT: u64 = 64 << 20;
/// Bytes written to the sink per call.
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct State {
    buffer: VecDeque<u8>,
    /// Bytes dropped because the buffer was full, not reported yet.
    dropped: u64,
    /// Bytes dropped in all.
    dropped_total: u64,
    closed: bool,
    /// A [`ConsoleWaker`] asked for the sink to be flushed.
    wake: bool,
    /// The writer thread has written everything and ended.
    finished: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when bytes arrive in an empty buffer, when the output closes and when the
    /// writer has finished.
    changed: Condvar,
}

/// The UART's output: appends to the buffer, never blocks on the sink.
pub struct ConsoleOutput {
    shared: Arc<Shared>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.state.locked();
        // The writer waits only on an empty buffer: waking it for every byte would put a
        // syscall on the vCPU's path for nothing.
        let was_idle = state.buffer.is_empty() && state.dropped == 0;
        let room = BUFFER_LIMIT.saturating_sub(state.buffer.len());
        let taken = buf.len().min(room);
        state.buffer.extend(buf.get(..taken).unwrap_or_default());
        let lost = (buf.len() - taken) as u64;
        state.dropped += lost;
        state.dropped_total += lost;
        drop(state);
        if was_idle {
            self.shared.changed.notify_all();
        }
        // Dropped bytes count as written: the guest must not wait for a sink that does not read.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread and what it writes to.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWriter {
    /// Starts the writer thread over `sink`, which takes at most `limit` bytes (`None`: no
    /// limit); returns it with the `Write` to give the UART. The thread installs `filter` first.
    pub fn start(
        sink: Box<dyn Write + Send>,
        limit: Option<u64>,
        filter: ThreadFilter,
    ) -> io::Result<(Self, ConsoleOutput)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rvmm-console".into())
            .spawn(move || {
                if let Err(e) = filter.apply() {
                    log::error!("console writer: {}", rvmm_devices::error_chain(&e));
                } else {
                    drain(&for_thread, sink, limit);
                }
                for_thread.state.locked().finished = true;
                for_thread.changed.notify_all();
            })?;
        let output = ConsoleOutput {
            shared: shared.clone(),
        };
        Ok((
            Self {
                shared,
                thread: Some(thread),
            },
            output,
        ))
    }

    /// A handle that wakes this writer to flush its sink without new output.
    pub fn waker(&self) -> ConsoleWaker {
        ConsoleWaker {
            shared: self.shared.clone(),
        }
    }

    /// Bytes dropped so far because the sink was too slow.
    pub fn dropped_total(&self) -> u64 {
        self.shared.state.locked().dropped_total
    }

    /// Waits at most `timeout` for the buffer to reach the sink, then lets the thread go: a
    /// sink that does not read never holds up the end of the VM.
    pub fn finish(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.locked();
        state.closed = true;
        self.shared.changed.notify_all();
        while !state.finished {
            let now = Instant::now();
            if now >= deadline {
                log::warn!(
                    "guest console output not all written ({} bytes left): the console reader is not reading",
                    state.buffer.len()
                );
                return;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let dropped = state.dropped_total;
        drop(state);
        if dropped > 0 {
            log::warn!("{dropped} bytes of guest console output were dropped: the console reader was too slow");
        }
        if let Some(thread) = self.thread.take() {
            // It has ended: joining does not wait.
            let _ = thread.join();
        }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        // The thread writes what is left, then ends (or stays blocked on a stalled sink until
        // the process ends).
        self.shared.state.locked().closed = true;
        self.shared.changed.notify_all();
    }
}

/// Wakes the writer thread to flush its sink although no output arrived (see the module
/// documentation); cheap, never blocks on the sink.
#[derive(Clone)]
pub struct ConsoleWaker {
    shared: Arc<Shared>,
}

impl ConsoleWaker {
    /// Asks the writer thread to call its sink's `flush`.
    pub fn wake(&self) {
        self.shared.state.locked().wake = true;
        self.shared.changed.notify_all();
    }
}

/// The writer thread: moves the buffer to `sink` until the output is closed and drained.
fn drain(shared: &Shared, mut sink: Box<dyn Write + Send>, limit: Option<u64>) {
    let mut written: u64 = 0;
    let mut over_limit = false;
    let mut failing = false;
    loop {
        let (chunk, dropped) = {
            let mut state = shared.state.locked();
            while state.buffer.is_empty() && state.dropped == 0 && !state.closed && !state.wake {
                state = match shared.changed.wait(state) {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            let woken = std::mem::take(&mut state.wake);
            if state.buffer.is_empty() && state.dropped == 0 {
                if woken {
                    drop(state);
                    flush_sink(&mut sink, &mut failing);
                    continue;
                }
                if state.closed {
                    return;
                }
            }
            let n = state.buffer.len().min(CHUNK);
            let chunk: Vec<u8> = state.buffer.drain(..n).collect();
            let dropped = std::mem::take(&mut state.dropped);
            (chunk, dropped)
        };
        if over_limit {
            continue;
        }
        let mut out = Vec::with_capacity(chunk.len() + 96);
        if dropped > 0 {
            out.extend_from_slice(
                format!("\r\n[rvmm: {dropped} bytes of console output dropped: the reader was too slow]\r\n")
                    .as_bytes(),
            );
        }
        out.extend_from_slice(&chunk);
        if let Some(limit) = limit {
            let room = limit.saturating_sub(written);
            if out.len() as u64 > room {
                out.truncate(usize::try_from(room).unwrap_or(usize::MAX));
                out.extend_from_slice(
                    format!(
                        "\r\n[rvmm: console output beyond {limit} bytes dropped (max_size)]\r\n"
                    )
                    .as_bytes(),
                );
                over_limit = true;
                log::warn!(
                    "guest console output reached max_size ({limit} bytes); the rest is dropped"
                );
            }
        }
        let result = sink.write_all(&out).and_then(|()| sink.flush());
        note_result(result, &mut failing);
        written = written.saturating_add(out.len() as u64);
    }
}

/// Flushes `sink` when woken without new output.
fn flush_sink(sink: &mut Box<dyn Write + Send>, failing: &mut bool) {
    let result = sink.flush();
    note_result(result, failing);
}

/// Logs a failed write once per run of failures: a closed stdout fails every write.
fn note_result(result: io::Result<()>, failing: &mut bool) {
    match result {
        Ok(()) => *failing = false,
        Err(e) if !*failing => {
            log::warn!("guest console output lost: {e}");
            *failing = true;
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::mpsc;

    use crate::seccomp::{SeccompMode, ThreadKind};

    /// A sink the test controls: it blocks until the test lets it take bytes.
    struct GatedSink {
        gate: Arc<(Mutex<bool>, Condvar)>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for GatedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.gate;
            let mut open = open.locked();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn no_filter() -> ThreadFilter {
        ThreadFilter::new(ThreadKind::Console, SeccompMode::Off).expect("no filter")
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    fn gated() -> (ConsoleWriter, ConsoleOutput, Gate, mpsc::Receiver<Vec<u8>>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let sink = GatedSink {
            gate: gate.clone(),
            out: tx,
        };
        let (writer, output) = ConsoleWriter::start(Box::new(sink), None, no_filter()).unwrap();
        (writer, output, gate, rx)
    }

    fn open_gate(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.locked() = true;
        gate.1.notify_all();
    }

    fn wait_drained(writer: &ConsoleWriter) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !writer.shared.state.locked().buffer.is_empty() {
            assert!(Instant::now() < deadline, "the writer never drained");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
        let mut all = Vec::new();
        while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(500)) {
            all.extend(chunk);
        }
        all
    }

    #[test]
    fn writes_never_wait_for_a_stalled_sink() {
        let (writer, mut output, gate, _rx) = gated();
        let start = Instant::now();

        for _ in 0..(BUFFER_LIMIT / 1000) * 3 {
            output.write_all(&[b'x'; 1000]).unwrap();
        }

        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(writer.dropped_total() > 0);
        open_gate(&gate);
        writer.finish(Duration::from_secs(5));
    }

    #[test]
    fn dropped_output_is_reported_in_the_stream() {
        let (writer, mut output, gate, rx) = gated();
        // Twice what the buffer and the chunk the writer holds can take.
        for _ in 0..(BUFFER_LIMIT / 1000) * 2 {
            output.write_all(&[b'y'; 1000]).unwrap();
        }
        assert!(writer.dropped_total() > 0);

        open_gate(&gate);
        wait_drained(&writer);
        output.write_all(b"after\n").unwrap();
        let text = String::from_utf8_lossy(&collect(&rx)).into_owned();
        writer.finish(Duration::from_secs(5));

        assert!(
            text.contains("bytes of console output dropped"),
            "{}",
            text.len()
        );
        assert!(text.ends_with("after\n"));
    }

    #[test]
    fn everything_reaches_a_sink_that_keeps_up() {
        let (writer, mut output, gate, rx) = gated();
        open_gate(&gate);

        for i in 0..1000 {
            output.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let text = String::from_utf8_lossy(&collect(&rx)).into_owned();
        writer.finish(Duration::from_secs(5));

        assert_eq!(text.lines().count(), 1000);
        assert!(!text.contains("dropped"));
    }

    #[test]
    fn file_sink_stops_at_its_limit_and_says_so() {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new((Mutex::new(true), Condvar::new()));
        let sink = GatedSink { gate, out: tx };
        let (writer, mut output) =
            ConsoleWriter::start(Box::new(sink), Some(100), no_filter()).unwrap();

        for _ in 0..10 {
            output.write_all(&[b'z'; 50]).unwrap();
        }
        let text = String::from_utf8_lossy(&collect(&rx)).into_owned();
        writer.finish(Duration::from_secs(5));

        let (kept, notice) = text.split_once("\r\n[rvmm").expect("a notice");
        assert_eq!(kept, "z".repeat(100));
        assert!(notice.contains("console output beyond 100 bytes dropped"));
    }

    #[test]
    fn finish_gives_up_on_a_sink_that_never_reads() {
        let (writer, mut output, _gate, _rx) = gated();
        output.write_all(b"stuck").unwrap();
        let start = Instant::now();

        writer.finish(Duration::from_millis(200));

        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
