//! vCPU threads: run the vCPU, dispatch port and MMIO exits to the buses, park while the VM is
//! paused ([`super::pause`]), nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use rvmm_devices::Bus;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use super::pause::{Kick, VcpuPause};
use crate::observe::counters::{ExitReason, VmCounters};
use crate::placement::policy::set_thread_affinity;
use crate::placement::CpuList;
use crate::seccomp::ThreadFilter;
use crate::vm::exit::{ExitSignal, VmExit};

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of the kick signal; KVM_RUN then returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What a vCPU thread shares with the VM.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where stop requests go.
    pub exit: Arc<ExitSignal>,
    /// Set when all vCPUs must leave their loop.
    pub stop: Arc<AtomicBool>,
    /// Where the vCPU parks while the VM is paused.
    pub pause: Arc<VcpuPause>,
    /// The vCPU seccomp filter, installed first thing in the thread.
    pub seccomp: Arc<ThreadFilter>,
    /// Where the vCPU counts its exits.
    pub counters: Arc<VmCounters>,
    /// The host CPUs the thread may run on (set first thing, before the seccomp filter), if
    /// restricted; every vCPU thread gets the same list.
    pub affinity: Option<Arc<CpuList>>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// Gives the vCPU back when its loop ends (`None` when the seccomp filter failed).
    thread: JoinHandle<Option<VcpuFd>>,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread, which restricts itself to the context's host CPUs
    /// and installs its seccomp filter before it runs the vCPU; an error doing either is
    /// returned here and the vCPU never runs.
    pub fn spawn(index: u8, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        let (filtered_tx, filtered_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let placed = match &ctx.affinity {
                    Some(cpus) => set_thread_affinity(cpus).map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot restrict vCPU {index} to host CPUs {cpus}: {e}"),
                        )
                    }),
                    None => Ok(()),
                };
                if let Err(e) = placed {
                    let _ = filtered_tx.send(Err(e));
                    return None;
                }
                let filtered = ctx.seccomp.apply().map_err(std::io::Error::other);
                let ok = filtered.is_ok();
                let _ = filtered_tx.send(filtered);
                ok.then(|| run(index, vcpu, ctx))
            })?;
        match filtered_rx.recv() {
            Ok(Ok(())) => Ok(Self { thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(std::io::Error::other(format!(
                    "vCPU thread {index} ended before installing its seccomp filter"
                )))
            }
        }
    }

    /// Stops the thread (the caller has set the stop flag), waits for it and gives the vCPU
    /// back (`None` if the thread panicked).
    pub fn join(self) -> Option<VcpuFd> {
        // A signal sent just before the thread enters KVM_RUN is lost, so keep kicking until it
        // has left its loop.
        while !self.thread.is_finished() {
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::debug!("kicking a vCPU thread: {e}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match self.thread.join() {
            Ok(vcpu) => vcpu,
            Err(_) => {
                log::error!("a vCPU thread panicked");
                None
            }
        }
    }
}

/// The counter an exit (or a failed `KVM_RUN`) goes to.
fn exit_reason(exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> ExitReason {
    match exit {
        Ok(VcpuExit::IoIn(..)) => ExitReason::IoIn,
        Ok(VcpuExit::IoOut(..)) => ExitReason::IoOut,
        Ok(VcpuExit::MmioRead(..)) => ExitReason::MmioRead,
        Ok(VcpuExit::MmioWrite(..)) => ExitReason::MmioWrite,
        Ok(VcpuExit::Hlt) => ExitReason::Hlt,
        Ok(VcpuExit::Intr) => ExitReason::Intr,
        Ok(VcpuExit::Shutdown) => ExitReason::Shutdown,
        Ok(VcpuExit::SystemEvent(..)) => ExitReason::SystemEvent,
        Ok(VcpuExit::FailEntry(..)) => ExitReason::FailEntry,
        Ok(VcpuExit::InternalError) => ExitReason::InternalError,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitReason::Intr,
        _ => ExitReason::Other,
    }
}

/// A kick of the calling thread, for the pause gate.
fn kick_this_thread() -> Kick {
    // SAFETY: pthread_self has no preconditions.
    let thread = unsafe { libc::pthread_self() };
    Box::new(move || {
        // SAFETY: the gate calls a kick only while the thread is its member, and the thread
        // leaves the gate before it ends, so `thread` names a live thread.
        let r = unsafe { libc::pthread_kill(thread, kick_signal()) };
        if r != 0 {
            log::debug!("kicking a vCPU thread: errno {r}");
        }
    })
}

fn run(index: u8, mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuFd {
    if run_loop(index, &mut vcpu, &ctx) {
        complete_pending_io(index, &mut vcpu, &ctx);
    }
    vcpu
}

/// Most I/O exits completed at the end of a vCPU loop (a string instruction continues with
/// another exit after each completion).
const MAX_PENDING_IO: usize = 64;

/// Completes the I/O of the last exit without running the guest (`immediate_exit`): KVM would
/// otherwise complete it at the next `KVM_RUN`, after a reboot in place has set the power-on
/// registers, and write the old instruction's result over them.
fn complete_pending_io(index: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) {
    vcpu.set_kvm_immediate_exit(1);
    for _ in 0..MAX_PENDING_IO {
        let Ok(mut exit) = vcpu.run() else {
            break;
        };
        if !dispatch_io(index, &mut exit, ctx) {
            break;
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// Dispatches a port or MMIO exit to its bus (unclaimed reads return all-ones); false for any
/// other exit.
fn dispatch_io(index: u8, exit: &mut VcpuExit<'_>, ctx: &VcpuContext) -> bool {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(*port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(*port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(*addr, data) {
                log::debug!("vcpu{index}: unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(*addr, data) {
                log::debug!("vcpu{index}: unclaimed MMIO write at {addr:#x}");
            }
        }
        _ => return false,
    }
    true
}

/// Runs the vCPU until the VM stops or the vCPU cannot go on; returns false in the latter case
/// (a failed entry, an internal error, a failed `KVM_RUN`).
fn run_loop(index: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> bool {
    let _member = ctx.pause.enter(kick_this_thread());
    let exits = ctx.counters.vcpu(usize::from(index));
    while !ctx.stop.load(Ordering::Acquire) {
        let pausing = ctx.pause.requested();
        if pausing {
            // KVM_RUN then completes the I/O of the last exit (if any) and returns EINTR
            // without running the guest: the vCPU parks between two instructions.
            vcpu.set_kvm_immediate_exit(1);
        }
        let mut interrupted = false;
        let mut exit = vcpu.run();
        if let Some(exits) = exits {
            exits.count(exit_reason(&exit));
        }
        let dispatched = match &mut exit {
            Ok(io) => dispatch_io(index, io, ctx),
            Err(_) => false,
        };
        // A port or MMIO access is all done; the other exits are handled here.
        if !dispatched {
            match exit {
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => {
                    log::warn!("vcpu{index}: the guest triple-faulted; resetting the VM");
                    ctx.exit.request(VmExit::Reset);
                    break;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => ctx.exit.request(VmExit::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => ctx.exit.request(VmExit::Reset),
                        other => {
                            log::error!("vcpu{index}: unexpected system event {other}");
                            ctx.exit.request(VmExit::Crash);
                        }
                    }
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    log::error!(
                        "vcpu{index}: VM entry failed (reason {reason:#x}, host cpu {cpu})"
                    );
                    ctx.exit.request(VmExit::Crash);
                    return false;
                }
                Ok(VcpuExit::InternalError) => {
                    log::error!("vcpu{index}: KVM internal error");
                    ctx.exit.request(VmExit::Crash);
                    return false;
                }
                Ok(VcpuExit::Intr) => interrupted = true,
                Ok(other) => {
                    log::warn!("vcpu{index}: unhandled exit {other:?}");
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    interrupted = true;
                }
                Err(e) => {
                    log::error!("vcpu{index}: KVM_RUN failed: {e}");
                    ctx.exit.request(VmExit::Crash);
                    return false;
                }
            }
        }
        if pausing {
            vcpu.set_kvm_immediate_exit(0);
            // Another exit (an I/O the completion started) is dispatched first.
            if interrupted {
                ctx.pause.park();
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_go_to_the_counter_of_their_reason() {
        let mut data = [0u8; 4];
        assert_eq!(
            exit_reason(&Ok(VcpuExit::IoOut(0x3f8, &data))),
            ExitReason::IoOut
        );
        assert_eq!(
            exit_reason(&Ok(VcpuExit::MmioRead(0xe000_0000, &mut data))),
            ExitReason::MmioRead
        );
        assert_eq!(exit_reason(&Ok(VcpuExit::Hlt)), ExitReason::Hlt);
        assert_eq!(
            exit_reason(&Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]))),
            ExitReason::SystemEvent
        );
    }

    #[test]
    fn interrupted_runs_count_as_kicks_and_failures_as_other() {
        let eintr = kvm_ioctls::Error::new(libc::EINTR);
        let efault = kvm_ioctls::Error::new(libc::EFAULT);

        assert_eq!(exit_reason(&Err(eintr)), ExitReason::Intr);
        assert_eq!(exit_reason(&Err(efault)), ExitReason::Other);
        assert_eq!(exit_reason(&Ok(VcpuExit::Unknown)), ExitReason::Other);
    }
}
