//! The bridge that runs API requests on the VMM's event-loop thread.
//!
//! The API server calls a [`QueuedHandler`], which puts each request with a reply channel into
//! the [`ApiRequestQueue`] and wakes the event loop through the queue's [`EventFd`]. The event
//! loop takes [`PendingRequest`]s off the queue and answers each through its [`Responder`] —
//! at once (info, shutdown) or later, when the guest has finished a hotplug (add, remove):
//! a `Responder` can be stored with the slot's state and answered from a later event.
//!
//! Every wait has a deadline, so a wedged event loop answers the client with a 504 instead of
//! hanging it; a request answered after its client gave up is dropped quietly.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::api::error::ApiError;
use crate::api::events::{EventBus, Subscription};
use crate::api::types::{DeviceInfo, RemoveDeviceRequest, RemoveDeviceResponse, VmInfo};
use crate::api::ApiHandler;
use crate::device::DeviceSpec;
use crate::observe::Counters;
use crate::vm::exit::ForcedPowerOff;

/// How long a [`QueuedHandler`] waits for the event loop's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueTimeouts {
    /// For info.
    pub info: Duration,
    /// For add-device: the VMM's own deadline ([`crate::device::ADD_DEADLINE`], counted from
    /// the request) plus a margin for its answer, so the client hears the step the VMM stopped
    /// at, and never a timeout for an add that then succeeds.
    pub add: Duration,
    /// For remove-device: added to the request's own `timeout_ms`, which the VMM escalates at.
    pub remove_margin: Duration,
    /// For shutdown, the power button and a forced power-off (all answered at once).
    pub shutdown: Duration,
    /// For pause and resume: a pause waits for every vCPU to stop
    /// ([`crate::vm::pause::PAUSE_DEADLINE`]).
    pub pause: Duration,
}

impl Default for QueueTimeouts {
    fn default() -> Self {
        Self {
            info: Duration::from_secs(5),
            add: crate::device::ADD_DEADLINE + Duration::from_secs(5),
            remove_margin: Duration::from_secs(30),
            shutdown: Duration::from_secs(10),
            pause: crate::vm::pause::PAUSE_DEADLINE + Duration::from_secs(5),
        }
    }
}

/// How often a waiting add-device looks whether its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(100);

/// The answering end of one request: reply exactly once, now or later (it may be stored).
#[derive(Debug)]
pub struct Responder<T> {
    tx: Sender<Result<T, ApiError>>,
    queued_at: Instant,
    client_gone: Arc<AtomicBool>,
}

impl<T> Responder<T> {
    /// Sends the answer; `false` when the client no longer waits for it (it timed out or went
    /// away). Dropping a `Responder` unanswered tells the client the VMM gave up on it.
    pub fn reply(self, result: Result<T, ApiError>) -> bool {
        self.tx.send(result).is_ok()
    }

    /// Time since the request was queued (e.g. for `duration_ms` of a removal).
    pub fn elapsed(&self) -> Duration {
        self.queued_at.elapsed()
    }

    /// Whether the client went away without waiting for the answer (its connection closed):
    /// the operation should be rolled back rather than finished for nobody.
    pub fn client_gone(&self) -> bool {
        self.client_gone.load(Ordering::Acquire)
    }
}

/// A request waiting for the VMM, with its typed reply channel.
#[derive(Debug)]
pub enum PendingRequest {
    /// `GET /v1/vm/info`.
    Info(Responder<VmInfo>),
    /// `PUT /v1/vm/add-device`: answer when the guest has the device.
    AddDevice(DeviceSpec, Responder<DeviceInfo>),
    /// `PUT /v1/vm/remove-device`: answer when the device is released.
    RemoveDevice(RemoveDeviceRequest, Responder<RemoveDeviceResponse>),
    /// `PUT /v1/vm/shutdown`: answer once the shutdown is under way.
    Shutdown(Responder<()>),
    /// `GET /v1/vm/counters`.
    Counters(Responder<Counters>),
    /// `PUT /v1/vm/pause`: answer once every vCPU is parked.
    Pause(Responder<()>),
    /// `PUT /v1/vm/resume`: answer once the vCPUs may run again.
    Resume(Responder<()>),
    /// `PUT /v1/vm/power-button`: answer once the button has been pressed (not when the guest
    /// is off).
    PowerButton(Responder<()>),
    /// `PUT /v1/vm/reboot`: answer once the reset is requested.
    Reboot(Responder<()>),
    /// [`QueuedHandler::force_power_off`]: answer once the power-off is under way.
    ForcePowerOff(ForcedPowerOff, Responder<()>),
}

impl PendingRequest {
    /// The request's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            PendingRequest::Info(_) => "info",
            PendingRequest::AddDevice(..) => "add-device",
            PendingRequest::RemoveDevice(..) => "remove-device",
            PendingRequest::Shutdown(_) => "shutdown",
            PendingRequest::Counters(_) => "counters",
            PendingRequest::Pause(_) => "pause",
            PendingRequest::Resume(_) => "resume",
            PendingRequest::PowerButton(_) => "power-button",
            PendingRequest::Reboot(_) => "reboot",
            PendingRequest::ForcePowerOff(..) => "force-power-off",
        }
    }

    /// Answers with `err`, whatever the request (e.g. [`ApiError::Unavailable`] while the VM
    /// is stopping). `false` when the client no longer waits.
    pub fn fail(self, err: ApiError) -> bool {
        match self {
            PendingRequest::Info(r) => r.reply(Err(err)),
            PendingRequest::AddDevice(_, r) => r.reply(Err(err)),
            PendingRequest::RemoveDevice(_, r) => r.reply(Err(err)),
            PendingRequest::Shutdown(r) => r.reply(Err(err)),
            PendingRequest::Counters(r) => r.reply(Err(err)),
            PendingRequest::Pause(r) => r.reply(Err(err)),
            PendingRequest::Resume(r) => r.reply(Err(err)),
            PendingRequest::PowerButton(r) => r.reply(Err(err)),
            PendingRequest::Reboot(r) => r.reply(Err(err)),
            PendingRequest::ForcePowerOff(_, r) => r.reply(Err(err)),
        }
    }
}

/// The event loop's end of the bridge.
pub struct ApiRequestQueue {
    tx: Sender<PendingRequest>,
    rx: Receiver<PendingRequest>,
    event: Arc<EventFd>,
}

impl ApiRequestQueue {
    /// An empty queue with a non-blocking event fd.
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            tx,
            rx,
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// The fd the event loop polls for `EPOLLIN`: readable while requests may be queued.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }

    /// The next queued request, if any. On a wake-up, read (reset) [`Self::event_fd`] first,
    /// then call this until `None` — or use [`Self::drain`], which does both.
    pub fn try_recv(&self) -> Option<PendingRequest> {
        self.rx.try_recv().ok()
    }

    /// Resets the event fd and takes every queued request, oldest first.
    pub fn drain(&self) -> Vec<PendingRequest> {
        // EAGAIN (nothing signalled) is fine: the queue is checked regardless.
        let _ = self.event.read();
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    /// A handler for the API server that queues every request here; `events` serves
    /// subscriptions directly (they need no event-loop work).
    pub fn handler(&self, events: Arc<EventBus>, timeouts: QueueTimeouts) -> QueuedHandler {
        QueuedHandler {
            tx: self.tx.clone(),
            event: self.event.clone(),
            events,
            timeouts,
        }
    }
}

/// An [`ApiHandler`] that hands every request to the event loop and waits for its answer.
pub struct QueuedHandler {
    tx: Sender<PendingRequest>,
    event: Arc<EventFd>,
    events: Arc<EventBus>,
    timeouts: QueueTimeouts,
}

impl QueuedHandler {
    fn call<T>(
        &self,
        name: &str,
        timeout: Duration,
        make: impl FnOnce(Responder<T>) -> PendingRequest,
    ) -> Result<T, ApiError> {
        self.call_for(name, timeout, &|| false, make)
    }

    /// Queues a request and waits for its answer; while waiting, looks every
    /// [`CLIENT_CHECK`] whether `client_gone`, and if so tells the event loop (through the
    /// responder) and stops waiting.
    fn call_for<T>(
        &self,
        name: &str,
        timeout: Duration,
        client_gone: &dyn Fn() -> bool,
        make: impl FnOnce(Responder<T>) -> PendingRequest,
    ) -> Result<T, ApiError> {
        let (tx, rx) = mpsc::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let pending = make(Responder {
            tx,
            queued_at: started,
            client_gone: gone.clone(),
        });
        self.tx
            .send(pending)
            .map_err(|_| ApiError::Unavailable("the VM is stopping".into()))?;
        self.event
            .write(1)
            .map_err(|e| ApiError::Internal(format!("cannot wake the VMM event loop: {e}")))?;
        let deadline = started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(CLIENT_CHECK)) {
                Ok(result) => return result,
                Err(RecvTimeoutError::Timeout) if left > CLIENT_CHECK => {
                    if client_gone() {
                        log::info!("API {name}: the client went away, the VMM rolls it back");
                        gone.store(true, Ordering::Release);
                        // Wake the loop: the rollback need not wait for its next tick.
                        let _ = self.event.write(1);
                        return Err(ApiError::Unavailable(format!(
                            "the client went away before the answer to {name}"
                        )));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!("API {name}: no answer from the VMM within {timeout:?}");
                    return Err(ApiError::Timeout {
                        step: format!("waiting for the VMM to answer {name}"),
                        after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ApiError::Unavailable(format!(
                        "the VMM stopped before answering {name}"
                    )))
                }
            }
        }
    }
}

impl QueuedHandler {
    /// Powers the VM off at once, without the guest's shutdown, for `why` (the VM ends with
    /// [`crate::VmExit::ShutdownTimeout`] or [`crate::VmExit::Signal`] and its `vm-shutdown`
    /// event says so); returns once the power-off is under way. Not part of the control API:
    /// it is how the VM's owner (e.g. `rvmm run` on a signal) ends a guest that does not power
    /// off when asked.
    pub fn force_power_off(&self, why: ForcedPowerOff) -> Result<(), ApiError> {
        self.call("force-power-off", self.timeouts.shutdown, |r| {
            PendingRequest::ForcePowerOff(why, r)
        })
    }
}

impl ApiHandler for QueuedHandler {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.call("info", self.timeouts.info, PendingRequest::Info)
    }

    fn add_device(&self, req: DeviceSpec) -> Result<DeviceInfo, ApiError> {
        self.add_device_for(req, &|| false)
    }

    fn add_device_for(
        &self,
        req: DeviceSpec,
        client_gone: &dyn Fn() -> bool,
    ) -> Result<DeviceInfo, ApiError> {
        // Library callers build requests by hand: the decoder's rules hold here too.
        req.check().map_err(ApiError::BadRequest)?;
        self.call_for("add-device", self.timeouts.add, client_gone, |r| {
            PendingRequest::AddDevice(req, r)
        })
    }

    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError> {
        req.check().map_err(ApiError::BadRequest)?;
        let timeout = req.timeout().saturating_add(self.timeouts.remove_margin);
        self.call("remove-device", timeout, |r| {
            PendingRequest::RemoveDevice(req, r)
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.call("shutdown", self.timeouts.shutdown, PendingRequest::Shutdown)
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.call("pause", self.timeouts.pause, PendingRequest::Pause)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.call("resume", self.timeouts.pause, PendingRequest::Resume)
    }

    fn power_button(&self) -> Result<(), ApiError> {
        self.call(
            "power-button",
            self.timeouts.shutdown,
            PendingRequest::PowerButton,
        )
    }

    fn reboot(&self) -> Result<(), ApiError> {
        self.call("reboot", self.timeouts.shutdown, PendingRequest::Reboot)
    }

    fn subscribe(&self) -> Subscription {
        self.events.subscribe()
    }

    fn counters(&self) -> Result<Counters, ApiError> {
        self.call("counters", self.timeouts.info, PendingRequest::Counters)
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::api::types::RootPortUsage;
    use crate::device::DeviceId;

    fn info() -> VmInfo {
        VmInfo {
            version: "test".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            hugepages: false,
            root_ports: RootPortUsage { used: 0, total: 8 },
            devices: Vec::new(),
            resources: Default::default(),
            state: crate::vm::pause::VmState::Running,
            console: None,
            placement: None,
            hotplug: None,
        }
    }

    fn short_timeouts() -> QueueTimeouts {
        QueueTimeouts {
            info: Duration::from_millis(100),
            add: Duration::from_millis(100),
            remove_margin: Duration::from_millis(100),
            shutdown: Duration::from_millis(100),
            pause: Duration::from_millis(100),
        }
    }

    fn setup() -> (ApiRequestQueue, Arc<QueuedHandler>) {
        let queue = ApiRequestQueue::new().expect("eventfd");
        let handler = Arc::new(queue.handler(Arc::new(EventBus::new()), short_timeouts()));
        (queue, handler)
    }

    /// Plays the event loop once: waits for the wake-up, then answers every request.
    fn serve_once(queue: &ApiRequestQueue, answer: impl FnMut(PendingRequest)) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pending = queue.drain();
            if !pending.is_empty() {
                pending.into_iter().for_each(answer);
                return;
            }
            assert!(Instant::now() < deadline, "no request arrived");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn request_is_answered_by_the_event_loop() {
        let (queue, handler) = setup();
        let client = thread::spawn(move || handler.info());
        serve_once(&queue, |p| match p {
            PendingRequest::Info(r) => assert!(r.reply(Ok(info()))),
            other => panic!("unexpected {}", other.name()),
        });
        assert_eq!(client.join().expect("client thread"), Ok(info()));
    }

    #[test]
    fn queued_request_wakes_the_event_fd() {
        let (queue, handler) = setup();
        let client = thread::spawn(move || handler.shutdown());
        let deadline = Instant::now() + Duration::from_secs(5);
        let count = loop {
            match queue.event_fd().read() {
                Ok(n) => break n,
                Err(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "the event fd was never signalled"
                    );
                    thread::sleep(Duration::from_millis(5));
                }
            }
        };
        assert_eq!(count, 1);
        let pending = queue.try_recv().expect("queued before the wake-up");
        assert!(pending.fail(ApiError::Conflict("no".into())));
        let _ = client.join();
    }

    #[test]
    fn stored_responder_can_answer_later() {
        let (queue, handler) = setup();
        let req = RemoveDeviceRequest {
            id: DeviceId::new("nvme0").expect("valid id"),
            surprise: false,
            timeout_ms: 1000,
        };
        let client = thread::spawn(move || handler.remove_device(req));
        let mut stored = Vec::new();
        serve_once(&queue, |p| stored.push(p));
        let Some(PendingRequest::RemoveDevice(_, responder)) = stored.pop() else {
            panic!("no remove request");
        };
        thread::sleep(Duration::from_millis(150));
        assert!(responder.elapsed() >= Duration::from_millis(150));
        assert!(responder.reply(Err(ApiError::Conflict("busy".into()))));
        assert_eq!(
            client.join().expect("client thread"),
            Err(ApiError::Conflict("busy".into()))
        );
    }

    #[test]
    fn hand_built_removal_with_an_overflowing_timeout_is_refused_before_the_loop() {
        let (queue, handler) = setup();
        let req = RemoveDeviceRequest {
            id: DeviceId::new("nvme0").expect("valid id"),
            surprise: false,
            timeout_ms: u64::MAX - 1,
        };

        let answer = handler.remove_device(req);

        assert!(
            matches!(&answer, Err(ApiError::BadRequest(m)) if m.contains("invalid timeout_ms")),
            "{answer:?}"
        );
        assert!(
            queue.drain().is_empty(),
            "the request reached the event loop"
        );
    }

    #[test]
    fn hand_built_vf_with_a_multicast_mac_is_refused_before_the_loop() {
        let (queue, handler) = setup();
        let spec: DeviceSpec = "vf=eth0".parse().expect("valid");
        let DeviceSpec {
            source: crate::device::DeviceSource::Vf(mut vf),
            ..
        } = spec
        else {
            panic!("not a VF");
        };
        vf.policy.mac = Some(rvmm_vfio::sriov::MacAddress([1, 0, 0x5e, 0, 0, 1]));
        let spec = DeviceSpec {
            id: None,
            source: crate::device::DeviceSource::Vf(vf),
            group: None,
        };

        let answer = handler.add_device(spec);

        assert!(
            matches!(&answer, Err(ApiError::BadRequest(m)) if m.contains("multicast")),
            "{answer:?}"
        );
        assert!(
            queue.drain().is_empty(),
            "the request reached the event loop"
        );
    }

    #[test]
    fn add_whose_client_goes_away_is_marked_for_rollback() {
        let queue = ApiRequestQueue::new().expect("eventfd");
        let timeouts = QueueTimeouts {
            add: Duration::from_secs(10),
            ..short_timeouts()
        };
        let handler = queue.handler(Arc::new(EventBus::new()), timeouts);
        let gone = Arc::new(AtomicBool::new(false));
        let client_gone = gone.clone();
        let spec: DeviceSpec = "path=/sys/bus/pci/devices/0000:01:00.0"
            .parse()
            .expect("valid");
        let client = thread::spawn(move || {
            handler.add_device_for(spec, &|| client_gone.load(Ordering::Acquire))
        });
        let mut stored = Vec::new();
        serve_once(&queue, |p| stored.push(p));
        let Some(PendingRequest::AddDevice(_, responder)) = stored.pop() else {
            panic!("no add request");
        };
        assert!(!responder.client_gone());

        gone.store(true, Ordering::Release);
        let answer = client.join().expect("client thread");

        assert!(
            matches!(&answer, Err(ApiError::Unavailable(m)) if m.contains("went away")),
            "{answer:?}"
        );
        assert!(responder.client_gone(), "the event loop was not told");
        assert_eq!(
            queue.event_fd().read().ok(),
            Some(1),
            "the event loop was not woken for the rollback"
        );
        assert!(!responder.reply(Err(ApiError::Internal("rolled back".into()))));
    }

    #[test]
    fn pause_and_resume_are_answered_by_the_event_loop() {
        let (queue, handler) = setup();
        let client = {
            let handler = handler.clone();
            thread::spawn(move || handler.pause())
        };
        serve_once(&queue, |p| match p {
            PendingRequest::Pause(r) => assert!(r.reply(Ok(()))),
            other => panic!("unexpected {}", other.name()),
        });
        assert_eq!(client.join().expect("client thread"), Ok(()));

        let client = thread::spawn(move || handler.resume());
        serve_once(&queue, |p| match p {
            PendingRequest::Resume(r) => {
                assert!(r.reply(Err(ApiError::Conflict("refused".into()))))
            }
            other => panic!("unexpected {}", other.name()),
        });
        assert_eq!(
            client.join().expect("client thread"),
            Err(ApiError::Conflict("refused".into()))
        );
    }

    #[test]
    fn power_button_is_answered_by_the_event_loop() {
        let (queue, handler) = setup();
        let client = thread::spawn(move || handler.power_button());
        serve_once(&queue, |p| match p {
            PendingRequest::PowerButton(r) => assert!(r.reply(Ok(()))),
            other => panic!("unexpected {}", other.name()),
        });
        assert_eq!(client.join().expect("client thread"), Ok(()));
    }

    #[test]
    fn forced_power_off_carries_its_reason_to_the_event_loop() {
        let (queue, handler) = setup();
        let client =
            thread::spawn(move || handler.force_power_off(ForcedPowerOff::ShutdownTimeout));
        serve_once(&queue, |p| match p {
            PendingRequest::ForcePowerOff(ForcedPowerOff::ShutdownTimeout, r) => {
                assert!(r.reply(Ok(())))
            }
            other => panic!("unexpected {}", other.name()),
        });
        assert_eq!(client.join().expect("client thread"), Ok(()));
    }

    #[test]
    fn silent_event_loop_gives_a_timeout_with_the_step() {
        let (_queue, handler) = setup();
        match handler.info() {
            Err(ApiError::Timeout { step, .. }) => {
                assert_eq!(step, "waiting for the VMM to answer info")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dropped_responder_means_unavailable() {
        let (queue, handler) = setup();
        let client = thread::spawn(move || handler.info());
        serve_once(&queue, drop);
        assert!(matches!(
            client.join().expect("client thread"),
            Err(ApiError::Unavailable(_))
        ));
    }

    #[test]
    fn dropped_queue_means_unavailable() {
        let (queue, handler) = setup();
        drop(queue);
        assert!(matches!(handler.info(), Err(ApiError::Unavailable(_))));
    }

    #[test]
    fn reply_after_the_client_gave_up_reports_false() {
        let (queue, handler) = setup();
        assert!(handler.info().is_err());
        let pending = queue.drain().pop().expect("the request stays queued");
        assert!(!pending.fail(ApiError::Internal("late".into())));
    }
}
