//! rvmm without a VM: the VMM of `rvmm run --api-socket PATH` alone. It serves the control API
//! and holds at most one VM, which the API creates ([`Vm::new`]: memory reserved, machine
//! built, cold-plugged devices attached), boots ([`Vm::run`]: vCPUs started), shuts down and
//! deletes (everything it held released); a new VM can then be created in the same process.
//!
//! Threads: [`VmManager::serve`] runs on the caller's thread, which stays unfiltered by seccomp
//! (building a VM opens /dev/kvm, maps memory, opens devices): API connection threads hand it
//! `create`, `boot`, `delete` and `quit` over a channel and wait for the answer; while the VM
//! runs, that thread is inside [`Vm::run`], and the VM-level requests go straight to the VM's
//! [`QueuedHandler`]. The state every thread reads is one [`Mutex`] with a [`Condvar`] that
//! announces each change; a connection thread claims a transition (`Creating`, `Booting`)
//! under the lock before it asks, so two requests never race for one VM.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rvmm_devices::sync::MutexExt;

use crate::api::ch::{ChError, ChVmState, VmmControl};
use crate::api::events::EventBus;
use crate::api::{
    ApiError, ApiHandler, ApiServer, DeviceInfo, QueuedHandler, RemoveDeviceRequest,
    RemoveDeviceResponse, ServerConfig, ServerError, Subscription, VmInfo,
};
use crate::device::DeviceSpec;
use crate::observe::Counters;
use crate::vm::config::VmConfig;
use crate::vm::exit::VmExit;
use crate::vm::Vm;

/// How long a request waits for the VMM thread (building a VM prefaults all its memory).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a shutdown waits for the VM to end.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the one VM is.
#[derive(Clone)]
enum Phase {
    /// No VM.
    Empty,
    /// A create is under way on the VMM thread.
    Creating,
    /// Created, not booted.
    Created,
    /// A boot is under way on the VMM thread.
    Booting,
    /// Booted; requests go to its handle.
    Running(Arc<QueuedHandler>),
    /// Ended; its configuration is kept for a new boot.
    Shutdown,
    /// rvmm is ending.
    Quitting,
}

struct State {
    phase: Phase,
    config: Option<VmConfig>,
    /// How the last VM ended.
    last_exit: Option<VmExit>,
}

/// What the VMM thread is asked to do.
enum Command {
    Create(Box<VmConfig>, Sender<Result<(), ChError>>),
    AddDevice(DeviceSpec, Sender<Result<(), ChError>>),
    Boot(Sender<Result<(), ChError>>),
    Delete(Sender<Result<(), ChError>>),
    Quit(Sender<Result<(), ChError>>),
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    commands: Mutex<Sender<Command>>,
}

/// The VMM of `rvmm run` without `--kernel`; see the module documentation.
pub struct VmManager {
    shared: Arc<Shared>,
    commands: Receiver<Command>,
}

/// Errors of running the VMM.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The API server could not start.
    #[error(transparent)]
    Api(#[from] ServerError),
}

impl Default for VmManager {
    fn default() -> Self {
        Self::new()
    }
}

impl VmManager {
    /// A VMM without a VM.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    phase: Phase::Empty,
                    config: None,
                    last_exit: None,
                }),
                changed: Condvar::new(),
                commands: Mutex::new(tx),
            }),
            commands: rx,
        }
    }

    /// The API handler of this VMM: rvmm's own `/v1` API reaches the running VM through it,
    /// Cloud Hypervisor's API also creates, boots and deletes VMs.
    pub fn handler(&self) -> Arc<dyn ApiHandler> {
        Arc::new(ManagerHandler {
            shared: self.shared.clone(),
        })
    }

    /// Serves the API on `socket` (a path, or `fd=N`) and runs the VMs it asks for on this
    /// thread until `vmm.shutdown`; returns how the last VM ended, if one ran.
    pub fn serve(
        self,
        socket: &std::path::Path,
        config: ServerConfig,
    ) -> Result<Option<VmExit>, ManagerError> {
        let server = ApiServer::start_with(socket, self.handler(), config)?;
        let exit = self.run();
        server.stop();
        Ok(exit)
    }

    /// Runs the commands of the API until `quit`.
    pub fn run(self) -> Option<VmExit> {
        let mut created: Option<Vm> = None;
        while let Ok(command) = self.commands.recv() {
            match command {
                Command::Create(config, reply) => match Vm::new(&config) {
                    Ok(vm) => {
                        created = Some(vm);
                        self.set(|s| {
                            s.phase = Phase::Created;
                            s.config = Some(*config);
                        });
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        self.set(|s| s.phase = Phase::Empty);
                        let _ = reply.send(Err(ChError {
                            status: create_status(&e),
                            message: format!("vm.create: {}", rvmm_devices::error_chain(&e)),
                        }));
                    }
                },
                Command::AddDevice(spec, reply) => {
                    let _ = reply.send(self.add_cold(created.as_mut(), spec));
                }
                Command::Boot(reply) => self.boot(created.take(), reply),
                Command::Delete(reply) => {
                    drop(created.take());
                    self.set(|s| {
                        s.phase = Phase::Empty;
                        s.config = None;
                    });
                    let _ = reply.send(Ok(()));
                }
                Command::Quit(reply) => {
                    drop(created.take());
                    self.set(|s| s.phase = Phase::Quitting);
                    let _ = reply.send(Ok(()));
                    break;
                }
            }
        }
        self.shared.state.locked().last_exit
    }

    /// Attaches `spec` to the created VM and keeps it in the configuration (`vm.info`, a boot
    /// after a shutdown).
    fn add_cold(&self, vm: Option<&mut Vm>, mut spec: DeviceSpec) -> Result<(), ChError> {
        let vm = vm.ok_or_else(|| ChError::not_allowed("vm.add-device: the VM is not created"))?;
        let info = vm.add_device(&spec).map_err(|e| ChError {
            status: match e {
                crate::vm::VmError::Device(_) => 400,
                _ => 500,
            },
            message: format!("vm.add-device: {}", rvmm_devices::error_chain(&e)),
        })?;
        spec.id = Some(info.id);
        self.set(|s| {
            if let Some(config) = s.config.as_mut() {
                config.devices.push(spec);
            }
        });
        Ok(())
    }

    /// Boots `vm` (or a new VM from the kept configuration after a shutdown) and runs it on
    /// this thread until it ends.
    fn boot(&self, vm: Option<Vm>, reply: Sender<Result<(), ChError>>) {
        let vm = match vm {
            Some(vm) => Ok(vm),
            None => {
                let config = self.shared.state.locked().config.clone();
                match config {
                    Some(config) => Vm::new(&config).map_err(|e| ChError {
                        status: create_status(&e),
                        message: format!("vm.boot: {}", rvmm_devices::error_chain(&e)),
                    }),
                    None => Err(ChError::not_created("vm.boot")),
                }
            }
        };
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                self.set(|s| s.phase = Phase::Shutdown);
                let _ = reply.send(Err(e));
                return;
            }
        };
        let handle = Arc::new(vm.handle());
        self.set(|s| s.phase = Phase::Running(handle));
        let _ = reply.send(Ok(()));
        let result = vm.run();
        match &result {
            Ok(exit) => log::info!("the VM ended: {exit:?}"),
            Err(e) => log::error!(
                "the VM ended with an error: {}",
                rvmm_devices::error_chain(e)
            ),
        }
        self.set(|s| {
            s.phase = Phase::Shutdown;
            s.last_exit = result.ok();
        });
    }

    fn set(&self, change: impl FnOnce(&mut State)) {
        set(&self.shared, change);
    }
}

fn set(shared: &Shared, change: impl FnOnce(&mut State)) {
    change(&mut shared.state.locked());
    shared.changed.notify_all();
}

/// 400 for what the request got wrong (its configuration), 500 for what the host did.
fn create_status(e: &crate::vm::VmError) -> u16 {
    match e {
        crate::vm::VmError::Config(_) | crate::vm::VmError::Placement(_) => 400,
        _ => 500,
    }
}

/// The API handler of a [`VmManager`].
struct ManagerHandler {
    shared: Arc<Shared>,
}

impl ManagerHandler {
    /// Sends `command` (built with its reply channel) to the VMM thread and waits.
    fn ask(
        &self,
        command: impl FnOnce(Sender<Result<(), ChError>>) -> Command,
    ) -> Result<(), ChError> {
        let (tx, rx) = mpsc::channel();
        self.shared
            .commands
            .locked()
            .send(command(tx))
            .map_err(|_| unavailable())?;
        rx.recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| ChError::from(ApiError::Unavailable("the VMM did not answer".into())))?
    }

    /// The running VM's handle, or why there is none.
    fn running(&self) -> Result<Arc<QueuedHandler>, ApiError> {
        match &self.shared.state.locked().phase {
            Phase::Running(handle) => Ok(handle.clone()),
            Phase::Empty => Err(ApiError::Conflict(
                "no VM is created: create and boot one (PUT /api/v1/vm.create, then PUT /api/v1/vm.boot)".into(),
            )),
            _ => Err(ApiError::Conflict(
                "the VM is not running: boot it (PUT /api/v1/vm.boot)".into(),
            )),
        }
    }

    /// Stops the running VM (if it runs) and waits until it has ended.
    fn stop_vm(&self) -> Result<(), ChError> {
        // A boot under way first becomes a running VM (or fails).
        self.wait_while(|p| matches!(p, Phase::Booting))?;
        let handle = match &self.shared.state.locked().phase {
            Phase::Running(handle) => handle.clone(),
            _ => return Ok(()),
        };
        // A VM that ends on its own meanwhile refuses: the wait below covers both.
        if let Err(e) = handle.shutdown() {
            log::info!("shutdown: {e}");
        }
        self.wait_while(|p| matches!(p, Phase::Running(_) | Phase::Booting))
    }

    /// Waits until the phase no longer satisfies `busy`, at most [`END_TIMEOUT`].
    fn wait_while(&self, busy: impl Fn(&Phase) -> bool) -> Result<(), ChError> {
        let deadline = Instant::now() + END_TIMEOUT;
        let mut state = self.shared.state.locked();
        while busy(&state.phase) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChError::from(ApiError::Timeout {
                    step: "waiting for the VM to end".into(),
                    after_ms: END_TIMEOUT.as_millis() as u64,
                }));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }
}

fn unavailable() -> ChError {
    ChError::from(ApiError::Unavailable("rvmm is shutting down".into()))
}

impl VmmControl for ManagerHandler {
    fn create(&self, config: VmConfig) -> Result<(), ChError> {
        let mut config = config;
        // The VMM serves the API; the VM starts no server of its own.
        config.api_socket = None;
        {
            let mut state = self.shared.state.locked();
            match state.phase {
                Phase::Empty => state.phase = Phase::Creating,
                Phase::Quitting => return Err(unavailable()),
                _ => return Err(ChError::from(ApiError::Conflict(
                    "vm.create: a VM is already created; delete it first (PUT /api/v1/vm.delete)"
                        .into(),
                ))),
            }
        }
        self.ask(|tx| Command::Create(Box::new(config), tx))
    }

    fn add_device_cold(&self, spec: DeviceSpec) -> Result<(), ChError> {
        let (tx, rx) = mpsc::channel();
        {
            // Checked and sent under the lock: a boot claimed after this waits behind it.
            let state = self.shared.state.locked();
            if !matches!(state.phase, Phase::Created) {
                return Err(ChError::not_allowed(
                    "vm.add-device: the VM is not in the Created state",
                ));
            }
            self.shared
                .commands
                .locked()
                .send(Command::AddDevice(spec, tx))
                .map_err(|_| unavailable())?;
        }
        rx.recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| ChError::from(ApiError::Unavailable("the VMM did not answer".into())))?
    }

    fn boot(&self) -> Result<(), ChError> {
        {
            let mut state = self.shared.state.locked();
            match state.phase {
                Phase::Created | Phase::Shutdown => state.phase = Phase::Booting,
                Phase::Empty | Phase::Creating => return Err(ChError::not_created("vm.boot")),
                Phase::Quitting => return Err(unavailable()),
                Phase::Booting | Phase::Running(_) => {
                    return Err(ChError::not_allowed("vm.boot: the VM is already booted"))
                }
            }
        }
        self.ask(Command::Boot)
    }

    fn shutdown_vm(&self) -> Result<(), ChError> {
        match self.shared.state.locked().phase {
            Phase::Running(_) => {}
            Phase::Empty | Phase::Creating => return Err(ChError::not_created("vm.shutdown")),
            _ => return Err(ChError::not_allowed("vm.shutdown: the VM is not booted")),
        }
        self.stop_vm()
    }

    fn delete(&self) -> Result<(), ChError> {
        self.stop_vm()?;
        if matches!(self.shared.state.locked().phase, Phase::Empty) {
            return Ok(());
        }
        self.ask(Command::Delete)
    }

    fn shutdown_vmm(&self) -> Result<(), ChError> {
        self.stop_vm()?;
        self.ask(Command::Quit)
    }

    fn status(&self) -> Option<(ChVmState, VmConfig)> {
        let state = self.shared.state.locked();
        let phase = match &state.phase {
            Phase::Empty | Phase::Creating | Phase::Quitting => return None,
            Phase::Created | Phase::Booting => ChVmState::Created,
            Phase::Running(_) => ChVmState::Running,
            Phase::Shutdown => ChVmState::Shutdown,
        };
        state.config.clone().map(|c| (phase, c))
    }
}

/// rvmm's own `/v1` API: the running VM's, refused with 409 while none runs.
impl ApiHandler for ManagerHandler {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.running()?.info()
    }

    fn add_device(&self, req: DeviceSpec) -> Result<DeviceInfo, ApiError> {
        self.running()?.add_device(req)
    }

    fn add_device_for(
        &self,
        req: DeviceSpec,
        client_gone: &dyn Fn() -> bool,
    ) -> Result<DeviceInfo, ApiError> {
        self.running()?.add_device_for(req, client_gone)
    }

    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError> {
        self.running()?.remove_device(req)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.running()?.shutdown()
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.running()?.pause()
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.running()?.resume()
    }

    fn power_button(&self) -> Result<(), ApiError> {
        self.running()?.power_button()
    }

    fn reboot(&self) -> Result<(), ApiError> {
        self.running()?.reboot()
    }

    fn subscribe(&self) -> Subscription {
        match self.running() {
            Ok(handle) => handle.subscribe(),
            Err(_) => {
                // Nothing runs: a stream that ends at once.
                let bus = EventBus::new();
                bus.close();
                bus.subscribe()
            }
        }
    }

    fn counters(&self) -> Result<Counters, ApiError> {
        self.running()?.counters()
    }

    fn vmm(&self) -> Option<&dyn VmmControl> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
