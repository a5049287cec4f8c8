//! Sizes in bytes: parsing `512M`-style values and printing them back.

use std::fmt;

use super::{MemoryError, Result};

/// Binary units from the largest down, as (shift, suffix, long name).
const UNITS: [(u32, char, &str); 4] = [
    (40, 'T', "TiB"),
    (30, 'G', "GiB"),
    (20, 'M', "MiB"),
    (10, 'K', "KiB"),
];

/// Parses a size in bytes: decimal digits with an optional binary suffix `K`, `M`, `G` or `T`
/// (case-insensitive), e.g. `512M`, `1G`, `4096K`, `2147483648`.
///
/// Signs, spaces, fractions and other suffixes are rejected; a value above `u64::MAX` bytes is an
/// [`MemoryError::SizeOverflow`].
pub fn parse_size(s: &str) -> Result<u64> {
    let (digits, shift) = match s.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => {
            let unit = c.to_ascii_uppercase();
            let shift = UNITS
                .iter()
                .find(|(_, suffix, _)| *suffix == unit)
                .map(|(shift, _, _)| *shift)
                .ok_or_else(|| MemoryError::InvalidSize {
                    value: s.to_string(),
                })?;
            (s.get(..at).unwrap_or_default(), shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MemoryError::InvalidSize {
            value: s.to_string(),
        });
    }
    let overflow = || MemoryError::SizeOverflow {
        value: s.to_string(),
    };
    // Only ASCII digits are left, so the parse can fail on overflow alone.
    let number: u64 = digits.parse().map_err(|_| overflow())?;
    number.checked_mul(1u64 << shift).ok_or_else(overflow)
}

/// Formats a size in the largest suffix that divides it exactly (`512M`, `1G`, `4100K`, `123`),
/// the inverse of [`parse_size`].
pub(crate) struct DisplaySize(pub u64);

impl fmt::Display for DisplaySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match exact_unit(self.0) {
            Some((shift, suffix, _)) => write!(f, "{}{}", self.0 >> shift, suffix),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Formats a size for people in the largest binary unit that divides it exactly
/// (`512 MiB`, `4100 KiB`, `123 bytes`).
pub(crate) struct DisplayBytes(pub u64);

impl fmt::Display for DisplayBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match exact_unit(self.0) {
            Some((shift, _, name)) => write!(f, "{} {}", self.0 >> shift, name),
            None => write!(f, "{} bytes", self.0),
        }
    }
}

/// The largest unit that divides a non-zero `bytes` exactly.
fn exact_unit(bytes: u64) -> Option<(u32, char, &'static str)> {
    if bytes == 0 {
        return None;
    }
    UNITS
        .iter()
        .copied()
        .find(|(shift, _, _)| bytes.trailing_zeros() >= *shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_number_is_bytes() {
        assert_eq!(parse_size("2147483648").unwrap(), 2 << 30);
    }

    #[test]
    fn kilo_suffix_is_binary() {
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
    }

    #[test]
    fn mega_suffix_is_binary() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    }

    #[test]
    fn giga_suffix_is_binary() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    }

    #[test]
    fn tera_suffix_is_binary() {
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
    }

    #[test]
    fn suffix_is_case_insensitive() {
        assert_eq!(parse_size("512m").unwrap(), parse_size("512M").unwrap());
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("8k").unwrap(), 8 << 10);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
    }

    #[test]
    fn zero_parses_as_zero() {
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn empty_string_is_invalid() {
        assert!(matches!(
            parse_size(""),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn suffix_without_digits_is_invalid() {
        assert!(matches!(
            parse_size("M"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn unknown_suffix_is_invalid() {
        assert!(matches!(
            parse_size("512X"),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            parse_size("512MB"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn sign_is_invalid() {
        assert!(matches!(
            parse_size("+512M"),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            parse_size("-1"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn fraction_and_spaces_are_invalid() {
        assert!(matches!(
            parse_size("1.5G"),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            parse_size(" 1G"),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            parse_size("1 G"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn non_ascii_is_invalid() {
        assert!(matches!(
            parse_size("1Ǵ"),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            parse_size("１G"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn suffix_multiplication_overflow_is_reported() {
        assert!(matches!(
            parse_size("99999999999T"),
            Err(MemoryError::SizeOverflow { .. })
        ));
    }

    #[test]
    fn number_beyond_u64_is_reported_as_overflow() {
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(MemoryError::SizeOverflow { .. })
        ));
    }

    #[test]
    fn largest_u64_parses() {
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn display_size_uses_largest_exact_suffix() {
        assert_eq!(DisplaySize(512 << 20).to_string(), "512M");
        assert_eq!(DisplaySize(3 << 30).to_string(), "3G");
        assert_eq!(DisplaySize(4100 << 10).to_string(), "4100K");
        assert_eq!(DisplaySize(123).to_string(), "123");
        assert_eq!(DisplaySize(0).to_string(), "0");
    }

    #[test]
    fn display_size_round_trips_through_parse_size() {
        for bytes in [0, 1, 4096, 512 << 20, (1 << 40) + (1 << 20), u64::MAX] {
            assert_eq!(parse_size(&DisplaySize(bytes).to_string()).unwrap(), bytes);
        }
    }

    #[test]
    fn display_bytes_names_the_unit() {
        assert_eq!(DisplayBytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(DisplayBytes(2 << 40).to_string(), "2 TiB");
        assert_eq!(DisplayBytes(100).to_string(), "100 bytes");
    }
}
