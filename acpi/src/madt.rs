//! MADT (Multiple APIC Description Table) of an xAPIC machine with one I/O APIC.
//!
//! Written with the generic table builder of `acpi_tables`, whose MADT helper lacks the MADT
//! flags, interrupt source overrides and local APIC NMI structures.

use acpi_tables::sdt::Sdt;

use crate::description::MachineDescription;
use crate::{oem_table_id, OEM_ID, OEM_REVISION};

/// MADT revision (ACPI 6.3 and later).
const MADT_REVISION: u8 = 5;
/// Size of the MADT header: the common header, local APIC address and flags.
const HEADER_LEN: u32 = 44;
/// Offset of the local interrupt controller address.
const LAPIC_ADDRESS_OFFSET: usize = 36;
/// Offset of the MADT flags.
const FLAGS_OFFSET: usize = 40;

/// MADT flag: the machine also has dual 8259 PICs, which the guest must mask.
pub(crate) const PCAT_COMPAT: u32 = 1;

/// Structure type of a processor local APIC.
pub(crate) const TYPE_LOCAL_APIC: u8 = 0;
/// Structure type of an I/O APIC.
pub(crate) const TYPE_IO_APIC: u8 = 1;
/// Structure type of an interrupt source override.
pub(crate) const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// Structure type of a local APIC NMI.
pub(crate) const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// Local APIC flag: the processor is enabled.
const LOCAL_APIC_ENABLED: u32 = 1;
/// ISA bus, the source of interrupt source overrides.
const BUS_ISA: u8 = 0;
/// The ISA IRQ of the PIT.
const ISA_IRQ_TIMER: u8 = 0;
/// The GSI the PIT's IRQ is wired to on the I/O APIC.
const GSI_TIMER: u32 = 2;
/// MPS INTI flags: polarity and trigger mode conform to the bus.
const MPS_INTI_CONFORMING: u16 = 0;
/// ACPI processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// Local APIC input the NMI is wired to.
const LINT1: u8 = 1;

/// Builds the MADT.
pub(crate) fn build(desc: &MachineDescription) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
    );
    madt.write_u32(LAPIC_ADDRESS_OFFSET, desc.lapic_address);
    madt.write_u32(FLAGS_OFFSET, PCAT_COMPAT);

    for cpu in 0..desc.cpus {
        // Processor UID and APIC id are both the vCPU index.
        let mut entry = vec![TYPE_LOCAL_APIC, 8, cpu, cpu];
        entry.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
        madt.append_slice(&entry);
    }

    let mut ioapic = vec![TYPE_IO_APIC, 12, desc.ioapic.id, 0];
    ioapic.extend_from_slice(&desc.ioapic.address.to_le_bytes());
    ioapic.extend_from_slice(&desc.ioapic.gsi_base.to_le_bytes());
    madt.append_slice(&ioapic);

    let mut timer_override = vec![TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, BUS_ISA, ISA_IRQ_TIMER];
    timer_override.extend_from_slice(&GSI_TIMER.to_le_bytes());
    timer_override.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    madt.append_slice(&timer_override);

    let mut nmi = vec![TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    nmi.push(LINT1);
    madt.append_slice(&nmi);

    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::tests::example;
    use crate::tests::{read_u32, sum};

    /// The interrupt controller structures of a MADT, as (type, bytes) pairs.
    fn structures(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &madt[HEADER_LEN as usize..];
        while let [kind, len, ..] = *rest {
            let (entry, tail) = rest.split_at(usize::from(len));
            out.push((kind, entry));
            rest = tail;
        }
        out
    }

    fn of_type(madt: &[u8], kind: u8) -> Vec<&[u8]> {
        structures(madt)
            .into_iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, e)| e)
            .collect()
    }

    #[test]
    fn madt_has_valid_length_and_checksum() {
        let madt = build(&example());
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(read_u32(&madt, 4) as usize, madt.len());
        assert_eq!(sum(&madt), 0);
    }

    #[test]
    fn madt_has_lapic_address_and_pcat_compat() {
        let madt = build(&example());
        assert_eq!(read_u32(&madt, LAPIC_ADDRESS_OFFSET), 0xfee0_0000);
        assert_eq!(read_u32(&madt, FLAGS_OFFSET), PCAT_COMPAT);
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_vcpu() {
        let mut desc = example();
        desc.cpus = 7;
        let madt = build(&desc);
        let lapics = of_type(&madt, TYPE_LOCAL_APIC);
        assert_eq!(lapics.len(), 7);
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic[2] as usize, i, "processor UID");
            assert_eq!(lapic[3] as usize, i, "APIC id");
            assert_eq!(read_u32(lapic, 4), LOCAL_APIC_ENABLED);
        }
    }

    #[test]
    fn madt_has_255_local_apics_for_255_vcpus() {
        let mut desc = example();
        desc.cpus = 255;
        let madt = build(&desc);
        assert_eq!(of_type(&madt, TYPE_LOCAL_APIC).len(), 255);
        assert_eq!(sum(&madt), 0);
    }

    #[test]
    fn madt_has_the_io_apic() {
        let mut desc = example();
        desc.ioapic.id = 9;
        desc.ioapic.gsi_base = 24;
        let madt = build(&desc);
        let ioapics = of_type(&madt, TYPE_IO_APIC);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], 9);
        assert_eq!(read_u32(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(read_u32(ioapics[0], 8), 24);
    }

    #[test]
    fn isa_irq0_is_overridden_to_gsi2() {
        let madt = build(&example());
        let overrides = of_type(&madt, TYPE_INTERRUPT_SOURCE_OVERRIDE);
        assert_eq!(overrides, vec![&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0][..]]);
    }

    #[test]
    fn nmi_is_on_lint1_of_all_processors() {
        let madt = build(&example());
        let nmis = of_type(&madt, TYPE_LOCAL_APIC_NMI);
        assert_eq!(nmis, vec![&[4, 6, 0xff, 0, 0, 1][..]]);
    }
}
