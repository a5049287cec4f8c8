//! A vCPU back to its power-on state for a reboot of the VM in place.
//!
//! The vCPU fds stay (KVM has no vCPU reset ioctl for userspace, and a new fd would need a new
//! VM); what the last guest left in them is overwritten with what the boot path writes:
//! pending events cleared, the MP state as at creation (the BSP runnable, application processors
//! waiting for INIT/SIPI), the segment and control registers, APIC base and LAPIC as KVM
//! created them ([`VcpuPowerOn`]), the paravirtual MSRs that make KVM write into guest memory
//! (kvmclock, steal time, async page faults, PV EOI) switched off so that KVM does not scribble
//! over the next kernel, then the boot MSRs, registers, FPU and LAPIC as for the first boot.

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_sregs, kvm_vcpu_events, Msrs,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::Result;
use super::{configure_fpu, configure_lapic, configure_msrs, configure_registers, CpuError};
use crate::boot::EntryPoint;

/// KVM's paravirtual MSRs whose value points into guest memory, off at power-on: kvmclock
/// (new and old numbers), steal time, async page faults, PV EOI.
const PV_MSRS_OFF: [u32; 7] = [
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x12,        // MSR_KVM_SYSTEM_TIME
    0x11,        // MSR_KVM_WALL_CLOCK
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
];

/// What KVM gave a vCPU at creation, before the boot path changed anything: the baseline the
/// boot path builds on, written back at a reboot so that nothing of the last guest (control
/// registers, APIC base and x2APIC mode, descriptor tables, pending interrupts, TPR) remains.
pub struct VcpuPowerOn {
    sregs: kvm_sregs,
    lapic: kvm_lapic_state,
}

impl VcpuPowerOn {
    /// Reads the state of vCPU `cpu`, which has not been configured nor run yet.
    pub fn capture(vcpu: &VcpuFd, cpu: u8) -> Result<Self> {
        let kvm = |what: &'static str| move |source| CpuError::Kvm { cpu, what, source };
        Ok(Self {
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        })
    }
}

/// The MP state vCPU `cpu` has at power-on.
pub fn power_on_mp_state(cpu: u8) -> u32 {
    if cpu == 0 {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    }
}

/// Puts vCPU `cpu` back to the state the boot path gives it for `entry` (the kernel just loaded
/// again into `mem`).
pub fn reset_vcpu(
    vcpu: &VcpuFd,
    power_on: &VcpuPowerOn,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    cpu: u8,
) -> Result<()> {
    let kvm = |what: &'static str| move |source| CpuError::Kvm { cpu, what, source };
    vcpu.set_vcpu_events(&kvm_vcpu_events::default())
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    // The APIC base (in sregs) before the LAPIC registers: they are read in the mode it sets.
    vcpu.set_sregs(&power_on.sregs)
        .map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_lapic(&power_on.lapic)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    disable_pv_msrs(vcpu, cpu);
    configure_msrs(vcpu, cpu)?;
    configure_registers(vcpu, mem, entry, cpu)?;
    configure_fpu(vcpu, cpu)?;
    configure_lapic(vcpu, cpu)?;
    // Last: an application processor's registers are set by KVM at INIT/SIPI.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: power_on_mp_state(cpu),
    })
    .map_err(kvm("KVM_SET_MP_STATE"))
}

/// Writes 0 to each paravirtual MSR that KVM accepts; one it refuses (a host without that
/// feature) was never enabled by the guest either.
fn disable_pv_msrs(vcpu: &VcpuFd, cpu: u8) {
    for index in PV_MSRS_OFF {
        let entry = [kvm_msr_entry {
            index,
            data: 0,
            ..Default::default()
        }];
        let Ok(msrs) = Msrs::from_entries(&entry) else {
            continue;
        };
        if let Ok(0) | Err(_) = vcpu.set_msrs(&msrs) {
            log::debug!("vCPU {cpu}: MSR {index:#x} not reset (not supported by KVM)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bsp_runs_at_power_on() {
        assert_eq!(power_on_mp_state(0), KVM_MP_STATE_RUNNABLE);
        assert_eq!(power_on_mp_state(1), KVM_MP_STATE_UNINITIALIZED);
        assert_eq!(power_on_mp_state(7), KVM_MP_STATE_UNINITIALIZED);
    }
}
