//! docs/api.yaml against the code: every route is documented, every answer the types produce
//! matches its schema (required properties, no undocumented ones, types, enums, ranges,
//! patterns), and the documented request examples are accepted.

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::server::ROUTES;
use crate::api::types::{
    ConsoleInfo, ConsoleKind, DeviceErrorOutcome, DeviceInfo, Event, EventKind, PowerButtonRequest,
    RemovalReason, RemoveDeviceRequest, RemoveDeviceResponse, RootPortUsage, ShutdownReason,
    ShutdownRequest, VfInfo, VmInfo,
};
use crate::device::DeviceId;
use crate::device::{DeviceSpec, DeviceState};
use crate::observe::counters::ExitCounters;
use crate::observe::{
    Counters, DeviceCounters, EventLogCounts, ExitReason, HotplugOpKind, HotplugStats,
    MemoryCounters, VcpuCounters, VectorCount, VectorKind,
};
use crate::placement::{CpuList, GuestNodeInfo, MemoryPolicy, Placement, PlacementMode};
use crate::vm::pause::VmState;
use rvmm_pci::Bdf;

const SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml"));
const SCHEMA_PREFIX: &str = "#/components/schemas/";

fn spec() -> Value {
    serde_yaml_ng::from_str(SPEC).expect("docs/api.yaml is valid YAML")
}

/// A minimal JSON Schema (OpenAPI 3.0 subset) checker over the spec's components.
struct Validator {
    spec: Value,
}

impl Validator {
    fn new() -> Self {
        Self { spec: spec() }
    }

    fn schema(&self, name: &str) -> &Value {
        let s = &self.spec["components"]["schemas"][name];
        assert!(s.is_object(), "no schema {name} in docs/api.yaml");
        s
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => self.schema(r.strip_prefix(SCHEMA_PREFIX).unwrap_or(r)),
            None => schema,
        }
    }

    /// Property names a schema documents, through `$ref` and `allOf`.
    fn documented(&self, schema: &Value, names: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            names.extend(props.keys().cloned());
        }
        for part in schema["allOf"].as_array().into_iter().flatten() {
            self.documented(part, names);
        }
    }

    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
            for part in parts {
                self.check(part, value, at)?;
            }
            let mut names = Vec::new();
            self.documented(schema, &mut names);
            for key in value.as_object().into_iter().flat_map(|o| o.keys()) {
                if !names.contains(key) {
                    return Err(format!("{at}: property {key} is not documented"));
                }
            }
        }
        if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = options
                .iter()
                .filter(|o| self.check(o, value, at).is_ok())
                .count();
            if matching != 1 {
                return Err(format!("{at}: {value} matches {matching} of oneOf"));
            }
        }
        if let Some(ty) = schema.get("type").and_then(Value::as_str) {
            let ok = match ty {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_u64() || value.is_i64(),
                "boolean" => value.is_boolean(),
                other => return Err(format!("{at}: unsupported type {other}")),
            };
            if !ok {
                return Err(format!("{at}: {value} is not {ty}"));
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let (Some(min), Some(v)) = (
            schema.get("minimum").and_then(Value::as_i64),
            value.as_i64(),
        ) {
            if v < min {
                return Err(format!("{at}: {v} is below {min}"));
            }
        }
        if let (Some(max), Some(v)) = (
            schema.get("maximum").and_then(Value::as_i64),
            value.as_i64(),
        ) {
            if v > max {
                return Err(format!("{at}: {v} is above {max}"));
            }
        }
        if let (Some(p), Some(v)) = (
            schema.get("pattern").and_then(Value::as_str),
            value.as_str(),
        ) {
            if !Regex::new(p).map_err(|e| e.to_string())?.is_match(v) {
                return Err(format!("{at}: {v:?} does not match {p}"));
            }
        }
        if let Some(obj) = value.as_object() {
            for req in schema["required"].as_array().into_iter().flatten() {
                let name = req.as_str().unwrap_or_default();
                if !obj.contains_key(name) {
                    return Err(format!("{at}: required property {name} is missing"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (key, v) in obj {
                match props.and_then(|p| p.get(key)) {
                    Some(s) => self.check(s, v, &format!("{at}.{key}"))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("{at}: property {key} is not allowed"))
                    }
                    None => {}
                }
            }
        }
        if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
            for (i, v) in values.iter().enumerate() {
                self.check(items, v, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    fn validate<T: Serialize>(&self, name: &str, value: &T) -> Result<(), String> {
        let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
        self.check(self.schema(name), &json, name)
    }
}

fn bdf(s: &str) -> Bdf {
    s.parse().expect("valid test address")
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid test id")
}

fn host_device() -> DeviceInfo {
    DeviceInfo {
        id: id("nvme0"),
        bdf: bdf("0000:02:00.0"),
        host_bdf: bdf("0000:01:00.0"),
        slot: 1,
        root_port: bdf("0000:00:01.0"),
        state: DeviceState::Present,
        vf: None,
    }
}

fn vf_device() -> DeviceInfo {
    DeviceInfo {
        id: id("vf0"),
        bdf: bdf("0000:03:00.0"),
        host_bdf: bdf("0000:3b:02.1"),
        slot: 2,
        root_port: bdf("0000:00:01.1"),
        state: DeviceState::Adding,
        vf: Some(VfInfo {
            pf: bdf("0000:3b:00.0"),
            index: 9,
            mac: Some("52:54:00:12:34:56".parse().expect("valid MAC")),
            vlan: Some(100),
            trust: Some(false),
            spoofchk: Some(true),
        }),
    }
}

fn vm_info() -> VmInfo {
    VmInfo {
        version: "0.1.0".into(),
        cpus: 4,
        memory_bytes: 2 << 30,
        hugepages: true,
        root_ports: RootPortUsage { used: 2, total: 8 },
        devices: vec![host_device(), vf_device()],
        resources: Default::default(),
        state: VmState::Paused,
        console: Some(ConsoleInfo {
            kind: ConsoleKind::Socket,
            path: Some("/run/rvmm/vm0.console".into()),
        }),
        placement: Some(Placement {
            mode: PlacementMode::Auto,
            memory_policy: MemoryPolicy::Bind,
            memory_node: Some(1),
            vcpu_cpus: Some(CpuList::from_ids([1, 2, 3])),
            reason: "disk0 (0000:10:00.0) on host node 1: guest RAM bound to node 1; vCPU \
                     threads on node 1's CPUs 1-3"
                .into(),
            guest_nodes: vec![
                GuestNodeInfo {
                    guest_node: 0,
                    cpus: CpuList::from_ids([0]),
                    memory_bytes: 1 << 30,
                    host_node: None,
                    host_cpus: None,
                },
                GuestNodeInfo {
                    guest_node: 1,
                    cpus: CpuList::from_ids([1, 2]),
                    memory_bytes: 1 << 30,
                    host_node: Some(1),
                    host_cpus: Some(CpuList::from_ids([1, 2, 3])),
                },
            ],
            ..Placement::default()
        }),
        hotplug: Some(crate::hotplug::HotplugMode::Acpi),
    }
}

fn events() -> Vec<Event> {
    let d = host_device();
    vec![
        Event::now(EventKind::VmStarted { cpus: 2 }),
        Event::now(EventKind::DeviceAdded(vf_device())),
        Event::now(EventKind::DeviceRemoving {
            id: d.id.clone(),
            bdf: d.bdf,
            host_bdf: d.host_bdf,
            surprise: false,
        }),
        Event::now(EventKind::DeviceError {
            id: d.id.clone(),
            bdf: d.bdf,
            host_bdf: d.host_bdf,
            outcome: DeviceErrorOutcome::Recovered,
        }),
        Event::now(EventKind::DeviceRemoved {
            id: d.id,
            bdf: d.bdf,
            host_bdf: d.host_bdf,
            reason: RemovalReason::HostRequest,
        }),
        Event::now(EventKind::VmPaused),
        Event::now(EventKind::VmResumed),
        Event::now(EventKind::VmRebooted {
            reboots: 1,
            rolled_back: vec![id("vf0")],
            removed: vec![id("nvme0")],
        }),
        Event::now(EventKind::VmShutdown {
            reason: ShutdownReason::Crash,
        }),
    ]
}

#[test]
fn spec_is_openapi_3_0() {
    let spec = spec();
    assert!(spec["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.0.")));
}

#[test]
fn every_route_is_documented_with_its_method_and_nothing_else() {
    let spec = spec();
    let paths = spec["paths"].as_object().expect("paths");
    for (path, method, _) in ROUTES {
        let ops = paths.get(path).and_then(Value::as_object);
        let ops = ops.unwrap_or_else(|| panic!("{path} is not documented"));
        let methods: Vec<&String> = ops.keys().collect();
        assert_eq!(methods, vec![&method.to_lowercase()], "{path}");
    }
    assert_eq!(paths.len(), ROUTES.len());
}

#[test]
fn vm_info_matches_its_schema() {
    Validator::new()
        .validate("VmInfo", &vm_info())
        .expect("valid");
}

#[test]
fn every_console_kind_matches_its_schema_and_info_without_console_too() {
    let v = Validator::new();
    for (kind, path) in [
        (ConsoleKind::Stdio, None),
        (ConsoleKind::File, Some("/var/log/vm0.log")),
        (ConsoleKind::Socket, Some("/run/vm0.console")),
        (ConsoleKind::Pty, Some("/dev/pts/3")),
        (ConsoleKind::Off, None),
    ] {
        let info = ConsoleInfo {
            kind,
            path: path.map(Into::into),
        };
        v.validate("ConsoleInfo", &info)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
    let older = VmInfo {
        console: None,
        ..vm_info()
    };
    v.validate("VmInfo", &older).expect("valid");
}

#[test]
fn every_placement_matches_its_schema_and_info_without_placement_too() {
    let v = Validator::new();
    for policy in [
        MemoryPolicy::Default,
        MemoryPolicy::Bind,
        MemoryPolicy::Preferred,
    ] {
        for mode in [PlacementMode::Auto, PlacementMode::Off] {
            let placement = Placement {
                mode,
                memory_policy: policy,
                memory_node: (policy != MemoryPolicy::Default).then_some(0),
                vcpu_cpus: None,
                reason: "why".into(),
                ..Placement::default()
            };
            v.validate("Placement", &placement)
                .unwrap_or_else(|e| panic!("{policy:?} {mode:?}: {e}"));
        }
    }
    let older = VmInfo {
        placement: None,
        ..vm_info()
    };
    v.validate("VmInfo", &older).expect("valid");
}

#[test]
fn info_in_each_hotplug_mode_and_without_one_matches_its_schema() {
    let v = Validator::new();
    for hotplug in [
        Some(crate::hotplug::HotplugMode::Native),
        Some(crate::hotplug::HotplugMode::Acpi),
        None,
    ] {
        let info = VmInfo {
            hotplug,
            ..vm_info()
        };
        v.validate("VmInfo", &info)
            .unwrap_or_else(|e| panic!("{hotplug:?}: {e}"));
    }
}

#[test]
fn info_of_an_older_server_without_console_is_read() {
    let mut value = serde_json::to_value(vm_info()).unwrap();
    value.as_object_mut().unwrap().remove("console");

    let info: VmInfo = serde_json::from_value(value).expect("console is optional");

    assert_eq!(info.console, None);
}

#[test]
fn device_info_with_and_without_vf_matches_its_schema() {
    let v = Validator::new();
    v.validate("DeviceInfo", &host_device())
        .expect("host device");
    v.validate("DeviceInfo", &vf_device()).expect("VF device");
}

#[test]
fn remove_response_with_every_reason_matches_its_schema() {
    let v = Validator::new();
    for reason in [
        RemovalReason::GuestEjected,
        RemovalReason::Surprise,
        RemovalReason::HostRequest,
        RemovalReason::DeviceError,
        RemovalReason::TimeoutEscalated,
        RemovalReason::Reboot,
    ] {
        let r = RemoveDeviceResponse {
            id: id("nvme0"),
            bdf: bdf("0000:02:00.0"),
            host_bdf: bdf("0000:01:00.0"),
            reason,
            duration_ms: 5200,
        };
        v.validate("RemoveDeviceResponse", &r)
            .unwrap_or_else(|e| panic!("{reason:?}: {e}"));
    }
}

fn counters(event_log: Option<EventLogCounts>) -> Counters {
    let exits = ExitCounters::default();
    for reason in ExitReason::ALL {
        exits.count(reason);
    }
    let mut stats = HotplugStats::default();
    for kind in [
        HotplugOpKind::Add,
        HotplugOpKind::AddFailed,
        HotplugOpKind::GracefulRemove,
        HotplugOpKind::SurpriseRemove,
        HotplugOpKind::EscalatedRemove,
        HotplugOpKind::HostRemove,
        HotplugOpKind::ErrorRemove,
    ] {
        stats.record(kind, std::time::Duration::from_millis(12));
    }
    let vector = |kind, vector| VectorCount {
        kind,
        vector,
        irq: 40 + vector,
        count: 1000,
    };
    Counters {
        uptime_ms: 61_000,
        reboots: 0,
        vcpus: vec![VcpuCounters {
            index: 0,
            exits: exits.snapshot(),
        }],
        devices: vec![DeviceCounters {
            id: id("nvme0"),
            host_bdf: bdf("0000:01:00.0"),
            interrupts: vec![
                vector(VectorKind::Msix, 0),
                vector(VectorKind::Msi, 1),
                vector(VectorKind::Intx, 0),
            ],
            dma_mapped_bytes: 512 << 20,
        }],
        hotplug: stats.snapshot(),
        memory: MemoryCounters {
            reserved_bytes: 512 << 20,
            locked_bytes: 512 << 20,
            page_size: 4096,
        },
        event_log,
    }
}

#[test]
fn counters_with_every_kind_match_their_schema() {
    let v = Validator::new();
    v.validate("Counters", &counters(None))
        .expect("without an event log");
    v.validate(
        "Counters",
        &counters(Some(EventLogCounts {
            written: 10,
            dropped: 1,
        })),
    )
    .expect("with an event log");
}

#[test]
fn every_event_kind_matches_the_event_schema() {
    let v = Validator::new();
    for event in events() {
        v.validate("Event", &event)
            .unwrap_or_else(|e| panic!("{event:?}: {e}"));
    }
}

#[test]
fn vm_shutdown_with_every_reason_matches_the_event_schema() {
    let v = Validator::new();
    for reason in [
        ShutdownReason::PowerOff,
        ShutdownReason::Reset,
        ShutdownReason::Crash,
        ShutdownReason::ShutdownTimeout,
        ShutdownReason::Signal,
        ShutdownReason::Error,
    ] {
        let event = Event::now(EventKind::VmShutdown { reason });
        v.validate("Event", &event)
            .unwrap_or_else(|e| panic!("{reason:?}: {e}"));
    }
}

#[test]
fn documented_shutdown_reasons_are_the_types_reasons() {
    let spec = spec();
    let documented: Vec<String> = spec["components"]["schemas"]["ShutdownReason"]["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    for name in &documented {
        serde_json::from_value::<ShutdownReason>(Value::String(name.clone()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn error_bodies_match_the_error_schema() {
    let v = Validator::new();
    for err in [
        ApiError::UnknownDevice { id: id("nvme0") },
        ApiError::Timeout {
            step: "waiting for the guest to power the slot on".into(),
            after_ms: 30000,
        },
    ] {
        v.validate("Error", &err.body()).expect("valid");
    }
}

#[test]
fn requests_the_types_send_match_their_schemas() {
    let v = Validator::new();
    for s in [
        "path=01:00.0,id=nvme0",
        "vf=enp59s0f0,mac=52:54:00:00:00:02,vlan=0,trust=off,spoofchk=on",
    ] {
        let req: DeviceSpec = s.parse().expect("valid");
        v.validate("AddDeviceRequest", &req)
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    let remove = RemoveDeviceRequest {
        id: id("nvme0"),
        surprise: true,
        timeout_ms: 100,
    };
    v.validate("RemoveDeviceRequest", &remove).expect("valid");
    v.validate("ShutdownRequest", &ShutdownRequest {})
        .expect("valid");
    v.validate("PowerButtonRequest", &PowerButtonRequest {})
        .expect("valid");
}

fn request_examples(spec: &Value, path: &str) -> Vec<Value> {
    let examples =
        &spec["paths"][path]["put"]["requestBody"]["content"]["application/json"]["examples"];
    let examples = examples.as_object().expect("request examples");
    examples.values().map(|e| e["value"].clone()).collect()
}

#[test]
fn documented_add_examples_are_accepted() {
    for example in request_examples(&spec(), "/v1/vm/add-device") {
        serde_json::from_value::<DeviceSpec>(example.clone())
            .unwrap_or_else(|e| panic!("{example}: {e}"));
    }
}

#[test]
fn documented_remove_examples_are_accepted() {
    for example in request_examples(&spec(), "/v1/vm/remove-device") {
        serde_json::from_value::<RemoveDeviceRequest>(example.clone())
            .unwrap_or_else(|e| panic!("{example}: {e}"));
    }
}

#[test]
fn device_info_fields_for_events_match_device_info() {
    let v = Validator::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    v.documented(v.schema("DeviceInfo"), &mut a);
    v.documented(v.schema("DeviceInfoFields"), &mut b);
    assert_eq!(a, b);
    assert_eq!(
        v.schema("DeviceInfo")["required"],
        v.schema("DeviceInfoFields")["required"]
    );
}

#[test]
fn vm_info_in_both_states_matches_its_schema() {
    let v = Validator::new();
    for state in [VmState::Running, VmState::Paused] {
        let info = VmInfo { state, ..vm_info() };
        v.validate("VmInfo", &info)
            .unwrap_or_else(|e| panic!("{state:?}: {e}"));
    }
}

#[test]
fn pause_and_resume_take_the_empty_request() {
    let spec = spec();
    for path in ["/v1/vm/pause", "/v1/vm/resume"] {
        let schema = &spec["paths"][path]["put"]["requestBody"]["content"]["application/json"]
            ["schema"]["$ref"];
        assert_eq!(schema, "#/components/schemas/EmptyRequest", "{path}");
        let answers = spec["paths"][path]["put"]["responses"]
            .as_object()
            .expect("responses");
        assert!(answers.contains_key("204"), "{path}");
    }
    Validator::new()
        .validate("EmptyRequest", &crate::api::types::EmptyRequest {})
        .expect("valid");
}

#[test]
fn validator_catches_a_missing_required_property() {
    let v = Validator::new();
    let mut json = serde_json::to_value(host_device()).expect("serializable");
    json.as_object_mut().expect("object").remove("slot");
    assert!(v
        .check(v.schema("DeviceInfo"), &json, "DeviceInfo")
        .is_err());
}

#[test]
fn validator_catches_an_undocumented_event_property() {
    let v = Validator::new();
    let mut json = serde_json::to_value(&events()[5]).expect("serializable");
    json["extra"] = Value::Bool(true);
    assert!(v.check(v.schema("Event"), &json, "Event").is_err());
}

#[test]
fn documented_error_example_matches_the_error_type() {
    let spec = spec();
    let example = spec["components"]["responses"]["Timeout"]["content"]["application/json"]
        ["example"]
        .clone();
    let body: ErrorBody = serde_json::from_value(example).expect("an ErrorBody");
    assert!(body.step.is_some());
}
