use serde_json::json;

use super::*;

/// A `vm.create` body as that API's clients send it: every field of its OpenAPI document at
/// its default, for what rvmm has a value.
fn full_body() -> Value {
    json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "max_phys_bits": 46,
                 "nested": true, "core_scheduling": "Vm"},
        "memory": {"size": 536870912u64, "hotplug_size": 0, "mergeable": false,
                   "hotplug_method": "Acpi", "shared": false, "hugepages": false,
                   "prefault": false, "reserve": false, "thp": true, "zones": []},
        "payload": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0", "initramfs": "/boot/initrd"},
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off", "iommu": false},
        "debug_console": {"mode": "Off", "iobase": 233},
        "devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0/", "id": "nvme0", "iommu": false, "pci_segment": 0}],
        "disks": [], "net": [], "fs": [], "pmem": [], "vdpa": [], "numa": null,
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
        "platform": {"num_pci_segments": 1, "tdx": false, "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true}
    })
}

#[test]
fn a_body_at_the_defaults_becomes_rvmms_configuration() {
    let config = vm_config(&full_body()).expect("accepted");

    assert_eq!(config.kernel, PathBuf::from("/boot/vmlinuz"));
    assert_eq!(config.initramfs, Some(PathBuf::from("/boot/initrd")));
    assert_eq!(config.cmdline, "console=ttyS0");
    assert_eq!(config.cpus, 2);
    assert_eq!(config.memory.size, 512 << 20);
    assert_eq!(config.serial, SerialConfig::Stdio);
    assert_eq!(config.devices.len(), 1);
    assert_eq!(
        config.devices[0].id.as_ref().map(DeviceId::as_str),
        Some("nvme0")
    );
    assert_eq!(
        config.devices[0].source,
        DeviceSource::Host("0000:01:00.0".parse().expect("bdf"))
    );
}

#[test]
fn only_the_payload_is_required() {
    let config = vm_config(&json!({"payload": {"kernel": "/k"}})).expect("accepted");

    assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    assert_eq!(config.serial, SerialConfig::Off);
    assert_eq!(config.cpus, 1);
}

/// The message of refusing `body` with `field` changed to `value`.
fn refusal(pointer: &str, value: Value) -> String {
    let mut body = full_body();
    *body
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} in the body")) = value;
    vm_config(&body).expect_err("refused")
}

#[test]
fn unsupported_fields_away_from_their_defaults_are_refused_by_name() {
    let cases = [
        ("/disks", json!([{"path": "/disk.img"}]), "disks"),
        ("/net", json!([{"tap": "tap0"}]), "net"),
        ("/iommu", json!(true), "iommu"),
        ("/devices/0/iommu", json!(true), "devices[0].iommu"),
        ("/devices/0/pci_segment", json!(1), "devices[0].pci_segment"),
        ("/cpus/max_vcpus", json!(4), "cpus.max_vcpus"),
        ("/cpus/nested", json!(false), "cpus.nested"),
        ("/memory/shared", json!(true), "memory.shared"),
        (
            "/memory/hotplug_size",
            json!(1073741824u64),
            "memory.hotplug_size",
        ),
        ("/console/mode", json!("Tty"), "console.mode"),
        ("/rng/src", json!("/dev/random"), "rng.src"),
        ("/platform/tdx", json!(true), "platform.tdx"),
    ];
    for (pointer, value, field) in cases {
        let err = refusal(pointer, value);

        assert!(err.starts_with(field), "{pointer}: {err}");
    }
}

#[test]
fn a_vsock_is_refused_by_name() {
    let mut body = full_body();
    body["vsock"] = json!({"cid": 3, "socket": "/tmp/vsock"});

    assert!(vm_config(&body).expect_err("refused").starts_with("vsock:"));
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let mut body = full_body();
    body["memory"]["balloon"] = json!(true);

    let err = vm_config(&body).expect_err("refused");

    assert!(err.starts_with("memory.balloon: unknown field"), "{err}");
}

#[test]
fn a_missing_kernel_or_firmware_payload_is_refused() {
    assert!(vm_config(&json!({}))
        .expect_err("no payload")
        .starts_with("payload"));
    let err = vm_config(&json!({"payload": {"firmware": "/fw"}})).expect_err("firmware");
    assert!(err.starts_with("payload.firmware"), "{err}");
}

#[test]
fn equal_affinity_for_every_vcpu_becomes_one_cpu_list() {
    let mut body = full_body();
    body["cpus"]["affinity"] =
        json!([{"vcpu": 0, "host_cpus": [2, 3]}, {"vcpu": 1, "host_cpus": [3, 2]}]);

    let config = vm_config(&body).expect("accepted");

    assert_eq!(config.cpu_affinity, Some(CpuList::from_ids([2, 3])));
}

#[test]
fn different_affinity_per_vcpu_is_refused() {
    let err = refusal(
        "/cpus",
        json!({"boot_vcpus": 2, "max_vcpus": 2, "affinity": [{"vcpu": 0, "host_cpus": [0]}, {"vcpu": 1, "host_cpus": [1]}]}),
    );

    assert!(err.starts_with("cpus.affinity"), "{err}");
}

#[test]
fn hugepages_take_the_two_sizes_rvmm_has() {
    let mut body = full_body();
    body["memory"]["hugepages"] = json!(true);
    body["memory"]["hugepage_size"] = json!(2097152);
    assert_eq!(
        vm_config(&body).expect("2M").memory.hugepage_size,
        HugepageSize::Size2M
    );

    body["memory"]["hugepage_size"] = json!(4096);
    assert!(vm_config(&body)
        .expect_err("4K")
        .starts_with("memory.hugepage_size"));
}

#[test]
fn serial_modes_map_onto_rvmms() {
    for (serial, expected) in [
        (json!({"mode": "Null"}), SerialConfig::Off),
        (json!({"mode": "Off"}), SerialConfig::Off),
        (json!({"mode": "Pty"}), SerialConfig::Pty),
        (
            json!({"mode": "File", "file": "/tmp/c"}),
            SerialConfig::File {
                path: "/tmp/c".into(),
                max_size: crate::vm::console_out::DEFAULT_FILE_LIMIT,
            },
        ),
    ] {
        let mut body = full_body();
        body["serial"] = serial.clone();

        assert_eq!(
            vm_config(&body).expect("accepted").serial,
            expected,
            "{serial}"
        );
    }
    let err = refusal("/serial", json!({"mode": "File"}));
    assert!(err.starts_with("serial.file"), "{err}");
}

#[test]
fn an_add_device_body_needs_a_sysfs_path() {
    let spec = device_config(
        &json!({"path": "/sys/bus/pci/devices/0000:02:00.0", "iommu": false, "pci_segment": 0}),
        "the device",
    )
    .expect("accepted");
    assert_eq!(spec.id, None);

    let err = device_config(&json!({"id": "x"}), "the device").expect_err("no path");
    assert!(err.starts_with("the device.path"), "{err}");
    let err = device_config(&json!({"path": "/dev/vfio/3"}), "the device").expect_err("bad");
    assert!(err.starts_with("the device.path"), "{err}");
}

#[test]
fn rvmms_configuration_reads_back_the_same() {
    let config = vm_config(&full_body()).expect("accepted");

    let again = vm_config(&to_ch(&config, None)).expect("its own shape is accepted");

    assert_eq!(again, config);
}
