use std::os::fd::BorrowedFd;
use std::sync::Mutex as StdMutex;

use vfio_bindings::bindings::vfio::{VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE};

use super::super::group::{check_group_fd, GroupFdMismatch};
use super::super::sys::FdNode;
use super::*;

fn group_rdev() -> u64 {
    libc::makedev(240, 7)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Open(u32),
    SetContainer,
    Unset,
    SetIommu,
    KvmAdd,
    KvmDel,
    DeviceFd(String),
}

struct FakeKernel {
    calls: Arc<StdMutex<Vec<Call>>>,
    flags: u32,
    fail_kvm_add: bool,
    fail_kvm_del: bool,
    fail_device_fd: bool,
    fd_rdev: u64,
}

impl FakeKernel {
    fn new() -> Self {
        Self {
            calls: Arc::default(),
            flags: VFIO_GROUP_FLAGS_VIABLE,
            fail_kvm_add: false,
            fail_kvm_del: false,
            fail_device_fd: false,
            fd_rdev: group_rdev(),
        }
    }

    fn log(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
}

fn some_fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

fn failure() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl GroupKernel for FakeKernel {
    fn open_group(&self, group: u32) -> io::Result<OwnedFd> {
        self.log(Call::Open(group));
        Ok(some_fd())
    }

    fn group_node(&self, _group: u32) -> io::Result<u64> {
        Ok(group_rdev())
    }

    fn fd_node(&self, _fd: BorrowedFd<'_>) -> io::Result<FdNode> {
        Ok(FdNode {
            is_char: true,
            rdev: self.fd_rdev,
        })
    }

    fn group_flags(&self, _group: BorrowedFd<'_>) -> io::Result<u32> {
        Ok(self.flags)
    }

    fn set_container(&self, _group: BorrowedFd<'_>, _container: BorrowedFd<'_>) -> io::Result<()> {
        self.log(Call::SetContainer);
        Ok(())
    }

    fn unset_container(&self, _group: BorrowedFd<'_>) -> io::Result<()> {
        self.log(Call::Unset);
        Ok(())
    }

    fn set_iommu(&self, _container: BorrowedFd<'_>) -> io::Result<()> {
        self.log(Call::SetIommu);
        Ok(())
    }

    fn kvm_add(&self, _group: BorrowedFd<'_>) -> io::Result<()> {
        self.log(Call::KvmAdd);
        if self.fail_kvm_add {
            return Err(failure());
        }
        Ok(())
    }

    fn kvm_del(&self, _group: BorrowedFd<'_>) -> io::Result<()> {
        self.log(Call::KvmDel);
        if self.fail_kvm_del {
            return Err(failure());
        }
        Ok(())
    }

    fn device_fd(&self, _group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
        self.log(Call::DeviceFd(name.to_string_lossy().into_owned()));
        if self.fail_device_fd {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(some_fd())
    }
}

fn container(kernel: FakeKernel) -> (Arc<StdMutex<Vec<Call>>>, Arc<LegacyContainer>) {
    let calls = kernel.calls.clone();
    let c = Arc::new(LegacyContainer::with_kernel(some_fd(), Box::new(kernel)));
    (calls, c)
}

fn count(calls: &StdMutex<Vec<Call>>, call: &Call) -> usize {
    calls.lock().unwrap().iter().filter(|c| *c == call).count()
}

const DEV_A: &CStr = c"0000:01:00.0";
const DEV_B: &CStr = c"0000:01:00.1";

#[test]
fn devices_of_one_group_share_its_attachment() {
    let (calls, c) = container(FakeKernel::new());
    let _a = c.attach_device(7, DEV_A, None).unwrap();
    let _b = c.attach_device(7, DEV_B, None).unwrap();
    assert_eq!(c.attached_groups(), 1);
    assert_eq!(count(&calls, &Call::Open(7)), 1);
    assert_eq!(count(&calls, &Call::SetContainer), 1);
    assert_eq!(count(&calls, &Call::KvmAdd), 1);
}

#[test]
fn group_stays_attached_while_one_of_its_devices_is_open() {
    let (calls, c) = container(FakeKernel::new());
    let a = c.attach_device(7, DEV_A, None).unwrap();
    let _b = c.attach_device(7, DEV_B, None).unwrap();
    drop(a);
    assert_eq!(c.attached_groups(), 1);
    assert_eq!(count(&calls, &Call::Unset), 0);
}

#[test]
fn last_device_releases_the_group() {
    let (calls, c) = container(FakeKernel::new());
    let a = c.attach_device(7, DEV_A, None).unwrap();
    drop(a);
    assert_eq!(c.attached_groups(), 0);
    let calls = calls.lock().unwrap();
    assert_eq!(calls[calls.len() - 2..], [Call::KvmDel, Call::Unset]);
}

#[test]
fn group_is_released_even_if_kvm_unregistration_fails() {
    let (calls, c) = container(FakeKernel {
        fail_kvm_del: true,
        ..FakeKernel::new()
    });
    drop(c.attach_device(7, DEV_A, None).unwrap());
    assert_eq!(c.attached_groups(), 0);
    assert_eq!(count(&calls, &Call::Unset), 1);
}

#[test]
fn released_group_is_opened_again_with_a_new_iommu() {
    let (calls, c) = container(FakeKernel {
        fail_kvm_del: true,
        ..FakeKernel::new()
    });
    drop(c.attach_device(7, DEV_A, None).unwrap());
    let _a = c.attach_device(7, DEV_A, None).unwrap();
    assert_eq!(c.attached_groups(), 1);
    assert_eq!(count(&calls, &Call::Open(7)), 2);
    assert_eq!(count(&calls, &Call::SetIommu), 2);
}

#[test]
fn second_group_reuses_the_iommu() {
    let (calls, c) = container(FakeKernel::new());
    let _a = c.attach_device(7, DEV_A, None).unwrap();
    let _b = c.attach_device(8, DEV_B, None).unwrap();
    assert_eq!(c.attached_groups(), 2);
    assert_eq!(count(&calls, &Call::SetIommu), 1);
}

#[test]
fn group_that_is_not_viable_is_refused_and_not_kept() {
    let (calls, c) = container(FakeKernel {
        flags: 0,
        ..FakeKernel::new()
    });
    let err = c.attach_device(7, DEV_A, None).err().unwrap();
    assert!(matches!(err, VfioError::GroupNotViable { group: 7 }));
    assert_eq!(c.attached_groups(), 0);
    assert_eq!(count(&calls, &Call::SetContainer), 0);
}

#[test]
fn failed_device_open_releases_a_new_group() {
    let (calls, c) = container(FakeKernel {
        fail_device_fd: true,
        ..FakeKernel::new()
    });
    let err = c.attach_device(7, DEV_A, None).err().unwrap();
    assert!(matches!(err, VfioError::GetDeviceFd { group: 7, .. }));
    assert_eq!(c.attached_groups(), 0);
    assert_eq!(count(&calls, &Call::Unset), 1);
}

#[test]
fn failed_kvm_registration_detaches_the_group() {
    let (calls, c) = container(FakeKernel {
        fail_kvm_add: true,
        ..FakeKernel::new()
    });
    let err = c.attach_device(7, DEV_A, None).err().unwrap();
    assert!(matches!(err, VfioError::KvmAdd { group: 7, .. }));
    assert_eq!(c.attached_groups(), 0);
    assert_eq!(count(&calls, &Call::Unset), 1);
    assert_eq!(count(&calls, &Call::KvmDel), 0);
}

#[test]
fn preopened_group_fd_replaces_opening_the_node() {
    let (calls, c) = container(FakeKernel::new());
    let _a = c.attach_device(7, DEV_A, Some(some_fd())).unwrap();
    assert_eq!(count(&calls, &Call::Open(7)), 0);
    assert_eq!(count(&calls, &Call::SetContainer), 1);
}

#[test]
fn preopened_fd_of_an_attached_group_reuses_the_group() {
    let (calls, c) = container(FakeKernel::new());
    let _a = c.attach_device(7, DEV_A, None).unwrap();
    let _b = c.attach_device(7, DEV_B, Some(some_fd())).unwrap();
    assert_eq!(c.attached_groups(), 1);
    assert_eq!(count(&calls, &Call::SetContainer), 1);
}

#[test]
fn preopened_fd_of_another_node_is_refused_naming_group_and_device() {
    let (_calls, c) = container(FakeKernel {
        fd_rdev: libc::makedev(240, 8),
        ..FakeKernel::new()
    });
    let fd = some_fd();
    let err = c.attach_device(7, DEV_A, Some(fd)).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "the descriptor given for 0000:01:00.0 is not its VFIO group 7: it is device 240:8, \
             the group node is 240:7"
        )
    );
    assert_eq!(c.attached_groups(), 0);
}

fn node(rdev: u64) -> FdNode {
    FdNode {
        is_char: true,
        rdev,
    }
}

#[test]
fn group_fd_matching_the_node_is_accepted() {
    let flags = Some(VFIO_GROUP_FLAGS_VIABLE);
    assert_eq!(check_group_fd(node(5), 5, flags, false), Ok(()));
}

#[test]
fn group_fd_that_is_not_a_character_device_is_refused() {
    let fd = FdNode {
        is_char: false,
        rdev: 5,
    };
    assert_eq!(
        check_group_fd(fd, 5, Some(0), false),
        Err(GroupFdMismatch::NotCharDevice)
    );
}

#[test]
fn group_fd_of_another_device_is_refused() {
    assert_eq!(
        check_group_fd(node(6), 5, Some(0), false),
        Err(GroupFdMismatch::OtherNode {
            rdev: 6,
            expected: 5
        })
    );
}

#[test]
fn group_fd_without_status_is_refused() {
    assert_eq!(
        check_group_fd(node(5), 5, None, false),
        Err(GroupFdMismatch::NoStatus)
    );
}

#[test]
fn group_fd_in_a_foreign_container_is_refused() {
    let flags = Some(VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET);
    assert_eq!(
        check_group_fd(node(5), 5, flags, false),
        Err(GroupFdMismatch::OtherContainer)
    );
}

#[test]
fn group_fd_of_our_attached_group_is_accepted() {
    let flags = Some(VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET);
    assert_eq!(check_group_fd(node(5), 5, flags, true), Ok(()));
}

#[test]
fn container_of_another_api_version_is_refused() {
    assert!(matches!(
        check_container(1, 1),
        Err(VfioError::ApiVersion { version: 1 })
    ));
}

#[test]
fn container_without_type1v2_is_refused() {
    assert!(matches!(check_container(0, 0), Err(VfioError::NoType1v2)));
}

#[test]
fn container_with_type1v2_is_accepted() {
    assert!(check_container(0, 1).is_ok());
}
