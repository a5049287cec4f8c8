//! The server and client end to end over a real unix socket, with a fake VMM behind the
//! [`ApiHandler`] trait.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;
use crate::api::client::{ApiClient, ClientError};
use crate::api::events::{EventBus, Subscription};
use crate::api::fd_passing::write_with_fds;
use crate::api::http::Limits;
use crate::api::queue::{ApiRequestQueue, PendingRequest, QueueTimeouts};
use crate::api::server::{ApiServer, ServerConfig, ServerError};
use crate::api::types::{
    DeviceInfo, Event, EventKind, RemovalReason, RemoveDeviceRequest, RemoveDeviceResponse,
    RootPortUsage, ShutdownReason, VmInfo,
};
use crate::api::{ApiError, ApiHandler};
use crate::device::DeviceId;
use crate::device::GroupFd;
use crate::device::{DeviceSource, DeviceSpec, DeviceState};
use crate::vm::pause::VmState;
use rvmm_pci::Bdf;

/// A VMM that hot-plugs instantly. Id `busy` conflicts, id `slow` times out; an add of id
/// `watch` takes a second, during which it watches whether its client goes away.
struct FakeVmm {
    bus: Arc<EventBus>,
    devices: Mutex<Vec<DeviceInfo>>,
    shutdown_delay: Duration,
    /// (device, inode) of the group descriptor of the last add request that had one.
    group: Mutex<Option<(u64, u64)>>,
    /// Whether the client of the last `watch` add went away while it was served.
    client_gone: Mutex<Option<bool>>,
    /// Paused through the API.
    paused: Mutex<bool>,
    /// How often the power button was pressed.
    presses: Mutex<u32>,
    resets: Mutex<u32>,
}

fn bdf(s: &str) -> Bdf {
    s.parse().expect("valid test address")
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid test id")
}

impl FakeVmm {
    fn new() -> Arc<Self> {
        Self::with_shutdown_delay(Duration::ZERO)
    }

    fn with_shutdown_delay(shutdown_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            bus: Arc::new(EventBus::new()),
            devices: Mutex::new(Vec::new()),
            shutdown_delay,
            group: Mutex::new(None),
            client_gone: Mutex::new(None),
            paused: Mutex::new(false),
            presses: Mutex::new(0),
            resets: Mutex::new(0),
        })
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Vec<DeviceInfo>> {
        self.devices.lock().expect("not poisoned")
    }
}

impl ApiHandler for FakeVmm {
    fn info(&self) -> Result<VmInfo, ApiError> {
        let devices = self.devices().clone();
        Ok(VmInfo {
            version: "test".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            hugepages: false,
            root_ports: RootPortUsage {
                used: u8::try_from(devices.len()).unwrap_or(u8::MAX),
                total: 8,
            },
            devices,
            resources: Default::default(),
            state: if *self.paused.lock().expect("not poisoned") {
                VmState::Paused
            } else {
                VmState::Running
            },
            console: None,
            placement: None,
            hotplug: None,
        })
    }

    fn add_device(&self, req: DeviceSpec) -> Result<DeviceInfo, ApiError> {
        let DeviceSource::Host(host_bdf) = req.source else {
            return Err(ApiError::InvalidRequest(
                "the fake takes host devices".into(),
            ));
        };
        match &req.group {
            Some(GroupFd::Open(fd)) => {
                let meta = std::fs::File::from(fd.try_clone().expect("dup"))
                    .metadata()
                    .expect("fstat");
                *self.group.lock().expect("not poisoned") = Some((meta.dev(), meta.ino()));
            }
            Some(GroupFd::Number(n)) => {
                return Err(ApiError::InvalidRequest(format!(
                    "bare descriptor number {n}"
                )))
            }
            None => {}
        }
        let id = req.id.unwrap_or_else(|| id("dev0"));
        if id.as_str() == "busy" {
            return Err(ApiError::Conflict("device 0000:01:00.0 is in use".into()));
        }
        let device = DeviceInfo {
            id,
            bdf: bdf("0000:02:00.0"),
            host_bdf,
            slot: 1,
            root_port: bdf("0000:00:01.0"),
            state: DeviceState::Present,
            vf: None,
        };
        self.devices().push(device.clone());
        self.bus
            .publish(Event::now(EventKind::DeviceAdded(device.clone())));
        Ok(device)
    }

    fn add_device_for(
        &self,
        req: DeviceSpec,
        client_gone: &dyn Fn() -> bool,
    ) -> Result<DeviceInfo, ApiError> {
        if req.id.as_ref().map(DeviceId::as_str) != Some("watch") {
            return self.add_device(req);
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut gone = false;
        while !gone && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
            gone = client_gone();
        }
        *self.client_gone.lock().expect("not poisoned") = Some(gone);
        if gone {
            return Err(ApiError::Unavailable("the client went away".into()));
        }
        self.add_device(req)
    }

    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError> {
        if req.id.as_str() == "slow" {
            return Err(ApiError::Timeout {
                step: "waiting for the guest to power the slot off".into(),
                after_ms: req.timeout_ms,
            });
        }
        let mut devices = self.devices();
        let pos = devices
            .iter()
            .position(|d| d.id == req.id)
            .ok_or(ApiError::UnknownDevice { id: req.id })?;
        let d = devices.remove(pos);
        Ok(RemoveDeviceResponse {
            id: d.id,
            bdf: d.bdf,
            host_bdf: d.host_bdf,
            reason: if req.surprise {
                RemovalReason::Surprise
            } else {
                RemovalReason::GuestEjected
            },
            duration_ms: 5,
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        thread::sleep(self.shutdown_delay);
        self.bus.publish(Event::now(EventKind::VmShutdown {
            reason: ShutdownReason::PowerOff,
        }));
        self.bus.close();
        Ok(())
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().expect("not poisoned");
        if !*paused {
            *paused = true;
            self.bus.publish(Event::now(EventKind::VmPaused));
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().expect("not poisoned");
        if *paused {
            *paused = false;
            self.bus.publish(Event::now(EventKind::VmResumed));
        }
        Ok(())
    }

    fn power_button(&self) -> Result<(), ApiError> {
        *self.presses.lock().expect("not poisoned") += 1;
        Ok(())
    }

    fn reboot(&self) -> Result<(), ApiError> {
        *self.resets.lock().expect("not poisoned") += 1;
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        self.bus.subscribe()
    }
}

struct Setup {
    _dir: TempDir,
    path: PathBuf,
    vmm: Arc<FakeVmm>,
    server: ApiServer,
}

impl Setup {
    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path).with_timeout(Duration::from_secs(10))
    }
}

fn start_with(config: ServerConfig) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    let vmm = FakeVmm::new();
    let server = ApiServer::start_with(&path, vmm.clone(), config).expect("server starts");
    Setup {
        _dir: dir,
        path,
        vmm,
        server,
    }
}

fn start() -> Setup {
    start_with(ServerConfig::default())
}

/// Sends raw bytes; returns the status and the whole response text.
fn raw(path: &Path, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A server that refuses the connection answers and closes without reading the request:
    // sending then fails (EPIPE), and reading ends in a reset after the answer, not in EOF.
    let sent = s.write_all(request);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let read_error = loop {
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    let out = String::from_utf8_lossy(&bytes).into_owned();
    if out.is_empty() {
        panic!("no answer (send: {sent:?}, read: {read_error:?})");
    }
    if let Some(e) = &read_error {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "read failed after {out:?}"
        );
    }
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    (status, out)
}

fn put(path: &Path, target: &str, body: &str) -> (u16, String) {
    let req = format!(
        "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(path, req.as_bytes())
}

/// Sends raw bytes with `file`'s descriptor attached; returns the whole response text.
fn raw_with_fd(path: &Path, request: &[u8], file: &std::fs::File) -> String {
    let stream = UnixStream::connect(path).expect("connect");
    write_with_fds(&stream, request, &[file.as_raw_fd()]).expect("sent");
    let mut out = String::new();
    (&stream).read_to_string(&mut out).expect("answer");
    out
}

fn api_status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("not an API error: {other:?}"),
    }
}

#[test]
fn info_returns_the_vm_configuration() {
    let s = start();
    let info = s.client().info().expect("info");
    assert_eq!(info.cpus, 2);
    assert_eq!(info.root_ports, RootPortUsage { used: 0, total: 8 });
}

#[test]
fn counters_of_a_handler_that_keeps_none_are_404() {
    let s = start();

    let (status, message) = api_status(s.client().counters());

    assert_eq!(status, 404, "{message}");
    assert!(message.contains("/v1/vm/counters"), "{message}");
}

#[test]
fn add_device_answers_with_guest_and_host_address() {
    let s = start();
    let req = "path=/sys/bus/pci/devices/0000:01:00.0,id=nvme0"
        .parse()
        .expect("valid");
    let d = s.client().add_device(&req).expect("added");
    assert_eq!(d.id, id("nvme0"));
    assert_eq!(d.bdf, bdf("0000:02:00.0"));
    assert_eq!(d.host_bdf, bdf("0000:01:00.0"));
    assert_eq!(s.client().info().expect("info").devices, vec![d]);
}

#[test]
fn group_descriptor_sent_by_the_client_reaches_the_vmm() {
    let s = start();
    let file = tempfile::tempfile().expect("temp file");
    let meta = file.metadata().expect("fstat");
    let req: DeviceSpec = format!("path=0000:01:00.0,group-fd={}", file.as_raw_fd())
        .parse()
        .expect("valid");

    s.client().add_device(&req).expect("added");

    assert_eq!(
        *s.vmm.group.lock().expect("not poisoned"),
        Some((meta.dev(), meta.ino()))
    );
}

#[test]
fn group_fd_without_a_descriptor_is_400() {
    let s = start();

    let (status, text) = put(
        &s.path,
        "/v1/vm/add-device",
        r#"{"path": "0000:01:00.0", "group_fd": 7}"#,
    );

    assert_eq!(status, 400);
    assert!(text.contains("came without a descriptor"), "{text}");
}

#[test]
fn descriptor_without_group_fd_is_400() {
    let s = start();
    let file = tempfile::tempfile().expect("temp file");
    let body = r#"{"path": "0000:01:00.0"}"#;
    let req = format!(
        "PUT /v1/vm/add-device HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );

    let out = raw_with_fd(&s.path, req.as_bytes(), &file);

    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("has no \\\"group_fd\\\""), "{out}");
}

#[test]
fn descriptor_with_another_endpoint_is_400() {
    let s = start();
    let file = tempfile::tempfile().expect("temp file");

    let out = raw_with_fd(
        &s.path,
        b"GET /v1/vm/info HTTP/1.1\r\nHost: x\r\n\r\n",
        &file,
    );

    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("takes no file descriptors"), "{out}");
}

#[test]
fn malformed_json_is_400_with_the_parser_message() {
    let s = start();
    let (status, text) = put(&s.path, "/v1/vm/add-device", "{\"path\": ");
    assert_eq!(status, 400);
    assert!(
        text.contains("{\"error\":\"invalid request body: EOF while parsing"),
        "{text}"
    );
}

#[test]
fn unknown_field_is_400() {
    let s = start();
    let (status, text) = put(
        &s.path,
        "/v1/vm/add-device",
        r#"{"path":"01:00.0","rom":1}"#,
    );
    assert_eq!(status, 400);
    assert!(text.contains("unknown field `rom`"), "{text}");
}

#[test]
fn two_devices_in_one_call_is_400() {
    let s = start();
    let (status, text) = put(
        &s.path,
        "/v1/vm/add-device",
        r#"{"path":"01:00.0","vf":"enp1s0"}"#,
    );
    assert_eq!(status, 400);
    assert!(text.contains("two devices in one call"), "{text}");
    assert!(s.vmm.devices().is_empty());
}

#[test]
fn array_of_devices_is_400() {
    let s = start();
    let (status, _) = put(
        &s.path,
        "/v1/vm/add-device",
        r#"[{"path":"01:00.0"},{"path":"02:00.0"}]"#,
    );
    assert_eq!(status, 400);
}

#[test]
fn unknown_path_is_404() {
    let s = start();
    let (status, text) = raw(&s.path, b"GET /v2/nothing HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    assert!(text.contains("no endpoint /v2/nothing"), "{text}");
}

#[test]
fn wrong_method_is_405_with_allow() {
    let s = start();
    let (status, text) = raw(&s.path, b"GET /v1/vm/shutdown HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405);
    assert!(text.contains("\r\nAllow: PUT\r\n"), "{text}");
}

#[test]
fn oversized_body_is_413() {
    let s = start();
    let (status, _) = raw(
        &s.path,
        b"PUT /v1/vm/add-device HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
    );
    assert_eq!(status, 413);
}

#[test]
fn oversized_body_sent_in_full_still_gets_413() {
    let s = start();
    let mut req = b"PUT /v1/vm/add-device HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b' ', 100_000));
    let (status, _) = raw(&s.path, &req);
    assert_eq!(status, 413);
}

#[test]
fn body_on_get_is_400() {
    let s = start();
    let (status, _) = raw(
        &s.path,
        b"GET /v1/vm/info HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(status, 400);
}

#[test]
fn unknown_device_from_the_handler_is_404() {
    let s = start();
    let req = RemoveDeviceRequest {
        id: id("ghost"),
        surprise: false,
        timeout_ms: 100,
    };
    let (status, message) = api_status(s.client().remove_device(&req));
    assert_eq!(status, 404);
    assert_eq!(message, "no device with id 'ghost'");
}

#[test]
fn conflict_from_the_handler_is_409() {
    let s = start();
    let req = "path=01:00.0,id=busy".parse().expect("valid");
    let (status, _) = api_status(s.client().add_device(&req));
    assert_eq!(status, 409);
}

#[test]
fn timeout_from_the_handler_is_504_with_the_step() {
    let s = start();
    let (status, text) = put(&s.path, "/v1/vm/remove-device", r#"{"id":"slow"}"#);
    assert_eq!(status, 504);
    assert!(
        text.contains("\"step\":\"waiting for the guest to power the slot off\""),
        "{text}"
    );
}

#[test]
fn remove_device_reports_how_it_ended() {
    let s = start();
    let add = "path=01:00.0,id=nvme0".parse().expect("valid");
    s.client().add_device(&add).expect("added");
    let req = RemoveDeviceRequest {
        id: id("nvme0"),
        surprise: true,
        timeout_ms: 100,
    };
    let r = s.client().remove_device(&req).expect("removed");
    assert_eq!(r.reason, RemovalReason::Surprise);
    assert!(s.vmm.devices().is_empty());
}

#[test]
fn shutdown_answers_204_without_body() {
    let s = start();
    let (status, text) = put(&s.path, "/v1/vm/shutdown", "");
    assert_eq!(status, 204);
    assert!(text.ends_with("\r\n\r\n"), "{text}");
}

#[test]
fn shutdown_with_unknown_field_is_400() {
    let s = start();
    let (status, _) = put(&s.path, "/v1/vm/shutdown", r#"{"force":true}"#);
    assert_eq!(status, 400);
}

#[test]
fn pause_and_resume_answer_204_and_info_follows() {
    let s = start();

    s.client().pause().expect("paused");
    let paused = s.client().info().expect("info").state;
    s.client().resume().expect("resumed");
    let resumed = s.client().info().expect("info").state;

    assert_eq!(paused, VmState::Paused);
    assert_eq!(resumed, VmState::Running);
}

#[test]
fn pause_and_resume_take_an_empty_body_or_an_empty_object() {
    let s = start();
    for path in ["/v1/vm/pause", "/v1/vm/resume"] {
        assert_eq!(put(&s.path, path, "").0, 204, "{path}");
        assert_eq!(put(&s.path, path, "{}").0, 204, "{path}");
        let (status, text) = put(&s.path, path, r#"{"now":true}"#);
        assert_eq!(status, 400, "{path}");
        assert!(text.contains("unknown field `now`"), "{text}");
    }
}

#[test]
fn pause_and_resume_events_reach_the_stream() {
    let s = start();
    let mut stream = s.client().events().expect("stream");
    wait_for_subscribers(&s.vmm, 1);

    s.client().pause().expect("paused");
    s.client().resume().expect("resumed");

    let first = stream.next_event().expect("read").expect("an event");
    let second = stream.next_event().expect("read").expect("an event");
    assert_eq!(first.kind, EventKind::VmPaused);
    assert_eq!(second.kind, EventKind::VmResumed);
}

/// Plays the event loop: the one request that arrives in `queue` (within 5 s).
fn next_pending(queue: &ApiRequestQueue) -> PendingRequest {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = queue.drain().pop() {
            return p;
        }
        assert!(Instant::now() < deadline, "no request arrived");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn queued_handler_carries_a_refused_pause_to_the_client_as_409() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    let queue = ApiRequestQueue::new().expect("queue");
    let handler = Arc::new(queue.handler(Arc::new(EventBus::new()), QueueTimeouts::default()));
    let _server = ApiServer::start(&path, handler).expect("server starts");
    let client = thread::spawn(move || ApiClient::new(&path).pause());
    let pending = next_pending(&queue);
    let PendingRequest::Pause(responder) = pending else {
        panic!("expected pause, got {}", pending.name());
    };

    assert!(responder.reply(Err(ApiError::Conflict(
        "cannot pause the VM while device nvme0 is being added".into()
    ))));

    match client.join().expect("client") {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 409);
            assert!(message.contains("nvme0 is being added"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn power_button_answers_204_and_presses_once() {
    let s = start();
    let (status, text) = put(&s.path, "/v1/vm/power-button", "");
    assert_eq!(status, 204);
    assert!(text.ends_with("\r\n\r\n"), "{text}");
    s.client().power_button().expect("pressed");
    assert_eq!(*s.vmm.presses.lock().expect("not poisoned"), 2);
}

#[test]
fn power_button_takes_an_empty_object_only() {
    let s = start();
    let (ok, _) = put(&s.path, "/v1/vm/power-button", "{}");
    let (bad, _) = put(&s.path, "/v1/vm/power-button", r#"{"hold_ms":5000}"#);
    assert_eq!((ok, bad), (204, 400));
    assert_eq!(*s.vmm.presses.lock().expect("not poisoned"), 1);
}

#[test]
fn reboot_answers_204_and_resets_once() {
    let s = start();
    let (status, _) = put(&s.path, "/v1/vm/reboot", "");
    let (bad, _) = put(&s.path, "/v1/vm/reboot", r#"{"hard":true}"#);
    assert_eq!((status, bad), (204, 400));
    s.client().reboot().expect("reset");
    assert_eq!(*s.vmm.resets.lock().expect("not poisoned"), 2);
}

#[test]
fn power_button_answers_405_to_get() {
    let s = start();
    let (status, text) = raw(&s.path, b"GET /v1/vm/power-button HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405, "{text}");
}

/// Waits until the fake VMM's bus has `n` subscribers.
fn wait_for_subscribers(vmm: &FakeVmm, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm.bus.subscriber_count() < n {
        assert!(Instant::now() < deadline, "the stream never subscribed");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn events_arrive_in_order_and_the_stream_ends_when_the_bus_closes() {
    let s = start();
    let mut stream = s.client().events().expect("stream");
    wait_for_subscribers(&s.vmm, 1);
    let add = "path=01:00.0,id=nvme0".parse().expect("valid");
    s.client().add_device(&add).expect("added");
    s.client().shutdown().expect("shutdown");
    let first = stream.next_event().expect("read").expect("an event");
    assert!(matches!(first.kind, EventKind::DeviceAdded(d) if d.id == id("nvme0")));
    let second = stream.next_event().expect("read").expect("an event");
    assert!(matches!(second.kind, EventKind::VmShutdown { .. }));
    assert!(stream.next_event().expect("proper end").is_none());
}

#[test]
fn events_stream_ends_properly_when_the_server_stops() {
    let s = start();
    let mut stream = s.client().events().expect("stream");
    wait_for_subscribers(&s.vmm, 1);
    s.server.stop();
    assert!(stream.next_line().expect("proper end").is_none());
}

#[test]
fn events_published_just_before_the_server_stops_are_still_sent() {
    let s = start();
    let mut stream = s.client().events().expect("stream");
    wait_for_subscribers(&s.vmm, 1);
    s.vmm.bus.publish(Event::now(EventKind::VmShutdown {
        reason: ShutdownReason::Signal,
    }));

    s.server.stop();

    let last = stream.next_event().expect("read").expect("an event");
    assert_eq!(
        last.kind,
        EventKind::VmShutdown {
            reason: ShutdownReason::Signal
        }
    );
    assert!(stream.next_line().expect("proper end").is_none());
}

#[test]
fn events_stream_of_a_lost_server_is_truncated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n");
    });
    let mut stream = ApiClient::new(&path).events().expect("stream");
    assert_eq!(stream.next_line().expect("one line").as_deref(), Some("{}"));
    server.join().expect("fake server");
    assert!(matches!(stream.next_line(), Err(ClientError::Truncated)));
}

#[test]
fn slow_client_gets_408() {
    let s = start_with(ServerConfig {
        limits: Limits {
            request_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
        ..ServerConfig::default()
    });
    let (status, _) = {
        let mut c = UnixStream::connect(&s.path).expect("connect");
        c.write_all(b"GET /v1/vm/info HTTP/1.1\r\n").expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        (out.get(9..12).map(str::to_string), out)
    };
    assert_eq!(status.as_deref(), Some("408"));
}

#[test]
fn connections_beyond_the_limit_get_503() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let s = start_with(config);
    let _held = UnixStream::connect(&s.path).expect("first connection");
    // The first connection holds the only slot until its request times out (10 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = raw(&s.path, b"GET /v1/vm/info HTTP/1.1\r\n\r\n");
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "never refused");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn events_streams_do_not_crowd_out_requests_and_have_their_own_limit() {
    let config = ServerConfig {
        max_connections: 1,
        max_event_streams: 1,
        ..ServerConfig::default()
    };
    let s = start_with(config);
    let _stream = s.client().events().expect("first stream");
    wait_for_subscribers(&s.vmm, 1);

    let (second, text) = raw(&s.path, b"GET /v1/events HTTP/1.1\r\n\r\n");
    // The refused stream's connection lets go of its request slot once it has closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    let info = loop {
        let info = s.client().info();
        if info.is_ok() || Instant::now() > deadline {
            break info;
        }
        thread::sleep(Duration::from_millis(20));
    };

    assert_eq!(second, 503, "{text}");
    assert!(
        text.contains("too many events streams (at most 1)"),
        "{text}"
    );
    assert!(
        info.is_ok(),
        "requests were refused while a stream was open: {info:?}"
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = ApiServer::start(&path, FakeVmm::new()).expect("starts over a stale socket");
    server.stop();
}

#[test]
fn socket_of_a_running_server_is_refused() {
    let s = start();
    let second = ApiServer::start(&s.path, FakeVmm::new());
    assert!(matches!(second, Err(ServerError::InUse { .. })));
    // The first server still answers.
    s.client().info().expect("info");
}

#[test]
fn regular_file_at_the_socket_path_is_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    std::fs::write(&path, b"keep me").expect("write");
    let r = ApiServer::start(&path, FakeVmm::new());
    assert!(matches!(r, Err(ServerError::NotASocket { .. })));
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}

#[test]
fn stopping_removes_the_socket_file() {
    let s = start();
    let path = s.path.clone();
    s.server.stop();
    assert!(!path.exists());
}

#[test]
fn stopping_waits_for_an_answer_in_progress() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    let vmm = FakeVmm::with_shutdown_delay(Duration::from_millis(300));
    let server = ApiServer::start(&path, vmm.clone()).expect("server starts");
    let client = {
        let path = path.clone();
        thread::spawn(move || ApiClient::new(&path).shutdown())
    };
    // Stop while the handler is still working on the request.
    thread::sleep(Duration::from_millis(100));
    server.stop();
    client.join().expect("client").expect("the answer arrived");
}

#[test]
fn client_without_server_reports_the_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("none.sock");
    let err = ApiClient::new(&path).info().expect_err("no server");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[test]
fn queued_handler_serves_requests_through_the_event_loop_thread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    let queue = ApiRequestQueue::new().expect("queue");
    let handler = Arc::new(queue.handler(Arc::new(EventBus::new()), QueueTimeouts::default()));
    let _server = ApiServer::start(&path, handler).expect("server starts");
    let client = thread::spawn(move || ApiClient::new(&path).info());
    // Play the event loop: answer the one request that arrives.
    let pending = next_pending(&queue);
    let PendingRequest::Info(responder) = pending else {
        panic!("expected info, got {}", pending.name());
    };
    let vm = FakeVmm::new().info().expect("info");
    assert!(responder.reply(Ok(vm.clone())));
    assert_eq!(client.join().expect("client").expect("answer"), vm);
}

// --- routing ---------------------------------------------------------------------------------

#[test]
fn every_route_is_found_with_its_method() {
    for (path, method, endpoint) in ROUTES {
        assert_eq!(route(method, path), Ok(endpoint));
    }
}

#[test]
fn unknown_path_routes_to_404() {
    assert_eq!(route("GET", "/v1/nope").map_err(|e| e.status()), Err(404));
}

#[test]
fn wrong_method_routes_to_405() {
    assert_eq!(
        route("POST", ADD_DEVICE_PATH).map_err(|e| e.status()),
        Err(405)
    );
}

#[test]
fn query_string_is_refused() {
    assert_eq!(
        route("GET", "/v1/vm/info?x=1").map_err(|e| e.status()),
        Err(400)
    );
}

#[test]
fn whitespace_body_is_empty() {
    let err = json_body::<ShutdownRequest>(b" \r\n").expect_err("empty");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn malformed_json_names_the_position() {
    let err = json_body::<ShutdownRequest>(b"{").expect_err("malformed");
    assert!(
        err.to_string().starts_with("invalid request body: EOF"),
        "{err}"
    );
}

/// What the fake saw of the client of its last `watch` add, once it has finished.
fn watched_client_gone(vmm: &FakeVmm) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(gone) = *vmm.client_gone.lock().expect("not poisoned") {
            return gone;
        }
        assert!(Instant::now() < deadline, "the watched add never finished");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Connects and sends an add the fake watches (id `watch`), leaving the connection open.
fn send_watched_add(path: &Path) -> UnixStream {
    const BODY: &str = r#"{"path":"/sys/bus/pci/devices/0000:01:00.0","id":"watch"}"#;
    let req = format!(
        "PUT /v1/vm/add-device HTTP/1.1\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut conn = UnixStream::connect(path).expect("connect");
    conn.write_all(req.as_bytes()).expect("send");
    conn
}

#[test]
fn add_whose_client_closed_the_connection_is_told_the_client_is_gone() {
    let s = start();
    let conn = send_watched_add(&s.path);
    thread::sleep(Duration::from_millis(100));
    drop(conn);

    assert!(
        watched_client_gone(&s.vmm),
        "the handler never saw the client go"
    );
    assert!(s.vmm.devices().is_empty());
}

#[test]
fn add_whose_client_only_shut_its_sending_side_is_answered() {
    let s = start();
    let mut conn = send_watched_add(&s.path);
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("answer");

    assert!(
        !watched_client_gone(&s.vmm),
        "a half-close was taken for a hang-up"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
