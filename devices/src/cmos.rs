//! A minimal MC146818 RTC / CMOS: the wall clock at boot and 128 bytes of NVRAM.
//!
//! Two ports: the index register at offset [`CMOS_INDEX_OFFSET`] (0x70; bit 7 of a write is the
//! NMI-disable bit and is masked off) and the data register at [`CMOS_DATA_OFFSET`] (0x71).
//!
//! The time registers read the host's UTC clock at the moment of the read, in BCD, 24-hour mode,
//! with the century at [`CMOS_CENTURY_INDEX`] (the FADT `CENTURY` field). The model has no
//! interrupt line and no update cycle: status A never reports an update in progress, status B is
//! fixed to 24-hour BCD, status C reports no interrupt flags and status D reports valid RAM and
//! time. Guest writes to the time registers and to status B..D are ignored (the guest cannot set
//! the clock); status A keeps its writable bits, and every other index is plain NVRAM.

use std::time::{SystemTime, UNIX_EPOCH};

use log::debug;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::BusDevice;

/// Bus range length: 0x70..0x72.
pub const CMOS_PORT_COUNT: u64 = 2;
/// Offset of the index register (0x70) from the base.
pub const CMOS_INDEX_OFFSET: u64 = 0;
/// Offset of the data register (0x71) from the base.
pub const CMOS_DATA_OFFSET: u64 = 1;
/// CMOS index of the century register (for the FADT `CENTURY` field).
pub const CMOS_CENTURY_INDEX: u8 = 0x32;

/// Seconds.
const REG_SECONDS: u8 = 0x00;
/// Minutes.
const REG_MINUTES: u8 = 0x02;
/// Hours.
const REG_HOURS: u8 = 0x04;
/// Day of the week, 1 = Sunday.
const REG_DAY_OF_WEEK: u8 = 0x06;
/// Day of the month.
const REG_DAY_OF_MONTH: u8 = 0x07;
/// Month.
const REG_MONTH: u8 = 0x08;
/// Year within the century.
const REG_YEAR: u8 = 0x09;
/// Status register A: update in progress, divider, periodic rate.
const REG_STATUS_A: u8 = 0x0a;
/// Status register B: data format and interrupt enables.
const REG_STATUS_B: u8 = 0x0b;
/// Status register C: interrupt flags.
const REG_STATUS_C: u8 = 0x0c;
/// Status register D: valid RAM and time.
const REG_STATUS_D: u8 = 0x0d;

/// Status A: update in progress (read-only).
const STATUS_A_UIP: u8 = 1 << 7;
/// Status A at power-on: 32.768 kHz time base (divider 010), 1024 Hz periodic rate (0110).
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode; the binary-mode bit (2) is clear, so the data format is BCD.
const STATUS_B_24_HOUR: u8 = 1 << 1;
/// Status D: valid RAM and time.
const STATUS_D_VALID: u8 = 1 << 7;

/// The index register selects one of 128 bytes; bit 7 is the NMI-disable bit.
const INDEX_MASK: u8 = 0x7f;
/// Bytes of NVRAM behind the index register.
const NVRAM_SIZE: usize = 128;

const SECONDS_PER_DAY: u64 = 86_400;
/// 9999-12-31T23:59:59Z, the last moment the four BCD digits of century and year can show.
const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// The source of wall-clock time, injectable for tests.
pub trait WallClock: Send {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The host's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A UTC calendar time as the RTC shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RtcTime {
    second: u64,
    minute: u64,
    hour: u64,
    /// 1 = Sunday .. 7 = Saturday.
    day_of_week: u64,
    day_of_month: u64,
    month: u64,
    year: u64,
}

impl RtcTime {
    /// Converts seconds since the Unix epoch (clamped to year 9999) to the civil UTC calendar.
    fn from_unix_seconds(seconds: u64) -> Self {
        let seconds = seconds.min(MAX_UNIX_SECONDS);
        let days = seconds / SECONDS_PER_DAY;
        let time_of_day = seconds % SECONDS_PER_DAY;
        let (year, month, day_of_month) = civil_from_days(days);
        Self {
            second: time_of_day % 60,
            minute: time_of_day / 60 % 60,
            hour: time_of_day / 3600,
            // 1970-01-01 was a Thursday (5 when Sunday is 1).
            day_of_week: (days + 4) % 7 + 1,
            day_of_month,
            month,
            year,
        }
    }
}

/// Splits a count of days since 1970-01-01 into (year, month 1..=12, day 1..=31) of the proleptic
/// Gregorian calendar. Counts in 400-year eras of 146097 days, with years starting on March 1st
/// so that the leap day is the last day of a year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Days from 0000-03-01 to 1970-01-01.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Month counted from March: 0 = March .. 11 = February.
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// The two low decimal digits of `value` in BCD.
fn bcd(value: u64) -> u8 {
    let tens = (value / 10 % 10) as u8;
    let ones = (value % 10) as u8;
    (tens << 4) | ones
}

/// The RTC / CMOS device.
pub struct Cmos {
    clock: Box<dyn WallClock>,
    /// Selected register, already masked to 7 bits.
    index: u8,
    nvram: [u8; NVRAM_SIZE],
    throttle: LogThrottle,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// Creates the device reading the host's clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemWallClock))
    }

    /// Creates the device reading `clock`.
    pub fn with_clock(clock: Box<dyn WallClock>) -> Self {
        let mut nvram = [0; NVRAM_SIZE];
        if let Some(status_a) = nvram.get_mut(usize::from(REG_STATUS_A)) {
            *status_a = STATUS_A_DEFAULT;
        }
        Self {
            clock,
            index: 0,
            nvram,
            throttle: LogThrottle::default(),
        }
    }

    fn now(&mut self) -> RtcTime {
        let seconds = match self.clock.now().duration_since(UNIX_EPOCH) {
            Ok(since_epoch) => since_epoch.as_secs(),
            Err(e) => {
                warn_throttled!(
                    self.throttle,
                    "cmos: host clock is {:?} before the Unix epoch, showing the epoch",
                    e.duration()
                );
                0
            }
        };
        RtcTime::from_unix_seconds(seconds)
    }

    fn nvram_byte(&self, index: u8) -> u8 {
        self.nvram.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn read_data(&mut self) -> u8 {
        match self.index {
            REG_SECONDS => bcd(self.now().second),
            REG_MINUTES => bcd(self.now().minute),
            REG_HOURS => bcd(self.now().hour),
            REG_DAY_OF_WEEK => bcd(self.now().day_of_week),
            REG_DAY_OF_MONTH => bcd(self.now().day_of_month),
            REG_MONTH => bcd(self.now().month),
            REG_YEAR => bcd(self.now().year % 100),
            CMOS_CENTURY_INDEX => bcd(self.now().year / 100),
            REG_STATUS_A => self.nvram_byte(REG_STATUS_A) & !STATUS_A_UIP,
            REG_STATUS_B => STATUS_B_24_HOUR,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VALID,
            index => self.nvram_byte(index),
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | CMOS_CENTURY_INDEX | REG_STATUS_B | REG_STATUS_C
            | REG_STATUS_D => {
                debug!(
                    "cmos: ignored write of {value:#04x} to read-only register {:#04x}",
                    self.index
                );
            }
            REG_STATUS_A => self.set_nvram_byte(REG_STATUS_A, value & !STATUS_A_UIP),
            index => self.set_nvram_byte(index, value),
        }
    }

    fn set_nvram_byte(&mut self, index: u8, value: u8) {
        if let Some(byte) = self.nvram.get_mut(usize::from(index)) {
            *byte = value;
        }
    }

    /// Checks an access is one byte wide, logging it otherwise.
    fn is_byte_access(&mut self, offset: u64, len: usize, what: &str) -> bool {
        if len != 1 {
            warn_throttled!(
                self.throttle,
                "cmos: ignored {what} of {len} bytes at offset {offset:#x}"
            );
        }
        len == 1
    }
}

impl BusDevice for Cmos {
    /// The index register is write-only and reads zero.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.is_byte_access(offset, data.len(), "read") {
            return;
        }
        let value = match offset {
            CMOS_DATA_OFFSET => self.read_data(),
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
            CMOS_INDEX_OFFSET => self.index = value & INDEX_MASK,
            CMOS_DATA_OFFSET => self.write_data(value),
            _ => debug!("cmos: ignored write of {value:#04x} at offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A clock stopped at a given number of seconds after (or before, if negative) the epoch.
    struct FixedClock(i64);

    impl WallClock for FixedClock {
        fn now(&self) -> SystemTime {
            let offset = Duration::from_secs(self.0.unsigned_abs());
            if self.0 >= 0 {
                UNIX_EPOCH + offset
            } else {
                UNIX_EPOCH - offset
            }
        }
    }

    /// 2024-02-29T13:45:07Z, a Thursday.
    const LEAP_DAY_AFTERNOON: i64 = 1_709_214_307;

    fn cmos_at(seconds: i64) -> Cmos {
        Cmos::with_clock(Box::new(FixedClock(seconds)))
    }

    fn read_register(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, CMOS_INDEX_OFFSET, &[index]);
        let mut data = [0xffu8];
        cmos.read(0, CMOS_DATA_OFFSET, &mut data);
        data[0]
    }

    fn write_register(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, CMOS_INDEX_OFFSET, &[index]);
        cmos.write(0, CMOS_DATA_OFFSET, &[value]);
    }

    fn date_time(cmos: &mut Cmos) -> [u8; 8] {
        [
            CMOS_CENTURY_INDEX,
            REG_YEAR,
            REG_MONTH,
            REG_DAY_OF_MONTH,
            REG_DAY_OF_WEEK,
            REG_HOURS,
            REG_MINUTES,
            REG_SECONDS,
        ]
        .map(|index| read_register(cmos, index))
    }

    #[test]
    fn time_registers_show_the_clock_in_bcd() {
        let mut cmos = cmos_at(LEAP_DAY_AFTERNOON);

        assert_eq!(
            date_time(&mut cmos),
            [0x20, 0x24, 0x02, 0x29, 0x05, 0x13, 0x45, 0x07]
        );
    }

    #[test]
    fn century_rolls_over_at_year_2000() {
        let mut cmos = cmos_at(946_684_799);
        assert_eq!(
            date_time(&mut cmos),
            [0x19, 0x99, 0x12, 0x31, 0x06, 0x23, 0x59, 0x59]
        );

        let mut cmos = cmos_at(946_684_800);
        assert_eq!(
            date_time(&mut cmos),
            [0x20, 0x00, 0x01, 0x01, 0x07, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn clock_before_the_epoch_shows_the_epoch() {
        let mut cmos = cmos_at(-3600);

        assert_eq!(
            date_time(&mut cmos),
            [0x19, 0x70, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn clock_past_year_9999_shows_its_last_second() {
        let mut cmos = cmos_at(300_000_000_000);

        assert_eq!(
            date_time(&mut cmos),
            [0x99, 0x99, 0x12, 0x31, 0x06, 0x23, 0x59, 0x59]
        );
    }

    #[test]
    fn calendar_matches_known_days() {
        // (days since the epoch, (year, month, day)), across leap and century rules.
        let known = [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (10_956, (1999, 12, 31)),
            (11_016, (2000, 2, 29)),
            (19_782, (2024, 2, 29)),
            (47_540, (2100, 2, 28)),
            (47_541, (2100, 3, 1)),
        ];

        for (days, date) in known {
            assert_eq!(civil_from_days(days), date, "day {days}");
        }
    }

    #[test]
    fn index_bit_7_is_masked() {
        let mut cmos = cmos_at(0);
        write_register(&mut cmos, 0x80 | 0x40, 0xa5);

        assert_eq!(read_register(&mut cmos, 0x40), 0xa5);
    }

    #[test]
    fn nvram_byte_round_trips() {
        let mut cmos = cmos_at(0);

        write_register(&mut cmos, 0x7f, 0x5a);

        assert_eq!(read_register(&mut cmos, 0x7f), 0x5a);
    }

    #[test]
    fn time_register_writes_are_ignored() {
        let mut cmos = cmos_at(LEAP_DAY_AFTERNOON);

        write_register(&mut cmos, REG_HOURS, 0x01);

        assert_eq!(read_register(&mut cmos, REG_HOURS), 0x13);
    }

    #[test]
    fn status_a_never_reports_update_in_progress() {
        let mut cmos = cmos_at(0);
        assert_eq!(read_register(&mut cmos, REG_STATUS_A), STATUS_A_DEFAULT);

        write_register(&mut cmos, REG_STATUS_A, 0xff);

        assert_eq!(read_register(&mut cmos, REG_STATUS_A), 0x7f);
    }

    #[test]
    fn status_b_reports_24_hour_bcd() {
        let mut cmos = cmos_at(0);

        write_register(&mut cmos, REG_STATUS_B, 0xff);

        assert_eq!(read_register(&mut cmos, REG_STATUS_B), STATUS_B_24_HOUR);
    }

    #[test]
    fn status_d_reports_valid_ram_and_time() {
        let mut cmos = cmos_at(0);

        assert_eq!(read_register(&mut cmos, REG_STATUS_D), STATUS_D_VALID);
    }

    #[test]
    fn index_register_reads_zero() {
        let mut cmos = cmos_at(0);
        cmos.write(0, CMOS_INDEX_OFFSET, &[0x10]);
        let mut data = [0xffu8];

        cmos.read(0, CMOS_INDEX_OFFSET, &mut data);

        assert_eq!(data, [0]);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut cmos = cmos_at(0);
        write_register(&mut cmos, 0x20, 0x11);

        cmos.write(0, CMOS_INDEX_OFFSET, &[0x21, 0]);
        cmos.write(0, CMOS_DATA_OFFSET, &[0x22, 0]);
        let mut data = [0xffu8; 2];
        cmos.read(0, CMOS_DATA_OFFSET, &mut data);

        assert_eq!(data, [0, 0]);
        assert_eq!(read_register(&mut cmos, 0x20), 0x11);
    }
}
