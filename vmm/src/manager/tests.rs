use std::path::PathBuf;

use super::*;

/// A manager running on its own thread, with its handler.
fn started() -> (Arc<dyn ApiHandler>, std::thread::JoinHandle<Option<VmExit>>) {
    let manager = VmManager::new();
    let handler = manager.handler();
    let thread = std::thread::spawn(move || manager.run());
    (handler, thread)
}

#[test]
fn without_a_vm_info_is_not_created_and_boot_is_404() {
    let (handler, thread) = started();
    let vmm = handler.vmm().expect("a VMM");

    assert!(vmm.status().is_none());
    assert_eq!(vmm.boot().expect_err("nothing to boot").status, 404);
    assert_eq!(vmm.shutdown_vm().expect_err("nothing to stop").status, 404);
    assert!(matches!(handler.info(), Err(ApiError::Conflict(_))));

    vmm.shutdown_vmm().expect("quit");
    assert_eq!(thread.join().expect("joined"), None);
}

#[test]
fn a_create_that_fails_leaves_no_vm_and_says_why() {
    let (handler, thread) = started();
    let vmm = handler.vmm().expect("a VMM");
    let config = VmConfig {
        kernel: PathBuf::from("/nonexistent/vmlinuz"),
        ..VmConfig::default()
    };

    let err = vmm.create(config).expect_err("no kernel");

    assert!(err.message.starts_with("vm.create: "), "{}", err.message);
    assert!(vmm.status().is_none());
    vmm.delete().expect("deleting nothing succeeds");
    vmm.shutdown_vmm().expect("quit");
    thread.join().expect("joined");
}

#[test]
fn an_events_stream_without_a_vm_ends_at_once() {
    let (handler, thread) = started();

    let stream = handler.subscribe();

    assert!(matches!(
        stream.recv_timeout(Duration::from_secs(1)),
        crate::api::Received::Ended
    ));
    handler.vmm().expect("a VMM").shutdown_vmm().expect("quit");
    thread.join().expect("joined");
}
