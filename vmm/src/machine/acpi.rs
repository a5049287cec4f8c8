//! Describes the machine to `rvmm-acpi` and writes the tables into guest memory, with the
//! real-mode reset vector that uses their reset register ([`reset_vector`]).

use rvmm_acpi::{
    IoApic, IoWindow, LegacyDevices, MachineDescription, MmioWindow, Numa, NumaNode, PciHostBridge,
    PciHotplug, PowerButton, PowerManagement, RootPort, SerialPort,
};
use rvmm_devices::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, SLEEP_TYPE_S5,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::{layout, reset_vector};
use crate::placement::GuestTopology;

/// Errors of ACPI table creation.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables could not be built.
    #[error("cannot build the ACPI tables")]
    Build(#[source] rvmm_acpi::Error),
    /// The tables could not be written into guest memory.
    #[error("cannot write ACPI table at {addr:#x} into guest memory")]
    Write {
        /// Guest address of the table.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The reset vector could not be written into guest memory.
    #[error(
        "cannot write the real-mode reset vector at {:#x} into guest memory",
        reset_vector::RESET_VECTOR
    )]
    ResetVector(#[source] vm_memory::GuestMemoryError),
}

/// What the VMM knows of the machine that ACPI must describe.
pub struct Machine<'a> {
    /// Number of vCPUs.
    pub cpus: u8,
    /// Last bus number of the PCI segment.
    pub bus_end: u8,
    /// The 64-bit MMIO window (base, size).
    pub mmio64: (u64, u64),
    /// Root ports: (device, function, physical slot number, INTx GSI).
    pub root_ports: &'a [(u8, u8, u16, u32)],
    /// Whether COM1 exists.
    pub serial: bool,
    /// The guest NUMA topology (`--numa`), if any.
    pub numa: Option<&'a GuestTopology>,
    /// With `--numa`, the host bridge of each root bus (one per guest node holding ports).
    pub numa_bridges: &'a [rvmm_acpi::NumaBridge],
    /// ACPI PCI hotplug (`--hotplug acpi`) instead of native PCIe hotplug.
    pub acpi_hotplug: bool,
}

/// The ACPI NUMA description of `topology` for `ports` root ports on the host bridges
/// `bridges`: guest node `i` is proximity domain `i`; root port `p` is in domain
/// [`port_guest_node`]`(p)`.
pub fn numa_description(
    topology: &GuestTopology,
    ports: usize,
    bridges: &[rvmm_acpi::NumaBridge],
) -> Numa {
    let nodes = topology.nodes.len();
    Numa {
        nodes: topology
            .nodes
            .iter()
            .map(|node| NumaNode {
                // vCPU indices below 255: `--cpus` is at most 254.
                cpus: node.cpus.iter().map(|c| c as u8).collect(),
                memory: topology
                    .ranges
                    .iter()
                    .filter(|(g, _, _)| *g == node.guest_node)
                    .map(|&(_, start, len)| (start, len))
                    .collect(),
            })
            .collect(),
        distances: topology.distances.clone(),
        root_port_domains: (0..ports).map(|p| port_guest_node(p, nodes)).collect(),
        bridges: bridges.to_vec(),
    }
}

/// The guest node of root port `port` among `nodes` guest nodes: ports are dealt to the nodes in
/// turn (port 0 to node 0, port 1 to node 1, ...), so that every node has ports.
pub fn port_guest_node(port: usize, nodes: usize) -> u32 {
    (port % nodes.max(1)) as u32
}

/// Builds the tables for `machine`, writes them at [`layout::ACPI_START`] and returns the RSDP
/// address.
pub fn write_tables(mem: &GuestMemoryMmap, machine: &Machine) -> Result<u64, AcpiError> {
    let pm = layout::ACPI_PM_PORT as u16;
    let desc = MachineDescription {
        cpus: machine.cpus,
        lapic_address: layout::LAPIC_START as u32,
        ioapic: IoApic {
            id: 0,
            address: layout::IOAPIC_START as u32,
            gsi_base: 0,
        },
        pci: PciHostBridge {
            segment: 0,
            ecam_base: layout::PCI_ECAM_START,
            bus_start: 0,
            bus_end: machine.bus_end,
            mmio32: MmioWindow {
                base: layout::PCI_MMIO32_START,
                size: layout::PCI_MMIO32_SIZE,
            },
            mmio64: MmioWindow {
                base: machine.mmio64.0,
                size: machine.mmio64.1,
            },
            io: Some(IoWindow {
                base: layout::PCI_IO_START as u16,
                size: layout::PCI_IO_SIZE as u32,
            }),
            root_ports: machine
                .root_ports
                .iter()
                .map(|&(device, function, slot_number, gsi)| RootPort {
                    device,
                    function,
                    slot_number,
                    intx_gsi: Some(gsi),
                })
                .collect(),
        },
        pm: PowerManagement {
            sleep_control_port: pm + SLEEP_CONTROL_OFFSET as u16,
            sleep_status_port: pm + SLEEP_STATUS_OFFSET as u16,
            reset_port: pm + RESET_OFFSET as u16,
            reset_value: RESET_VALUE,
            s5_sleep_type: SLEEP_TYPE_S5,
        },
        serial: machine.serial.then_some(SerialPort {
            port: layout::SERIAL_PORT as u16,
            irq: layout::SERIAL_IRQ as u8,
        }),
        power_button: Some(PowerButton {
            event_port: layout::GED_PORT as u16,
            irq: layout::GED_IRQ as u8,
        }),
        pci_hotplug: machine.acpi_hotplug.then_some(PciHotplug {
            port: layout::PCI_HOTPLUG_PORT as u16,
        }),
        legacy: LegacyDevices {
            cmos_rtc: true,
            i8042: false,
        },
        numa: machine.numa.map(|topology| {
            numa_description(topology, machine.root_ports.len(), machine.numa_bridges)
        }),
    };
    let tables =
        rvmm_acpi::build(&desc, layout::ACPI_START, layout::ACPI_SIZE).map_err(AcpiError::Build)?;
    for blob in &tables.blobs {
        mem.write_slice(&blob.bytes, GuestAddress(blob.address))
            .map_err(|source| AcpiError::Write {
                addr: blob.address,
                source,
            })?;
    }
    // The reset vector resets through the FADT's reset register, written with it.
    reset_vector::write(mem, desc.pm.reset_port, desc.pm.reset_value)
        .map_err(AcpiError::ResetVector)?;
    Ok(tables.rsdp_address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::CpuList;
    use crate::placement::GuestNodeInfo;

    #[test]
    fn ports_are_dealt_to_the_guest_nodes_in_turn() {
        let nodes: Vec<u32> = (0..5).map(|p| port_guest_node(p, 2)).collect();
        assert_eq!(nodes, vec![0, 1, 0, 1, 0]);
        assert_eq!(port_guest_node(3, 1), 0);
    }

    #[test]
    fn guest_topology_becomes_the_acpi_numa_description() {
        let node = |g: u32, cpus: &[u32]| GuestNodeInfo {
            guest_node: g,
            cpus: CpuList::from_ids(cpus.iter().copied()),
            memory_bytes: 0,
            host_node: Some(g),
            host_cpus: None,
        };
        let topology = GuestTopology {
            nodes: vec![node(0, &[0, 2]), node(1, &[1])],
            ranges: vec![
                (0, 0, 0x1000_0000),
                (1, 0x1000_0000, 0x1000_0000),
                (1, 1 << 32, 1 << 30),
            ],
            distances: vec![vec![10, 20], vec![20, 10]],
        };
        let numa = numa_description(&topology, 3, &[]);
        assert_eq!(numa.nodes[0].cpus, vec![0, 2]);
        assert_eq!(numa.nodes[0].memory, vec![(0, 0x1000_0000)]);
        assert_eq!(
            numa.nodes[1].memory,
            vec![(0x1000_0000, 0x1000_0000), (1 << 32, 1 << 30)]
        );
        assert_eq!(numa.root_port_domains, vec![0, 1, 0]);
        assert_eq!(numa.distances, topology.distances);
    }
}
