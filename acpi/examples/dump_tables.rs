//! Writes the ACPI tables of an rvmm-shaped machine to a directory, one `<SIGNATURE>.dat` file
//! per table, for inspection with `iasl -d` (acpica-tools).
//!
//! `cargo run -p rvmm-acpi --example dump_tables -- <DIR> [<CPUS>]`

use std::path::PathBuf;
use std::process::ExitCode;

use rvmm_acpi::{
    IoApic, IoWindow, LegacyDevices, MachineDescription, MmioWindow, PciHostBridge, PowerButton,
    PowerManagement, RootPort, SerialPort,
};

fn machine(cpus: u8) -> MachineDescription {
    MachineDescription {
        cpus,
        lapic_address: 0xfee0_0000,
        ioapic: IoApic {
            id: 0,
            address: 0xfec0_0000,
            gsi_base: 0,
        },
        pci: PciHostBridge {
            segment: 0,
            ecam_base: 0xe000_0000,
            bus_start: 0,
            bus_end: 0xff,
            mmio32: MmioWindow {
                base: 0xc000_0000,
                size: 0x2000_0000,
            },
            mmio64: MmioWindow {
                base: 0x100_0000_0000,
                size: 0x100_0000_0000,
            },
            io: Some(IoWindow {
                base: 0x1000,
                size: 0xf000,
            }),
            root_ports: (1..=4)
                .map(|device| RootPort {
                    device,
                    function: 0,
                    slot_number: u16::from(device),
                    intx_gsi: Some(15 + u32::from(device)),
                })
                .collect(),
        },
        pm: PowerManagement {
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x1,
            s5_sleep_type: 5,
        },
        serial: Some(SerialPort {
            port: 0x3f8,
            irq: 4,
        }),
        power_button: Some(PowerButton {
            event_port: 0x603,
            irq: 5,
        }),
        pci_hotplug: None,
        legacy: LegacyDevices::default(),
        numa: None,
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: dump_tables <DIR> [<CPUS>]");
        return ExitCode::FAILURE;
    };
    let cpus = match args.next().map(|n| n.parse::<u8>()) {
        None => 2,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("invalid vCPU count: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tables = match rvmm_acpi::build(&machine(cpus), 0xe_0000, 0x2_0000) {
        Ok(tables) => tables,
        Err(e) => {
            eprintln!("cannot build the tables: {e}");
            return ExitCode::FAILURE;
        }
    };
    for blob in &tables.blobs {
        let signature: String = blob.bytes[..4].iter().map(|&b| char::from(b)).collect();
        let name = if signature == "RSD " {
            "RSDP"
        } else {
            &signature
        };
        let path = dir.join(format!("{name}.dat"));
        if let Err(e) = std::fs::write(&path, &blob.bytes) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{:#x} {name} {} bytes", blob.address, blob.bytes.len());
    }
    ExitCode::SUCCESS
}
