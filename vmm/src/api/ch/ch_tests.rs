use std::sync::Mutex;

use super::*;
use crate::api::types::{DeviceInfo, RemoveDeviceResponse, VmInfo};
use crate::api::Subscription;
use crate::device::DeviceSpec;

/// A VMM with one VM in `state`, recording the verbs it was asked.
struct Fake {
    state: Mutex<Option<ChVmState>>,
    calls: Mutex<Vec<&'static str>>,
}

impl Fake {
    fn new(state: Option<ChVmState>) -> Self {
        Self {
            state: Mutex::new(state),
            calls: Mutex::new(Vec::new()),
        }
    }

    fn called(&self, what: &'static str) {
        self.calls.lock().expect("lock").push(what);
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("lock").clone()
    }
}

impl VmmControl for Fake {
    fn create(&self, _config: VmConfig) -> Result<(), ChError> {
        self.called("create");
        *self.state.lock().expect("lock") = Some(ChVmState::Created);
        Ok(())
    }
    fn add_device_cold(&self, _spec: DeviceSpec) -> Result<(), ChError> {
        self.called("add_device_cold");
        Ok(())
    }
    fn boot(&self) -> Result<(), ChError> {
        self.called("boot");
        Ok(())
    }
    fn shutdown_vm(&self) -> Result<(), ChError> {
        self.called("shutdown_vm");
        Ok(())
    }
    fn delete(&self) -> Result<(), ChError> {
        self.called("delete");
        Ok(())
    }
    fn shutdown_vmm(&self) -> Result<(), ChError> {
        self.called("shutdown_vmm");
        Ok(())
    }
    fn status(&self) -> Option<(ChVmState, VmConfig)> {
        let config = VmConfig {
            kernel: "/k".into(),
            ..VmConfig::default()
        };
        self.state.lock().expect("lock").map(|s| (s, config))
    }
}

impl ApiHandler for Fake {
    fn info(&self) -> Result<VmInfo, ApiError> {
        Err(ApiError::Internal("not in these tests".into()))
    }
    fn add_device(&self, _req: DeviceSpec) -> Result<DeviceInfo, ApiError> {
        self.called("add_device");
        Err(ApiError::Conflict("no free slot".into()))
    }
    fn remove_device(&self, req: RemoveDeviceRequest) -> Result<RemoveDeviceResponse, ApiError> {
        self.called("remove_device");
        Err(ApiError::UnknownDevice { id: req.id })
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.called("pause");
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn power_button(&self) -> Result<(), ApiError> {
        self.called("power_button");
        Ok(())
    }
    fn reboot(&self) -> Result<(), ApiError> {
        self.called("reboot");
        Ok(())
    }
    fn subscribe(&self) -> Subscription {
        crate::api::EventBus::new().subscribe()
    }
    fn vmm(&self) -> Option<&dyn VmmControl> {
        Some(self)
    }
}

fn request(method: &str, path: &str, body: &str) -> Request {
    Request {
        method: method.into(),
        target: format!("{PREFIX}{path}"),
        http11: true,
        body: body.as_bytes().to_vec(),
    }
}

fn call(handler: &Fake, method: &str, path: &str, body: &str) -> Response {
    let req = request(method, path, body);
    match route(&req.method, &req.target).expect("a Cloud Hypervisor path") {
        Ok(endpoint) => dispatch(endpoint, &req, handler, &|| false),
        Err(e) => Response::error(&e),
    }
}

fn message(r: &Response) -> String {
    serde_json::from_slice::<crate::api::ErrorBody>(&r.body)
        .map(|b| b.error)
        .unwrap_or_default()
}

#[test]
fn rvmms_own_paths_are_not_routed_here() {
    assert!(route("GET", "/v1/vm/info").is_none());
}

#[test]
fn every_verb_takes_only_its_method() {
    for (path, method, _) in CH_ROUTES {
        let other = if method == "GET" { "PUT" } else { "GET" };

        let r = call(&Fake::new(None), other, path, "");

        assert_eq!(r.status, 405, "{other} {path}");
    }
}

#[test]
fn an_unknown_verb_is_404() {
    assert_eq!(call(&Fake::new(None), "PUT", "vm.snapshot", "").status, 404);
}

#[test]
fn ping_answers_the_version_and_pid() {
    let r = call(&Fake::new(None), "GET", "vmm.ping", "");

    let ping: PingResponse = serde_json::from_slice(&r.body).expect("a ping response");
    assert_eq!(r.status, 200);
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ping.pid, i64::from(std::process::id()));
}

#[test]
fn create_translates_the_body_and_answers_204() {
    let fake = Fake::new(None);

    let r = call(
        &fake,
        "PUT",
        "vm.create",
        r#"{"payload": {"kernel": "/k"}}"#,
    );

    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(fake.calls(), ["create"]);
}

#[test]
fn create_refuses_an_unsupported_field_with_400_naming_it() {
    let fake = Fake::new(None);

    let r = call(
        &fake,
        "PUT",
        "vm.create",
        r#"{"payload": {"kernel": "/k"}, "net": [{"tap": "tap0"}]}"#,
    );

    assert_eq!(r.status, 400);
    assert!(message(&r).starts_with("net:"), "{}", message(&r));
    assert!(fake.calls().is_empty());
}

#[test]
fn verbs_without_a_vm_are_404() {
    for path in ["vm.info", "vm.pause", "vm.power-button", "vm.counters"] {
        let method = if path == "vm.info" || path == "vm.counters" {
            "GET"
        } else {
            "PUT"
        };

        assert_eq!(
            call(&Fake::new(None), method, path, "").status,
            404,
            "{path}"
        );
    }
}

#[test]
fn verbs_that_need_a_booted_vm_are_405_before_boot() {
    let fake = Fake::new(Some(ChVmState::Created));

    for path in ["vm.pause", "vm.resume", "vm.power-button", "vm.reboot"] {
        assert_eq!(call(&fake, "PUT", path, "").status, 405, "{path}");
    }
    assert!(fake.calls().is_empty());
}

#[test]
fn add_device_before_boot_is_a_cold_add_answered_204() {
    let fake = Fake::new(Some(ChVmState::Created));

    let r = call(
        &fake,
        "PUT",
        "vm.add-device",
        r#"{"path": "/sys/bus/pci/devices/0000:01:00.0"}"#,
    );

    assert_eq!((r.status, r.body.len()), (204, 0));
    assert_eq!(fake.calls(), ["add_device_cold"]);
}

#[test]
fn lifecycle_verbs_answer_204_without_a_body() {
    let fake = Fake::new(Some(ChVmState::Running));

    for path in [
        "vm.boot",
        "vm.pause",
        "vm.power-button",
        "vm.shutdown",
        "vm.delete",
        "vmm.shutdown",
    ] {
        let r = call(&fake, "PUT", path, "");

        assert_eq!((r.status, r.body.len()), (204, 0), "{path}");
    }
    assert_eq!(
        fake.calls(),
        [
            "boot",
            "pause",
            "power_button",
            "shutdown_vm",
            "delete",
            "shutdown_vmm"
        ]
    );
}

#[test]
fn a_body_on_a_verb_without_one_is_refused() {
    let r = call(
        &Fake::new(Some(ChVmState::Running)),
        "PUT",
        "vm.pause",
        r#"{"x": 1}"#,
    );

    assert_eq!(r.status, 400);
}

#[test]
fn reboot_of_a_running_vm_is_rvmm_s_reset() {
    let fake = Fake::new(Some(ChVmState::Running));
    let r = call(&fake, "PUT", "vm.reboot", "");

    assert_eq!(r.status, 204);
    assert_eq!(fake.calls(), ["reboot"]);
}

#[test]
fn add_and_remove_device_reach_the_handler_with_its_errors() {
    let fake = Fake::new(Some(ChVmState::Running));

    let added = call(
        &fake,
        "PUT",
        "vm.add-device",
        r#"{"path": "/sys/bus/pci/devices/0000:01:00.0", "iommu": false}"#,
    );
    let removed = call(&fake, "PUT", "vm.remove-device", r#"{"id": "nvme0"}"#);
    let iommu = call(
        &fake,
        "PUT",
        "vm.add-device",
        r#"{"path": "/sys/bus/pci/devices/0000:01:00.0", "iommu": true}"#,
    );

    assert_eq!(added.status, 409);
    assert_eq!(removed.status, 404);
    assert_eq!(iommu.status, 400);
    assert!(message(&iommu).contains("iommu"), "{}", message(&iommu));
    assert_eq!(fake.calls(), ["add_device", "remove_device"]);
}

#[test]
fn info_of_a_created_vm_has_its_configuration_and_state() {
    let r = call(&Fake::new(Some(ChVmState::Created)), "GET", "vm.info", "");

    let info: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(r.status, 200);
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["payload"]["kernel"], "/k");
    assert_eq!(info["memory_actual_size"], 512u64 << 20);
}

#[test]
fn counters_flatten_into_named_groups() {
    let counters: crate::observe::Counters = serde_json::from_value(serde_json::json!({
        "uptime_ms": 5, "reboots": 0, "devices": [], "hotplug": [],
        "vcpus": [{"index": 1, "exits": {"io_in": 7, "io_out": 0, "mmio_read": 0, "mmio_write": 0,
                   "hlt": 0, "shutdown": 0, "system_event": 0, "fail_entry": 0,
                   "internal_error": 0, "intr": 0, "other": 0}}],
        "memory": {"reserved_bytes": 1024, "locked_bytes": 0, "page_size": 4096}
    }))
    .expect("counters");

    let groups = info::counters(&counters);

    assert_eq!(groups["vm"]["uptime_ms"], 5);
    assert_eq!(groups["memory"]["reserved_bytes"], 1024);
    assert_eq!(groups["vcpu1"]["exits.io_in"], 7);
    assert!(!groups["vcpu1"].contains_key("index"));
}
