//! A token unique to one test process, for data a test writes and later finds again (NVMe
//! patterns, lines typed on a guest's console): what carries it cannot be left over from an
//! earlier run.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The token of this test process: the start time in nanoseconds and the pid, in hex.
pub fn token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        format!("{nanos:x}-{:x}", std::process::id())
    })
}
