//! Describes the machine to `rvmm-acpi` and writes the tables into guest memory.

use rvmm_acpi::{
    IoApic, LegacyDevices, MachineDescription, MmioWindow, PciHostBridge, PciHotplug, PowerButton,
    PowerManagement, RootPort, SerialPort,
};
use rvmm_devices::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, SLEEP_TYPE_S5,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::layout;

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
}

/// What the VMM knows of the machine that ACPI must describe.
pub struct Machine<'a> {
    /// Number of vCPUs.
    pub cpus: u8,
    /// Last bus number of the PCI segment.
    pub bus_end: u8,
    /// The 64-bit MMIO window (base, size).
    pub mmio64: (u64, u64),
    /// Root ports: (device, function, physical slot number).
    pub root_ports: &'a [(u8, u8, u16)],
    /// Whether COM1 exists.
    pub serial: bool,
    /// ACPI PCI hotplug (`--hotplug acpi`) instead of native PCIe hotplug.
    pub acpi_hotplug: bool,
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
            root_ports: machine
                .root_ports
                .iter()
                .map(|&(device, function, slot_number)| RootPort {
                    device,
                    function,
                    slot_number,
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
    Ok(tables.rsdp_address)
}
