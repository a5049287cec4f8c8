//! Host input for the guest's serial console: an event-loop subscriber that reads a descriptor
//! (rvmm's stdin, a pty master) and hands the bytes to the UART with flow control, so that no byte is lost and
//! the loop never spins:
//!
//! - the descriptor is read only while fewer than [`PENDING_LIMIT`] bytes wait for the guest; at
//!   the limit it leaves the epoll set (a level-triggered, readable descriptor nobody reads would
//!   wake the loop without end), and it comes back once the guest has taken input;
//! - the UART takes what fits in its receive FIFO; the rest is offered again when the guest has
//!   read the FIFO empty (the UART's input-drained notifier, an eventfd this subscriber watches),
//!   not on a timer;
//! - a writer that hangs up leaves its last bytes readable: the descriptor is read to its end of
//!   file before it is dropped, so input piped into rvmm arrives whole.
//!
//! [`ConsoleInput`] is the part every console input shares (the socket console's client input
//! too, `console_socket.rs`): the pending bytes and the input-drained notifier.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use rvmm_devices::serial::Serial;
use rvmm_devices::sync::MutexExt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Input waiting for the guest at most, in bytes: the descriptor is not read while this much
/// waits (the guest is not reading its console, or reads it slower than the host types).
pub const PENDING_LIMIT: usize = 4096;

/// Bytes taken from the descriptor per read.
const READ_CHUNK: usize = 256;

/// Input on its way to the guest's UART: the bytes read from the host that the guest has not
/// taken yet, and the UART's input-drained notifier that says when to offer them again. Shared
/// by every kind of console input (stdin, a pty, a socket client); the descriptor and when to
/// read it are the caller's.
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    drained: EventFd,
    pending: Vec<u8>,
}

/// What reading a console input descriptor found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes, or nothing right now: read again when it is readable.
    Open,
    /// End of file or an error: the descriptor has nothing more to give.
    Closed,
}

impl ConsoleInput {
    /// Input for `serial`, whose input-drained notifier it sets.
    pub fn new(serial: Arc<Mutex<Serial>>) -> std::io::Result<Self> {
        let drained = EventFd::new(EFD_NONBLOCK)?;
        let notifier = drained.try_clone()?;
        serial.locked().set_input_drained(Arc::new(notifier));
        Ok(Self {
            serial,
            drained,
            pending: Vec::new(),
        })
    }

    /// The eventfd the UART raises when the guest has read its receive FIFO empty; watch it
    /// and call [`ConsoleInput::take_drained`] and [`ConsoleInput::flush`] when it is readable.
    pub fn drained(&self) -> &EventFd {
        &self.drained
    }

    /// Consumes the input-drained notification.
    pub fn take_drained(&self) {
        // The counter only says "the FIFO ran empty at least once"; its value is not needed.
        let _ = self.drained.read();
    }

    /// Bytes read from the host that the guest has not taken yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether more may be read from the host: fewer than [`PENDING_LIMIT`] bytes wait.
    pub fn has_room(&self) -> bool {
        self.pending.len() < PENDING_LIMIT
    }

    /// Offers the pending bytes to the UART and forgets what it took.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = self.serial.locked().enqueue_input(&self.pending);
        self.pending.drain(..taken.min(self.pending.len()));
    }

    /// Reads what `fd` has into the pending bytes (call it when `fd` is readable).
    pub fn read_from(&mut self, fd: RawFd) -> ReadOutcome {
        match read_fd(fd, &mut self.pending) {
            Ok(0) => ReadOutcome::Closed,
            Ok(_) => ReadOutcome::Open,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                ReadOutcome::Open
            }
            Err(e) => {
                log::warn!("serial console input stopped: {e}");
                ReadOutcome::Closed
            }
        }
    }
}

/// Feeds a host descriptor that stays for the VM's life (rvmm's stdin, a pty master) to the
/// guest's UART (see the module documentation).
pub struct StdinConsole {
    input: RawFd,
    feed: ConsoleInput,
    /// Whether `input` is in the epoll set.
    reading: bool,
    /// End of file or a read error: `input` is never read again.
    closed: bool,
}

impl StdinConsole {
    /// A console that reads `input` (a descriptor the caller keeps open for the loop's lifetime,
    /// e.g. `STDIN_FILENO`) and feeds `serial`, whose input-drained notifier it sets.
    pub fn new(input: RawFd, serial: Arc<Mutex<Serial>>) -> std::io::Result<Self> {
        Ok(Self {
            input,
            feed: ConsoleInput::new(serial)?,
            reading: false,
            closed: false,
        })
    }

    /// Bytes read from the host that the guest has not taken yet.
    pub fn pending(&self) -> usize {
        self.feed.pending()
    }

    /// Puts the descriptor in the epoll set, or takes it out, as the state asks: read while open
    /// and below the limit.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = !self.closed && self.feed.has_room();
        if want == self.reading {
            return;
        }
        let result = if want {
            ops.add(Events::new_raw(self.input, EventSet::IN))
        } else {
            ops.remove(Events::empty_raw(self.input))
        };
        match result {
            Ok(()) => self.reading = want,
            // /dev/null and regular files cannot be polled: the guest just gets no input.
            Err(e) if want => {
                log::debug!(
                    "console input is not pollable ({e:?}); the serial console has no input"
                );
                self.closed = true;
            }
            Err(e) => log::warn!("cannot stop watching the console input: {e:?}"),
        }
    }
}

impl MutEventSubscriber for StdinConsole {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.feed.drained().as_raw_fd() {
            self.feed.take_drained();
        } else if events.fd() == self.input && !self.closed {
            // A hang-up with bytes left is reported as readable too: read until end of file.
            if events
                .event_set()
                .intersects(EventSet::IN | EventSet::HANG_UP)
                && self.feed.read_from(self.input) == ReadOutcome::Closed
            {
                self.closed = true;
            }
            if events.event_set().contains(EventSet::ERROR) && self.feed.pending() == 0 {
                self.closed = true;
            }
        }
        self.feed.flush();
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.feed.drained(), EventSet::IN)) {
            log::error!("cannot watch the serial input FIFO: {e:?}; the console has no input");
            self.closed = true;
            return;
        }
        self.update_interest(ops);
    }
}

/// The host side of the serial console that the event loop serves, as `--serial` chose.
pub enum ConsoleHost {
    /// rvmm's stdin ([`StdinConsole`]).
    Stdin,
    /// A unix socket ([`crate::vm::console_socket::SocketConsole`]).
    Socket {
        /// The listening socket.
        listener: crate::vm::console_socket::ConsoleListener,
        /// The attachment shared with the console writer's sink.
        shared: Arc<crate::vm::console_socket::SocketShared>,
        /// Wakes the console writer to replay its ring to a client that attached.
        waker: crate::vm::console_out::ConsoleWaker,
    },
    /// A pseudo-terminal ([`crate::vm::console_pty::PtyConsole`]).
    Pty(crate::vm::console_pty::Pty),
    /// No input (`--serial file=`).
    Nothing,
}

/// Reads what `fd` has (at most [`READ_CHUNK`] bytes) straight from the descriptor and appends
/// it to `pending`; returns the count (0 at end of file). Not through `std::io::stdin()`: its
/// buffer would take more than one call returns and keep the rest where epoll cannot see it, so
/// input longer than one read would wait for the next keystroke.
fn read_fd(fd: RawFd, pending: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut buf = [0u8; READ_CHUNK];
    // SAFETY: `buf` is a writable buffer of the given length; read(2) writes at most that much.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    pending.extend_from_slice(buf.get(..n).unwrap_or_default());
    Ok(n)
}

/// What the guest reads from `serial`'s receive FIFO until it is empty, as the 8250 driver does
/// on an interrupt (for the console tests).
#[cfg(test)]
pub(crate) fn guest_reads_fifo(serial: &Mutex<Serial>) -> Vec<u8> {
    use rvmm_devices::BusDevice;
    const DATA: u64 = 0;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;
    let mut serial = serial.locked();
    let mut got = Vec::new();
    loop {
        let mut lsr = [0u8];
        serial.read(0, LSR, &mut lsr);
        if lsr[0] & LSR_DATA_READY == 0 {
            return got;
        }
        let mut byte = [0u8];
        serial.read(0, DATA, &mut byte);
        got.push(byte[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{PipeReader, PipeWriter, Write};

    use event_manager::{EventManager, SubscriberOps};

    type Shared = Arc<Mutex<StdinConsole>>;

    struct Fixture {
        manager: EventManager<Shared>,
        console: Shared,
        serial: Arc<Mutex<Serial>>,
        writer: Option<PipeWriter>,
        _reader: PipeReader,
    }

    fn fixture() -> Fixture {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(std::io::sink()))));
        let console = Arc::new(Mutex::new(
            StdinConsole::new(reader.as_raw_fd(), serial.clone()).expect("console"),
        ));
        let mut manager = EventManager::<Shared>::new().expect("epoll");
        manager.add_subscriber(console.clone());
        Fixture {
            manager,
            console,
            serial,
            writer: Some(writer),
            _reader: reader,
        }
    }

    impl Fixture {
        fn type_in(&mut self, bytes: &[u8]) {
            self.writer
                .as_mut()
                .expect("writer open")
                .write_all(bytes)
                .expect("written");
        }

        /// Runs the loop once without waiting; returns how many events it dispatched.
        fn turn(&mut self) -> usize {
            self.manager.run_with_timeout(0).expect("loop")
        }

        /// Runs the loop until it has nothing to do.
        fn settle(&mut self) {
            while self.turn() > 0 {}
        }

        /// The guest reads the receive FIFO empty, as the 8250 driver does on an interrupt.
        fn guest_reads(&self) -> Vec<u8> {
            guest_reads_fifo(&self.serial)
        }

        /// The guest reads whatever arrives until the loop has nothing more to give.
        fn guest_reads_all(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            loop {
                self.settle();
                let chunk = self.guest_reads();
                if chunk.is_empty() {
                    return got;
                }
                got.extend(chunk);
            }
        }

        fn pending(&self) -> usize {
            self.console.lock().unwrap().pending()
        }
    }

    fn lines(count: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| format!("line {i:04}\n").into_bytes())
            .collect()
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_as_the_guest_reads() {
        let mut f = fixture();
        let input = lines(100);
        f.type_in(&input);

        let got = f.guest_reads_all();

        assert_eq!(got, input);
    }

    #[test]
    fn rest_is_offered_when_the_guest_drains_the_fifo_not_on_a_timer() {
        let mut f = fixture();
        f.type_in(&[b'a'; 100]);
        f.settle();
        assert_eq!(f.guest_reads().len(), 64);

        // Draining raised the notifier: one turn of the loop refills the FIFO.
        assert!(f.turn() > 0);

        assert_eq!(f.guest_reads().len(), 36);
    }

    #[test]
    fn input_from_a_writer_that_hung_up_is_read_to_its_end() {
        let mut f = fixture();
        let input = lines(300);
        f.type_in(&input);
        f.writer = None;

        let got = f.guest_reads_all();

        assert_eq!(got, input);
    }

    #[test]
    fn input_is_not_read_past_the_limit_while_the_guest_does_not_read() {
        let mut f = fixture();
        f.type_in(&vec![b'x'; PENDING_LIMIT * 2]);

        f.settle();

        // The descriptor left the epoll set: the loop is idle although input is readable.
        assert_eq!(f.turn(), 0);
        assert!(f.pending() >= PENDING_LIMIT - 64);
        assert!(f.pending() < PENDING_LIMIT + READ_CHUNK);
    }

    #[test]
    fn reading_resumes_after_the_guest_takes_input() {
        let mut f = fixture();
        let input = vec![b'y'; PENDING_LIMIT * 3];
        f.type_in(&input);
        f.settle();
        assert_eq!(f.turn(), 0);

        let got = f.guest_reads_all();

        assert_eq!(got.len(), input.len());
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn input_longer_than_one_read_stays_on_the_descriptor_for_the_next() {
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        writer.write_all(&[b'x'; 300]).expect("written");
        let mut pending = Vec::new();

        let first = read_fd(reader.as_raw_fd(), &mut pending).expect("first read");
        let second = read_fd(reader.as_raw_fd(), &mut pending).expect("second read");

        assert_eq!((first, second, pending.len()), (256, 44, 300));
    }

    #[test]
    fn closed_writer_reads_as_end_of_file() {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(writer);
        let mut pending = Vec::new();

        assert_eq!(read_fd(reader.as_raw_fd(), &mut pending).expect("read"), 0);
    }
}
