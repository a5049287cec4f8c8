//! The VM controller: the event-loop subscriber that changes the device tree. It answers the
//! control API, drives hotplug through the root-port slots (waiting for the guest's pciehp at every
//! step) and removes a device at once when the host takes it back. A device error the host
//! reports is forwarded to the guest's AER recovery first (`controller_errors.rs`); removal is
//! the fallback.
//!
//! It also pauses and resumes the VM ([`VmPause`]); while paused, hotplug requests are refused
//! (the guest takes part in every hotplug), but a device the host takes back is still
//! released at once: parked vCPUs hold no lock the release needs.
//!
//! Nothing here blocks: a hot-add or graceful removal is an operation with a deadline that advances
//! whenever the guest touches a slot (the slot notifier), a VFIO interrupt arrives, or the
//! operation timer fires.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use rvmm_devices::ged::Ged;
use rvmm_pci::{pending_device, PciSegment, PendingHandle, SlotDevice, SlotState};
use rvmm_vfio::sriov::SriovError;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::types::{ConsoleInfo, RootPortUsage};
use crate::api::{
    ApiError, ApiRequestQueue, DeviceInfo, Event, EventBus, EventKind, PendingRequest,
    RemovalReason, RemoveDeviceRequest, RemoveDeviceResponse, Responder, VmInfo,
};
use crate::device::passthrough::{AttachedDevice, Passthrough, PassthroughError};
use crate::device::{DeviceId, DeviceSpec, DeviceState, ADD_DEADLINE, ADD_SLOT_READY_TIMEOUT};
use crate::machine::pci::SlotNotifier;
use crate::observe::event_log::EventLogCountsReader;
use crate::observe::{
    interrupts, Counters, DeviceCounters, HotplugOpKind, HotplugStats, MemoryCounters,
    VcpuCounters, VmCounters,
};
use crate::vm::exit::{ExitSignal, VmExit};
use crate::vm::pause::{VmPause, VmState};
use rvmm_devices::sync::MutexExt;

/// How long a hot-add waits for the guest to power the slot on and enable the device, at most
/// (never past [`ADD_DEADLINE`]).
pub const ADD_GUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Most vCPUs a VM may have for hotplug (as in vSphere).
pub const MAX_HOTPLUG_CPUS: u8 = 128;
/// How long a guest config access waits for a device announced while it opens, at most.
const PENDING_ACCESS_WAIT: Duration = Duration::from_secs(10);
/// A hot-add is announced before the device is open only if the open pins at most this much
/// guest RAM for DMA first: the guest's config accesses to the device wait for the open.
const ANNOUNCE_EARLY_MAX_DMA_MAP: u64 = 4 << 30;
/// Shortest timer expiry (a zero one would disarm it).
const MIN_TIMER: Duration = Duration::from_millis(1);

const TOKEN_QUEUE: u32 = 0;
const TOKEN_SLOTS: u32 = 1;
const TOKEN_TIMER: u32 = 2;
/// VFIO interrupt tokens start here: token = FIRST + 2 * n (+1 for the error interrupt).
const TOKEN_VFIO_FIRST: u32 = 16;

/// What `GET /v1/vm/counters` is answered from besides the controller's own hotplug counts.
pub struct CounterSources {
    /// The VM's exit counters, uptime and reboots.
    pub vm: Arc<VmCounters>,
    /// Guest RAM (`locked_bytes` is read at each request).
    pub memory: MemoryCounters,
    /// The event log's counts, with `--event-log`.
    pub event_log: Option<EventLogCountsReader>,
}

/// What the controller reports about the VM itself.
#[derive(Clone, Debug)]
pub struct VmSummary {
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Whether RAM is on hugepages.
    pub hugepages: bool,
    /// Where the serial console is.
    pub console: Option<ConsoleInfo>,
    /// Where guest RAM and the vCPU threads are on the host, and why.
    pub placement: Option<crate::placement::Placement>,
    /// How hotplug reaches the guest.
    pub hotplug: super::HotplugMode,
}

enum Op {
    /// Opened and placed; the slot has not accepted it yet (guest not ready, event pending).
    WaitingForSlot {
        deadline: Instant,
        /// The whole add's deadline.
        end: Instant,
        reply: Option<Responder<DeviceInfo>>,
    },
    /// In the slot; waiting for the guest to power it on and enable it.
    WaitingForGuest {
        deadline: Instant,
        reply: Option<Responder<DeviceInfo>>,
    },
    /// Attention button pressed; waiting for the guest to power the slot off.
    Removing(Removal),
}

/// A graceful removal under way.
struct Removal {
    /// When it escalates to a surprise removal.
    deadline: Instant,
    /// When it was asked for.
    started: Instant,
    reply: Option<Responder<RemoveDeviceResponse>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VfioIrq {
    Request,
    Error,
    /// The guest cleared uncorrectable error status in the device's AER capability.
    AerCleared,
}

/// The event-loop subscriber that owns the passthrough devices.
pub struct Controller {
    segment: Arc<PciSegment>,
    passthrough: Passthrough,
    notifier: Arc<SlotNotifier>,
    exit: Arc<ExitSignal>,
    events: Arc<EventBus>,
    queue: Option<ApiRequestQueue>,
    summary: VmSummary,
    /// The ACPI Generic Event Device whose power button `power-button` presses.
    power_button: Option<Arc<Mutex<Ged>>>,
    ops: BTreeMap<DeviceId, Op>,
    timer: Option<TimerFd>,
    timer_armed: bool,
    /// VFIO request/error fds in epoll: token → (device id, raw fd, kind).
    watched: HashMap<u32, (DeviceId, i32, VfioIrq)>,
    next_token: u32,
    /// Hotplug operations finished so far, by kind.
    stats: HotplugStats,
    /// When each pending hot-add was asked for.
    add_started: HashMap<DeviceId, Instant>,
    counters: Option<CounterSources>,
    /// Pause and resume; a controller given none answers them 503.
    pause: Option<VmPause>,
    /// ACPI hotplug (`--hotplug acpi`); `None`: native PCIe hotplug.
    acpi: Option<AcpiSlots>,
    /// Device errors forwarded to the guest, waiting for its recovery.
    recoveries: errors::Recoveries,
}

#[path = "controller_acpi.rs"]
mod acpi;
use acpi::{AcpiAdd, AcpiSlots};

#[path = "controller_errors.rs"]
mod errors;
pub use errors::ERROR_RECOVERY_TIMEOUT;

#[path = "controller_reboot.rs"]
mod reboot;
pub use reboot::RebootOutcome;

fn now_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Controller {
    /// Creates the controller; `queue` carries the requests of every [`crate::vm::Vm::handle`]
    /// (the control API server is one of them).
    pub fn new(
        segment: Arc<PciSegment>,
        passthrough: Passthrough,
        notifier: Arc<SlotNotifier>,
        exit: Arc<ExitSignal>,
        events: Arc<EventBus>,
        queue: ApiRequestQueue,
        summary: VmSummary,
    ) -> Self {
        let timer = TimerFd::new()
            .and_then(|t| {
                // Non-blocking: an expiry already reported by epoll may be gone by the time it is
                // read (the timer was disarmed in between), and a read must never block the loop.
                // SAFETY: fcntl on a timerfd we own; only the status flags change.
                let r = unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
                if r < 0 {
                    Err(vmm_sys_util::errno::Error::last())
                } else {
                    Ok(t)
                }
            })
            .map_err(|e| log::error!("no hotplug timer, deadlines are checked on events only: {e}"))
            .ok();
        Self {
            segment,
            passthrough,
            notifier,
            exit,
            events,
            queue: Some(queue),
            summary,
            power_button: None,
            ops: BTreeMap::new(),
            timer,
            timer_armed: false,
            watched: HashMap::new(),
            next_token: TOKEN_VFIO_FIRST,
            stats: HotplugStats::default(),
            add_started: HashMap::new(),
            counters: None,
            pause: None,
            acpi: None,
            recoveries: errors::Recoveries::new(),
        }
    }

    /// Lets the controller answer `GET /v1/vm/counters` (else it is answered 404).
    pub fn with_counters(mut self, sources: CounterSources) -> Self {
        self.counters = Some(sources);
        self
    }

    /// Every passthrough device as `info` shows it, in slot order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.info().devices
    }

    fn counters(&self) -> Result<Counters, ApiError> {
        let Some(sources) = &self.counters else {
            return Err(ApiError::UnknownPath {
                path: crate::api::server::COUNTERS_PATH.to_owned(),
            });
        };
        let mut host_irqs = interrupts::read_host();
        let dma_mapped_bytes = self.passthrough.dma_mapped_bytes();
        let mut devices: Vec<&AttachedDevice> = self.passthrough.devices().collect();
        devices.sort_by_key(|d| d.slot);
        let locked_bytes = crate::memory::locked_memory().unwrap_or_else(|e| {
            log::warn!("counters: {}", rvmm_devices::error_chain(&e));
            0
        });
        Ok(Counters {
            uptime_ms: now_ms(sources.vm.uptime()),
            reboots: sources.vm.reboots(),
            vcpus: sources
                .vm
                .vcpu_exits()
                .into_iter()
                .enumerate()
                .map(|(i, exits)| VcpuCounters {
                    index: u8::try_from(i).unwrap_or(u8::MAX),
                    exits,
                })
                .collect(),
            devices: devices
                .into_iter()
                .map(|d| DeviceCounters {
                    id: d.id.clone(),
                    host_bdf: d.host.bdf,
                    interrupts: host_irqs.remove(&d.host.bdf).unwrap_or_default(),
                    dma_mapped_bytes,
                })
                .collect(),
            hotplug: self.stats.snapshot(),
            memory: MemoryCounters {
                locked_bytes,
                ..sources.memory
            },
            event_log: sources.event_log.as_ref().map(|r| r.counts()),
        })
    }

    /// The controller that also pauses and resumes the VM through `pause`.
    pub fn with_pause(mut self, pause: VmPause) -> Self {
        self.pause = Some(pause);
        self
    }

    fn vm_state(&self) -> VmState {
        self.pause.as_ref().map_or(VmState::Running, VmPause::state)
    }

    /// A hotplug operation in flight, as words for a refused pause.
    fn busy(&self) -> Option<String> {
        self.ops.iter().next().map(|(id, op)| match op {
            Op::Removing(_) => format!("device {id} is being removed"),
            _ => format!("device {id} is being added"),
        })
    }

    fn pause_vm(&mut self) -> Result<(), ApiError> {
        let busy = self.busy();
        match self.pause.as_mut() {
            Some(p) => p.pause(busy),
            None => Err(ApiError::Unavailable(
                "this VM was started without pause support".into(),
            )),
        }
    }

    fn resume_vm(&mut self) -> Result<(), ApiError> {
        match self.pause.as_mut() {
            Some(p) => p.resume(),
            None => Err(ApiError::Unavailable(
                "this VM was started without pause support".into(),
            )),
        }
    }

    /// Whether the VM is paused (never without pause support).
    fn vm_paused(&self) -> bool {
        self.pause.as_ref().is_some_and(|p| p.is_paused())
    }

    /// Refuses hotplug request `what` while the VM is paused.
    fn refuse_while_paused(&self, what: &str) -> Result<(), ApiError> {
        self.pause
            .as_ref()
            .map_or(Ok(()), |p| p.refuse_while_paused(what))
    }

    /// Gives the controller the VM's power button (the GED that signals it to the guest).
    pub fn with_power_button(mut self, ged: Arc<Mutex<Ged>>) -> Self {
        self.power_button = Some(ged);
        self
    }

    /// Presses the power button: the GED latches the event and interrupts the guest.
    fn press_power_button(&self) -> Result<(), ApiError> {
        let ged = self
            .power_button
            .as_ref()
            .ok_or_else(|| ApiError::Conflict("this VM has no power button".into()))?;
        ged.locked().press_power_button().map_err(|e| {
            ApiError::Internal(format!(
                "cannot raise the power button's interrupt (GSI {}): {e}",
                crate::machine::layout::GED_IRQ
            ))
        })?;
        log::info!("power button pressed");
        Ok(())
    }

    /// Everything the guest would see in `info` for device `d`.
    fn device_info(&self, d: &AttachedDevice) -> DeviceInfo {
        let port = self.segment.ports().get(d.port).map(|p| p.address);
        DeviceInfo {
            id: d.id.clone(),
            bdf: d.guest_bdf,
            host_bdf: d.host.bdf,
            slot: d.slot,
            root_port: port.unwrap_or(d.guest_bdf),
            state: d.state,
            vf: d.vf_info(),
        }
    }

    fn info(&self) -> VmInfo {
        let usage = self.passthrough.port_usage(&self.segment);
        let mut devices: Vec<&AttachedDevice> = self.passthrough.devices().collect();
        devices.sort_by_key(|d| d.slot);
        VmInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cpus: self.summary.cpus,
            memory_bytes: self.summary.memory_bytes,
            hugepages: self.summary.hugepages,
            root_ports: RootPortUsage {
                used: u8::try_from(usage.used).unwrap_or(u8::MAX),
                total: u8::try_from(usage.total).unwrap_or(u8::MAX),
            },
            devices: devices.into_iter().map(|d| self.device_info(d)).collect(),
            resources: self.passthrough.resources(),
            state: self.vm_state(),
            console: self.summary.console.clone(),
            placement: self.summary.placement.clone(),
            hotplug: Some(self.summary.hotplug),
        }
    }

    fn handle_request(&mut self, req: PendingRequest, ops: &mut EventOps) {
        match req {
            PendingRequest::Info(r) => {
                r.reply(Ok(self.info()));
            }
            PendingRequest::Shutdown(r) => {
                self.exit.request(VmExit::PowerOff);
                r.reply(Ok(()));
            }
            PendingRequest::Counters(r) => {
                r.reply(self.counters());
            }
            PendingRequest::AddDevice(add, r) => {
                match self.refuse_while_paused(&format!("hot-add device {add}")) {
                    Ok(()) => self.start_add(add, r, ops),
                    Err(e) => {
                        r.reply(Err(e));
                    }
                }
            }
            PendingRequest::RemoveDevice(rm, r) => {
                match self.refuse_while_paused(&format!("remove device {}", rm.id)) {
                    Ok(()) => self.start_remove(rm, r, ops),
                    Err(e) => {
                        r.reply(Err(e));
                    }
                }
            }
            PendingRequest::Pause(r) => {
                r.reply(self.pause_vm());
            }
            PendingRequest::Resume(r) => {
                r.reply(self.resume_vm());
            }
            PendingRequest::PowerButton(r) => {
                r.reply(self.press_power_button());
            }
            PendingRequest::Reboot(r) => {
                let outcome = self.refuse_while_paused("reboot").map(|()| {
                    log::info!("resetting the VM on request");
                    self.exit.request(VmExit::Reset);
                });
                r.reply(outcome);
            }
            PendingRequest::ForcePowerOff(why, r) => {
                log::info!("powering the guest off without its shutdown: {why:?}");
                self.exit.request(why.into());
                r.reply(Ok(()));
            }
        }
        self.advance(ops);
    }

    fn start_add(&mut self, spec: DeviceSpec, reply: Responder<DeviceInfo>, ops: &mut EventOps) {
        if self.summary.cpus > MAX_HOTPLUG_CPUS {
            reply.reply(Err(ApiError::Conflict(format!(
                "hotplug is not supported on a VM with more than {MAX_HOTPLUG_CPUS} vCPUs (this VM has {})",
                self.summary.cpus
            ))));
            return;
        }
        // The deadlines count from the request, not from the end of the attach.
        let asked = Instant::now()
            .checked_sub(reply.elapsed())
            .unwrap_or_else(Instant::now);
        log::debug!("hot-add of {spec} asked");
        let reservation = match self.passthrough.reserve(&spec, &self.segment) {
            Ok(r) => r,
            Err(e) => {
                reply.reply(Err(api_error(&spec.to_string(), e)));
                return;
            }
        };
        let port = reservation.port();
        let announced = self.announce_early(port, reservation.id());
        let opening = Instant::now();
        let id = match self.passthrough.open_reserved(reservation, &self.segment) {
            Ok(id) => id,
            Err(e) => {
                if let Some(handle) = announced {
                    handle.fail();
                    self.withdraw_from_slot(port);
                }
                reply.reply(Err(api_error(&spec.to_string(), e)));
                return;
            }
        };
        self.watch_vfio(&id, ops);
        self.add_started.insert(id.clone(), asked);
        let end = asked + ADD_DEADLINE;
        let Some(handle) = announced else {
            log::debug!(
                "device {id} open in {} ms, waiting for its slot",
                opening.elapsed().as_millis()
            );
            self.ops.insert(
                id,
                Op::WaitingForSlot {
                    deadline: asked + ADD_SLOT_READY_TIMEOUT,
                    end,
                    reply: Some(reply),
                },
            );
            return;
        };
        if !self
            .passthrough
            .slot_device(&id)
            .is_some_and(|d| handle.ready(d))
        {
            let step = format!(
                "opening the device: the guest looked for it in slot {} and gave up after {} ms",
                port + 1,
                PENDING_ACCESS_WAIT.as_millis()
            );
            self.fail_add(&id, Some(reply), step, PENDING_ACCESS_WAIT, ops);
            return;
        }
        // The open's time is mostly the host's: vfio-pci resets the function as its descriptor
        // opens (an FLR waits 100 ms), and the guest RAM is mapped for DMA.
        log::debug!(
            "device {id} open in {} ms, in slot {} since its announcement",
            opening.elapsed().as_millis(),
            port + 1
        );
        self.ops.insert(
            id,
            Op::WaitingForGuest {
                deadline: (Instant::now() + ADD_GUEST_TIMEOUT).min(end),
                reply: Some(reply),
            },
        );
    }

    /// Announces a device to the guest in slot `port` before it is open, when the slot can take
    /// it now and the open is short (it pins little or no guest RAM): the guest's own waits
    /// after the announcement (pciehp's 120 ms for the link) overlap the open, and its config
    /// accesses wait for the device meanwhile. Returns the handle that completes the device;
    /// `None`: the device goes into its slot once open, as any other.
    fn announce_early(&mut self, port: usize, id: &DeviceId) -> Option<PendingHandle> {
        let to_map = self.passthrough.dma_map_on_open();
        if to_map > ANNOUNCE_EARLY_MAX_DMA_MAP {
            log::debug!(
                "device {id}: opening it maps {} MiB of guest RAM for DMA first; announced once open",
                to_map >> 20
            );
            return None;
        }
        let (pending, handle) = pending_device(PENDING_ACCESS_WAIT);
        match self.insert_in_slot(port, pending.into_slot_device()) {
            Ok(()) => {
                log::debug!("device {id} announced in slot {} while it opens", port + 1);
                Some(handle)
            }
            Err(e) => {
                log::debug!("device {id}: slot {} cannot take it yet: {e}", port + 1);
                None
            }
        }
    }

    /// Puts `device` into slot `port` and tells the guest: a hot-plug event (native) or a
    /// Device Check (ACPI). A retryable slot error when the guest is not ready for it.
    fn insert_in_slot(&mut self, port: usize, device: SlotDevice) -> Result<(), PassthroughError> {
        if self.acpi.is_some() {
            return match self.acpi_insert(port, device) {
                Ok(true) => Ok(()),
                Ok(false) => Err(PassthroughError::Slot {
                    port,
                    source: rvmm_pci::SlotError::EventPending {
                        slot: self.segment.ports().get(port).map_or(0, |p| p.slot_number),
                        status: 0,
                    },
                }),
                Err(e) => Err(e),
            };
        }
        self.port_insert(port, device, false)
    }

    /// Puts `device` into the slot of root port `port`: hot-plugged (presence and link change,
    /// the port's hot-plug interrupt) or `as_at_boot` (present and powered, no event: the guest
    /// learns of it through ACPI).
    pub(super) fn port_insert(
        &self,
        port: usize,
        device: SlotDevice,
        as_at_boot: bool,
    ) -> Result<(), PassthroughError> {
        let root_port = self
            .segment
            .port(port)
            .ok_or(PassthroughError::NoSuchPort(port))?;
        let mut root_port = root_port.locked();
        let inserted = if as_at_boot {
            root_port.insert_device_at_boot(device)
        } else {
            root_port.insert_device(device)
        };
        inserted.map_err(|source| PassthroughError::Slot { port, source })
    }

    /// Takes whatever is in slot `port` out without the guest's consent (the guest is told).
    fn withdraw_from_slot(&mut self, port: usize) {
        let removed = self.segment.port(port).is_some_and(|p| {
            let mut p = p.locked();
            p.slot_state() != SlotState::Empty && p.surprise_remove().is_ok()
        });
        if removed {
            self.acpi_slot_left(port, true);
        }
    }

    fn start_remove(
        &mut self,
        req: RemoveDeviceRequest,
        reply: Responder<RemoveDeviceResponse>,
        ops: &mut EventOps,
    ) {
        let id = req.id.clone();
        let Some(d) = self.passthrough.get(&id) else {
            reply.reply(Err(ApiError::UnknownDevice { id: req.id }));
            return;
        };
        if let Some(op) = self.ops.get(&id) {
            let what = match op {
                Op::Removing(_) => "being removed",
                _ => "being added",
            };
            reply.reply(Err(ApiError::Conflict(format!(
                "device {id} is {what}; wait for that to finish"
            ))));
            return;
        }
        let port = d.port;
        log::debug!("removal of {id} asked (surprise: {})", req.surprise);
        self.publish(EventKind::DeviceRemoving {
            id: req.id.clone(),
            bdf: d.guest_bdf,
            host_bdf: d.host.bdf,
            surprise: req.surprise,
        });
        let started = Instant::now();
        if req.surprise {
            let r = self.remove_now(&id, RemovalReason::Surprise, true, started, ops);
            reply.reply(r.ok_or(ApiError::UnknownDevice { id: req.id }));
            return;
        }
        let pressed = if self.acpi.is_some() {
            Some(self.acpi_request_eject(port))
        } else {
            self.segment.port(port).map(|p| {
                p.locked()
                    .press_attention_button()
                    .map_err(|e| e.to_string())
            })
        };
        match pressed {
            Some(Ok(())) => {
                if let Some(d) = self.passthrough.get_mut(&id) {
                    d.state = DeviceState::Removing;
                }
                self.ops.insert(
                    id,
                    Op::Removing(Removal {
                        // Checked at the handler (at most 600 s); never overflows.
                        deadline: started
                            .checked_add(req.timeout())
                            .unwrap_or(started + Duration::from_secs(600)),
                        started,
                        reply: Some(reply),
                    }),
                );
            }
            Some(Err(e)) => {
                reply.reply(Err(ApiError::Conflict(format!(
                    "cannot ask the guest to release device {id}: {e}; use --surprise to remove it anyway"
                ))));
            }
            None => {
                reply.reply(Err(ApiError::Internal(format!(
                    "root port {port} of device {id} does not exist"
                ))));
            }
        }
    }

    /// Removes device `id` from its slot (surprise removal when `surprise`, else the guest has
    /// powered the slot off), releases it, publishes `device-removed` and returns the answer for a
    /// removal request. `None` when there is no such device.
    fn remove_now(
        &mut self,
        id: &DeviceId,
        reason: RemovalReason,
        surprise: bool,
        started: Instant,
        ops: &mut EventOps,
    ) -> Option<RemoveDeviceResponse> {
        let d = self.passthrough.get(id)?;
        if let Some(port) = self.segment.port(d.port) {
            let mut port = port.locked();
            let was_in_slot = port.slot_state() != SlotState::Empty;
            // With ACPI hotplug the guest's _EJ0 is its consent: the slot has no power
            // controller of its own to check.
            let taken = if surprise || self.acpi.is_some() {
                port.surprise_remove()
            } else {
                port.take_device()
            };
            if let Err(e) = taken {
                // Not in the slot yet (an add that never got there) or already out.
                log::debug!("device {id}: slot removal: {e}");
            }
            drop(port);
            // Presence goes in any case (a reboot took the device out of its slot already);
            // the guest is told only of a device it may still hold.
            self.acpi_slot_left(d.port, surprise && was_in_slot);
        }
        // Out of epoll before the device's fds are closed.
        self.unwatch_vfio(id, ops);
        let d = self.passthrough.detach(id)?;
        self.ops.remove(id);
        self.recoveries.remove(id);
        let bdf = d.guest_bdf;
        let host = d.host.bdf;
        self.add_started.remove(id);
        self.stats.record(reason.into(), started.elapsed());
        log::info!("device {id} (host {host}) removed: {reason:?}");
        self.publish(EventKind::DeviceRemoved {
            id: d.id.clone(),
            bdf,
            host_bdf: host,
            reason,
        });
        Some(RemoveDeviceResponse {
            id: d.id.clone(),
            bdf,
            host_bdf: host,
            reason,
            duration_ms: now_ms(started.elapsed()),
        })
    }

    /// Advances every pending operation: slot accepted, guest took the device, guest powered the
    /// slot off, or a deadline passed.
    fn advance(&mut self, ops: &mut EventOps) {
        self.acpi_collect();
        let now = Instant::now();
        let ids: Vec<DeviceId> = self.ops.keys().cloned().collect();
        for id in ids {
            let Some(op) = self.ops.remove(&id) else {
                continue;
            };
            if let Some(op) = self.advance_one(&id, op, now, ops) {
                self.ops.insert(id, op);
            }
        }
        self.acpi_renotify(now);
        self.check_recoveries(now, ops);
        self.arm_timer();
    }

    /// One step of one operation; returns it when it is still pending.
    fn advance_one(
        &mut self,
        id: &DeviceId,
        op: Op,
        now: Instant,
        ops: &mut EventOps,
    ) -> Option<Op> {
        let port_index = self.passthrough.get(id).map(|d| d.port)?;
        match op {
            Op::WaitingForSlot { reply, .. } | Op::WaitingForGuest { reply, .. }
                if reply.as_ref().is_some_and(Responder::client_gone) =>
            {
                log::warn!("hot-add of {id} rolled back: its client went away before the answer");
                self.roll_back_add(id, ops);
                if let Some(r) = reply {
                    r.reply(Err(ApiError::Unavailable(format!(
                        "hot-add of {id} rolled back: the client went away"
                    ))));
                }
                None
            }
            Op::WaitingForSlot {
                deadline,
                end,
                reply,
            } => self.offer_to_slot(id, port_index, (deadline, end), reply, now, ops),
            Op::WaitingForGuest { deadline, reply } => {
                self.check_guest_took(id, port_index, deadline, reply, now, ops)
            }
            Op::Removing(removal) => self.check_guest_released(id, port_index, removal, now, ops),
        }
    }

    /// A hot-add waiting for its slot: puts the device in when the slot is ready (the guest's
    /// pciehp enabled hotplug and acknowledged earlier events), or gives up at the deadline.
    fn offer_to_slot(
        &mut self,
        id: &DeviceId,
        port_index: usize,
        (deadline, end): (Instant, Instant),
        reply: Option<Responder<DeviceInfo>>,
        now: Instant,
        ops: &mut EventOps,
    ) -> Option<Op> {
        let inserted = match self.passthrough.slot_device(id) {
            Some(device) => self.insert_in_slot(port_index, device),
            None => Err(PassthroughError::UnknownId(id.clone())),
        };
        match inserted {
            Ok(()) => {
                log::debug!("device {id} in slot {}", port_index + 1);
                Some(Op::WaitingForGuest {
                    deadline: (now + ADD_GUEST_TIMEOUT).min(end),
                    reply,
                })
            }
            Err(PassthroughError::Slot { source, .. })
                if now < deadline && source.is_retryable() =>
            {
                Some(Op::WaitingForSlot {
                    deadline,
                    end,
                    reply,
                })
            }
            Err(e) => {
                let step = format!(
                    "waiting for the guest to enable hotplug on slot {} ({e})",
                    port_index + 1
                );
                self.fail_add(id, reply, step, ADD_SLOT_READY_TIMEOUT, ops);
                None
            }
        }
    }

    /// A hot-add in its slot: answers once the guest powered the slot on and enabled the device,
    /// or gives up at the deadline.
    fn check_guest_took(
        &mut self,
        id: &DeviceId,
        port_index: usize,
        deadline: Instant,
        reply: Option<Responder<DeviceInfo>>,
        now: Instant,
        ops: &mut EventOps,
    ) -> Option<Op> {
        let present = if self.acpi.is_some() {
            match self.acpi_guest_took(id, port_index) {
                AcpiAdd::Taken => true,
                AcpiAdd::Waiting => false,
                AcpiAdd::Failed(status) => {
                    let step = format!(
                        "the guest's ACPI hotplug reported failure {status:#x} enabling slot {}",
                        port_index + 1
                    );
                    self.fail_add(id, reply, step, ADD_GUEST_TIMEOUT, ops);
                    return None;
                }
            }
        } else {
            self.segment
                .port(port_index)
                .is_some_and(|p| p.locked().slot_state() == SlotState::Present)
        };
        if present {
            if let Some(d) = self.passthrough.get_mut(id) {
                d.state = DeviceState::Present;
            }
            let info = self.passthrough.get(id).map(|d| self.device_info(d))?;
            log::info!("device {id} added at {}", info.bdf);
            if let Some(asked) = self.add_started.remove(id) {
                self.stats.record(HotplugOpKind::Add, asked.elapsed());
            }
            self.publish(EventKind::DeviceAdded(info.clone()));
            if let Some(r) = reply {
                r.reply(Ok(info));
            }
            None
        } else if now >= deadline {
            let step = format!(
                "waiting for the guest to power on slot {} and enable the device",
                port_index + 1
            );
            self.fail_add(id, reply, step, ADD_GUEST_TIMEOUT, ops);
            None
        } else {
            Some(Op::WaitingForGuest { deadline, reply })
        }
    }

    /// A graceful removal: completes once the guest powered the slot off; at the deadline the
    /// device is surprise-removed.
    fn check_guest_released(
        &mut self,
        id: &DeviceId,
        port_index: usize,
        removal: Removal,
        now: Instant,
        ops: &mut EventOps,
    ) -> Option<Op> {
        let powered_off = if self.acpi.is_some() {
            self.acpi_ejected(port_index)
        } else {
            self.segment
                .port(port_index)
                .is_some_and(|p| p.locked().guest_powered_off())
        };
        let (reason, surprise) = if powered_off {
            (RemovalReason::GuestEjected, false)
        } else if now >= removal.deadline {
            log::warn!("device {id}: the guest did not release it in time, surprise-removing");
            (RemovalReason::TimeoutEscalated, true)
        } else {
            return Some(Op::Removing(removal));
        };
        let r = self.remove_now(id, reason, surprise, removal.started, ops);
        if let (Some(reply), Some(r)) = (removal.reply, r) {
            reply.reply(Ok(r));
        }
        None
    }

    /// Gives up a hot-add: takes the device back out of its slot (if it got there), releases it
    /// and tells the client where it stopped.
    fn fail_add(
        &mut self,
        id: &DeviceId,
        reply: Option<Responder<DeviceInfo>>,
        step: String,
        waited: Duration,
        ops: &mut EventOps,
    ) {
        log::warn!("hot-add of {id} failed while {step}");
        self.roll_back_add(id, ops);
        if let Some(r) = reply {
            r.reply(Err(ApiError::Timeout {
                step,
                after_ms: now_ms(waited),
            }));
        }
    }

    /// Undoes a hot-add that did not finish: takes the device back out of its slot (if it got
    /// there) and releases it.
    fn roll_back_add(&mut self, id: &DeviceId, ops: &mut EventOps) {
        if let Some(asked) = self.add_started.remove(id) {
            self.stats.record(HotplugOpKind::AddFailed, asked.elapsed());
        }
        if let Some(port) = self.passthrough.get(id).map(|d| d.port) {
            self.withdraw_from_slot(port);
        }
        self.unwatch_vfio(id, ops);
        self.passthrough.detach(id);
    }

    /// The host asked for device `id` back (VFIO request interrupt) or reported it failed.
    fn host_event(&mut self, id: &DeviceId, kind: VfioIrq, ops: &mut EventOps) {
        let reason = match kind {
            VfioIrq::Request => RemovalReason::HostRequest,
            VfioIrq::Error | VfioIrq::AerCleared => RemovalReason::DeviceError,
        };
        log::warn!("device {id}: {reason:?}, surprise-removing it from the guest");
        let pending = self.ops.remove(id);
        let r = self.remove_now(id, reason, true, Instant::now(), ops);
        match pending {
            Some(Op::WaitingForSlot { reply, .. }) | Some(Op::WaitingForGuest { reply, .. }) => {
                if let Some(reply) = reply {
                    reply.reply(Err(ApiError::Conflict(format!(
                        "the host took device {id} back while it was being added ({reason:?})"
                    ))));
                }
            }
            Some(Op::Removing(Removal { reply, .. })) => {
                if let (Some(reply), Some(r)) = (reply, r) {
                    reply.reply(Ok(r));
                }
            }
            None => {}
        }
    }

    fn publish(&self, kind: EventKind) {
        self.events.publish(Event::now(kind));
    }

    /// Puts device `id`'s VFIO request and error interrupts into the event loop.
    fn watch_vfio(&mut self, id: &DeviceId, ops: &mut EventOps) {
        let Some(d) = self.passthrough.get(id) else {
            return;
        };
        let fds = [
            (
                d.device.request_event().map(|e| e.as_raw_fd()),
                VfioIrq::Request,
            ),
            (
                d.device.error_event().map(|e| e.as_raw_fd()),
                VfioIrq::Error,
            ),
            (
                d.device.aer_cleared_event().map(|e| e.as_raw_fd()),
                VfioIrq::AerCleared,
            ),
        ];
        for (fd, kind) in fds {
            let Some(fd) = fd else { continue };
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(TOKEN_VFIO_FIRST);
            match ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                Ok(()) => {
                    self.watched.insert(token, (id.clone(), fd, kind));
                }
                Err(e) => log::warn!("device {id}: cannot watch its VFIO interrupt: {e:?}"),
            }
        }
    }

    /// Takes device `id`'s VFIO interrupts out of the event loop.
    fn unwatch_vfio(&mut self, id: &DeviceId, ops: &mut EventOps) {
        let tokens: Vec<u32> = self
            .watched
            .iter()
            .filter(|(_, (dev, _, _))| dev == id)
            .map(|(&t, _)| t)
            .collect();
        for t in tokens {
            if let Some((_, fd, _)) = self.watched.remove(&t) {
                if let Err(e) = ops.remove(Events::with_data_raw(fd, t, EventSet::IN)) {
                    log::debug!("device {id}: removing its VFIO interrupt from epoll: {e:?}");
                }
            }
        }
    }

    /// The earliest moment something must happen without the guest doing anything: an
    /// operation's deadline, or an unread ACPI notification to signal again.
    fn next_wake(&self) -> Option<Instant> {
        let deadlines = self.ops.values().map(|op| match op {
            Op::WaitingForSlot { deadline, .. } | Op::WaitingForGuest { deadline, .. } => *deadline,
            Op::Removing(r) => r.deadline,
        });
        deadlines
            .chain(self.acpi_next_wake())
            .chain(self.next_recovery_deadline())
            .min()
    }

    /// Arms the timer for [`Controller::next_wake`] (one shot), or disarms it. Guest actions
    /// that advance an operation wake the controller through the slot notifier, so the timer
    /// is only for deadlines.
    fn arm_timer(&mut self) {
        let next = self.next_wake();
        if next.is_none() && !self.timer_armed {
            return;
        }
        if let Some(t) = self.timer.as_mut() {
            let r = match next {
                // A zero expiry would disarm the timer: at least a millisecond.
                Some(at) => t.reset(
                    at.saturating_duration_since(Instant::now()).max(MIN_TIMER),
                    None,
                ),
                None => t.clear(),
            };
            match r {
                Ok(()) => self.timer_armed = next.is_some(),
                Err(e) => log::warn!("hotplug timer: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_QUEUE => {
                let requests = self.queue.as_ref().map(|q| q.drain()).unwrap_or_default();
                if requests.is_empty() {
                    // A wake-up without a request: a client went away (see `Responder`).
                    self.advance(ops);
                }
                for req in requests {
                    self.handle_request(req, ops);
                }
            }
            TOKEN_SLOTS => {
                let _ = self.notifier.event().read();
                self.advance(ops);
            }
            TOKEN_TIMER => {
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.wait();
                }
                self.advance(ops);
            }
            token => {
                let Some((id, fd, kind)) = self.watched.get(&token).cloned() else {
                    return;
                };
                // Consume the eventfd counter so a level-triggered epoll does not spin.
                let mut buf = [0u8; 8];
                // SAFETY: reading 8 bytes from an eventfd we registered into a stack buffer.
                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                match kind {
                    VfioIrq::Request => self.host_event(&id, kind, ops),
                    VfioIrq::Error => self.device_error(&id, ops),
                    VfioIrq::AerCleared => self.advance(ops),
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(q) = &self.queue {
            if let Err(e) = ops.add(Events::with_data(q.event_fd(), TOKEN_QUEUE, EventSet::IN)) {
                log::error!("cannot watch the control API queue: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            self.notifier.event(),
            TOKEN_SLOTS,
            EventSet::IN,
        )) {
            log::error!("cannot watch hotplug slot changes: {e:?}");
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(t, TOKEN_TIMER, EventSet::IN)) {
                log::error!("cannot watch the hotplug timer: {e:?}");
            }
        }
        let ids: Vec<DeviceId> = self.passthrough.devices().map(|d| d.id.clone()).collect();
        for id in ids {
            self.watch_vfio(&id, ops);
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Refuse what is still waiting; the devices are released when `passthrough` drops.
        for (id, op) in std::mem::take(&mut self.ops) {
            let err =
                ApiError::Unavailable(format!("the VM stopped while device {id} was changing"));
            match op {
                Op::WaitingForSlot { reply, .. } | Op::WaitingForGuest { reply, .. } => {
                    if let Some(r) = reply {
                        r.reply(Err(err));
                    }
                }
                Op::Removing(Removal { reply, .. }) => {
                    if let Some(r) = reply {
                        r.reply(Err(err));
                    }
                }
            }
        }
        if let Some(q) = &self.queue {
            for req in q.drain() {
                req.fail(ApiError::Unavailable("the VM is stopping".into()));
            }
        }
    }
}

/// The API error for a failed attach: conflicts (409) for what another owner or the VM's
/// limits hold, bad requests (400) for what the caller must fix, the rest internal.
fn api_error(spec: &str, e: PassthroughError) -> ApiError {
    let msg = format!(
        "cannot add device {spec}: {}",
        rvmm_devices::error_chain(&e)
    );
    match e {
        PassthroughError::Limit(_)
        | PassthroughError::DuplicateId(_)
        | PassthroughError::AlreadyAttached { .. }
        | PassthroughError::NoFreePort { .. } => ApiError::Conflict(msg),
        PassthroughError::Host(rvmm_vfio::HostError::GroupBusy { .. }) => ApiError::Conflict(msg),
        PassthroughError::Host(_)
        | PassthroughError::BarDoesNotFit { .. }
        | PassthroughError::GroupNotHeld(_)
        | PassthroughError::GroupForVf => ApiError::BadRequest(msg),
        // No free VF: another VM holds them all.
        PassthroughError::Vf(SriovError::NoFreeVf { .. }) => ApiError::Conflict(msg),
        PassthroughError::Vf(SriovError::Claim(_) | SriovError::ReadSettings { .. }) => {
            ApiError::Internal(msg)
        }
        // PF not found / not SR-IOV / no VFs, a setting the PF refused, a VF that won't bind:
        // the caller must change the request or prepare the host.
        PassthroughError::Vf(_) => ApiError::BadRequest(msg),
        _ => ApiError::Internal(msg),
    }
}
