use std::io::Read;
use std::sync::mpsc;

use super::*;
use crate::api::types::{EventKind, ShutdownReason};
use crate::api::EventBus;
use crate::seccomp::{SeccompMode, ThreadKind};

const WAIT: Duration = Duration::from_secs(5);

fn no_filter() -> ThreadFilter {
    ThreadFilter::new(ThreadKind::Console, SeccompMode::Off).expect("no filter")
}

fn event(n: u64) -> Event {
    Event {
        timestamp_ms: n,
        kind: EventKind::VmShutdown {
            reason: ShutdownReason::PowerOff,
        },
    }
}

/// A sink that blocks every write until the test lets it go.
struct Gated {
    gate: mpsc::Receiver<()>,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.gate.recv();
        self.out.locked().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(libc::EPIPE))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn targets_parse() {
    assert_eq!(
        "fd=3".parse::<EventLogTarget>().ok(),
        Some(EventLogTarget::Fd(3))
    );
    assert_eq!(
        "/tmp/e.jsonl".parse::<EventLogTarget>().ok(),
        Some(EventLogTarget::Path("/tmp/e.jsonl".into()))
    );
    for bad in ["", "fd=", "fd=x", "fd=-1"] {
        assert!(
            matches!(bad.parse::<EventLogTarget>(), Err(EventLogError::Parse(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn stdio_descriptors_are_refused() {
    for fd in 0..=2 {
        let err = EventLogTarget::Fd(fd).open().expect_err("stdio");
        assert!(err.to_string().contains("3 or above"), "{err}");
    }
}

#[test]
fn unopened_descriptor_is_refused_with_the_fix() {
    let err = EventLogTarget::Fd(1_000_000).open().expect_err("not open");

    assert!(
        matches!(err, EventLogError::NotOpen { fd: 1_000_000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("1000000>events.jsonl"), "{err}");
}

#[test]
fn every_event_is_written_in_order_as_the_events_stream_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.jsonl");
    let file = EventLogTarget::Path(path.clone()).open().expect("opens");
    let log = EventLog::start(Box::new(file), no_filter()).expect("starts");
    let bus = EventBus::new();
    bus.attach(log.sink());

    for n in 0..100 {
        bus.publish(event(n));
    }
    bus.close();
    log.finish(WAIT);

    let mut text = String::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("readable");
    let expected: String = (0..100)
        .map(|n| serde_json::to_string(&event(n)).expect("encodes") + "\n")
        .collect();
    assert_eq!(text, expected);
}

#[test]
fn a_file_is_appended_to() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, "earlier\n").expect("writable");
    let file = EventLogTarget::Path(path.clone()).open().expect("opens");
    let log = EventLog::start(Box::new(file), no_filter()).expect("starts");

    log.sink().deliver(&event(1));
    log.finish(WAIT);

    let text = std::fs::read_to_string(&path).expect("readable");
    assert!(text.starts_with("earlier\n{"), "{text}");
}

#[test]
fn a_stalled_reader_never_blocks_the_publisher_and_drops_are_counted() {
    let (open_gate, gate) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let log = EventLog::start(
        Box::new(Gated {
            gate,
            out: out.clone(),
        }),
        no_filter(),
    )
    .expect("starts");
    let sink = log.sink();
    // The writer may take up to a whole backlog as its first batch before it blocks, so twice
    // the backlog and 500 more always overflow, by 500 to a backlog + 500.
    let total = 2 * EVENT_LOG_BACKLOG as u64 + 500;

    // The writer takes a first batch and blocks in its first write; the rest queue up to the
    // backlog and the others are dropped: the publisher never waits.
    for n in 0..total {
        sink.deliver(&event(n));
    }
    let counts = log.counts();
    assert!(
        (500..=EVENT_LOG_BACKLOG as u64 + 500).contains(&counts.dropped),
        "{counts:?}"
    );
    assert_eq!(counts.written, 0);
    let reader = log.counts_reader();

    drop(open_gate);
    log.finish(WAIT);
    let text = String::from_utf8(out.locked().clone()).expect("utf-8");
    let written = text.lines().count() as u64;
    assert!(written >= EVENT_LOG_BACKLOG as u64, "{written}");
    assert_eq!(reader.counts().written, written);
    assert_eq!(written + reader.counts().dropped, total);
    assert_eq!(
        text.lines().next().map(str::to_owned),
        serde_json::to_string(&event(0)).ok(),
        "the first events are the ones kept"
    );
}

#[test]
fn finish_gives_up_on_a_reader_that_never_reads() {
    let (_keep_closed, gate) = mpsc::channel();
    let log = EventLog::start(
        Box::new(Gated {
            gate,
            out: Arc::new(Mutex::new(Vec::new())),
        }),
        no_filter(),
    )
    .expect("starts");
    log.sink().deliver(&event(1));
    let started = Instant::now();

    log.finish(Duration::from_millis(100));

    assert!(started.elapsed() < WAIT);
}

#[test]
fn a_failed_write_counts_the_rest_as_dropped() {
    let log = EventLog::start(Box::new(Broken), no_filter()).expect("starts");
    let reader = log.counts_reader();
    let sink = log.sink();
    for n in 0..3 {
        sink.deliver(&event(n));
    }

    log.finish(WAIT);

    assert_eq!(
        reader.counts(),
        EventLogCounts {
            written: 0,
            dropped: 3
        }
    );
}

#[test]
fn nothing_is_taken_after_close() {
    let log = EventLog::start(Box::new(std::io::sink()), no_filter()).expect("starts");
    let sink = log.sink();
    sink.close();
    sink.deliver(&event(1));
    let reader = log.counts_reader();

    log.finish(WAIT);

    assert_eq!(reader.counts(), EventLogCounts::default());
}
