//! MCFG (PCI Express memory-mapped configuration space base address description table).

use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use crate::description::MachineDescription;
use crate::{oem_table_id, OEM_ID, OEM_REVISION};

/// Size of the MCFG with one allocation: header, 8 reserved bytes and one 16-byte entry.
pub(crate) const LEN: usize = 36 + 8 + 16;

/// Builds the MCFG with the host bridge's single ECAM allocation.
pub(crate) fn build(desc: &MachineDescription) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(
        desc.pci.ecam_base,
        desc.pci.segment,
        desc.pci.bus_start,
        desc.pci.bus_end,
    );
    let mut bytes = Vec::with_capacity(LEN);
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::tests::example;
    use crate::tests::{read_u16, read_u32, read_u64, sum};

    /// Offset of the first configuration space base address allocation.
    const ALLOCATION: usize = 44;

    #[test]
    fn mcfg_has_valid_length_and_checksum() {
        let mcfg = build(&example());
        assert_eq!(&mcfg[0..4], b"MCFG");
        assert_eq!(mcfg.len(), LEN);
        assert_eq!(read_u32(&mcfg, 4) as usize, mcfg.len());
        assert_eq!(sum(&mcfg), 0);
    }

    #[test]
    fn mcfg_allocation_has_ecam_base_segment_and_bus_range() {
        let mut desc = example();
        desc.pci.segment = 3;
        desc.pci.bus_start = 0x10;
        desc.pci.bus_end = 0x3f;
        let mcfg = build(&desc);
        assert_eq!(read_u64(&mcfg, ALLOCATION), 0xe000_0000);
        assert_eq!(read_u16(&mcfg, ALLOCATION + 8), 3);
        assert_eq!(mcfg[ALLOCATION + 10], 0x10);
        assert_eq!(mcfg[ALLOCATION + 11], 0x3f);
        assert_eq!(read_u32(&mcfg, ALLOCATION + 12), 0, "reserved");
    }
}
