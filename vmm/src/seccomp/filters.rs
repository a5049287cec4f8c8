//! What each kind of rvmm thread may ask of the kernel. docs/seccomp.md explains every group.
//!
//! The rules are built from groups: [`base`] for what every thread does (memory, locks, time,
//! logging, its own end), then one group per thread kind. ioctls are allowed by request number,
//! `mmap`/`mprotect` never with `PROT_EXEC`, `socket` only for netlink, `clone` only for threads.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ioctls::*;
use super::{SeccompError, ThreadKind};

/// Syscall number → rules; an empty list allows the syscall whatever its arguments.
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// An allow-list under construction.
#[derive(Default)]
struct Allow(Rules);

impl Allow {
    /// Allows each of `syscalls` whatever its arguments.
    fn always(&mut self, syscalls: &[i64]) {
        for &nr in syscalls {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allows `syscall` when one of `rules` matches (unless it is already always allowed).
    fn when(&mut self, syscall: i64, rules: Vec<SeccompRule>) {
        if rules.is_empty() {
            return;
        }
        match self.0.get_mut(&syscall) {
            // Already allowed whatever the arguments.
            Some(existing) if existing.is_empty() => {}
            Some(existing) => {
                for rule in rules {
                    if !existing.contains(&rule) {
                        existing.push(rule);
                    }
                }
            }
            None => {
                let mut unique: Vec<SeccompRule> = Vec::with_capacity(rules.len());
                for rule in rules {
                    if !unique.contains(&rule) {
                        unique.push(rule);
                    }
                }
                self.0.insert(syscall, unique);
            }
        }
    }

    /// Allows `syscall` when its argument `arg` (32 bits) is one of `values`.
    fn when_arg_in(&mut self, syscall: i64, arg: u8, values: &[u64]) -> Result<(), SeccompError> {
        let rules = values
            .iter()
            .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)?]))
            .collect::<Result<Vec<_>, _>>()?;
        self.when(syscall, rules);
        Ok(())
    }

    /// Allows `ioctl` with one of `requests`.
    fn ioctls(&mut self, requests: &[u32]) -> Result<(), SeccompError> {
        let values: Vec<u64> = requests.iter().map(|&r| u64::from(r)).collect();
        self.when_arg_in(libc::SYS_ioctl, 1, &values)
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Rule)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Rule)
}

/// A rule matching when `arg` has none of the bits of `mask` set.
fn without_bits(arg: u8, mask: u64) -> Result<SeccompRule, SeccompError> {
    rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)?])
}

/// What every thread does: allocate and free memory (glibc malloc, thread stacks, never
/// executable), wait on locks and channels, read clocks and sleep, write logs and eventfds,
/// close fds (debug builds of std check with `fcntl(F_GETFD)` that an fd is open before closing
/// it), return from signal handlers, read its own name (the SIGSYS reporter), and end.
fn base(a: &mut Allow) -> Result<(), SeccompError> {
    a.always(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    let no_exec = libc::PROT_EXEC as u64;
    a.when(libc::SYS_mmap, vec![without_bits(2, no_exec)?]);
    a.when(libc::SYS_mprotect, vec![without_bits(2, no_exec)?]);
    a.when_arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?;
    // abort(): SIGABRT to this process's own thread, so that an abort is reported as one.
    let pid = u64::from(std::process::id());
    a.when(
        libc::SYS_tgkill,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, pid)?,
            cond(2, SeccompCmpOp::Eq, libc::SIGABRT as u64)?,
        ])?],
    );
    a.when_arg_in(libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64])
}

/// vCPU threads: `KVM_RUN`, and what the device models do on a guest's port or MMIO access:
/// passthrough config space and trapped BARs (`pread64`/`pwrite64` on the VFIO device), MSI and
/// MSI-X changes (eventfds, `VFIO_DEVICE_SET_IRQS`, GSI routes, irqfds, a pending-bit `poll`),
/// BARs moved by the guest (memory slots), root-port hotplug MSIs, and a guest's reset of a
/// passthrough function (FLR, secondary bus reset: `VFIO_DEVICE_RESET`).
fn vcpu(a: &mut Allow) -> Result<(), SeccompError> {
    a.always(&[
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_eventfd2,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    a.ioctls(&[
        KVM_RUN,
        KVM_SET_USER_MEMORY_REGION,
        KVM_SET_GSI_ROUTING,
        KVM_IRQFD,
        KVM_SIGNAL_MSI,
        VFIO_DEVICE_SET_IRQS,
        VFIO_DEVICE_RESET,
    ])
}

/// The event loop: epoll, eventfds and the hotplug timer, serial input from stdin or a pty, the
/// socket console's clients (`accept4` on its listener, `shutdown` of a client that detaches,
/// `recvfrom`/`sendto` for a refused one), and hot-add
/// and removal: host checks in /sys and /proc (holders of a busy device), the VFIO container,
/// group and device (open, ioctls, BAR `mmap`), KVM memory slots, irqfds, GSI routes and the
/// KVM-VFIO device, SR-IOV claim files under /run/rvmm (`flock`) and VF policy over rtnetlink;
/// a pause: the kick signal to this process's vCPU threads (`tgkill`) and the VM's kvmclock.
fn event_loop(a: &mut Allow) -> Result<(), SeccompError> {
    a.always(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_openat,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_stat,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getdents64,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getcwd,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_flock,
        libc::SYS_ftruncate,
        libc::SYS_fsync,
        libc::SYS_dup,
        libc::SYS_getrlimit,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_bind,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_accept4,
        libc::SYS_shutdown,
    ]);
    a.when_arg_in(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    )?;
    // A pause kicks the vCPU threads out of KVM_RUN: the kick signal, to this process only.
    a.when(
        libc::SYS_tgkill,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, u64::from(std::process::id()))?,
            cond(2, SeccompCmpOp::Eq, crate::cpu::vcpu::kick_signal() as u64)?,
        ])?],
    );
    // prlimit64 on this process only (pid 0): the memlock check of a device being added.
    a.when_arg_in(libc::SYS_prlimit64, 0, &[0])?;
    // Sockets: rtnetlink (NETLINK_ROUTE = 0) for VF settings, nothing else.
    a.when(
        libc::SYS_socket,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
            cond(2, SeccompCmpOp::Eq, libc::NETLINK_ROUTE as u64)?,
        ])?],
    );
    a.ioctls(&[
        KVM_SET_USER_MEMORY_REGION,
        KVM_SET_GSI_ROUTING,
        KVM_IRQFD,
        KVM_SIGNAL_MSI,
        KVM_GET_CLOCK,
        KVM_SET_CLOCK,
        KVM_CHECK_EXTENSION,
        KVM_CREATE_DEVICE,
        KVM_SET_DEVICE_ATTR,
        KVM_HAS_DEVICE_ATTR,
        VFIO_GET_API_VERSION,
        VFIO_CHECK_EXTENSION,
        VFIO_SET_IOMMU,
        VFIO_GROUP_GET_STATUS,
        VFIO_GROUP_SET_CONTAINER,
        VFIO_GROUP_UNSET_CONTAINER,
        VFIO_GROUP_GET_DEVICE_FD,
        VFIO_DEVICE_GET_INFO,
        VFIO_DEVICE_GET_REGION_INFO,
        VFIO_DEVICE_GET_IRQ_INFO,
        VFIO_DEVICE_SET_IRQS,
        VFIO_DEVICE_RESET,
        VFIO_IOMMU_GET_INFO,
        VFIO_IOMMU_MAP_DMA,
        VFIO_IOMMU_UNMAP_DMA,
        TCGETS,
        FIONBIO,
    ])
}

/// An API connection thread: read one request from its socket (`recvmsg`, which also takes a
/// VFIO group descriptor sent with an add-device request), queue it to the event loop
/// (an eventfd write) and wait for the answer, write the response or stream events, drain and
/// close the connection (timeouts, `shutdown`, `poll` for a departed client).
fn api_connection(a: &mut Allow) -> Result<(), SeccompError> {
    a.always(&[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_shutdown,
    ]);
    // Descriptors received with a request are made close-on-exec at once.
    a.when_arg_in(libc::SYS_fcntl, 1, &[libc::F_SETFD as u64])?;
    a.when_arg_in(
        libc::SYS_setsockopt,
        2,
        &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64],
    )
}

/// The API accept thread: everything a connection thread does (they inherit its filter), plus
/// `accept4` and starting connection threads (thread `clone`, their stacks, names, robust lists,
/// rseq areas, the affinity query of `pthread_getattr_np`, and installing their own, narrower
/// filter: `PR_SET_NO_NEW_PRIVS` and `SECCOMP_SET_MODE_FILTER`).
fn api_accept(a: &mut Allow) -> Result<(), SeccompError> {
    api_connection(a)?;
    a.always(&[
        libc::SYS_accept4,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ]);
    let thread = libc::CLONE_THREAD as u64;
    a.when(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    a.when_arg_in(
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    )?;
    a.when_arg_in(
        libc::SYS_seccomp,
        0,
        &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
    )
}

/// The `rvmm` binary's signal thread: wait on its signalfd and stop eventfd (`poll`/`ppoll`),
/// read them (`read`); asking the VM (a channel send, an eventfd write, a wait for the answer)
/// is in the base.
fn signals(a: &mut Allow) {
    a.always(&[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]);
}

/// The rules of threads of `kind`.
pub(super) fn rules(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut a = Allow::default();
    base(&mut a)?;
    match kind {
        ThreadKind::Vcpu => vcpu(&mut a)?,
        ThreadKind::EventLoop => event_loop(&mut a)?,
        ThreadKind::ApiAccept => api_accept(&mut a)?,
        ThreadKind::ApiConnection => api_connection(&mut a)?,
        ThreadKind::Signals => signals(&mut a),
        // Writes (stdout, the console file or pty, opened before) and waits; `sendto` for an
        // attached socket console client (`send` with `MSG_NOSIGNAL`).
        ThreadKind::Console => a.always(&[libc::SYS_sendto]),
    }
    Ok(a.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows_unconditionally(kind: ThreadKind, nr: i64) -> bool {
        rules(kind).unwrap().get(&nr).is_some_and(Vec::is_empty)
    }

    #[test]
    fn every_thread_may_exit_and_write() {
        for kind in ThreadKind::ALL {
            assert!(
                allows_unconditionally(kind, libc::SYS_exit_group),
                "{kind:?}"
            );
            assert!(allows_unconditionally(kind, libc::SYS_write), "{kind:?}");
        }
    }

    #[test]
    fn no_thread_may_execute_programs() {
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            assert!(!r.contains_key(&libc::SYS_execve), "{kind:?}");
            assert!(!r.contains_key(&libc::SYS_execveat), "{kind:?}");
        }
    }

    #[test]
    fn vcpu_ioctls_are_filtered_by_request() {
        let r = rules(ThreadKind::Vcpu).unwrap();
        assert_eq!(r.get(&libc::SYS_ioctl).map(Vec::len), Some(7));
    }

    #[test]
    fn only_the_event_loop_may_signal_other_threads() {
        let tgkill_rules = |kind| rules(kind).unwrap().get(&libc::SYS_tgkill).map(Vec::len);
        // Its own abort, and the pause's kick of the vCPU threads.
        assert_eq!(tgkill_rules(ThreadKind::EventLoop), Some(2));
        for kind in [ThreadKind::Vcpu, ThreadKind::ApiConnection] {
            assert_eq!(tgkill_rules(kind), Some(1), "{kind:?}");
        }
    }

    #[test]
    fn vcpu_threads_cannot_open_files() {
        assert!(!rules(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_openat));
    }

    #[test]
    fn api_accept_allows_everything_a_connection_thread_may_do() {
        let accept = rules(ThreadKind::ApiAccept).unwrap();
        for (nr, conn_rules) in rules(ThreadKind::ApiConnection).unwrap() {
            let Some(accept_rules) = accept.get(&nr) else {
                panic!("syscall {nr} is missing from the accept thread's rules");
            };
            assert!(
                accept_rules.is_empty() || conn_rules.iter().all(|r| accept_rules.contains(r)),
                "syscall {nr}"
            );
        }
    }

    #[test]
    fn only_the_accept_thread_starts_threads() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::ApiConnection,
            ThreadKind::Signals,
        ] {
            let r = rules(kind).unwrap();
            assert!(!r.contains_key(&libc::SYS_clone3), "{kind:?}");
            assert!(!r.contains_key(&libc::SYS_clone), "{kind:?}");
        }
    }

    #[test]
    fn signal_thread_only_reads_and_waits_beyond_the_base() {
        let mut base_rules = Allow::default();
        base(&mut base_rules).unwrap();
        let extra: Vec<i64> = rules(ThreadKind::Signals)
            .unwrap()
            .into_keys()
            .filter(|nr| !base_rules.0.contains_key(nr))
            .collect();
        let mut want = vec![libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];
        want.sort_unstable();
        assert_eq!(extra, want);
    }

    #[test]
    fn event_loop_may_accept_and_detach_socket_console_clients() {
        for nr in [libc::SYS_accept4, libc::SYS_shutdown, libc::SYS_recvfrom] {
            assert!(allows_unconditionally(ThreadKind::EventLoop, nr), "{nr}");
        }
    }

    #[test]
    fn console_writer_may_send_to_a_socket_client_but_not_accept_or_open() {
        assert!(allows_unconditionally(
            ThreadKind::Console,
            libc::SYS_sendto
        ));
        let r = rules(ThreadKind::Console).unwrap();
        for nr in [
            libc::SYS_accept4,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
        ] {
            assert!(!r.contains_key(&nr), "{nr}");
        }
    }

    #[test]
    fn adding_rules_to_an_always_allowed_syscall_keeps_it_unconditional() {
        let mut a = Allow::default();
        a.always(&[libc::SYS_read]);
        a.when_arg_in(libc::SYS_read, 0, &[0]).unwrap();
        assert_eq!(a.0.get(&libc::SYS_read).map(Vec::len), Some(0));
    }

    #[test]
    fn conditional_rules_accumulate_without_duplicates() {
        let mut a = Allow::default();
        a.when_arg_in(libc::SYS_fcntl, 1, &[1, 2]).unwrap();
        a.when_arg_in(libc::SYS_fcntl, 1, &[2, 3]).unwrap();
        assert_eq!(a.0.get(&libc::SYS_fcntl).map(Vec::len), Some(3));
    }
}
