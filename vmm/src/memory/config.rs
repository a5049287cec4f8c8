//! The guest memory configuration and its `--memory` syntax.

use std::fmt;
use std::str::FromStr;

use super::size::{parse_size, DisplaySize};
use super::{MemoryError, Result};
use rvmm_devices::host::page_size as host_page_size;

/// Smallest guest RAM accepted: enough for a kernel and an initramfs to boot.
pub const MIN_SIZE: u64 = 64 << 20;

/// Largest guest RAM accepted (64 TiB).
///
/// A sanity bound that keeps every guest address computation far from overflow; whether the host
/// can hold the guest is checked at reservation.
pub const MAX_SIZE: u64 = 1 << 46;

/// Size of the hugetlb pages backing guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HugepageSize {
    /// 2 MiB pages.
    #[default]
    Size2M,
    /// 1 GiB pages.
    Size1G,
}

impl HugepageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            HugepageSize::Size2M => 2 << 20,
            HugepageSize::Size1G => 1 << 30,
        }
    }

    /// The page size in KiB, as used in `/sys/kernel/mm/hugepages/hugepages-<kB>kB`.
    pub const fn kib(self) -> u64 {
        self.bytes() >> 10
    }
}

impl fmt::Display for HugepageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HugepageSize::Size2M => f.write_str("2M"),
            HugepageSize::Size1G => f.write_str("1G"),
        }
    }
}

impl FromStr for HugepageSize {
    type Err = MemoryError;

    /// Parses `2M` or `1G` (or any spelling of these sizes [`parse_size`] accepts, e.g. `2048K`).
    fn from_str(s: &str) -> Result<Self> {
        let unsupported = || MemoryError::UnsupportedHugepageSize {
            value: s.to_string(),
        };
        match parse_size(s).map_err(|_| unsupported())? {
            b if b == HugepageSize::Size2M.bytes() => Ok(HugepageSize::Size2M),
            b if b == HugepageSize::Size1G.bytes() => Ok(HugepageSize::Size1G),
            _ => Err(unsupported()),
        }
    }
}

/// Guest RAM: its size and its backing.
///
/// Parsed from the CLI value `size=512M[,hugepages=on|off][,hugepage_size=2M|1G][,host_node=N]`;
/// displays back in the same syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Back guest RAM with hugetlb pages.
    pub hugepages: bool,
    /// Size of the hugetlb pages; used only when `hugepages` is set.
    pub hugepage_size: HugepageSize,
    /// Host NUMA node guest RAM is strictly bound to (`host_node=N`); checked against the
    /// node's free memory before anything is reserved ([`crate::placement`]).
    pub host_node: Option<u32>,
}

impl MemoryConfig {
    /// The size of the pages backing guest RAM: the hugepage size, or the host's base page size.
    pub fn page_size(&self) -> u64 {
        if self.hugepages {
            self.hugepage_size.bytes()
        } else {
            host_page_size()
        }
    }

    /// Checks the size: non-zero, between [`MIN_SIZE`] and [`MAX_SIZE`], a multiple of
    /// [`page_size`](Self::page_size).
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if self.size < MIN_SIZE {
            return Err(MemoryError::SizeTooSmall {
                size: self.size,
                minimum: MIN_SIZE,
            });
        }
        if self.size > MAX_SIZE {
            return Err(MemoryError::SizeTooLarge {
                size: self.size,
                maximum: MAX_SIZE,
            });
        }
        let page_size = self.page_size();
        if self.size.checked_rem(page_size) != Some(0) {
            return Err(MemoryError::SizeNotAligned {
                size: self.size,
                page_size,
            });
        }
        Ok(())
    }
}

rvmm_pci::serde_as_string!(MemoryConfig);

impl FromStr for MemoryConfig {
    type Err = MemoryError;

    /// Parses and validates `size=<size>[,hugepages=on|off][,hugepage_size=2M|1G][,host_node=N]`.
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(MemoryError::EmptyOptions);
        }
        let mut size = None;
        let mut hugepages = None;
        let mut hugepage_size = None;
        let mut host_node = None;
        for option in s.split(',') {
            if option.is_empty() {
                return Err(MemoryError::EmptyOption {
                    options: s.to_string(),
                });
            }
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| MemoryError::MissingValue {
                    option: option.to_string(),
                })?;
            match key {
                "size" => set_once(&mut size, key, parse_size(value)?)?,
                "hugepages" => set_once(&mut hugepages, key, parse_switch(key, value)?)?,
                "hugepage_size" => set_once(&mut hugepage_size, key, value.parse()?)?,
                "host_node" => set_once(&mut host_node, key, parse_node(value)?)?,
                _ => {
                    return Err(MemoryError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        }
        let hugepages = hugepages.unwrap_or(false);
        if hugepage_size.is_some() && !hugepages {
            return Err(MemoryError::HugepageSizeWithoutHugepages);
        }
        let config = MemoryConfig {
            size: size.ok_or(MemoryError::MissingSize)?,
            hugepages,
            hugepage_size: hugepage_size.unwrap_or_default(),
            host_node,
        };
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for MemoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "size={}", DisplaySize(self.size))?;
        if self.hugepages {
            write!(f, ",hugepages=on,hugepage_size={}", self.hugepage_size)?;
        }
        if let Some(node) = self.host_node {
            write!(f, ",host_node={node}")?;
        }
        Ok(())
    }
}

/// Stores `value` in `slot` unless `key` was given before.
fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(MemoryError::DuplicateKey {
            key: key.to_string(),
        });
    }
    *slot = Some(value);
    Ok(())
}

/// Parses a host NUMA node number (0 to 1023, the kernel's `MAX_NUMNODES` limit).
fn parse_node(value: &str) -> Result<u32> {
    value
        .parse::<u32>()
        .ok()
        .filter(|&n| n < 1024 && !value.starts_with('+'))
        .ok_or_else(|| MemoryError::InvalidHostNode {
            value: value.chars().take(40).collect(),
        })
}

/// Parses `on` or `off`.
fn parse_switch(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(MemoryError::InvalidSwitch {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MemoryConfig> {
        s.parse()
    }

    #[test]
    fn size_alone_gives_4k_backed_config() {
        assert_eq!(
            parse("size=512M").unwrap(),
            MemoryConfig {
                size: 512 << 20,
                hugepages: false,
                hugepage_size: HugepageSize::Size2M,
                host_node: None,
            }
        );
    }

    #[test]
    fn hugepages_on_defaults_to_2m_pages() {
        let config = parse("size=1G,hugepages=on").unwrap();
        assert!(config.hugepages);
        assert_eq!(config.hugepage_size, HugepageSize::Size2M);
    }

    #[test]
    fn all_keys_are_parsed_in_any_order() {
        assert_eq!(
            parse("hugepage_size=1G,hugepages=on,size=4G").unwrap(),
            MemoryConfig {
                size: 4 << 30,
                hugepages: true,
                hugepage_size: HugepageSize::Size1G,
                host_node: None,
            }
        );
    }

    #[test]
    fn host_node_is_parsed_and_displayed_back() {
        let config = parse("size=512M,host_node=1").unwrap();

        assert_eq!(config.host_node, Some(1));
        assert_eq!(config.to_string(), "size=512M,host_node=1");
    }

    #[test]
    fn host_node_must_be_a_node_number() {
        for value in ["-1", "x", "1024", "+1", ""] {
            assert!(
                matches!(
                    parse(&format!("size=512M,host_node={value}")),
                    Err(MemoryError::InvalidHostNode { .. })
                ),
                "{value}"
            );
        }
    }

    #[test]
    fn hugepages_off_is_accepted() {
        assert!(!parse("size=512M,hugepages=off").unwrap().hugepages);
    }

    #[test]
    fn hugepage_size_accepts_other_spellings_of_2m() {
        let config = parse("size=512M,hugepages=on,hugepage_size=2048K").unwrap();
        assert_eq!(config.hugepage_size, HugepageSize::Size2M);
    }

    #[test]
    fn empty_string_is_rejected() {
        assert!(matches!(parse(""), Err(MemoryError::EmptyOptions)));
    }

    #[test]
    fn trailing_comma_is_rejected() {
        assert!(matches!(
            parse("size=512M,"),
            Err(MemoryError::EmptyOption { .. })
        ));
    }

    #[test]
    fn option_without_value_is_rejected() {
        assert!(
            matches!(parse("512M"), Err(MemoryError::MissingValue { option }) if option == "512M")
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        assert!(matches!(
            parse("size=512M,shared=on"),
            Err(MemoryError::UnknownKey { key }) if key == "shared"
        ));
    }

    #[test]
    fn duplicate_key_is_rejected() {
        assert!(matches!(
            parse("size=512M,size=1G"),
            Err(MemoryError::DuplicateKey { key }) if key == "size"
        ));
    }

    #[test]
    fn missing_size_is_rejected() {
        assert!(matches!(
            parse("hugepages=off"),
            Err(MemoryError::MissingSize)
        ));
    }

    #[test]
    fn invalid_size_value_is_rejected() {
        assert!(matches!(
            parse("size=lots"),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn bad_switch_value_is_rejected() {
        assert!(matches!(
            parse("size=512M,hugepages=yes"),
            Err(MemoryError::InvalidSwitch { key, value }) if key == "hugepages" && value == "yes"
        ));
    }

    #[test]
    fn unsupported_hugepage_size_is_rejected() {
        assert!(matches!(
            parse("size=512M,hugepages=on,hugepage_size=4M"),
            Err(MemoryError::UnsupportedHugepageSize { value }) if value == "4M"
        ));
    }

    #[test]
    fn hugepage_size_without_hugepages_is_rejected() {
        assert!(matches!(
            parse("size=1G,hugepage_size=1G"),
            Err(MemoryError::HugepageSizeWithoutHugepages)
        ));
        assert!(matches!(
            parse("size=1G,hugepages=off,hugepage_size=1G"),
            Err(MemoryError::HugepageSizeWithoutHugepages)
        ));
    }

    #[test]
    fn zero_size_is_rejected() {
        assert!(matches!(parse("size=0"), Err(MemoryError::ZeroSize)));
    }

    #[test]
    fn size_below_minimum_is_rejected() {
        assert!(matches!(
            parse("size=32M"),
            Err(MemoryError::SizeTooSmall { size, minimum })
                if size == 32 << 20 && minimum == MIN_SIZE
        ));
    }

    #[test]
    fn size_at_minimum_is_accepted() {
        assert_eq!(parse("size=64M").unwrap().size, MIN_SIZE);
    }

    #[test]
    fn size_above_maximum_is_rejected() {
        assert!(matches!(
            parse("size=65T"),
            Err(MemoryError::SizeTooLarge { .. })
        ));
    }

    #[test]
    fn size_not_multiple_of_host_page_is_rejected() {
        let size = MIN_SIZE + 100;
        assert!(matches!(
            parse(&format!("size={size}")),
            Err(MemoryError::SizeNotAligned { page_size, .. }) if page_size == host_page_size()
        ));
    }

    #[test]
    fn size_not_multiple_of_2m_hugepage_is_rejected() {
        assert!(matches!(
            parse("size=65M,hugepages=on"),
            Err(MemoryError::SizeNotAligned { page_size, .. }) if page_size == 2 << 20
        ));
    }

    #[test]
    fn size_not_multiple_of_1g_hugepage_is_rejected() {
        assert!(matches!(
            parse("size=1536M,hugepages=on,hugepage_size=1G"),
            Err(MemoryError::SizeNotAligned { page_size, .. }) if page_size == 1 << 30
        ));
    }

    #[test]
    fn not_aligned_error_names_size_and_page() {
        let err = parse("size=65M,hugepages=on").unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest memory size 65 MiB is not a multiple of the 2 MiB page size; \
             round it to a multiple of 2 MiB"
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["size=512M", "size=3G,hugepages=on,hugepage_size=1G"] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn display_of_hugepages_off_omits_hugepage_keys() {
        assert_eq!(
            parse("size=1G,hugepages=off").unwrap().to_string(),
            "size=1G"
        );
    }
}
