//! Control API requests from a hostile client: the bytes of one connection go through the
//! server's own functions, [`read_request`] (HTTP/1.1 within the limits), then the real
//! [`dispatch`] into a handler that records what it is asked; the typed requests are also
//! decoded with [`route`] and [`json_body`] on their own and the body is parsed as an
//! `rvmm run --device` argument, the other way a device request enters.
//!
//! Input: the first byte sets how many bytes each read of the fake connection returns (the
//! request may arrive in pieces), the rest is what the client sends.
//!
//! Invariants: a rejected request gets a 4xx/5xx response whose body is `{"error": ...}`; an
//! accepted body is within the limit; every request type that decodes serializes back to JSON
//! that decodes to the same request.

#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::str::FromStr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rvmm::api::error::ErrorBody;
use rvmm::api::http::{read_request, Limits, Request, Response, TimedRead};
use std::sync::Mutex;

use rvmm::api::server::{dispatch as real_dispatch, json_body, route, Endpoint, Outcome};
use rvmm::api::types::{
    DeviceInfo, EmptyRequest, PowerButtonRequest, RemovalReason, RemoveDeviceResponse,
    RootPortUsage, ShutdownRequest, VmInfo,
};
use rvmm::api::{ApiError, ApiHandler, EventBus, RemoveDeviceRequest, Subscription};
use rvmm::device::DeviceSpec;
use rvmm::device::DeviceState;
use rvmm::observe::{Counters, MemoryCounters};
use rvmm::vm::pause::VmState;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A connection that returns at most `step` bytes per read and records what the server writes.
struct Connection {
    input: Cursor<Vec<u8>>,
    step: usize,
    output: Vec<u8>,
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.step);
        self.input.read(buf.get_mut(..n).unwrap_or_default())
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TimedRead for Connection {
    fn set_read_timeout(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// The response the server sends for `err`: a 4xx/5xx with an `{"error": ...}` body.
fn check_error(err: &ApiError) {
    let status = err.status();
    assert!((400..600).contains(&status), "status {status} for {err:?}");
    let mut out = Vec::new();
    if let Err(e) = Response::error(err).write_to(&mut out) {
        panic!("the error response cannot be written: {e}");
    }
    let text = String::from_utf8_lossy(&out);
    let Some((_, body)) = text.split_once("\r\n\r\n") else {
        panic!("the error response has no end of head: {text:?}");
    };
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(parsed) => assert_eq!(parsed, err.body(), "error body"),
        Err(e) => panic!("the error body {body:?} is not JSON: {e}"),
    }
}

/// Decodes `body` as the server does; a request that decodes must survive a JSON round trip.
fn decode<T>(body: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match json_body::<T>(body) {
        Ok(value) => {
            let json = match serde_json::to_vec(&value) {
                Ok(json) => json,
                Err(e) => panic!("{value:?} does not serialize: {e}"),
            };
            match serde_json::from_slice::<T>(&json) {
                Ok(again) => assert_eq!(again, value, "JSON round trip"),
                Err(e) => panic!("{value:?} serializes to JSON it refuses: {e}"),
            }
            Some(value)
        }
        Err(e) => {
            check_error(&e);
            None
        }
    }
}

/// A VMM that answers every call and records which it got.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<&'static str>>,
    bus: EventBus,
}

impl Recorder {
    fn record(&self, call: &'static str) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

impl ApiHandler for Recorder {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.record("info");
        Ok(VmInfo {
            version: "fuzz".into(),
            cpus: 1,
            memory_bytes: 1 << 29,
            hugepages: false,
            root_ports: RootPortUsage { used: 0, total: 8 },
            devices: Vec::new(),
            resources: Default::default(),
            state: VmState::Running,
            console: None,
            placement: None,
            hotplug: None,
        })
    }

    fn add_device(&self, req: DeviceSpec) -> Result<DeviceInfo, ApiError> {
        self.record("add");
        let id = req
            .id
            .unwrap_or_else(|| "dev0".parse().unwrap_or_else(|_| unreachable!()));
        let bdf = "0000:01:00.0".parse().unwrap_or_else(|_| unreachable!());
        Ok(DeviceInfo {
            id,
            bdf,
            host_bdf: bdf,
            slot: 1,
            root_port: bdf,
            state: DeviceState::Present,
            vf: None,
        })
    }

    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError> {
        self.record("remove");
        let bdf = "0000:01:00.0".parse().unwrap_or_else(|_| unreachable!());
        Ok(RemoveDeviceResponse {
            id: req.id,
            bdf,
            host_bdf: bdf,
            reason: RemovalReason::Surprise,
            duration_ms: 1,
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.record("shutdown");
        Ok(())
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.record("pause");
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.record("resume");
        Ok(())
    }

    fn power_button(&self) -> Result<(), ApiError> {
        self.record("power-button");
        Ok(())
    }

    fn reboot(&self) -> Result<(), ApiError> {
        self.record("reboot");
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        self.record("events");
        self.bus.subscribe()
    }

    fn counters(&self) -> Result<Counters, ApiError> {
        self.record("counters");
        Ok(Counters {
            uptime_ms: 1,
            reboots: 0,
            vcpus: Vec::new(),
            devices: Vec::new(),
            hotplug: Vec::new(),
            memory: MemoryCounters {
                reserved_bytes: 1 << 29,
                locked_bytes: 1 << 29,
                page_size: 4096,
            },
            event_log: None,
        })
    }
}

/// The real dispatcher: a refusal is a well-formed error and reaches no handler; an accepted
/// request reaches exactly the handler of its endpoint, once.
fn real(request: &Request) {
    let recorder = Recorder::default();
    let expected = match route(&request.method, &request.target) {
        Ok(Endpoint::Info) => "info",
        Ok(Endpoint::AddDevice) => "add",
        Ok(Endpoint::RemoveDevice) => "remove",
        Ok(Endpoint::Shutdown) => "shutdown",
        Ok(Endpoint::PowerButton) => "power-button",
        Ok(Endpoint::Reboot) => "reboot",
        Ok(Endpoint::Events) => "events",
        Ok(Endpoint::Counters) => "counters",
        Ok(Endpoint::Pause) => "pause",
        Ok(Endpoint::Resume) => "resume",
        Err(_) => "",
    };
    let outcome = real_dispatch(request, (Vec::new(), 0), &recorder, &|| false);
    let calls = recorder
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match outcome {
        Err(e) => {
            check_error(&e);
            assert!(
                calls.is_empty(),
                "a refused request reached the VMM: {calls:?}"
            );
        }
        Ok(Outcome::Reply(response)) => {
            assert_eq!(calls, vec![expected], "handlers called");
            let mut out = Vec::new();
            if let Err(e) = response.write_to(&mut out) {
                panic!("the response cannot be written: {e}");
            }
        }
        Ok(Outcome::Stream(_)) => assert_eq!(calls, vec!["events"], "handlers called"),
    }
}

/// What `dispatch` decodes before it calls the VMM, on its own.
fn dispatch(request: &Request) {
    let endpoint = match route(&request.method, &request.target) {
        Ok(endpoint) => endpoint,
        Err(e) => return check_error(&e),
    };
    match endpoint {
        Endpoint::Info | Endpoint::Events | Endpoint::Counters => {}
        Endpoint::AddDevice => {
            decode::<DeviceSpec>(&request.body);
        }
        Endpoint::RemoveDevice => {
            if let Some(req) = decode::<RemoveDeviceRequest>(&request.body) {
                assert!(
                    (1..=600_000).contains(&req.timeout_ms),
                    "timeout {} accepted",
                    req.timeout_ms
                );
            }
        }
        Endpoint::Shutdown => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                decode::<ShutdownRequest>(&request.body);
            }
        }
        Endpoint::Pause | Endpoint::Resume => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                decode::<EmptyRequest>(&request.body);
            }
        }
        Endpoint::PowerButton | Endpoint::Reboot => {
            if !request.body.iter().all(u8::is_ascii_whitespace) {
                decode::<PowerButtonRequest>(&request.body);
            }
        }
    }
}

/// The body as an `rvmm run --device` argument: what parses must mean the same as its JSON.
fn device_argument(body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    if let Ok(req) = DeviceSpec::from_str(text) {
        let json = match serde_json::to_vec(&req) {
            Ok(json) => json,
            Err(e) => panic!("{req:?} does not serialize: {e}"),
        };
        match json_body::<DeviceSpec>(&json) {
            Ok(again) => assert_eq!(again, req, "--device argument vs its JSON"),
            Err(e) => panic!("--device {text:?} gives JSON the API refuses: {e}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    let mut conn = Connection {
        input: Cursor::new(bytes.to_vec()),
        step: usize::from(step).max(1),
        output: Vec::new(),
    };
    match read_request(&mut conn, &limits) {
        Ok(Some(request)) => {
            assert!(
                request.body.len() <= limits.max_body,
                "a body of {} bytes was accepted",
                request.body.len()
            );
            dispatch(&request);
            real(&request);
            device_argument(&request.body);
        }
        Ok(None) => assert!(bytes.is_empty(), "a request was dropped silently"),
        Err(e) => check_error(&e),
    }
});
