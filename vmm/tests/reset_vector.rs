//! The real-mode reset vector on this machine's KVM: a vCPU that jumps to `F000:FFF0` the way
//! Linux's "BIOS" reboot does (real mode, CS base 0xF0000) finds rvmm's code there, writes the
//! reset value to the ACPI reset register and halts.

use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use rvmm::machine::{layout, reset_vector};
use rvmm_devices::acpi_pm::{RESET_OFFSET, RESET_VALUE};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[test]
fn a_jump_to_the_bios_reset_entry_resets_through_the_reset_register() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm on this machine: the reset vector is tested on real guests only");
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let port = layout::ACPI_PM_PORT as u16 + RESET_OFFSET as u16;
    reset_vector::write(&mem, port, RESET_VALUE).unwrap();

    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let region = mem.iter().next().unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: the region is mapped for the lifetime of `mem`, which outlives the VM's use of it.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        })
        .unwrap();
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // Real mode, as after `ljmp $0xf000, $0xfff0`.
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.selector = 0xf000;
    sregs.cs.base = 0xf_0000;
    sregs.cr0 &= !1;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0xfff0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    match vcpu.run().unwrap() {
        VcpuExit::IoOut(p, data) => {
            assert_eq!(p, port, "the reset vector writes the reset register");
            assert_eq!(data, [RESET_VALUE], "the value the FADT names");
        }
        other => panic!("the reset vector did not write the reset register: {other:?}"),
    }
    // Then it halts (no in-kernel irqchip here: the halt comes back to the VMM).
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
}
