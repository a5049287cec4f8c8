//! Embedding rvmm: boot a guest, hot-add a passthrough device, wait for the guest to have it,
//! remove it again and shut the VM down — all through the library, no control socket.
//!
//! ```text
//! cargo run --release -p rvmm --example hotplug -- KERNEL INITRAMFS HOST_BDF [CMDLINE]
//! ```
//! The host device must be bound to vfio-pci. Prints one line per step and the events it saw;
//! exits 0 when every step worked.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use rvmm::api::{ApiHandler, EventKind, Received, RemoveDeviceRequest};
use rvmm::device::DeviceSpec;
use rvmm::vm::config::DEFAULT_ROOT_PORTS;
use rvmm::{SerialConfig, Vm, VmConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: {} KERNEL INITRAMFS HOST_BDF [CMDLINE]", args[0]);
        return ExitCode::from(2);
    }
    match run(
        &args[1],
        &args[2],
        &args[3],
        args.get(4).map(String::as_str),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("example: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(kernel: &str, initramfs: &str, bdf: &str, cmdline: Option<&str>) -> Result<(), String> {
    let config = VmConfig {
        kernel: PathBuf::from(kernel),
        initramfs: Some(PathBuf::from(initramfs)),
        cmdline: cmdline.unwrap_or("console=ttyS0 panic=1").to_owned(),
        cpus: 1,
        memory: "size=256M".parse().map_err(|e| format!("{e}"))?,
        root_ports: DEFAULT_ROOT_PORTS,
        serial: SerialConfig::Stdio,
        api_socket: None,
        devices: Vec::new(),
        seccomp: Default::default(),
        event_log: None,
        placement: Default::default(),
        cpu_affinity: None,
        on_reboot: Default::default(),
        hotplug: Default::default(),
    };
    let vm = Vm::new(&config).map_err(|e| format!("cannot build the VM: {e}"))?;
    let handle = vm.handle();
    let events = handle.subscribe();
    let vm_thread = std::thread::spawn(move || vm.run());

    // The add waits until the guest's pciehp has enabled the slot (also while it still boots).
    let add: DeviceSpec = format!("path={bdf},id=example0")
        .parse()
        .map_err(|e| format!("bad device {bdf}: {e}"))?;
    let added = handle
        .add_device(add)
        .map_err(|e| format!("add-device failed: {e}"))?;
    println!("EXAMPLE added {} at guest {}", added.id, added.bdf);

    // The same news arrives on the event stream.
    wait_for(&events, |k| matches!(k, EventKind::DeviceAdded(_)))?;
    println!("EXAMPLE event device-added");

    let removed = handle
        .remove_device(RemoveDeviceRequest {
            id: added.id.clone(),
            surprise: false,
            timeout_ms: 10_000,
        })
        .map_err(|e| format!("remove-device failed: {e}"))?;
    println!(
        "EXAMPLE removed {} ({:?}, {} ms)",
        removed.id, removed.reason, removed.duration_ms
    );
    wait_for(&events, |k| matches!(k, EventKind::DeviceRemoved { .. }))?;
    println!("EXAMPLE event device-removed");

    handle
        .shutdown()
        .map_err(|e| format!("shutdown failed: {e}"))?;
    let exit = vm_thread
        .join()
        .map_err(|_| "the VM thread panicked".to_owned())?
        .map_err(|e| format!("the VM failed: {e}"))?;
    println!("EXAMPLE vm exit {exit:?}");
    Ok(())
}

/// Waits up to 30 s for an event matching `want`.
fn wait_for(
    events: &rvmm::api::Subscription,
    want: impl Fn(&EventKind) -> bool,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(500)) {
            Received::Event(e) if want(&e.kind) => return Ok(()),
            Received::Event(_) | Received::Idle => {}
            Received::Ended => return Err("the event stream ended".into()),
        }
    }
    Err("no such event within 30 s".into())
}
