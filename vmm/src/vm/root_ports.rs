//! `--root-ports N[,mmio64=SIZE]`: how many hotplug root ports the VM has and, optionally, the
//! 64-bit window each one reserves for the BARs of the devices it will hold.

use std::fmt;

use crate::memory::parse_size;
use crate::vm::config::{DEFAULT_ROOT_PORTS, MAX_ROOT_PORTS};

/// Smallest 64-bit window a root port can have (the bridge window granularity).
const MIN_MMIO64_PER_PORT: u64 = 1 << 20;

/// `--root-ports N[,mmio64=SIZE]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortsArg {
    /// Number of root ports, 1 to [`MAX_ROOT_PORTS`].
    pub count: u8,
    /// `mmio64=`: every port's 64-bit prefetchable window (a power of two of at least 1 MiB);
    /// `None` shares the 64-bit window out evenly.
    pub mmio64: Option<u64>,
}

impl Default for RootPortsArg {
    fn default() -> Self {
        Self {
            count: DEFAULT_ROOT_PORTS,
            mmio64: None,
        }
    }
}

impl fmt::Display for RootPortsArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count)?;
        if let Some(size) = self.mmio64 {
            write!(f, ",mmio64={size}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for RootPortsArg {
    type Err = String;

    /// Parses `N` or `N,mmio64=SIZE` (SIZE as `64G`, a power of two of at least 1M).
    fn from_str(s: &str) -> Result<Self, String> {
        let (count, rest) = match s.split_once(',') {
            Some((count, rest)) => (count, Some(rest)),
            None => (s, None),
        };
        let count = match count.parse::<u64>() {
            Ok(n) if (1..=u64::from(MAX_ROOT_PORTS)).contains(&n) => n as u8,
            Ok(n) => return Err(format!("{n} is not in 1..={MAX_ROOT_PORTS}")),
            Err(_) => {
                return Err(format!(
                    "\"{count}\" is not a number of root ports; give N[,mmio64=SIZE], e.g. 8 or \
                     8,mmio64=64G"
                ))
            }
        };
        let mmio64 = match rest {
            None => None,
            Some(option) => {
                let size = option.strip_prefix("mmio64=").ok_or_else(|| {
                    format!("unknown option \"{option}\"; the only option is mmio64=SIZE")
                })?;
                let size = parse_size(size).map_err(|e| format!("mmio64=: {e}"))?;
                if !size.is_power_of_two() || size < MIN_MMIO64_PER_PORT {
                    return Err(format!(
                        "mmio64={size:#x} is not a power of two of at least 1M (a port's 64-bit \
                         window is aligned to its size), e.g. mmio64=64G"
                    ));
                }
                Some(size)
            }
        };
        Ok(RootPortsArg { count, mmio64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_alone_shares_the_window_out() {
        assert_eq!(
            "8".parse(),
            Ok(RootPortsArg {
                count: 8,
                mmio64: None
            })
        );
    }

    #[test]
    fn mmio64_reserves_a_window_per_port() {
        assert_eq!(
            "4,mmio64=64G".parse(),
            Ok(RootPortsArg {
                count: 4,
                mmio64: Some(64 << 30)
            })
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_form() {
        for bad in [
            "0",
            "129",
            "x",
            "8,mmio64=3G",
            "8,mmio64=512K",
            "8,mem=1G",
            "8,mmio64=1Q",
        ] {
            assert!(bad.parse::<RootPortsArg>().is_err(), "{bad}");
        }
        let e = "8,mmio64=96G".parse::<RootPortsArg>().unwrap_err();
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn display_parses_back() {
        for arg in [RootPortsArg::default(), "2,mmio64=128G".parse().unwrap()] {
            assert_eq!(arg.to_string().parse(), Ok(arg));
        }
    }
}
