//! CPUID as the guest sees it: what KVM supports on this host, with the topology of the VM and the
//! hypervisor bit.

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;

use super::{CpuError, Result};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `supported` (KVM_GET_SUPPORTED_CPUID) for vCPU `cpu` of `cpus` and sets it: one socket,
/// one thread per core, `cpus` cores; APIC id = vCPU index.
pub fn configure_cpuid(vcpu: &VcpuFd, supported: &CpuId, cpu: u8, cpus: u8) -> Result<()> {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(cpu);
    let n = u32::from(cpus);
    let core_bits = bits_for(n);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size (kept).
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n.min(255)) << 16);
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Intel deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] logical processors sharing the cache - 1 (one per core).
                e.eax &= 0x3fff;
                e.eax |= ((n.saturating_sub(1)) & 0x3f) << 26;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = n;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: [15:12] APIC id bits for cores, [7:0] number of cores - 1.
                e.ecx = (core_bits << 12) | (n.saturating_sub(1) & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC id, core id, node id; one thread per core.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(|source| CpuError::Kvm {
        cpu,
        what: "KVM_SET_CPUID2",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_for_counts_apic_id_width() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
        assert_eq!(bits_for(255), 8);
    }
}
