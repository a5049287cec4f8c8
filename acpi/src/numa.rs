//! SRAT (System Resource Affinity Table) and SLIT (System Locality Information Table) of a
//! machine with a NUMA topology.
//!
//! The SRAT gives each vCPU's local APIC (type 0, processor local APIC affinity: the APIC ids of
//! the MADT) and each RAM range (type 1, memory affinity) a proximity domain; the SLIT gives the
//! distance between every two domains. Written with the generic table builder of
//! `acpi_tables`, whose SRAT helper has no processor local APIC affinity structure.

use acpi_tables::sdt::Sdt;

use crate::description::Numa;
use crate::{oem_table_id, OEM_ID, OEM_REVISION};

/// SRAT revision (ACPI 3.0 and later: 32-bit proximity domains).
const SRAT_REVISION: u8 = 3;
/// SRAT header: the common header, a reserved dword that must be 1 and 8 reserved bytes.
const SRAT_HEADER_LEN: u32 = 48;
/// Offset of the reserved dword that must be 1.
const SRAT_RESERVED_ONE_OFFSET: usize = 36;
/// SLIT revision.
const SLIT_REVISION: u8 = 1;
/// SLIT header: the common header and the number of localities.
const SLIT_HEADER_LEN: u32 = 44;

/// SRAT structure type: processor local APIC affinity.
pub(crate) const TYPE_LAPIC_AFFINITY: u8 = 0;
/// SRAT structure type: memory affinity.
pub(crate) const TYPE_MEMORY_AFFINITY: u8 = 1;
/// Length of a processor local APIC affinity structure.
const LAPIC_AFFINITY_LEN: u8 = 16;
/// Length of a memory affinity structure.
const MEMORY_AFFINITY_LEN: u8 = 40;
/// Affinity flag: the structure is enabled.
const ENABLED: u32 = 1;

/// Builds the SRAT of `numa`.
pub(crate) fn build_srat(numa: &Numa) -> Vec<u8> {
    let mut srat = Sdt::new(
        *b"SRAT",
        SRAT_HEADER_LEN,
        SRAT_REVISION,
        OEM_ID,
        oem_table_id(b"SRAT"),
        OEM_REVISION,
    );
    srat.write_u32(SRAT_RESERVED_ONE_OFFSET, 1);
    for (domain, node) in numa.nodes.iter().enumerate() {
        // Validated: at most 255 vCPUs, so fewer domains than that hold one.
        let domain = domain as u32;
        let [d0, d1, d2, d3] = domain.to_le_bytes();
        for &apic_id in &node.cpus {
            let mut entry = vec![TYPE_LAPIC_AFFINITY, LAPIC_AFFINITY_LEN, d0, apic_id];
            entry.extend_from_slice(&ENABLED.to_le_bytes());
            entry.push(0); // Local SAPIC EID.
            entry.extend_from_slice(&[d1, d2, d3]);
            entry.extend_from_slice(&0u32.to_le_bytes()); // Clock domain.
            srat.append_slice(&entry);
        }
    }
    for (domain, node) in numa.nodes.iter().enumerate() {
        for &(base, size) in &node.memory {
            let mut entry = vec![TYPE_MEMORY_AFFINITY, MEMORY_AFFINITY_LEN];
            entry.extend_from_slice(&(domain as u32).to_le_bytes());
            entry.extend_from_slice(&[0, 0]); // Reserved.
            entry.extend_from_slice(&base.to_le_bytes());
            entry.extend_from_slice(&size.to_le_bytes());
            entry.extend_from_slice(&0u32.to_le_bytes()); // Reserved.
            entry.extend_from_slice(&ENABLED.to_le_bytes());
            entry.extend_from_slice(&0u64.to_le_bytes()); // Reserved.
            srat.append_slice(&entry);
        }
    }
    srat.as_slice().to_vec()
}

/// Builds the SLIT of `numa`.
pub(crate) fn build_slit(numa: &Numa) -> Vec<u8> {
    let mut slit = Sdt::new(
        *b"SLIT",
        SLIT_HEADER_LEN,
        SLIT_REVISION,
        OEM_ID,
        oem_table_id(b"SLIT"),
        OEM_REVISION,
    );
    slit.write_u64(36, numa.nodes.len() as u64);
    for row in &numa.distances {
        slit.append_slice(row);
    }
    slit.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::tests::numa_example;
    use crate::tests::{read_u32, read_u64, sum};

    fn numa() -> Numa {
        numa_example().numa.unwrap()
    }

    /// The structures of an SRAT as (type, bytes).
    fn structures(srat: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &srat[SRAT_HEADER_LEN as usize..];
        while let [kind, len, ..] = *rest {
            let (entry, tail) = rest.split_at(usize::from(len));
            out.push((kind, entry));
            rest = tail;
        }
        out
    }

    #[test]
    fn srat_has_valid_header() {
        let srat = build_srat(&numa());
        assert_eq!(&srat[0..4], b"SRAT");
        assert_eq!(read_u32(&srat, 4) as usize, srat.len());
        assert_eq!(srat[8], SRAT_REVISION);
        assert_eq!(read_u32(&srat, 36), 1, "reserved, must be 1");
        assert_eq!(sum(&srat), 0);
    }

    #[test]
    fn srat_gives_each_apic_id_its_domain() {
        let srat = build_srat(&numa());
        let lapics: Vec<(u8, u32, u32)> = structures(&srat)
            .into_iter()
            .filter(|(k, _)| *k == TYPE_LAPIC_AFFINITY)
            .map(|(_, e)| {
                assert_eq!(e.len(), 16);
                let domain = u32::from_le_bytes([e[2], e[9], e[10], e[11]]);
                (e[3], domain, read_u32(e, 4))
            })
            .collect();
        assert_eq!(
            lapics,
            vec![(0, 0, 1), (2, 0, 1), (1, 1, 1), (3, 1, 1)],
            "(APIC id, domain, flags)"
        );
    }

    #[test]
    fn srat_gives_each_memory_range_its_domain_above_4g_too() {
        let srat = build_srat(&numa());
        let memory: Vec<(u32, u64, u64, u32)> = structures(&srat)
            .into_iter()
            .filter(|(k, _)| *k == TYPE_MEMORY_AFFINITY)
            .map(|(_, e)| {
                assert_eq!(e.len(), 40);
                (
                    read_u32(e, 2),
                    read_u64(e, 8),
                    read_u64(e, 16),
                    read_u32(e, 28),
                )
            })
            .collect();
        assert_eq!(
            memory,
            vec![
                (0, 0, 0x4000_0000, 1),
                (1, 0x4000_0000, 0x8000_0000, 1),
                (1, 0x1_0000_0000, 0x4000_0000, 1),
            ]
        );
    }

    #[test]
    fn slit_has_the_distance_matrix() {
        let slit = build_slit(&numa());
        assert_eq!(&slit[0..4], b"SLIT");
        assert_eq!(read_u32(&slit, 4) as usize, slit.len());
        assert_eq!(read_u64(&slit, 36), 2);
        assert_eq!(&slit[44..], &[10, 21, 21, 10]);
        assert_eq!(sum(&slit), 0);
    }
}
