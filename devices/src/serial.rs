//! A 16550A UART (the guest console) on port I/O.
//!
//! The register model is vm-superio's [`vm_superio::Serial`]; this module puts it on the [`Bus`]
//! (8 byte-wide ports), routes its interrupt through our [`Interrupt`] trait and gives the VMM's
//! event loop a flow-controlled input path:
//!
//! 1. the event loop reads host input (stdin) and offers it with [`Serial::enqueue_input`], which
//!    takes what fits in the 64-byte receive FIFO and says how much that was;
//! 2. when not everything was taken, the event loop stops reading host input and keeps the rest;
//! 3. the optional input-drained notifier ([`Serial::set_input_drained`]) fires when the guest has
//!    read the FIFO empty, and the event loop offers the rest again.
//!
//! [`Bus`]: crate::Bus

use std::io::{self, Write};
use std::sync::Arc;

use log::debug;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::{BusDevice, Interrupt};

/// Number of I/O ports a 16550 decodes (the bus range length).
pub const SERIAL_PORT_COUNT: u64 = 8;

/// Receiver buffer (read) / transmitter holding register (write), when LCR.DLAB is clear.
const DATA_OFFSET: u8 = 0;
/// Modem control register.
const MCR_OFFSET: u8 = 4;
/// Line status register.
const LSR_OFFSET: u8 = 5;
/// MCR: loopback mode (the receive line is disconnected from the outside world).
const MCR_LOOP: u8 = 1 << 4;
/// LSR: data ready (the receive FIFO holds at least one byte).
const LSR_DATA_READY: u8 = 1 << 0;

/// Adapter from our [`Interrupt`] to vm-superio's [`Trigger`], so vm-superio devices can raise
/// the interrupt lines the VMM hands out.
pub struct InterruptTrigger(Arc<dyn Interrupt>);

impl InterruptTrigger {
    /// Wraps `interrupt`.
    pub fn new(interrupt: Arc<dyn Interrupt>) -> Self {
        Self(interrupt)
    }
}

impl Trigger for InterruptTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The UART register model with our trigger and a boxed output sink.
type Uart = vm_superio::Serial<InterruptTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A UART: guest output goes to a host writer, host input is queued by the event loop.
pub struct Serial {
    uart: Uart,
    input_drained: Option<Arc<dyn Interrupt>>,
    throttle: LogThrottle,
}

impl Serial {
    /// Creates a UART raising `interrupt` and writing the guest's output to `out` (each byte is
    /// written and flushed as the guest sends it).
    pub fn new(interrupt: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::new(InterruptTrigger::new(interrupt), out),
            input_drained: None,
            throttle: LogThrottle::default(),
        }
    }

    /// Sets the notifier raised when the guest reads the last byte out of the receive FIFO: the
    /// moment to offer held-back input again. It may also be raised when nothing was held back.
    pub fn set_input_drained(&mut self, notifier: Arc<dyn Interrupt>) {
        self.input_drained = Some(notifier);
    }

    /// Puts the UART's registers back to their power-on values for a reset of the machine:
    /// 9600 baud (divisor 12), 8N1, interrupts disabled, OUT2 set, scratch cleared. The host side
    /// (output writer, input notifier) stays connected.
    pub fn reset_registers(&mut self) {
        const DLL: u8 = 0;
        const DLM: u8 = 1;
        const IER: u8 = 1;
        const LCR: u8 = 3;
        const SCR: u8 = 7;
        const LCR_DLAB: u8 = 1 << 7;
        const LCR_8N1: u8 = 0x03;
        const MCR_OUT2: u8 = 1 << 3;
        const DIVISOR_9600: u8 = 12;
        for (reg, value) in [
            (LCR, LCR_DLAB),
            (DLL, DIVISOR_9600),
            (DLM, 0),
            (LCR, LCR_8N1),
            (IER, 0),
            (MCR_OFFSET, MCR_OUT2),
            (SCR, 0),
        ] {
            if let Err(e) = self.uart.write(reg, value) {
                self.log_uart_error(&e);
            }
        }
    }

    /// How many more input bytes the receive FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Offers host input to the guest and returns how many bytes of `input` were taken (from the
    /// front). Fewer than `input.len()` means the FIFO is full: keep the rest and offer it again
    /// once the input-drained notifier fires.
    ///
    /// While the guest has the UART in loopback mode (drivers do so briefly while probing), the
    /// receive line is disconnected as on real hardware: the input is dropped and reported as
    /// taken, so the caller never waits on a FIFO that only the loopback can fill.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if input.is_empty() {
            return 0;
        }
        if self.uart.read(MCR_OFFSET) & MCR_LOOP != 0 {
            debug!(
                "serial: dropped {} input bytes while in loopback mode",
                input.len()
            );
            return input.len();
        }
        // vm-superio takes exactly this many bytes (it queues before raising the interrupt, so
        // the count holds even when raising the interrupt fails).
        let taken = input.len().min(self.uart.fifo_capacity());
        if taken == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                self.log_uart_error(&e);
                taken
            }
        }
    }

    fn log_uart_error(&mut self, e: &UartError<io::Error>) {
        match e {
            UartError::Trigger(e) => {
                warn_throttled!(self.throttle, "serial: failed to raise the interrupt: {e}")
            }
            UartError::IOError(e) => {
                warn_throttled!(self.throttle, "serial: output byte lost: {e}")
            }
            UartError::FullFifo => {
                warn_throttled!(self.throttle, "serial: input dropped, receive FIFO full")
            }
        }
    }

    /// Decodes an access: the register offset if `offset` is a UART port and `len` is one byte.
    fn register(&mut self, offset: u64, len: usize, what: &str) -> Option<u8> {
        let reg = u8::try_from(offset)
            .ok()
            .filter(|&r| u64::from(r) < SERIAL_PORT_COUNT);
        match reg {
            Some(reg) if len == 1 => Some(reg),
            _ => {
                warn_throttled!(
                    self.throttle,
                    "serial: ignored {what} of {len} bytes at offset {offset:#x}"
                );
                None
            }
        }
    }

    fn notify_input_drained(&mut self) {
        if let Some(notifier) = &self.input_drained {
            if let Err(e) = notifier.trigger() {
                warn_throttled!(
                    self.throttle,
                    "serial: failed to signal that the input FIFO drained: {e}"
                );
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(reg) = self.register(offset, data.len(), "read") else {
            return;
        };
        let capacity_before = self.uart.fifo_capacity();
        let value = self.uart.read(reg);
        if let Some(byte) = data.first_mut() {
            *byte = value;
        }
        // Edge: this read took a byte out of the FIFO and left it empty.
        if reg == DATA_OFFSET
            && self.uart.fifo_capacity() > capacity_before
            && self.uart.read(LSR_OFFSET) & LSR_DATA_READY == 0
        {
            self.notify_input_drained();
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(reg) = self.register(offset, data.len(), "write") else {
            return;
        };
        let Some(&value) = data.first() else {
            return;
        };
        if let Err(e) = self.uart.write(reg, value) {
            self.log_uart_error(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 1 << 0;
    const IER_THRE: u8 = 1 << 1;
    const LCR_DLAB: u8 = 1 << 7;
    const FIFO_SIZE: usize = 64;

    #[test]
    fn reset_registers_restores_power_on_values() {
        let (mut serial, _) = fixture_for_reset();
        serial.write(0, IER, &[IER_RDA | IER_THRE]);
        serial.write(0, LCR, &[LCR_DLAB | 0x1f]);
        serial.write(0, MCR, &[MCR_LOOP]);

        serial.reset_registers();

        let mut byte = [0u8];
        serial.read(0, IER, &mut byte);
        assert_eq!(byte[0], 0);
        serial.read(0, LCR, &mut byte);
        assert_eq!(byte[0], 0x03);
        serial.read(0, MCR, &mut byte);
        assert_eq!(byte[0], 0x08);
    }

    fn fixture_for_reset() -> (Serial, SharedBuffer) {
        let out = SharedBuffer::default();
        let serial = Serial::new(
            Arc::new(RecordingInterrupt::default()),
            Box::new(out.clone()),
        );
        (serial, out)
    }

    /// A writer the test can look into.
    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl SharedBuffer {
        fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose host end is gone.
    struct BrokenWriter;

    impl Write for BrokenWriter {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    struct Fixture {
        serial: Serial,
        out: SharedBuffer,
        irq: Arc<RecordingInterrupt>,
        drained: Arc<RecordingInterrupt>,
    }

    fn fixture() -> Fixture {
        let out = SharedBuffer::default();
        let irq = Arc::new(RecordingInterrupt::default());
        let drained = Arc::new(RecordingInterrupt::default());
        let mut serial = Serial::new(irq.clone(), Box::new(out.clone()));
        serial.set_input_drained(drained.clone());
        Fixture {
            serial,
            out,
            irq,
            drained,
        }
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0xffu8];
        serial.read(0, offset, &mut data);
        data[0]
    }

    fn write_reg(serial: &mut Serial, offset: u64, value: u8) {
        serial.write(0, offset, &[value]);
    }

    #[test]
    fn transmitted_byte_reaches_writer() {
        let mut f = fixture();

        write_reg(&mut f.serial, 0, b'A');
        write_reg(&mut f.serial, 0, b'\n');

        assert_eq!(f.out.contents(), b"A\n");
    }

    #[test]
    fn transmit_raises_interrupt_when_ier_enables_it() {
        let mut f = fixture();
        write_reg(&mut f.serial, IER, IER_THRE);
        read_reg(&mut f.serial, IIR); // Acknowledge the THRE raised by enabling it.
        let before = f.irq.count();

        write_reg(&mut f.serial, 0, b'x');

        assert_eq!(f.irq.count(), before + 1);
    }

    #[test]
    fn transmit_raises_no_interrupt_when_ier_is_clear() {
        let mut f = fixture();

        write_reg(&mut f.serial, 0, b'x');

        assert_eq!(f.irq.count(), 0);
    }

    #[test]
    fn divisor_latch_write_does_not_transmit() {
        let mut f = fixture();
        write_reg(&mut f.serial, LCR, LCR_DLAB);

        write_reg(&mut f.serial, 0, 0x0c);

        assert!(f.out.contents().is_empty());
    }

    #[test]
    fn output_failure_does_not_stop_the_uart() {
        let irq = Arc::new(RecordingInterrupt::default());
        let mut serial = Serial::new(irq.clone(), Box::new(BrokenWriter));
        write_reg(&mut serial, IER, IER_THRE);
        read_reg(&mut serial, IIR);

        write_reg(&mut serial, 0, b'x');

        assert_eq!(irq.count(), 2);
        assert_ne!(read_reg(&mut serial, LSR) & (1 << 5), 0);
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let mut f = fixture();

        assert_eq!(f.serial.enqueue_input(b"hi"), 2);

        assert_ne!(read_reg(&mut f.serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut f.serial, 0), b'h');
        assert_eq!(read_reg(&mut f.serial, 0), b'i');
        assert_eq!(read_reg(&mut f.serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_raises_interrupt_when_ier_enables_it() {
        let mut f = fixture();
        write_reg(&mut f.serial, IER, IER_RDA);

        f.serial.enqueue_input(b"k");

        assert_eq!(f.irq.count(), 1);
    }

    #[test]
    fn input_raises_no_interrupt_when_ier_is_clear() {
        let mut f = fixture();

        f.serial.enqueue_input(b"k");

        assert_eq!(f.irq.count(), 0);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_not_taken() {
        let mut f = fixture();
        let input = [b'z'; FIFO_SIZE + 10];

        assert_eq!(f.serial.enqueue_input(&input), FIFO_SIZE);
        assert_eq!(f.serial.input_capacity(), 0);
        assert_eq!(f.serial.enqueue_input(&input), 0);
    }

    #[test]
    fn empty_input_takes_nothing() {
        let mut f = fixture();

        assert_eq!(f.serial.enqueue_input(&[]), 0);
        assert_eq!(read_reg(&mut f.serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn reading_the_last_input_byte_notifies_input_drained() {
        let mut f = fixture();
        f.serial.enqueue_input(b"ab");

        read_reg(&mut f.serial, 0);
        assert_eq!(f.drained.count(), 0);
        read_reg(&mut f.serial, 0);

        assert_eq!(f.drained.count(), 1);
    }

    #[test]
    fn reading_an_empty_rbr_does_not_notify_input_drained() {
        let mut f = fixture();

        read_reg(&mut f.serial, 0);

        assert_eq!(f.drained.count(), 0);
    }

    #[test]
    fn input_in_loopback_mode_is_dropped_as_taken() {
        let mut f = fixture();
        write_reg(&mut f.serial, MCR, MCR_LOOP);

        assert_eq!(f.serial.enqueue_input(b"lost"), 4);

        assert_eq!(read_reg(&mut f.serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn wide_read_is_ignored_and_reads_zero() {
        let mut f = fixture();
        f.serial.enqueue_input(b"q");
        let mut data = [0xffu8; 2];

        f.serial.read(0, 0, &mut data);

        assert_eq!(data, [0, 0]);
        assert_eq!(read_reg(&mut f.serial, 0), b'q');
    }

    #[test]
    fn wide_write_is_ignored() {
        let mut f = fixture();

        f.serial.write(0, 0, b"ab");

        assert!(f.out.contents().is_empty());
    }

    #[test]
    fn access_past_the_ports_is_ignored() {
        let mut f = fixture();

        f.serial.write(0, SERIAL_PORT_COUNT, b"a");

        assert_eq!(read_reg(&mut f.serial, SERIAL_PORT_COUNT), 0);
        assert_eq!(read_reg(&mut f.serial, u64::MAX), 0);
        assert!(f.out.contents().is_empty());
    }
}
