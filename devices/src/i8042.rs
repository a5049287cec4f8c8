//! A minimal i8042 keyboard controller: enough for the reset line and for probing not to hang.
//!
//! No keyboard or mouse is attached and no interrupt is wired. The controller answers the few
//! commands a driver uses to find and set it up (read/write the command byte, self tests,
//! enable/disable ports); writing [`I8042_RESET_COMMAND`] to the command port pulses the reset
//! line, which asks the VMM to reset the VM. Everything else is ignored.
//!
//! One device covers both ports: registered at the data port (0x60) with length
//! [`I8042_PORT_COUNT`], the command/status port is [`I8042_COMMAND_OFFSET`].

use std::sync::Arc;

use log::debug;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::{BusDevice, VmEvents};

/// Bus range length when registered at the data port: 0x60..0x65.
pub const I8042_PORT_COUNT: u64 = 5;
/// Offset of the data port (0x60) from the registered base.
pub const I8042_DATA_OFFSET: u64 = 0;
/// Offset of the command (write) / status (read) port (0x64) from the registered base.
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// Command "pulse output line 0", the CPU reset line.
pub const I8042_RESET_COMMAND: u8 = 0xfe;

/// Status: output buffer full (a byte waits at the data port).
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Status: system flag (mirrors the command byte's system flag, set once POST passed).
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
/// Status: the last write went to the command port.
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;

/// Command byte: keyboard interrupt enabled.
const CTR_KBD_INTERRUPT: u8 = 1 << 0;
/// Command byte: system flag.
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
/// Command byte: keyboard port disabled.
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// Command byte: aux (mouse) port disabled.
const CTR_AUX_DISABLED: u8 = 1 << 5;
/// Command byte: scan code set 1 translation.
const CTR_TRANSLATE: u8 = 1 << 6;
/// Command byte as a BIOS leaves it.
const CTR_DEFAULT: u8 = CTR_TRANSLATE | CTR_SYSTEM_FLAG | CTR_KBD_INTERRUPT;

/// Read the command byte.
const CMD_READ_CTR: u8 = 0x20;
/// Write the command byte (the next data port write).
const CMD_WRITE_CTR: u8 = 0x60;
/// Disable the aux port.
const CMD_AUX_DISABLE: u8 = 0xa7;
/// Enable the aux port.
const CMD_AUX_ENABLE: u8 = 0xa8;
/// Controller self test.
const CMD_SELF_TEST: u8 = 0xaa;
/// Keyboard interface test.
const CMD_KBD_TEST: u8 = 0xab;
/// Disable the keyboard port.
const CMD_KBD_DISABLE: u8 = 0xad;
/// Enable the keyboard port.
const CMD_KBD_ENABLE: u8 = 0xae;

/// Self test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Interface test passed.
const INTERFACE_TEST_OK: u8 = 0x00;

/// The i8042 controller.
pub struct I8042 {
    events: Arc<dyn VmEvents>,
    /// Controller command byte.
    ctr: u8,
    /// The byte waiting at the data port, if any.
    output: Option<u8>,
    /// The next data port write is the new command byte.
    ctr_write_pending: bool,
    last_was_command: bool,
    throttle: LogThrottle,
}

impl I8042 {
    /// Creates the controller; a reset request goes to `events`.
    pub fn new(events: Arc<dyn VmEvents>) -> Self {
        Self {
            events,
            ctr: CTR_DEFAULT,
            output: None,
            ctr_write_pending: false,
            last_was_command: false,
            throttle: LogThrottle::default(),
        }
    }

    /// Puts the controller back to its power-on state (a reset of the machine).
    pub fn reset(&mut self) {
        self.ctr = CTR_DEFAULT;
        self.output = None;
        self.ctr_write_pending = false;
        self.last_was_command = false;
    }

    fn status(&self) -> u8 {
        let mut status = 0;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.ctr_write_pending = false;
        match command {
            CMD_READ_CTR => self.output = Some(self.ctr),
            CMD_WRITE_CTR => self.ctr_write_pending = true,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_OK),
            CMD_KBD_TEST => self.output = Some(INTERFACE_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            I8042_RESET_COMMAND => {
                debug!("i8042: reset line pulsed");
                self.events.reset();
            }
            other => debug!("i8042: ignored command {other:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        if std::mem::take(&mut self.ctr_write_pending) {
            self.ctr = value;
        } else {
            debug!("i8042: no keyboard attached, dropped data byte {value:#04x}");
        }
    }

    /// Checks an access is one byte wide, logging it otherwise.
    fn is_byte_access(&mut self, offset: u64, len: usize, what: &str) -> bool {
        if len != 1 {
            warn_throttled!(
                self.throttle,
                "i8042: ignored {what} of {len} bytes at offset {offset:#x}"
            );
        }
        len == 1
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.is_byte_access(offset, data.len(), "read") {
            return;
        }
        let value = match offset {
            I8042_DATA_OFFSET => self.output.take().unwrap_or(0),
            I8042_COMMAND_OFFSET => self.status(),
            _ => 0,
        };
        if let Some(byte) = data.first_mut() {
            *byte = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if !self.is_byte_access(offset, data.len(), "write") {
            return;
        }
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            I8042_DATA_OFFSET => self.data(value),
            I8042_COMMAND_OFFSET => self.command(value),
            _ => debug!("i8042: ignored write of {value:#04x} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingVmEvents;

    /// Status: input buffer full (the controller has not taken the last write yet).
    const STATUS_INPUT_FULL: u8 = 1 << 1;

    fn fixture() -> (I8042, Arc<RecordingVmEvents>) {
        let events = Arc::new(RecordingVmEvents::default());
        (I8042::new(events.clone()), events)
    }

    fn read_port(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0xffu8];
        dev.read(0, offset, &mut data);
        data[0]
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut dev, events) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[I8042_RESET_COMMAND]);

        assert_eq!(events.resets(), 1);
        assert_eq!(events.power_offs(), 0);
    }

    #[test]
    fn other_commands_do_not_request_reset() {
        let (mut dev, events) = fixture();

        for command in (0..=u8::MAX).filter(|&c| c != I8042_RESET_COMMAND) {
            dev.write(0, I8042_COMMAND_OFFSET, &[command]);
        }

        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn reset_value_on_other_ports_does_not_request_reset() {
        let (mut dev, events) = fixture();

        for offset in (0..I8042_PORT_COUNT).filter(|&o| o != I8042_COMMAND_OFFSET) {
            dev.write(0, offset, &[I8042_RESET_COMMAND]);
        }

        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn wide_reset_write_is_ignored() {
        let (mut dev, events) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[I8042_RESET_COMMAND, 0]);

        assert_eq!(events.resets(), 0);
    }

    #[test]
    fn status_reports_both_buffers_empty() {
        let (mut dev, _) = fixture();

        let status = read_port(&mut dev, I8042_COMMAND_OFFSET);

        assert_eq!(status & (STATUS_OUTPUT_FULL | STATUS_INPUT_FULL), 0);
        assert_ne!(status & STATUS_SYSTEM_FLAG, 0);
    }

    #[test]
    fn data_port_reads_zero_when_nothing_is_pending() {
        let (mut dev, _) = fixture();

        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), 0);
    }

    #[test]
    fn read_command_byte_puts_it_in_the_output_buffer() {
        let (mut dev, _) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);

        assert_ne!(
            read_port(&mut dev, I8042_COMMAND_OFFSET) & STATUS_OUTPUT_FULL,
            0
        );
        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), CTR_DEFAULT);
        assert_eq!(
            read_port(&mut dev, I8042_COMMAND_OFFSET) & STATUS_OUTPUT_FULL,
            0
        );
    }

    #[test]
    fn write_command_byte_takes_the_next_data_byte() {
        let (mut dev, _) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(0, I8042_DATA_OFFSET, &[0x30]);
        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);

        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), 0x30);
    }

    #[test]
    fn data_byte_without_pending_command_leaves_command_byte() {
        let (mut dev, _) = fixture();

        dev.write(0, I8042_DATA_OFFSET, &[0xff]);
        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);

        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), CTR_DEFAULT);
    }

    #[test]
    fn self_test_answers_pass() {
        let (mut dev, _) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_SELF_TEST]);

        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), SELF_TEST_OK);
    }

    #[test]
    fn keyboard_disable_sets_the_command_byte_bit() {
        let (mut dev, _) = fixture();

        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_KBD_DISABLE]);
        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);

        assert_ne!(read_port(&mut dev, I8042_DATA_OFFSET) & CTR_KBD_DISABLED, 0);
    }

    #[test]
    fn wide_read_is_ignored_and_reads_zero() {
        let (mut dev, _) = fixture();
        dev.write(0, I8042_COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let mut data = [0xffu8; 2];

        dev.read(0, I8042_DATA_OFFSET, &mut data);

        assert_eq!(data, [0, 0]);
        assert_eq!(read_port(&mut dev, I8042_DATA_OFFSET), SELF_TEST_OK);
    }
}
