//! The answers of `vm.info`, `vm.counters` and `vm.add-device` in that API's shapes
//! (`VmInfo`, `VmCounters`, `PciDeviceInfo`), from rvmm's own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::ch::{config, ChError, ChVmState};
use crate::api::types::DeviceInfo;
use crate::api::ApiHandler;
use crate::observe::Counters;
use crate::vm::config::VmConfig;
use crate::vm::pause::VmState;

/// `vm.add-device`'s answer: the device's id and its address in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// The device's id.
    pub id: String,
    /// Its guest address, `0000:01:00.0`.
    pub bdf: String,
}

impl From<&DeviceInfo> for PciDeviceInfo {
    fn from(d: &DeviceInfo) -> Self {
        Self {
            id: d.id.to_string(),
            bdf: d.bdf.to_string(),
        }
    }
}

/// A node of `vm.info`'s `device_tree`: rvmm lists its passthrough devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// The device's id.
    pub id: String,
    /// Its resources (rvmm lists none).
    pub resources: Vec<Value>,
    /// Its children (a passthrough function has none).
    pub children: Vec<String>,
    /// Its guest address, once the VM is booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// `vm.info`'s answer (`VmInfo`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChVmInfo {
    /// The configuration, in that API's `VmConfig` shape, with the current devices.
    pub config: Value,
    /// Where the VM is in its life.
    pub state: ChVmState,
    /// Guest RAM in bytes.
    pub memory_actual_size: u64,
    /// The passthrough devices by id.
    pub device_tree: BTreeMap<String, DeviceNode>,
}

/// Builds `vm.info` from the VMM's state and, while the VM is booted, the VM's own info.
pub fn vm_info(handler: &dyn ApiHandler) -> Result<ChVmInfo, ChError> {
    let (state, config) = match handler.vmm() {
        Some(vmm) => vmm
            .status()
            .ok_or_else(|| ChError::not_created("vm.info"))?,
        None => (ChVmState::Running, VmConfig::default()),
    };
    let live = match state {
        ChVmState::Running | ChVmState::Paused => Some(handler.info()?),
        ChVmState::Created | ChVmState::Shutdown => None,
    };
    Ok(match live {
        Some(info) => {
            let mut config = config;
            if handler.vmm().is_none() {
                // The VM of the command line: what its own info says.
                config.cpus = info.cpus;
                config.memory.size = info.memory_bytes;
                config.memory.hugepages = info.hugepages;
            }
            let tree = info
                .devices
                .iter()
                .map(|d| {
                    let node = DeviceNode {
                        id: d.id.to_string(),
                        resources: Vec::new(),
                        children: Vec::new(),
                        pci_bdf: Some(d.bdf.to_string()),
                    };
                    (node.id.clone(), node)
                })
                .collect();
            ChVmInfo {
                config: config::to_ch(&config, Some(&info.devices)),
                state: match info.state {
                    VmState::Paused => ChVmState::Paused,
                    VmState::Running => ChVmState::Running,
                },
                memory_actual_size: info.memory_bytes,
                device_tree: tree,
            }
        }
        None => ChVmInfo {
            config: config::to_ch(&config, None),
            state,
            memory_actual_size: config.memory.size,
            device_tree: config
                .devices
                .iter()
                .filter_map(|d| d.id.as_ref())
                .map(|id| {
                    let node = DeviceNode {
                        id: id.to_string(),
                        resources: Vec::new(),
                        children: Vec::new(),
                        pci_bdf: None,
                    };
                    (node.id.clone(), node)
                })
                .collect(),
        },
    })
}

/// rvmm's counters in that API's `VmCounters` shape: groups of named integers. Top-level
/// numbers go to the group `vm`; `memory`, `event_log` are groups of their own; each vCPU is
/// `vcpuN`, each device its id, each hotplug operation kind `hotplug.KIND`; nested objects
/// flatten into dotted names (`exits.io`).
pub fn counters(counters: &Counters) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut groups: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let Ok(Value::Object(top)) = serde_json::to_value(counters) else {
        return groups;
    };
    for (key, value) in &top {
        match value {
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    groups
                        .entry("vm".into())
                        .or_default()
                        .insert(key.clone(), n);
                }
            }
            Value::Object(_) => flatten(value, "", groups.entry(key.clone()).or_default()),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let name = group_name(key, i, item);
                    let group = groups.entry(name).or_default();
                    flatten(item, "", group);
                    // What names the group is not one of its counters.
                    for naming in ["index", "id", "kind"] {
                        group.remove(naming);
                    }
                }
            }
            _ => {}
        }
    }
    groups
}

/// The group of the `i`-th item of the list `key`: its `id`, `vcpu{index}`, `hotplug.{kind}`.
fn group_name(key: &str, i: usize, item: &Value) -> String {
    if let Some(id) = item.get("id").and_then(Value::as_str) {
        return id.to_owned();
    }
    if let Some(kind) = item.get("kind").and_then(Value::as_str) {
        return format!("{key}.{kind}");
    }
    let index = item
        .get("index")
        .and_then(Value::as_u64)
        .unwrap_or(i as u64);
    match key {
        "vcpus" => format!("vcpu{index}"),
        _ => format!("{key}{index}"),
    }
}

fn flatten(value: &Value, at: &str, out: &mut BTreeMap<String, u64>) {
    match value {
        Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.insert(at.to_owned(), n);
            }
        }
        Value::Bool(b) => {
            out.insert(at.to_owned(), u64::from(*b));
        }
        Value::Object(m) => {
            for (k, v) in m {
                let name = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                flatten(v, &name, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(v, &format!("{at}.{i}"), out);
            }
        }
        Value::String(_) | Value::Null => {}
    }
}
