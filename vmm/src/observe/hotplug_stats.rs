//! Hotplug operations counted by kind, with the last and median duration of each.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::types::RemovalReason;

/// Durations kept per kind for the median (the most recent ones).
pub const MEDIAN_WINDOW: usize = 256;

/// What a hotplug operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HotplugOpKind {
    /// A hot-add the guest took (request to `device-added`).
    Add,
    /// A hot-add that timed out or whose client went away, rolled back.
    AddFailed,
    /// A removal the guest completed (attention button to slot powered off).
    GracefulRemove,
    /// A surprise removal asked for through the API.
    SurpriseRemove,
    /// A graceful removal the guest did not finish in time, surprise-removed at its deadline.
    EscalatedRemove,
    /// The host took the device back (VFIO request interrupt).
    HostRemove,
    /// The device failed (VFIO error interrupt) and was removed.
    ErrorRemove,
}

impl From<RemovalReason> for HotplugOpKind {
    fn from(reason: RemovalReason) -> Self {
        match reason {
            RemovalReason::GuestEjected | RemovalReason::Reboot => HotplugOpKind::GracefulRemove,
            RemovalReason::Surprise => HotplugOpKind::SurpriseRemove,
            RemovalReason::TimeoutEscalated => HotplugOpKind::EscalatedRemove,
            RemovalReason::HostRequest => HotplugOpKind::HostRemove,
            RemovalReason::DeviceError => HotplugOpKind::ErrorRemove,
        }
    }
}

/// The operations of one kind so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugOpCounts {
    /// The kind.
    pub kind: HotplugOpKind,
    /// How many finished.
    pub count: u64,
    /// Duration of the last one, in milliseconds.
    pub last_ms: u64,
    /// Median duration of the last (at most 256) ones, in milliseconds.
    pub median_ms: u64,
}

#[derive(Default)]
struct KindStats {
    count: u64,
    recent: VecDeque<Duration>,
}

/// Counts finished hotplug operations (kept by the controller, on the event loop).
#[derive(Default)]
pub struct HotplugStats {
    kinds: BTreeMap<HotplugOpKind, KindStats>,
}

impl HotplugStats {
    /// Records one finished operation of `kind` that took `took`.
    pub fn record(&mut self, kind: HotplugOpKind, took: Duration) {
        let s = self.kinds.entry(kind).or_default();
        s.count = s.count.saturating_add(1);
        if s.recent.len() == MEDIAN_WINDOW {
            s.recent.pop_front();
        }
        s.recent.push_back(took);
    }

    /// Every kind that happened at least once, in kind order.
    pub fn snapshot(&self) -> Vec<HotplugOpCounts> {
        self.kinds
            .iter()
            .map(|(&kind, s)| HotplugOpCounts {
                kind,
                count: s.count,
                last_ms: s.recent.back().map(|d| ms(*d)).unwrap_or(0),
                median_ms: median(s.recent.iter().copied()).map(ms).unwrap_or(0),
            })
            .collect()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The median of `values` (the lower middle one of an even count), `None` when empty.
pub fn median<T: Ord>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut v: Vec<T> = values.collect();
    if v.is_empty() {
        return None;
    }
    let mid = (v.len() - 1) / 2;
    v.select_nth_unstable(mid);
    v.into_iter().nth(mid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn kinds_are_counted_with_last_and_median() {
        let mut s = HotplugStats::default();
        s.record(HotplugOpKind::Add, ms_(300));
        s.record(HotplugOpKind::Add, ms_(100));
        s.record(HotplugOpKind::Add, ms_(200));
        s.record(HotplugOpKind::SurpriseRemove, ms_(5));

        let snap = s.snapshot();

        assert_eq!(
            snap,
            vec![
                HotplugOpCounts {
                    kind: HotplugOpKind::Add,
                    count: 3,
                    last_ms: 200,
                    median_ms: 200
                },
                HotplugOpCounts {
                    kind: HotplugOpKind::SurpriseRemove,
                    count: 1,
                    last_ms: 5,
                    median_ms: 5
                },
            ]
        );
    }

    #[test]
    fn median_of_an_even_count_is_the_lower_middle() {
        assert_eq!(median([4, 1, 3, 2].into_iter()), Some(2));
        assert_eq!(median(std::iter::empty::<u32>()), None);
    }

    #[test]
    fn median_covers_only_the_recent_window_but_count_all() {
        let mut s = HotplugStats::default();
        for _ in 0..MEDIAN_WINDOW {
            s.record(HotplugOpKind::HostRemove, ms_(1000));
        }
        for _ in 0..=MEDIAN_WINDOW / 2 {
            s.record(HotplugOpKind::HostRemove, ms_(1));
        }

        let snap = &s.snapshot()[0];

        assert_eq!(snap.count, (MEDIAN_WINDOW + MEDIAN_WINDOW / 2 + 1) as u64);
        assert_eq!(snap.median_ms, 1);
    }

    #[test]
    fn removal_reasons_map_to_kinds() {
        assert_eq!(
            HotplugOpKind::from(RemovalReason::GuestEjected),
            HotplugOpKind::GracefulRemove
        );
        assert_eq!(
            serde_json::to_string(&HotplugOpKind::EscalatedRemove)
                .ok()
                .as_deref(),
            Some("\"escalated-remove\"")
        );
    }
}
