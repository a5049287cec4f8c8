//! Cloud Hypervisor's `VmConfig` and `DeviceConfig` (the bodies of `vm.create` and
//! `vm.add-device`) read into rvmm's [`VmConfig`] and [`DeviceSpec`], and rvmm's configuration
//! written back in that shape (`vm.info`'s `config`).
//!
//! What rvmm has is translated; every other field of that API's schema is accepted only when
//! absent, `null` or at that API's default value, and refused otherwise with a message naming
//! the field (`disks`, `cpus.max_vcpus`, `devices[0].iommu`); a field that schema does not have
//! is refused too. Nothing is silently ignored.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use crate::api::types::DeviceInfo;
use crate::device::{DeviceId, DeviceSource, DeviceSpec};
use crate::memory::{HugepageSize, MemoryConfig};
use crate::placement::CpuList;
use crate::vm::config::{SerialConfig, VmConfig, DEFAULT_CMDLINE, MAX_CPUS};
use rvmm_pci::Bdf;

/// A refusal: the message of a 400 answer, naming the field.
pub type Refusal = String;

/// Cloud Hypervisor's default `cpus.max_phys_bits`.
const DEFAULT_MAX_PHYS_BITS: u64 = 46;
/// Cloud Hypervisor's default `debug_console.iobase` (port 0xe9).
const DEFAULT_DEBUG_IOBASE: u64 = 0xe9;

/// The top-level fields of that API's `VmConfig` that rvmm does not have, and the value each
/// is accepted at (besides absent and `null`).
const UNSUPPORTED_TOP: &[(&str, AtDefault)] = &[
    ("rate_limit_groups", AtDefault::EmptyList),
    ("disks", AtDefault::EmptyList),
    ("net", AtDefault::EmptyList),
    ("balloon", AtDefault::Absent),
    ("fs", AtDefault::EmptyList),
    ("generic_vhost_user", AtDefault::EmptyList),
    ("pmem", AtDefault::EmptyList),
    ("user_devices", AtDefault::EmptyList),
    ("vdpa", AtDefault::EmptyList),
    ("vsock", AtDefault::Absent),
    ("numa", AtDefault::EmptyList),
    ("iommu", AtDefault::False),
    ("watchdog", AtDefault::False),
    ("rtc", AtDefault::Absent),
    ("pvpanic", AtDefault::False),
    ("pci_segments", AtDefault::EmptyList),
    ("tpm", AtDefault::Absent),
    ("landlock_enable", AtDefault::False),
    ("landlock_rules", AtDefault::EmptyList),
    ("sgx_epc", AtDefault::EmptyList),
    ("preserved_fds", AtDefault::EmptyList),
];

/// The value a field is accepted at when rvmm does not support it.
#[derive(Clone, Copy, Debug)]
enum AtDefault {
    /// Only absent or `null`.
    Absent,
    /// Absent, `null` or `[]`.
    EmptyList,
    /// Absent, `null` or `false`.
    False,
    /// Absent, `null` or `true`.
    True,
    /// Absent, `null` or this number.
    Number(u64),
    /// Absent, `null` or this string.
    Str(&'static str),
}

impl AtDefault {
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (AtDefault::EmptyList, Value::Array(a)) => a.is_empty(),
            (AtDefault::False, Value::Bool(b)) => !b,
            (AtDefault::True, Value::Bool(b)) => *b,
            (AtDefault::Number(n), Value::Number(v)) => v.as_u64() == Some(n),
            (AtDefault::Str(s), Value::String(v)) => v == s,
            _ => false,
        }
    }

    fn describe(self) -> String {
        match self {
            AtDefault::Absent => "leave it out".into(),
            AtDefault::EmptyList => "leave it out or give []".into(),
            AtDefault::False => "leave it out or give false".into(),
            AtDefault::True => "leave it out or give true".into(),
            AtDefault::Number(n) => format!("leave it out or give {n}"),
            AtDefault::Str(s) => format!("leave it out or give \"{s}\""),
        }
    }
}

/// `field` (with its path `at`) is not something rvmm has: refused unless at `default`.
fn unsupported(
    map: &Map<String, Value>,
    at: &str,
    field: &str,
    default: AtDefault,
) -> Result<(), Refusal> {
    match map.get(field) {
        Some(value) if !default.accepts(value) => Err(format!(
            "{}: rvmm does not support this field (given {value}); {}",
            join(at, field),
            default.describe()
        )),
        _ => Ok(()),
    }
}

fn join(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// Refuses fields of `map` that are not in `known` (fields that API's schema does not have
/// here).
fn only_known(map: &Map<String, Value>, at: &str, known: &[&str]) -> Result<(), Refusal> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{}: unknown field (Cloud Hypervisor's schema has no such field here; rvmm knows {})",
            join(at, k),
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// The object `value` at `at`.
fn object<'a>(value: &'a Value, at: &str) -> Result<&'a Map<String, Value>, Refusal> {
    value
        .as_object()
        .ok_or_else(|| format!("{at}: expected a JSON object, got {value}"))
}

/// The present, non-null field `field` of `map`.
fn present<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

fn uint(map: &Map<String, Value>, at: &str, field: &str) -> Result<Option<u64>, Refusal> {
    present(map, field)
        .map(|v| {
            v.as_u64().ok_or_else(|| {
                format!(
                    "{}: expected a non-negative integer, got {v}",
                    join(at, field)
                )
            })
        })
        .transpose()
}

fn string<'a>(
    map: &'a Map<String, Value>,
    at: &str,
    field: &str,
) -> Result<Option<&'a str>, Refusal> {
    present(map, field)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("{}: expected a string, got {v}", join(at, field)))
        })
        .transpose()
}

fn boolean(map: &Map<String, Value>, at: &str, field: &str) -> Result<Option<bool>, Refusal> {
    present(map, field)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| format!("{}: expected true or false, got {v}", join(at, field)))
        })
        .transpose()
}

/// Reads the body of `vm.create`: that API's `VmConfig`, as rvmm's [`VmConfig`].
pub fn vm_config(body: &Value) -> Result<VmConfig, Refusal> {
    let map = object(body, "the VM configuration")?;
    let mut known: Vec<&str> = vec![
        "cpus",
        "memory",
        "payload",
        "rng",
        "serial",
        "console",
        "debug_console",
        "devices",
        "platform",
    ];
    known.extend(UNSUPPORTED_TOP.iter().map(|(k, _)| *k));
    only_known(map, "", &known)?;
    for (field, default) in UNSUPPORTED_TOP {
        unsupported(map, "", field, *default)?;
    }
    let mut config = VmConfig::default();
    let payload = present(map, "payload").ok_or(
        "payload: required (Cloud Hypervisor's VmConfig requires it): give {\"kernel\": PATH}",
    )?;
    payload_into(payload, &mut config)?;
    if let Some(cpus) = present(map, "cpus") {
        cpus_into(cpus, &mut config)?;
    }
    if let Some(memory) = present(map, "memory") {
        config.memory = memory_config(memory)?;
    }
    if let Some(rng) = present(map, "rng") {
        rng_at_default(rng)?;
    }
    // That API's default serial port is `Null` (no output); rvmm's port is always there, so
    // absent means off here too.
    config.serial = match present(map, "serial") {
        Some(serial) => serial_config(serial)?,
        None => SerialConfig::Off,
    };
    if let Some(console) = present(map, "console") {
        console_at_default(console)?;
    }
    if let Some(debug) = present(map, "debug_console") {
        let m = object(debug, "debug_console")?;
        only_known(m, "debug_console", &["mode", "file", "iobase"])?;
        unsupported(m, "debug_console", "mode", AtDefault::Str("Off"))?;
        unsupported(m, "debug_console", "file", AtDefault::Absent)?;
        unsupported(
            m,
            "debug_console",
            "iobase",
            AtDefault::Number(DEFAULT_DEBUG_IOBASE),
        )?;
    }
    if let Some(platform) = present(map, "platform") {
        platform_at_default(platform)?;
    }
    if let Some(devices) = present(map, "devices") {
        let list = devices
            .as_array()
            .ok_or_else(|| format!("devices: expected a list, got {devices}"))?;
        config.devices = list
            .iter()
            .enumerate()
            .map(|(i, d)| device_config(d, &format!("devices[{i}]")))
            .collect::<Result<_, _>>()?;
    }
    Ok(config)
}

fn payload_into(payload: &Value, config: &mut VmConfig) -> Result<(), Refusal> {
    let m = object(payload, "payload")?;
    only_known(
        m,
        "payload",
        &[
            "kernel",
            "cmdline",
            "initramfs",
            "firmware",
            "igvm",
            "host_data",
        ],
    )?;
    for field in ["firmware", "igvm", "host_data"] {
        unsupported(m, "payload", field, AtDefault::Absent)?;
    }
    let kernel = string(m, "payload", "kernel")?.ok_or(
        "payload.kernel: required: rvmm boots a kernel directly (a bzImage or a PVH vmlinux), give its path",
    )?;
    config.kernel = PathBuf::from(kernel);
    config.initramfs = string(m, "payload", "initramfs")?.map(PathBuf::from);
    config.cmdline = string(m, "payload", "cmdline")?
        .unwrap_or(DEFAULT_CMDLINE)
        .to_owned();
    Ok(())
}

fn cpus_into(cpus: &Value, config: &mut VmConfig) -> Result<(), Refusal> {
    let m = object(cpus, "cpus")?;
    only_known(
        m,
        "cpus",
        &[
            "boot_vcpus",
            "max_vcpus",
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "nested",
            "affinity",
            "features",
            "core_scheduling",
        ],
    )?;
    let boot = uint(m, "cpus", "boot_vcpus")?.ok_or("cpus.boot_vcpus: required")?;
    let count = u8::try_from(boot)
        .ok()
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .ok_or_else(|| format!("cpus.boot_vcpus: {boot} is not supported: give 1 to {MAX_CPUS}"))?;
    if let Some(max) = uint(m, "cpus", "max_vcpus")? {
        if max != boot {
            return Err(format!(
                "cpus.max_vcpus: {max} differs from boot_vcpus {boot}: rvmm has no vCPU hotplug; give max_vcpus equal to boot_vcpus"
            ));
        }
    }
    unsupported(m, "cpus", "topology", AtDefault::Absent)?;
    unsupported(m, "cpus", "kvm_hyperv", AtDefault::False)?;
    unsupported(
        m,
        "cpus",
        "max_phys_bits",
        AtDefault::Number(DEFAULT_MAX_PHYS_BITS),
    )?;
    unsupported(m, "cpus", "nested", AtDefault::True)?;
    unsupported(m, "cpus", "core_scheduling", AtDefault::Str("Vm"))?;
    if let Some(features) = present(m, "features") {
        let f = object(features, "cpus.features")?;
        only_known(f, "cpus.features", &["amx"])?;
        unsupported(f, "cpus.features", "amx", AtDefault::False)?;
    }
    config.cpus = count;
    config.cpu_affinity = match present(m, "affinity") {
        Some(affinity) => affinity_list(affinity, count)?,
        None => None,
    };
    Ok(())
}

/// That API's per-vCPU affinity as rvmm's one CPU list for every vCPU thread: accepted when
/// every vCPU is given the same host CPUs.
fn affinity_list(affinity: &Value, count: u8) -> Result<Option<CpuList>, Refusal> {
    let entries = affinity
        .as_array()
        .ok_or_else(|| format!("cpus.affinity: expected a list, got {affinity}"))?;
    if entries.is_empty() {
        return Ok(None);
    }
    let mut shared: Option<Vec<u64>> = None;
    let mut seen = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("cpus.affinity[{i}]");
        let e = object(entry, &at)?;
        only_known(e, &at, &["vcpu", "host_cpus"])?;
        let vcpu = uint(e, &at, "vcpu")?.ok_or_else(|| format!("{at}.vcpu: required"))?;
        let mut cpus: Vec<u64> = present(e, "host_cpus")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{at}.host_cpus: required, a list of host CPU numbers"))?
            .iter()
            .map(|c| c.as_u64().filter(|c| *c <= u64::from(u32::MAX)))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("{at}.host_cpus: expected host CPU numbers"))?;
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(format!("{at}.host_cpus: give at least one host CPU"));
        }
        match &shared {
            Some(first) if *first != cpus => {
                return Err(format!(
                    "cpus.affinity: rvmm gives every vCPU thread the same host CPUs; give each vCPU the same host_cpus (vCPU {vcpu} differs)"
                ))
            }
            Some(_) => {}
            None => shared = Some(cpus),
        }
        seen.push(vcpu);
    }
    seen.sort_unstable();
    if seen != (0..u64::from(count)).collect::<Vec<_>>() {
        return Err(format!(
            "cpus.affinity: give one entry for each vCPU 0 to {} (rvmm gives them all the same host CPUs)",
            count - 1
        ));
    }
    Ok(shared.map(|cpus| CpuList::from_ids(cpus.into_iter().map(|c| c as u32))))
}

fn memory_config(memory: &Value) -> Result<MemoryConfig, Refusal> {
    let m = object(memory, "memory")?;
    only_known(
        m,
        "memory",
        &[
            "size",
            "hotplug_size",
            "hotplugged_size",
            "mergeable",
            "hotplug_method",
            "shared",
            "hugepages",
            "hugepage_size",
            "prefault",
            "reserve",
            "thp",
            "zones",
        ],
    )?;
    let size = uint(m, "memory", "size")?.ok_or("memory.size: required, in bytes")?;
    unsupported(m, "memory", "hotplug_size", AtDefault::Number(0))?;
    unsupported(m, "memory", "hotplugged_size", AtDefault::Number(0))?;
    unsupported(m, "memory", "mergeable", AtDefault::False)?;
    unsupported(m, "memory", "hotplug_method", AtDefault::Str("Acpi"))?;
    unsupported(m, "memory", "shared", AtDefault::False)?;
    unsupported(m, "memory", "reserve", AtDefault::False)?;
    unsupported(m, "memory", "thp", AtDefault::True)?;
    unsupported(m, "memory", "zones", AtDefault::EmptyList)?;
    // rvmm always prefaults and locks guest RAM (passthrough DMA needs it resident): both
    // values are honoured by doing so.
    boolean(m, "memory", "prefault")?;
    let hugepages = boolean(m, "memory", "hugepages")?.unwrap_or(false);
    let hugepage_size = match uint(m, "memory", "hugepage_size")? {
        None => HugepageSize::default(),
        Some(_) if !hugepages => {
            return Err("memory.hugepage_size: given without hugepages: true".into())
        }
        Some(b) if b == HugepageSize::Size2M.bytes() => HugepageSize::Size2M,
        Some(b) if b == HugepageSize::Size1G.bytes() => HugepageSize::Size1G,
        Some(b) => {
            return Err(format!(
                "memory.hugepage_size: {b} is not supported: give 2097152 (2 MiB) or 1073741824 (1 GiB)"
            ))
        }
    };
    let config = MemoryConfig {
        size,
        hugepages,
        hugepage_size,
        host_node: None,
    };
    config.validate().map_err(|e| format!("memory.size: {e}"))?;
    Ok(config)
}

fn rng_at_default(rng: &Value) -> Result<(), Refusal> {
    let m = object(rng, "rng")?;
    only_known(
        m,
        "rng",
        &["src", "iommu", "id", "pci_segment", "pci_device_id"],
    )?;
    unsupported(m, "rng", "src", AtDefault::Str("/dev/urandom"))?;
    unsupported(m, "rng", "iommu", AtDefault::False)?;
    unsupported(m, "rng", "id", AtDefault::Absent)?;
    unsupported(m, "rng", "pci_segment", AtDefault::Number(0))?;
    unsupported(m, "rng", "pci_device_id", AtDefault::Absent)
}

fn platform_at_default(platform: &Value) -> Result<(), Refusal> {
    let m = object(platform, "platform")?;
    let defaults: &[(&str, AtDefault)] = &[
        ("num_pci_segments", AtDefault::Number(1)),
        ("iommu_segments", AtDefault::EmptyList),
        ("iommu_address_width_bits", AtDefault::Absent),
        ("system_serial_number", AtDefault::Absent),
        ("serial_number", AtDefault::Absent),
        ("system_uuid", AtDefault::Absent),
        ("uuid", AtDefault::Absent),
        ("oem_strings", AtDefault::EmptyList),
        ("system_manufacturer", AtDefault::Absent),
        ("system_product_name", AtDefault::Absent),
        ("system_version", AtDefault::Absent),
        ("system_family", AtDefault::Absent),
        ("system_sku_number", AtDefault::Absent),
        ("chassis_asset_tag", AtDefault::Absent),
        ("tdx", AtDefault::False),
        ("sev_snp", AtDefault::False),
        ("iommufd", AtDefault::False),
        ("vfio_p2p_dma", AtDefault::True),
    ];
    let known: Vec<&str> = defaults.iter().map(|(k, _)| *k).collect();
    only_known(m, "platform", &known)?;
    for (field, default) in defaults {
        unsupported(m, "platform", field, *default)?;
    }
    Ok(())
}

/// That API's `SerialConfig` as rvmm's serial port.
fn serial_config(serial: &Value) -> Result<SerialConfig, Refusal> {
    let m = object(serial, "serial")?;
    only_known(m, "serial", &["mode", "file", "socket", "iommu"])?;
    unsupported(m, "serial", "iommu", AtDefault::False)?;
    let mode = string(m, "serial", "mode")?.ok_or("serial.mode: required")?;
    let (file, socket) = (string(m, "serial", "file")?, string(m, "serial", "socket")?);
    let no_path = |what: &str| -> Result<(), Refusal> {
        match (file, socket) {
            (None, None) => Ok(()),
            _ => Err(format!("serial: mode {what} takes neither file nor socket")),
        }
    };
    Ok(match mode {
        "Off" | "Null" => {
            no_path(mode)?;
            SerialConfig::Off
        }
        "Tty" => {
            no_path(mode)?;
            SerialConfig::Stdio
        }
        "Pty" => {
            no_path(mode)?;
            SerialConfig::Pty
        }
        "File" => SerialConfig::File {
            path: PathBuf::from(file.ok_or("serial.file: required with mode File")?),
            max_size: crate::vm::console_out::DEFAULT_FILE_LIMIT,
        },
        "Socket" => SerialConfig::Socket {
            path: PathBuf::from(socket.ok_or("serial.socket: required with mode Socket")?),
            buffer: crate::vm::console_socket::DEFAULT_RING_SIZE,
        },
        other => {
            return Err(format!(
                "serial.mode: {other:?} is not supported: give Off, Null, Tty, Pty, File or Socket"
            ))
        }
    })
}

/// rvmm has no virtio console: `console` is accepted when off.
fn console_at_default(console: &Value) -> Result<(), Refusal> {
    let m = object(console, "console")?;
    only_known(
        m,
        "console",
        &[
            "mode",
            "file",
            "socket",
            "iommu",
            "id",
            "pci_segment",
            "pci_device_id",
        ],
    )?;
    match string(m, "console", "mode")? {
        None | Some("Off") | Some("Null") => {}
        Some(other) => {
            return Err(format!(
                "console.mode: {other:?} is not supported: rvmm has no virtio console; give \"console\": {{\"mode\": \"Off\"}} and use \"serial\" (the guest's ttyS0)"
            ))
        }
    }
    for field in ["file", "socket", "id", "pci_device_id"] {
        unsupported(m, "console", field, AtDefault::Absent)?;
    }
    unsupported(m, "console", "iommu", AtDefault::False)?;
    unsupported(m, "console", "pci_segment", AtDefault::Number(0))
}

/// That API's `DeviceConfig` (a `devices` entry, the body of `vm.add-device`) as a
/// [`DeviceSpec`]; `at` names it in refusals.
pub fn device_config(device: &Value, at: &str) -> Result<DeviceSpec, Refusal> {
    let m = object(device, at)?;
    only_known(
        m,
        at,
        &[
            "path",
            "iommu",
            "pci_segment",
            "pci_device_id",
            "id",
            "x_nv_gpudirect_clique",
            "x_exclude_mmap_bars",
        ],
    )?;
    unsupported(m, at, "iommu", AtDefault::False)?;
    unsupported(m, at, "pci_segment", AtDefault::Number(0))?;
    unsupported(m, at, "pci_device_id", AtDefault::Absent)?;
    unsupported(m, at, "x_nv_gpudirect_clique", AtDefault::Absent)?;
    unsupported(m, at, "x_exclude_mmap_bars", AtDefault::EmptyList)?;
    let path = string(m, at, "path")?.ok_or_else(|| {
        format!(
            "{}: required: the device's sysfs path, e.g. /sys/bus/pci/devices/0000:01:00.0 (rvmm takes no descriptor in its place)",
            join(at, "path")
        )
    })?;
    let bdf = Bdf::from_sysfs(path).map_err(|e| format!("{}: {e}", join(at, "path")))?;
    let mut spec = DeviceSpec::host(bdf);
    spec.id = string(m, at, "id")?
        .map(DeviceId::new)
        .transpose()
        .map_err(|e| format!("{}: {e}", join(at, "id")))?;
    Ok(spec)
}

/// rvmm's configuration in that API's `VmConfig` shape (`vm.info`'s `config`); `devices` are
/// the VM's current devices when it runs, else those it was created with.
pub fn to_ch(config: &VmConfig, devices: Option<&[DeviceInfo]>) -> Value {
    let mut cpus = json!({
        "boot_vcpus": config.cpus,
        "max_vcpus": config.cpus,
    });
    if let Some(list) = &config.cpu_affinity {
        let host_cpus: Vec<u32> = list.iter().collect();
        cpus["affinity"] = (0..config.cpus)
            .map(|vcpu| json!({"vcpu": vcpu, "host_cpus": host_cpus}))
            .collect();
    }
    let mut memory = json!({
        "size": config.memory.size,
        "hugepages": config.memory.hugepages,
        "shared": false,
        "mergeable": false,
        "prefault": true,
    });
    if config.memory.hugepages {
        memory["hugepage_size"] = json!(config.memory.hugepage_size.bytes());
    }
    let mut payload = json!({
        "kernel": config.kernel,
        "cmdline": config.cmdline,
    });
    if let Some(initramfs) = &config.initramfs {
        payload["initramfs"] = json!(initramfs);
    }
    let serial = match &config.serial {
        SerialConfig::Stdio => json!({"mode": "Tty"}),
        SerialConfig::Off => json!({"mode": "Off"}),
        SerialConfig::Pty => json!({"mode": "Pty"}),
        SerialConfig::File { path, .. } => json!({"mode": "File", "file": path}),
        SerialConfig::Socket { path, .. } => json!({"mode": "Socket", "socket": path}),
    };
    let devices: Vec<Value> = match devices {
        Some(live) => live
            .iter()
            .map(|d| device_entry(&d.host_bdf.sysfs_path(), Some(d.id.as_str())))
            .collect(),
        None => config
            .devices
            .iter()
            .filter_map(|d| match &d.source {
                DeviceSource::Host(bdf) => Some(device_entry(
                    &bdf.sysfs_path(),
                    d.id.as_ref().map(DeviceId::as_str),
                )),
                DeviceSource::Vf(_) => None,
            })
            .collect(),
    };
    json!({
        "cpus": cpus,
        "memory": memory,
        "payload": payload,
        "serial": serial,
        "console": {"mode": "Off"},
        "devices": devices,
        "iommu": false,
        "watchdog": false,
        "pvpanic": false,
    })
}

fn device_entry(path: &str, id: Option<&str>) -> Value {
    let mut entry = json!({"path": path, "iommu": false, "pci_segment": 0});
    if let Some(id) = id {
        entry["id"] = json!(id);
    }
    entry
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
