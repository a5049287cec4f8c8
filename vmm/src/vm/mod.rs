//! A VM: KVM objects, guest memory, buses, devices and vCPUs, built from a [`VmConfig`], and
//! its life: the configuration ([`config`]), the event loop ([`event_loop`]) with the console
//! input ([`console`]), and how it ends ([`exit`]).

pub mod config;
pub mod console;
pub mod console_out;
pub mod console_pty;
pub mod console_socket;
pub mod event_loop;
pub mod exit;
pub mod pause;
pub mod reboot;
pub mod root_ports;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use rvmm_devices::Bus;
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::api::{
    ApiRequestQueue, ApiServer, DeviceInfo, Event, EventBus, EventKind, QueueTimeouts,
    QueuedHandler, ServerConfig, ServerError, ShutdownReason,
};
use crate::boot::{self, BootSource, EntryPoint};
use crate::cpu;
use crate::cpu::pause::VcpuPause;
use crate::cpu::reset::VcpuPowerOn;
use crate::cpu::vcpu::{self, VcpuContext, VcpuHandle};
use crate::device::passthrough::raise_fd_limit;
use crate::hotplug::controller::{Controller, CounterSources, VmSummary};
use crate::machine::device_manager::{adopt_inherited_groups, DeviceError, DeviceManager, Machine};
use crate::memory;
use crate::observe::event_log::EventLogError;
use crate::observe::{EventLog, EventLogTarget, MemoryCounters, VmCounters};
use crate::placement::{self, PlacementError};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadFilter, ThreadKind};
use crate::vm::config::{ConfigError, VmConfig};
use crate::vm::event_loop::{EventLoop, EventLoopError};
use crate::vm::exit::{ExitSignal, VmExit};
use crate::vm::pause::VmPause;
use crate::vm::reboot::{ControllerHandle, OnReboot, Payload, PowerOnState};

/// How long the end of a VM waits for the console writer to pass on the guest's last output.
const CONSOLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the end of a VM waits for the event log to be written.
const EVENT_LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// TSS area KVM needs on Intel hosts (3 pages, inside the 32-bit hole, unused by anything else).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Identity-map page KVM needs on Intel hosts (just below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors of building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// /dev/kvm does not exist.
    #[error("/dev/kvm not found: KVM is not available on this host (load kvm-intel or kvm-amd, and enable virtualization in the firmware)")]
    KvmMissing,
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (run as root or add the user to the kvm group)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// KVM refused to create a VM or a core part of it.
    #[error("/dev/kvm is not usable: {what} failed")]
    Kvm {
        /// The call that failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM capability rvmm needs is missing.
    #[error(
        "/dev/kvm lacks {0:?}, which rvmm needs (an in-kernel IRQ chip host with KVM_CAP_{0:?})"
    )]
    KvmCap(Cap),
    /// Guest RAM or the vCPUs cannot be placed as asked.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Guest memory could not be reserved.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// A device could not be created.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The control API could not be started.
    #[error(transparent)]
    Api(#[from] ServerError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The event log could not be opened or started.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// A thread or fd could not be created.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of VM operations.
pub type Result<T> = std::result::Result<T, VmError>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm with a clear error when it is missing or not accessible.
fn open_kvm() -> Result<Kvm> {
    if !Path::new("/dev/kvm").exists() {
        return Err(VmError::KvmMissing);
    }
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    for cap in [
        Cap::Irqchip,
        Cap::Irqfd,
        Cap::UserMemory,
        Cap::SignalMsi,
        Cap::Pit2,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCap(cap));
        }
    }
    Ok(kvm)
}

/// A VM built and loaded, ready to run.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    devices: DeviceManager,
    vcpus: Vec<VcpuFd>,
    summary: VmSummary,
    api_socket: Option<PathBuf>,
    seccomp: SeccompMode,
    events: Arc<EventBus>,
    control: ApiRequestQueue,
    created: std::time::Instant,
    counters: Arc<VmCounters>,
    event_log: Option<EventLog>,
    page_size: u64,
    /// The host CPUs of each vCPU thread ([`placement`]), if restricted; vCPU `i` at index `i`.
    vcpu_cpus: Vec<Option<Arc<placement::CpuList>>>,
    on_reboot: OnReboot,
    /// Loaded again at each reboot in place.
    payload: Payload,
    /// The interrupt controllers and PIT as created, written back at each reboot in place.
    power_on: PowerOnState,
    /// Each vCPU's state as created, the baseline of its reset at each reboot in place.
    vcpus_power_on: Vec<VcpuPowerOn>,
}

impl Vm {
    /// Builds the VM described by `config`: reserves and pins memory, creates the devices and
    /// ACPI tables, loads the kernel and configures every vCPU. Nothing runs yet.
    pub fn new(config: &VmConfig) -> Result<Self> {
        let created = std::time::Instant::now();
        // Inherited group descriptors first: before rvmm opens anything of its own, a number
        // can only be one the caller handed over.
        let config = &VmConfig {
            devices: adopt_inherited_groups(&config.devices)?,
            ..config.clone()
        };
        // The event log next, taken over or opened before anything else, and on the bus before
        // anything is published.
        let events = Arc::new(EventBus::new());
        let event_log = start_event_log(config)?;
        if let Some(log) = &event_log {
            events.attach(log.sink());
        }
        raise_fd_limit();
        let kvm = open_kvm()?;
        let max_cpus = u8::try_from(kvm.get_max_vcpus()).unwrap_or(u8::MAX);
        config.validate(max_cpus)?;
        // Before anything is reserved: explicit options that cannot be honoured are refused here.
        let (placement, guest_topology) =
            placement::plan(config, std::path::Path::new(placement::SYSFS))?;

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let power_on = PowerOnState::capture(&vm_fd)?;

        let memory = memory::reserve_placed(&config.memory, &memory::SystemHost, &placement)?;
        register_memory(&vm_fd, &memory)?;

        let exit = Arc::new(ExitSignal::new().map_err(|source| VmError::Io {
            what: "create the exit event",
            source,
        })?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let devices = DeviceManager::new(
            Machine {
                vm_fd: &vm_fd,
                memory: &memory,
                pio: &pio,
                mmio: &mmio,
                exit: exit.clone(),
                phys_bits: phys_bits(&kvm),
                max_memslots: u32::try_from(kvm.get_nr_memslots()).unwrap_or(0),
                guest_topology: guest_topology.as_ref(),
            },
            config,
        )?;

        let entry = boot::load(
            &memory,
            &BootSource {
                kernel: &config.kernel,
                initramfs: config.initramfs.as_deref(),
                cmdline: &config.cmdline,
                rsdp: devices.rsdp_address(),
            },
        )?;
        let (vcpus, vcpus_power_on) = create_vcpus(&kvm, &vm_fd, &memory, entry, config.cpus)?;
        let console = Some(devices.console_info());
        Ok(Self {
            vm_fd,
            memory,
            pio,
            mmio,
            exit,
            devices,
            vcpus,
            summary: VmSummary {
                cpus: config.cpus,
                memory_bytes: config.memory.size,
                hugepages: config.memory.hugepages,
                console,
                placement: Some(placement.clone()),
                hotplug: config.hotplug,
            },
            api_socket: config.api_socket.clone(),
            seccomp: config.seccomp,
            events,
            control: ApiRequestQueue::new().map_err(|source| VmError::Io {
                what: "create the control queue",
                source,
            })?,
            created,
            counters: Arc::new(VmCounters::new(config.cpus)),
            event_log,
            page_size: config.memory.page_size(),
            vcpu_cpus: (0..usize::from(config.cpus))
                .map(|i| placement.vcpu_cpus_of(i).map(Arc::new))
                .collect(),
            on_reboot: config.on_reboot,
            payload: Payload {
                kernel: config.kernel.clone(),
                initramfs: config.initramfs.clone(),
                cmdline: config.cmdline.clone(),
            },
            power_on,
            vcpus_power_on,
        })
    }

    /// Attaches one more passthrough device to the created VM, before [`Vm::run`]: it is
    /// present when the guest starts, like the devices of the configuration (a device added
    /// while the VM runs is a hot-add through [`Vm::handle`]). Placement was decided at
    /// [`Vm::new`] from the configuration's devices; this one does not change it.
    pub fn add_device(&mut self, spec: &crate::device::DeviceSpec) -> Result<DeviceInfo> {
        Ok(self.devices.attach_cold(spec)?)
    }

    /// The VM's counters (exits, uptime, reboots), shared with its threads.
    pub fn counters(&self) -> &Arc<VmCounters> {
        &self.counters
    }

    /// The guest memory (pinned, locked).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The VM's event stream (device-added, device-removed, vm-shutdown, ...); library users
    /// subscribe here, the control API serves the same stream.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// A handle to control the VM from other threads while [`Vm::run`] runs: add and remove
    /// devices, read its info, subscribe to its events, press its power button, shut it down
    /// (also [`QueuedHandler::force_power_off`]). The control API server is
    /// a thin layer over the same handle. Take handles before calling `run`.
    pub fn handle(&self) -> QueuedHandler {
        self.control
            .handler(self.events.clone(), QueueTimeouts::default())
    }

    /// Runs the VM until the guest powers off, a vCPU fails, or a handle stops it. A guest reset
    /// reboots the VM in place with [`OnReboot::Restart`] (see [`reboot`]) and ends it with
    /// [`OnReboot::Exit`].
    ///
    /// Every way out, an error included, ends the same way: vCPUs stopped, the terminal
    /// restored, every passthrough device released (VF leases too), the console drained, then
    /// `vm-shutdown` published with the reason (`error` for an error) and the event streams
    /// ended, and last the control API stopped.
    pub fn run(mut self) -> Result<VmExit> {
        let mut server = None;
        let result = self.run_until_exit(&mut server);
        // Devices that never reached the controller (it releases its own when it drops).
        drop(self.devices.take_passthrough());
        // The guest's last words reach the console unless its reader stalls.
        if let Some(writer) = self.devices.take_console_writer() {
            writer.finish(CONSOLE_DRAIN_TIMEOUT);
        }
        // The error itself is the caller's to report (`rvmm run` prints it on one line).
        let reason = match &result {
            Ok(exit) => ShutdownReason::from(*exit),
            Err(_) => ShutdownReason::Error,
        };
        self.events
            .publish(Event::now(EventKind::VmShutdown { reason }));
        self.events.close();
        if let Some(log) = self.event_log.take() {
            log.finish(EVENT_LOG_DRAIN_TIMEOUT);
        }
        // After the last event: open streams send it before they end.
        if let Some(server) = server {
            server.stop();
        }
        result
    }

    /// Everything of [`Vm::run`] up to the end of the event loop; the API server it starts is
    /// left in `server` for `run` to stop last.
    fn run_until_exit(&mut self, server: &mut Option<ApiServer>) -> Result<VmExit> {
        vcpu::install_kick_handler().map_err(|source| VmError::Io {
            what: "install the vCPU kick signal handler",
            source,
        })?;
        // Built before any thread starts, so a filter that cannot be built stops nothing.
        let vcpu_filter = Arc::new(ThreadFilter::new(ThreadKind::Vcpu, self.seccomp)?);
        let loop_filter = ThreadFilter::new(ThreadKind::EventLoop, self.seccomp)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(VcpuPause::new(stop.clone()));
        // Dropping the loop restores the terminal and drops the controller (pending API calls
        // refused, devices released), on the error paths below too.
        let mut event_loop = EventLoop::new(self.exit.clone())?;
        if let (Some(serial), Some(host)) =
            (self.devices.serial(), self.devices.take_console_host())
        {
            event_loop.add_console(host, serial)?;
        }
        if let Some(path) = &self.api_socket {
            *server = Some(ApiServer::start_with(
                path,
                Arc::new(self.handle()),
                ServerConfig {
                    seccomp: self.seccomp,
                    ..ServerConfig::default()
                },
            )?);
        }
        let (cold_plugged, controller) = self.add_controller(&mut event_loop, &pause)?;
        let mut handles = self.start_vcpus(&stop, &pause, &vcpu_filter)?;
        // Before the event loop runs, so these come first in every stream and log.
        self.counters.mark_started();
        self.events.publish(Event::now(EventKind::VmStarted {
            cpus: self.summary.cpus,
        }));
        for device in cold_plugged {
            self.events
                .publish(Event::now(EventKind::DeviceAdded(device)));
        }
        log::info!(
            "{} vCPUs running {:?} after the VM began to be built",
            handles.len(),
            self.created.elapsed()
        );
        loop {
            let result = run_event_loop(&mut event_loop, &loop_filter);
            // Also wakes vCPUs parked by a pause.
            pause.stop();
            let vcpus: Vec<Option<VcpuFd>> = handles.into_iter().map(VcpuHandle::join).collect();
            let restart = result.is_ok()
                && self.on_reboot == OnReboot::Restart
                && vcpus.iter().all(Option::is_some)
                && self.exit.take_reset();
            if !restart {
                event_loop.restore_terminal();
                drop(event_loop);
                result?;
                return Ok(self.exit.requested().unwrap_or(VmExit::PowerOff));
            }
            self.vcpus = vcpus.into_iter().flatten().collect();
            self.reboot(&mut event_loop, controller.as_ref())?;
            pause.rearm();
            handles = self.start_vcpus(&stop, &pause, &vcpu_filter)?;
        }
    }

    /// Hands the passthrough devices to the hotplug controller, which then serves the VM's
    /// control queue on the event loop and pauses the vCPUs through `pause`; returns the
    /// devices attached at boot.
    fn add_controller(
        &mut self,
        event_loop: &mut EventLoop,
        pause: &Arc<VcpuPause>,
    ) -> Result<(Vec<DeviceInfo>, Option<ControllerHandle>)> {
        let passthrough = self.devices.take_passthrough();
        let (Some(pci), Some(passthrough)) = (self.devices.pci(), passthrough) else {
            return Ok((Vec::new(), None));
        };
        let queue = std::mem::replace(
            &mut self.control,
            ApiRequestQueue::new().map_err(|source| VmError::Io {
                what: "create the control queue",
                source,
            })?,
        );
        let mut controller = Controller::new(
            pci.segment.clone(),
            passthrough,
            pci.notifier.clone(),
            self.exit.clone(),
            self.events.clone(),
            queue,
            self.summary.clone(),
        )
        .with_counters(CounterSources {
            vm: self.counters.clone(),
            memory: MemoryCounters {
                reserved_bytes: self.summary.memory_bytes,
                locked_bytes: 0,
                page_size: self.page_size,
            },
            event_log: self.event_log.as_ref().map(EventLog::counts_reader),
        })
        .with_pause(VmPause::new(
            pause.clone(),
            self.vm_fd.clone(),
            self.events.clone(),
        ));
        let cold_plugged = controller.devices();
        if let Some(ged) = self.devices.ged() {
            controller = controller.with_power_button(ged);
        }
        if let Some(registers) = self.devices.pci_hotplug() {
            controller = controller.with_acpi_hotplug(registers);
        }
        let controller = Arc::new(Mutex::new(controller));
        let id = event_loop.add_subscriber(controller.clone());
        Ok((cold_plugged, Some(ControllerHandle { controller, id })))
    }

    /// Starts one thread per vCPU; if one cannot start, stops and joins those already started.
    fn start_vcpus(
        &mut self,
        stop: &Arc<AtomicBool>,
        pause: &Arc<VcpuPause>,
        filter: &Arc<ThreadFilter>,
    ) -> Result<Vec<VcpuHandle>> {
        let vcpus = std::mem::take(&mut self.vcpus);
        let mut handles = Vec::with_capacity(vcpus.len());
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                pause: pause.clone(),
                seccomp: filter.clone(),
                counters: self.counters.clone(),
                affinity: self.vcpu_cpus.get(index).cloned().flatten(),
            };
            // At most MAX_CPUS (254) vCPUs exist.
            match VcpuHandle::spawn(index as u8, vcpu, ctx) {
                Ok(h) => handles.push(h),
                Err(source) => {
                    pause.stop();
                    for handle in handles {
                        handle.join();
                    }
                    return Err(VmError::Io {
                        what: "start a vCPU thread",
                        source,
                    });
                }
            }
        }
        Ok(handles)
    }
}

/// Runs the event loop on its own thread, `rvmm-vmm`, under the event-loop seccomp filter, which
/// lives and ends with that thread: the caller's thread is never filtered. With
/// [`seccomp::SELFTEST_ENV`] set, the thread first makes a syscall its filter forbids.
fn run_event_loop(event_loop: &mut EventLoop, filter: &ThreadFilter) -> Result<()> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("rvmm-vmm".into())
            .spawn_scoped(scope, || -> Result<()> {
                let selftest = seccomp::selftest_requested();
                filter.apply()?;
                if selftest {
                    seccomp::run_selftest();
                }
                Ok(event_loop.run()?)
            })
            .map_err(|source| VmError::Io {
                what: "start the event loop thread",
                source,
            })?;
        thread.join().unwrap_or_else(|_| {
            Err(VmError::Io {
                what: "run the event loop",
                source: std::io::Error::other("the event loop thread panicked"),
            })
        })
    })
}

/// Opens `config.event_log` (an inherited descriptor must not be a device's group-fd too) and
/// starts its writer thread.
fn start_event_log(config: &VmConfig) -> Result<Option<EventLog>> {
    let Some(target) = &config.event_log else {
        return Ok(None);
    };
    if let EventLogTarget::Fd(fd) = target {
        let shared = config
            .devices
            .iter()
            .filter_map(|d| d.group.as_ref())
            .any(|g| g.number() == *fd);
        if shared {
            return Err(EventLogError::Shared(*fd).into());
        }
    }
    let out = target.open()?;
    let filter = ThreadFilter::new(ThreadKind::Console, config.seccomp)?;
    Ok(Some(EventLog::start(Box::new(out), filter)?))
}

/// Registers every guest RAM region as a KVM memory slot (slots 0..n).
fn register_memory(vm_fd: &VmFd, memory: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Io {
                what: "find the host address of guest memory",
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which outlives the VM fd's use of
        // it: the Vm keeps both and drops the VM fd (and so the slots) no later than the memory.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The host's physical address width (CPUID 0x80000008), 36 when unknown.
fn phys_bits(kvm: &Kvm) -> u8 {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| {
            c.as_slice()
                .iter()
                .find(|e| e.function == 0x8000_0008)
                .map(|e| (e.eax & 0xff) as u8)
        })
        .filter(|&b| b >= 32)
        .unwrap_or(36)
}

fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    entry: EntryPoint,
    count: u8,
) -> Result<(Vec<VcpuFd>, Vec<VcpuPowerOn>)> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    (0..count)
        .map(|i| {
            let vcpu = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let power_on = VcpuPowerOn::capture(&vcpu, i)?;
            cpu::configure_cpuid(&vcpu, &supported, i, count)?;
            cpu::configure_msrs(&vcpu, i)?;
            cpu::configure_registers(&vcpu, memory, entry, i)?;
            cpu::configure_fpu(&vcpu, i)?;
            cpu::configure_lapic(&vcpu, i)?;
            Ok((vcpu, power_on))
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}
