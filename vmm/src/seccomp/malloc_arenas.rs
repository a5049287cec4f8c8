//! glibc's malloc arena limit, settled before any filtered thread can need it.
//!
//! glibc gives each thread that allocates while the others hold their arenas a new arena, up
//! to a limit it computes the first time the process has more than eight: it then reads
//! `/sys/devices/system/cpu/online` (glibc 2.36, Debian 12). The thread that happens to create
//! the ninth arena makes that `openat`, and under a seccomp filter without `openat` (every
//! thread but the event loop) rvmm was killed: `rvmm: seccomp blocked syscall openat (257) on
//! thread rvmm-api-conn`, seen once the VM had enough threads (vCPUs, console, event log, API
//! connections) and a few API requests came at once.
//!
//! The same glibc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks the heap of
//! a thread's arena (`shrink_heap`), which a filtered thread freeing a few hundred KiB does.
//!
//! [`settle`] sets the limit with `mallopt(M_ARENA_MAX)` to what glibc would compute (eight
//! arenas per CPU this process may run on), unless the user already chose one
//! (`MALLOC_ARENA_MAX`, `GLIBC_TUNABLES=glibc.malloc.arena_max=N`), so the lazy computation
//! never happens; then it makes glibc take its overcommit setting on a short-lived thread of
//! its own (an arena heap grown past the trim threshold and freed). It runs once per process,
//! the first time a filter is built ([`super::ThreadFilter::new`]), which is before any
//! filtered thread starts.

use std::sync::Once;

/// Arenas per CPU on 64-bit glibc (`NARENAS_FROM_NCORES`).
const ARENAS_PER_CPU: usize = 8;
/// What the warm-up thread allocates in blocks of [`WARM_UP_BLOCK`] bytes, then frees: well
/// past glibc's default trim threshold (128 KiB) and below its mmap threshold per block, so
/// the blocks come from the thread's arena heap and freeing them shrinks it.
const WARM_UP_BYTES: usize = 1 << 20;
const WARM_UP_BLOCK: usize = 4096;

static SETTLED: Once = Once::new();

/// Whether the environment already fixes the arena limit (glibc then reads no file).
fn user_chose_a_limit(malloc_arena_max: Option<&str>, tunables: Option<&str>) -> bool {
    malloc_arena_max.is_some_and(|v| !v.is_empty())
        || tunables.is_some_and(|t| t.contains("glibc.malloc.arena_max="))
}

/// The CPUs this process may run on (at least 1).
fn allowed_cpus() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for pid 0 (this thread) and
    // we only read it when the call succeeded.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        usize::try_from(libc::CPU_COUNT(&set)).unwrap_or(1).max(1)
    }
}

/// The limit to set, or `None` when the user chose one.
fn limit(malloc_arena_max: Option<&str>, tunables: Option<&str>, cpus: usize) -> Option<usize> {
    if user_chose_a_limit(malloc_arena_max, tunables) {
        return None;
    }
    Some(cpus.max(1).saturating_mul(ARENAS_PER_CPU))
}

/// Settles glibc's arena limit once per process (see the module documentation).
pub fn settle() {
    SETTLED.call_once(|| {
        let arena_max = std::env::var("MALLOC_ARENA_MAX").ok();
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let Some(n) = limit(arena_max.as_deref(), tunables.as_deref(), allowed_cpus()) else {
            return;
        };
        let n = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes any positive count.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } != 1 {
            log::warn!("seccomp: cannot set malloc's arena limit to {n}");
        }
        warm_up_arena_heap();
    });
}

/// Grows a new thread's arena heap past the trim threshold and frees it, so that glibc reads
/// its overcommit setting here rather than on a filtered thread.
fn warm_up_arena_heap() {
    let warm_up = std::thread::Builder::new()
        .name("rvmm-malloc".into())
        .spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..WARM_UP_BYTES / WARM_UP_BLOCK)
                .map(|i| vec![i as u8; WARM_UP_BLOCK])
                .collect();
            std::hint::black_box(&blocks);
        });
    match warm_up {
        Ok(thread) => {
            if thread.join().is_err() {
                log::warn!("seccomp: the malloc warm-up thread panicked");
            }
        }
        Err(e) => log::warn!("seccomp: cannot start the malloc warm-up thread: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::seccomp::{SeccompMode, ThreadFilter, ThreadKind};

    /// Set in the fresh process that runs [`child_allocates_in_many_filtered_threads`].
    const CHILD_ENV: &str = "RVMM_TEST_MALLOC_ARENA_CHILD";
    const CHILD_TEST: &str =
        "seccomp::malloc_arenas::tests::child_allocates_in_many_filtered_threads";

    /// The regression test: in a fresh process (glibc computes the limit once per process),
    /// 32 threads under the API connection filter (no `openat`) all allocate at once, so
    /// glibc creates far more than eight arenas from filtered threads. Before [`settle`], the
    /// ninth killed the process with SIGSYS.
    #[test]
    fn filtered_threads_that_need_new_arenas_are_not_killed() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", CHILD_TEST, "--ignored", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
            .expect("child runs");
        assert!(
            out.status.success(),
            "{:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the child test did not run: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    #[ignore = "run in a fresh process by filtered_threads_that_need_new_arenas_are_not_killed"]
    fn child_allocates_in_many_filtered_threads() {
        assert!(
            std::env::var_os(CHILD_ENV).is_some(),
            "run through filtered_threads_that_need_new_arenas_are_not_killed"
        );
        let filter = ThreadFilter::new(ThreadKind::ApiConnection, SeccompMode::On).expect("filter");
        let threads = 32;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let filter = filter.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    filter.apply().expect("filter applies");
                    barrier.wait();
                    let blocks: Vec<Vec<u8>> = (0..64).map(|j| vec![(i + j) as u8; 4096]).collect();
                    barrier.wait();
                    blocks.iter().map(|b| usize::from(b[0])).sum::<usize>()
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
    }

    #[test]
    fn limit_is_glibcs_default_for_the_allowed_cpus() {
        assert_eq!(limit(None, None, 2), Some(16));
        assert_eq!(limit(None, None, 0), Some(8));
        assert_eq!(limit(Some(""), Some("glibc.malloc.check=1"), 4), Some(32));
    }

    #[test]
    fn a_limit_the_user_chose_is_kept() {
        assert_eq!(limit(Some("2"), None, 8), None);
        assert_eq!(
            limit(
                None,
                Some("glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=4"),
                8
            ),
            None
        );
    }
}
