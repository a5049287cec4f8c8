use super::*;

use std::io::Read;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{SeccompMode, ThreadFilter, ThreadKind};
use crate::vm::console_out::{ConsoleOutput, ConsoleWriter};

#[test]
fn ring_keeps_everything_below_its_limit() {
    let mut ring = Ring::new(16);
    ring.push(b"hello ");
    ring.push(b"world");

    assert_eq!(ring.take_replay(), b"hello world");
    assert!(ring.is_empty());
}

#[test]
fn ring_drops_the_oldest_bytes_and_says_how_many() {
    let mut ring = Ring::new(8);
    ring.push(b"0123456789");
    ring.push(b"ab");

    let replay = String::from_utf8(ring.take_replay()).unwrap();

    let (notice, kept) = replay.split_once("\r\n").expect("a notice line");
    assert_eq!(kept, "456789ab");
    assert!(notice.contains("4 older bytes"), "{notice}");
    assert!(notice.contains("the last 8 are kept"), "{notice}");
}

#[test]
fn ring_counts_drops_only_until_it_is_taken() {
    let mut ring = Ring::new(4);
    ring.push(b"123456");
    let _ = ring.take_replay();
    ring.push(b"ab");

    assert_eq!(ring.take_replay(), b"ab");
}

#[test]
fn sink_without_client_keeps_output_in_the_ring() {
    let shared = SocketShared::new(1024);
    let mut sink = SocketSink::new(shared.clone());

    sink.write_all(b"early").unwrap();

    assert_eq!(shared.state.locked().ring.len(), 5);
}

#[test]
fn attached_client_gets_the_ring_then_live_output() {
    let shared = SocketShared::new(1024);
    let mut sink = SocketSink::new(shared.clone());
    sink.write_all(b"before ").unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    shared.attach(Arc::new(ours)).unwrap();

    sink.flush().unwrap();
    sink.write_all(b"after").unwrap();

    let mut got = [0u8; 12];
    theirs.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before after");
}

#[test]
fn second_attach_is_refused_while_one_is_attached() {
    let shared = SocketShared::new(1024);
    let (a, _a) = UnixStream::pair().unwrap();
    let (b, _b) = UnixStream::pair().unwrap();
    shared.attach(Arc::new(a)).unwrap();

    assert!(shared.attach(Arc::new(b)).is_err());
}

#[test]
fn output_to_a_departed_client_is_kept_for_the_next() {
    let shared = SocketShared::new(1024);
    let mut sink = SocketSink::new(shared.clone());
    let (ours, theirs) = UnixStream::pair().unwrap();
    shared.attach(Arc::new(ours)).unwrap();
    drop(theirs);

    sink.write_all(b"lost?").unwrap();

    assert!(!shared.attached());
    assert_eq!(shared.state.locked().ring.take_replay(), b"lost?");
}

#[test]
fn stale_socket_file_is_replaced_and_removed_at_the_end() {
    let dir = tempdir();
    let path = dir.join("console.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let listener = ConsoleListener::bind(&path).expect("stale socket replaced");
    assert!(path.exists());
    drop(listener);

    assert!(!path.exists());
}

#[test]
fn live_socket_is_refused() {
    let dir = tempdir();
    let path = dir.join("console.sock");
    let _live = UnixListener::bind(&path).unwrap();

    let err = ConsoleListener::bind(&path).expect_err("in use");

    assert!(matches!(err, SocketConsoleError::InUse(_)), "{err}");
}

#[test]
fn the_check_for_a_live_socket_does_not_connect_to_it() {
    let dir = tempdir();
    let path = dir.join("console.sock");
    let live = UnixListener::bind(&path).unwrap();
    live.set_nonblocking(true).unwrap();

    let err = ConsoleListener::bind(&path).expect_err("in use");

    assert!(matches!(err, SocketConsoleError::InUse(_)), "{err}");
    // A live rvmm would have taken a connection as a client and replayed its output to it.
    assert_eq!(
        live.accept().map(|_| ()).unwrap_err().kind(),
        io::ErrorKind::WouldBlock,
        "the check connected to the live socket"
    );
}

#[test]
fn the_unix_socket_table_tells_listening_sockets_by_their_file() {
    let dir = tempdir();
    let path = dir.join("console.sock");
    let other = dir.join("other.sock");
    let header = "Num       RefCount Protocol Flags    Type St Inode Path\n";
    let line = |flags: &str, name: &Path| {
        format!(
            "0000000000000000: 00000002 00000000 {flags} 0001 01   123 {}\n",
            name.display()
        )
    };
    let listening = format!("{header}{}", line("00010000", &path));
    let connected = format!("{header}{}", line("00000000", &path));
    let elsewhere = format!("{header}{}", line("00010000", &other));
    let relative = format!("{header}{}", line("00010000", Path::new("console.sock")));
    let unnamed = format!("{header}0000000000000000: 00000003 00000000 00000000 0001 03 77\n");
    // The directory must exist to be resolved.
    std::fs::create_dir_all(&dir).unwrap();

    assert_eq!(listening_in(&listening, &path), Some(true));
    assert_eq!(listening_in(&connected, &path), Some(false));
    assert_eq!(listening_in(&elsewhere, &path), Some(false));
    assert_eq!(listening_in(&relative, &path), None);
    assert_eq!(listening_in(&unnamed, &path), Some(false));
    assert_eq!(listening_in(&listening, Path::new("console.sock")), None);
}

#[test]
fn other_file_is_not_replaced() {
    let dir = tempdir();
    let path = dir.join("console.sock");
    std::fs::write(&path, b"data").unwrap();

    let err = ConsoleListener::bind(&path).expect_err("not a socket");

    assert!(matches!(err, SocketConsoleError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

/// A scratch directory under the target's temporary directory, removed with its contents by
/// nobody: names are unique per test and process.
fn tempdir() -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("rvmm-console-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type Shared = Arc<Mutex<SocketConsole>>;

/// A socket console as the VM runs it: the UART, the writer thread with a [`SocketSink`], the
/// event-loop subscriber.
struct Fixture {
    manager: EventManager<Shared>,
    serial: Arc<Mutex<Serial>>,
    output: ConsoleOutput,
    writer: Option<ConsoleWriter>,
    shared: Arc<SocketShared>,
    path: PathBuf,
}

fn fixture(ring: usize) -> Fixture {
    let path = tempdir().join("console.sock");
    let shared = SocketShared::new(ring);
    let filter = ThreadFilter::new(ThreadKind::Console, SeccompMode::Off).unwrap();
    let (writer, output) =
        ConsoleWriter::start(Box::new(SocketSink::new(shared.clone())), None, filter).unwrap();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))));
    let listener = ConsoleListener::bind(&path).unwrap();
    let console =
        SocketConsole::new(listener, shared.clone(), writer.waker(), serial.clone()).unwrap();
    let mut manager = EventManager::<Shared>::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(console)));
    Fixture {
        manager,
        serial,
        output,
        writer: Some(writer),
        shared,
        path,
    }
}

impl Fixture {
    fn settle(&mut self) {
        while self.manager.run_with_timeout(10).unwrap() > 0 {}
    }

    fn connect(&mut self) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        self.settle();
        stream
    }

    fn guest_prints(&mut self, text: &str) {
        self.output.write_all(text.as_bytes()).unwrap();
    }

    /// The guest reads its receive FIFO empty.
    fn guest_reads(&self) -> Vec<u8> {
        crate::vm::console::guest_reads_fifo(&self.serial)
    }

    fn wait_detached(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.attached() {
            assert!(Instant::now() < deadline, "the client was never detached");
            self.settle();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            w.finish(Duration::from_secs(1));
        }
    }
}

/// Reads from `stream` until `want` has arrived (or panics after its read timeout).
fn read_until(stream: &mut UnixStream, want: &str) -> String {
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(want) {
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).expect("console output");
        assert!(
            n > 0,
            "console closed; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn output_while_detached_is_replayed_on_the_next_attach_without_a_gap() {
    let mut f = fixture(4096);
    f.guest_prints("line 1\n");
    let mut first = f.connect();
    assert!(read_until(&mut first, "line 1\n").starts_with("line 1\n"));
    f.guest_prints("line 2\n");
    read_until(&mut first, "line 2\n");
    drop(first);
    f.wait_detached();

    f.guest_prints("line 3\n");
    f.guest_prints("line 4\n");
    let mut second = f.connect();
    f.guest_prints("line 5\n");

    let got = read_until(&mut second, "line 5\n");
    assert_eq!(got, "line 3\nline 4\nline 5\n");
}

#[test]
fn client_input_reaches_the_guest() {
    let mut f = fixture(4096);
    let mut client = f.connect();

    client.write_all(b"ls\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < 3 && Instant::now() < deadline {
        f.settle();
        got.extend(f.guest_reads());
    }

    assert_eq!(got, b"ls\r");
}

#[test]
fn second_client_gets_one_line_and_is_closed_while_the_first_stays() {
    let mut f = fixture(4096);
    let mut first = f.connect();

    let mut second = f.connect();
    let mut refusal = String::new();
    second.read_to_string(&mut refusal).unwrap();
    f.guest_prints("still here\n");

    assert_eq!(refusal, REFUSAL);
    assert!(read_until(&mut first, "still here").contains("still here"));
}

#[test]
fn a_client_may_attach_after_the_previous_one_left() {
    let mut f = fixture(4096);
    let first = f.connect();
    drop(first);
    f.wait_detached();

    let mut second = f.connect();
    f.guest_prints("hello\n");

    assert_eq!(read_until(&mut second, "hello\n"), "hello\n");
}

#[test]
fn replay_of_an_overflowed_ring_says_what_was_dropped() {
    let mut f = fixture(16);
    f.guest_prints("0123456789abcdefXYZ");
    // The writer moves it to the ring before the client attaches.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.shared.state.locked().ring.len() < 16 {
        assert!(
            Instant::now() < deadline,
            "the output never reached the ring"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut client = f.connect();
    let got = read_until(&mut client, "XYZ");

    assert!(got.contains("3 older bytes"), "{got}");
    assert!(got.ends_with("3456789abcdefXYZ"), "{got}");
}
