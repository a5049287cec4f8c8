//! ACPI tables of rvmm, built from a plain description of the machine.
//!
//! The VMM describes the machine in a [`MachineDescription`] and calls [`build`] with the guest
//! address and size of the area reserved for the tables. The result lists each table with the
//! guest address it must be written to; the VMM copies them into guest memory, reserves the area
//! (E820 "ACPI") and hands [`AcpiTables::rsdp_address`] to the guest (boot params
//! `acpi_rsdp_addr`, or by placing the area in the BIOS range 0xE0000..0x100000 where the guest
//! scans for the RSDP).
//!
//! Tables: RSDP (revision 2) → XSDT → FADT (revision 6, hardware-reduced ACPI) → DSDT, plus
//! MADT and MCFG. They are laid out in that order from the start of the area, the RSDP at the
//! very start, every table 8-byte aligned:
//!
//! ```text
//! base: RSDP | XSDT | FADT | MADT | MCFG | DSDT [| SRAT | SLIT]
//! ```
//!
//! A [`Numa`] topology in the description adds the SRAT (each vCPU's local APIC and each RAM
//! range in its proximity domain) and the SLIT (distances), and a `_PXM` to each root port.
//!
//! A [`PowerButton`] in the description adds a control-method power button (`PNP0C0C`) and the
//! Generic Event Device (`ACPI0013`) whose interrupt and event register signal it; the FADT
//! never announces fixed-feature buttons.
//!
//! Limitations: xAPIC only (at most 255 vCPUs), one I/O APIC, one PCI segment with one host
//! bridge (its I/O window and each root port's `_PRT`, one GSI for INTA..INTD, are optional),
//! no FACS (hardware-reduced ACPI without waking vectors), S5 is the only sleep state.

mod description;
mod dsdt;
mod dsdt_hotplug;
mod fadt;
mod madt;
mod mcfg;
mod numa;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

pub use description::{
    Error as DescriptionError, IoApic, IoWindow, LegacyDevices, MachineDescription, MmioWindow,
    Numa, NumaBridge, NumaNode, PciHostBridge, PciHotplug, PowerButton, PowerManagement, RootPort,
    SerialPort, ECAM_BYTES_PER_BUS, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON,
    MAX_PCI_HOTPLUG_SLOTS, MAX_SLEEP_TYPE, MAX_SLOT_NUMBER, PCI_HOTPLUG_REGISTERS_LEN,
    SERIAL_PORT_LEN,
};

/// OEM id of every table.
pub const OEM_ID: [u8; 6] = *b"RVMM  ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// Alignment of the table area's base: the guest finds the RSDP in the BIOS range only on
/// 16-byte boundaries.
pub const AREA_ALIGNMENT: u64 = 16;
/// Alignment of each table inside the area.
pub const TABLE_ALIGNMENT: u64 = 8;

/// Size of the XSDT with `entries` entries.
const fn xsdt_len(entries: usize) -> usize {
    36 + entries * 8
}

/// The OEM table id of the table with `signature`: "RVMM" followed by the signature.
fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"RVMM    ";
    id[4..].copy_from_slice(signature);
    id
}

/// Errors of [`build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The machine description is invalid.
    #[error("invalid machine description")]
    Description(#[source] DescriptionError),
    /// The table area's base is not aligned for the RSDP.
    #[error("ACPI table area base {base:#x} is not {AREA_ALIGNMENT}-byte aligned")]
    MisalignedArea {
        /// Base of the area.
        base: u64,
    },
    /// The table area wraps around the address space.
    #[error("ACPI table area at {base:#x} with size {size:#x} wraps around the address space")]
    AreaWraps {
        /// Base of the area.
        base: u64,
        /// Size of the area.
        size: u64,
    },
    /// The tables do not fit in the table area.
    #[error("ACPI tables need {needed:#x} bytes but the table area holds {size:#x}")]
    AreaTooSmall {
        /// Bytes the tables need.
        needed: u64,
        /// Size of the area.
        size: u64,
    },
}

/// Result of [`build`].
pub type Result<T> = std::result::Result<T, Error>;

/// One table and the guest physical address it must be written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBlob {
    /// Guest physical address of the table's first byte.
    pub address: u64,
    /// The table, checksummed.
    pub bytes: Vec<u8>,
}

/// The ACPI tables of a machine, ready to be copied into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest physical address of the RSDP (the base of the table area).
    pub rsdp_address: u64,
    /// Every table, RSDP first, in ascending address order, without overlaps, all inside the
    /// table area. Bytes between tables are padding the VMM should leave zero.
    pub blobs: Vec<TableBlob>,
}

impl AcpiTables {
    /// The table whose bytes start with `signature` (`b"RSD PTR "`, `b"XSDT"`, `b"FACP"`,
    /// `b"APIC"`, `b"MCFG"`, `b"DSDT"`, and with NUMA `b"SRAT"`, `b"SLIT"`).
    pub fn find(&self, signature: &[u8]) -> Option<&TableBlob> {
        self.blobs
            .iter()
            .find(|blob| blob.bytes.starts_with(signature))
    }
}

/// Rounds `offset` up to a multiple of [`TABLE_ALIGNMENT`]; offsets are small sums of table
/// sizes, far from overflowing.
fn align_table(offset: u64) -> u64 {
    offset.next_multiple_of(TABLE_ALIGNMENT)
}

/// Builds the ACPI tables of `desc` for the table area of `size` bytes at guest address `base`.
///
/// `base` must be 16-byte aligned; the RSDP goes at `base`, the other tables after it.
pub fn build(desc: &MachineDescription, base: u64, size: u64) -> Result<AcpiTables> {
    desc.validate().map_err(Error::Description)?;
    if base % AREA_ALIGNMENT != 0 {
        return Err(Error::MisalignedArea { base });
    }
    if base.checked_add(size).is_none() {
        return Err(Error::AreaWraps { base, size });
    }

    let dsdt = dsdt::build(desc);
    let madt = madt::build(desc);
    let mcfg = mcfg::build(desc);
    let numa_tables = desc
        .numa
        .as_ref()
        .map(|numa| (numa::build_srat(numa), numa::build_slit(numa)));
    let xsdt_entries = if numa_tables.is_some() { 5 } else { 3 };

    // Offsets from `base`, in layout order: RSDP, XSDT, FADT, MADT, MCFG, DSDT[, SRAT, SLIT].
    let mut lengths = vec![
        Rsdp::len(),
        xsdt_len(xsdt_entries),
        fadt::len(),
        madt.len(),
        mcfg.len(),
        dsdt.len(),
    ];
    if let Some((srat, slit)) = &numa_tables {
        lengths.extend([srat.len(), slit.len()]);
    }
    let mut offsets = Vec::with_capacity(lengths.len());
    let mut end = 0u64;
    for len in lengths {
        let offset = align_table(end);
        offsets.push(offset);
        end = offset + len as u64;
    }
    if end > size {
        return Err(Error::AreaTooSmall { needed: end, size });
    }
    // Every offset is below `end` <= `size`, and `base + size` does not wrap.
    let addresses: Vec<u64> = offsets.iter().map(|offset| base + offset).collect();
    let (rsdp_addr, xsdt_addr, fadt_addr, madt_addr, mcfg_addr, dsdt_addr) = (
        addresses[0],
        addresses[1],
        addresses[2],
        addresses[3],
        addresses[4],
        addresses[5],
    );

    let fadt = fadt::build(desc, dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    let mut entries = vec![fadt_addr, madt_addr, mcfg_addr];
    entries.extend(addresses.get(6..).unwrap_or_default());
    for address in entries {
        xsdt.add_entry(address);
    }
    let mut xsdt_bytes = Vec::with_capacity(xsdt_len(xsdt_entries));
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let mut rsdp = Vec::with_capacity(Rsdp::len());
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    log::debug!(
        "ACPI tables at {base:#x}: RSDP {rsdp_addr:#x}, XSDT {xsdt_addr:#x}, FADT {fadt_addr:#x}, \
         MADT {madt_addr:#x}, MCFG {mcfg_addr:#x}, DSDT {dsdt_addr:#x}{}, {end:#x} bytes",
        match addresses.get(6..) {
            Some([srat, slit]) => format!(", SRAT {srat:#x}, SLIT {slit:#x}"),
            _ => String::new(),
        }
    );

    let mut tables = vec![rsdp, xsdt_bytes, fadt, madt, mcfg, dsdt];
    if let Some((srat, slit)) = numa_tables {
        tables.extend([srat, slit]);
    }
    let blobs = addresses
        .into_iter()
        .zip(tables)
        .map(|(address, bytes)| TableBlob { address, bytes })
        .collect();

    Ok(AcpiTables {
        rsdp_address: rsdp_addr,
        blobs,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::description::tests::example;

    /// Wrapping byte sum; 0 for a correctly checksummed table.
    pub(crate) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    pub(crate) fn read_u16(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    pub(crate) fn read_u32(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    pub(crate) fn read_u64(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Whether `needle` occurs in `haystack`.
    pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    const BASE: u64 = 0xe_0000;
    const SIZE: u64 = 0x2_0000;

    fn tables() -> AcpiTables {
        build(&example(), BASE, SIZE).unwrap()
    }

    fn table<'a>(tables: &'a AcpiTables, signature: &[u8]) -> &'a TableBlob {
        tables.find(signature).unwrap()
    }

    #[test]
    fn every_table_length_field_equals_its_blob_length() {
        let tables = tables();
        for blob in &tables.blobs[1..] {
            assert_eq!(read_u32(&blob.bytes, 4) as usize, blob.bytes.len());
        }
    }

    #[test]
    fn every_table_checksum_sums_to_zero() {
        let tables = tables();
        for blob in &tables.blobs[1..] {
            assert_eq!(sum(&blob.bytes), 0, "{:?}", &blob.bytes[0..4]);
        }
    }

    #[test]
    fn rsdp_is_first_at_base_with_valid_checksums() {
        let tables = tables();
        let rsdp = &tables.blobs[0];
        assert_eq!(tables.rsdp_address, BASE);
        assert_eq!(rsdp.address, BASE);
        assert_eq!(&rsdp.bytes[0..8], b"RSD PTR ");
        assert_eq!(&rsdp.bytes[9..15], &OEM_ID);
        assert_eq!(rsdp.bytes[15], 2, "revision");
        assert_eq!(read_u32(&rsdp.bytes, 20) as usize, rsdp.bytes.len());
        assert_eq!(sum(&rsdp.bytes[0..20]), 0, "checksum");
        assert_eq!(sum(&rsdp.bytes), 0, "extended checksum");
    }

    #[test]
    fn rsdp_points_at_xsdt() {
        let tables = tables();
        let xsdt = table(&tables, b"XSDT");
        assert_eq!(read_u32(&tables.blobs[0].bytes, 16), 0, "no RSDT");
        assert_eq!(read_u64(&tables.blobs[0].bytes, 24), xsdt.address);
    }

    #[test]
    fn xsdt_entries_point_at_fadt_madt_and_mcfg() {
        let tables = tables();
        let xsdt = &table(&tables, b"XSDT").bytes;
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| read_u64(xsdt, o))
            .collect();
        let expected: Vec<u64> = [b"FACP", b"APIC", b"MCFG"]
            .iter()
            .map(|s| table(&tables, *s).address)
            .collect();
        assert_eq!(entries, expected);
    }

    #[test]
    fn numa_adds_srat_and_slit_to_the_xsdt() {
        let tables = build(&crate::description::tests::numa_example(), BASE, SIZE).unwrap();
        let xsdt = &table(&tables, b"XSDT").bytes;
        assert_eq!(read_u32(xsdt, 4) as usize, xsdt.len());
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| read_u64(xsdt, o))
            .collect();
        let expected: Vec<u64> = [b"FACP", b"APIC", b"MCFG", b"SRAT", b"SLIT"]
            .iter()
            .map(|s| table(&tables, *s).address)
            .collect();
        assert_eq!(entries, expected);
        for blob in &tables.blobs[1..] {
            assert_eq!(sum(&blob.bytes), 0);
            assert_eq!(blob.address % TABLE_ALIGNMENT, 0);
        }
        assert!(tables.find(b"SRAT").is_some() && tables.find(b"SLIT").is_some());
        assert!(build(&example(), BASE, SIZE)
            .unwrap()
            .find(b"SRAT")
            .is_none());
    }

    #[test]
    fn fadt_x_dsdt_points_at_dsdt() {
        let tables = tables();
        let fadt = &table(&tables, b"FACP").bytes;
        assert_eq!(read_u64(fadt, 140), table(&tables, b"DSDT").address);
    }

    #[test]
    fn every_table_has_rvmm_oem_id() {
        let tables = tables();
        assert_eq!(&tables.blobs[0].bytes[9..15], &OEM_ID);
        for blob in &tables.blobs[1..] {
            assert_eq!(&blob.bytes[10..16], &OEM_ID);
            assert_eq!(&blob.bytes[16..20], b"RVMM");
        }
    }

    #[test]
    fn tables_are_aligned_ordered_and_inside_the_area() {
        let tables = tables();
        let mut next_free = BASE;
        for blob in &tables.blobs {
            assert_eq!(blob.address % TABLE_ALIGNMENT, 0);
            assert!(blob.address >= next_free, "tables overlap");
            next_free = blob.address + blob.bytes.len() as u64;
        }
        assert!(next_free <= BASE + SIZE);
    }

    #[test]
    fn tables_fit_exactly_in_the_needed_size() {
        let tables = tables();
        let last = tables.blobs.last().unwrap();
        let needed = last.address + last.bytes.len() as u64 - BASE;
        assert!(build(&example(), BASE, needed).is_ok());
    }

    #[test]
    fn too_small_area_is_rejected() {
        let tables = tables();
        let last = tables.blobs.last().unwrap();
        let needed = last.address + last.bytes.len() as u64 - BASE;
        assert_eq!(
            build(&example(), BASE, needed - 1),
            Err(Error::AreaTooSmall {
                needed,
                size: needed - 1
            })
        );
    }

    #[test]
    fn misaligned_area_is_rejected() {
        assert_eq!(
            build(&example(), BASE + 8, SIZE),
            Err(Error::MisalignedArea { base: BASE + 8 })
        );
    }

    #[test]
    fn wrapping_area_is_rejected() {
        let base = u64::MAX - 0xf;
        assert_eq!(
            build(&example(), base, SIZE),
            Err(Error::AreaWraps { base, size: SIZE })
        );
    }

    #[test]
    fn invalid_description_is_rejected() {
        let mut desc = example();
        desc.cpus = 0;
        assert_eq!(
            build(&desc, BASE, SIZE),
            Err(Error::Description(DescriptionError::NoCpus))
        );
    }

    #[test]
    fn largest_machine_fits_in_the_bios_area() {
        let mut desc = example();
        desc.cpus = 255;
        desc.pci.root_ports = (0..=255u16)
            .map(|devfn| RootPort {
                device: (devfn >> 3) as u8,
                function: (devfn & 7) as u8,
                slot_number: devfn,
                intx_gsi: Some(16 + u32::from(devfn % 8)),
            })
            .collect();
        let tables = build(&desc, BASE, SIZE).unwrap();
        for blob in &tables.blobs[1..] {
            assert_eq!(sum(&blob.bytes), 0);
            assert_eq!(read_u32(&blob.bytes, 4) as usize, blob.bytes.len());
        }
    }
}
