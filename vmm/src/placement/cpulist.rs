//! Sets of host CPUs and NUMA nodes in the kernel's list syntax (`0-3,8,10-11`), as sysfs
//! writes them (`/sys/devices/system/node/node1/cpulist`) and as `affinity=` takes them, and
//! their bitmask forms for `sched_setaffinity(2)` and `mbind(2)`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Largest CPU or node number accepted in a list (the kernel's `NR_CPUS` limit on x86-64).
pub const MAX_ID: u32 = 8191;

/// A list that is not in the kernel's list syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid CPU list \"{given}\": {why}; give numbers and ranges separated by commas, e.g. 0-3,8"
)]
pub struct CpuListError {
    /// What was given.
    pub given: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// A set of host CPU (or node) numbers, kept sorted; displays in the kernel's list syntax.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    /// The set of `ids`.
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Self {
        CpuList(ids.into_iter().collect())
    }

    /// The numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    /// The numbers of this set that are not in `other`.
    pub fn difference(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.difference(&other.0).copied().collect())
    }

    /// The numbers in both sets.
    pub fn intersection(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.intersection(&other.0).copied().collect())
    }

    /// The set as a bitmask of `c_ulong` words (bit `n` of word `n / 64` for number `n`), the
    /// form of `cpu_set_t` and of `mbind`'s nodemask; at least one word.
    pub fn to_mask(&self) -> Vec<libc::c_ulong> {
        let bits = libc::c_ulong::BITS;
        let words = self.0.last().map_or(1, |&max| max / bits + 1);
        let mut mask = vec![0; words as usize];
        for id in self.iter() {
            mask[(id / bits) as usize] |= 1 << (id % bits);
        }
        mask
    }

    /// The set of the bits set in `mask` (the inverse of [`to_mask`](Self::to_mask)).
    pub fn from_mask(mask: &[libc::c_ulong]) -> Self {
        let bits = libc::c_ulong::BITS;
        CpuList::from_ids((0..mask.len() as u32 * bits).filter(|&id| {
            mask.get((id / bits) as usize)
                .is_some_and(|w| w & (1 << (id % bits)) != 0)
        }))
    }
}

impl FromStr for CpuList {
    type Err = CpuListError;

    /// Parses `N`, `N-M` and `N-M:STRIDE`-free ranges separated by commas; an empty text (or
    /// one of white space, as sysfs writes for a node without CPUs) is the empty set.
    fn from_str(s: &str) -> Result<Self, CpuListError> {
        let err = |why| CpuListError {
            given: s.chars().take(80).collect(),
            why,
        };
        let text = s.trim();
        let mut set = BTreeSet::new();
        if text.is_empty() {
            return Ok(CpuList(set));
        }
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (
                    parse_id(a).ok_or_else(|| err("not a number"))?,
                    parse_id(b).ok_or_else(|| err("not a number"))?,
                ),
                None => {
                    let id = parse_id(part).ok_or_else(|| err("not a number"))?;
                    (id, id)
                }
            };
            if first > last {
                return Err(err("a range runs backwards"));
            }
            if last > MAX_ID {
                return Err(err("a number is above 8191"));
            }
            set.extend(first..=last);
        }
        Ok(CpuList(set))
    }
}

/// A decimal number without sign or white space.
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for CpuList {
    /// The kernel's list syntax, with runs of two or more as ranges (`0-3,8`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids = self.iter().peekable();
        let mut first = true;
        while let Some(start) = ids.next() {
            let mut end = start;
            while ids.peek() == Some(&(end + 1)) {
                end += 1;
                ids.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for CpuList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_numbers_and_ranges_are_parsed() {
        let list: CpuList = "0-2,5,7-8".parse().unwrap();

        assert_eq!(list.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 7, 8]);
    }

    #[test]
    fn sysfs_newline_and_empty_node_are_accepted() {
        assert_eq!("1\n".parse::<CpuList>().unwrap(), CpuList::from_ids([1]));
        assert!("\n".parse::<CpuList>().unwrap().is_empty());
    }

    #[test]
    fn display_folds_runs_into_ranges() {
        assert_eq!(
            CpuList::from_ids([0, 1, 2, 3, 8, 10, 11]).to_string(),
            "0-3,8,10-11"
        );
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        for (text, why) in [
            ("3-1", "a range runs backwards"),
            ("1,,2", "not a number"),
            ("x", "not a number"),
            ("-1", "not a number"),
            ("0-9000", "a number is above 8191"),
        ] {
            let err = text.parse::<CpuList>().unwrap_err();
            assert_eq!(err.why, why, "{text}");
        }
    }

    #[test]
    fn error_names_the_text_and_the_fix() {
        let err = "2-1".parse::<CpuList>().unwrap_err();

        assert_eq!(
            err.to_string(),
            "invalid CPU list \"2-1\": a range runs backwards; give numbers and ranges \
             separated by commas, e.g. 0-3,8"
        );
    }

    #[test]
    fn mask_sets_one_bit_per_number() {
        let list = CpuList::from_ids([0, 3, 64, 65]);

        let mask = list.to_mask();

        assert_eq!(mask, vec![0b1001, 0b11]);
        assert_eq!(CpuList::from_mask(&mask), list);
    }

    #[test]
    fn empty_set_has_one_zero_word() {
        assert_eq!(CpuList::default().to_mask(), vec![0]);
    }

    #[test]
    fn serializes_as_list_text() {
        let list = CpuList::from_ids([1, 2]);

        assert_eq!(serde_json::to_string(&list).unwrap(), "\"1-2\"");
        assert_eq!(serde_json::from_str::<CpuList>("\"1-2\"").unwrap(), list);
    }
}
