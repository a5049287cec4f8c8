//! Reboot in place end to end on this machine's KVM, with a payload small enough to run
//! anywhere KVM does: a PVH ELF whose 32-bit code prints `R<n>` on the serial port, `n` being
//! a counter it keeps in guest RAM (which a reboot does not clear), then resets the machine
//! through the ACPI reset register until `n` is 3, when it powers off through ACPI S5.
//!
//! With `--on-reboot restart` the VM boots three times in one `Vm::run` (the payload and the
//! vCPUs reset each time, the RAM kept) and ends with a power-off after two reboots; with
//! `--on-reboot exit` the first reset ends it.

use std::path::{Path, PathBuf};

use std::time::Duration;

use rvmm::api::{EventKind, Received};
use rvmm::vm::reboot::OnReboot;
use rvmm::{SeccompMode, SerialConfig, Vm, VmConfig, VmExit};

/// Where the payload is loaded (1 MiB) and where it keeps its boot counter (6 MiB).
const LOAD_ADDRESS: u64 = 0x10_0000;

/// `mov dx,0x3f8; mov al,'R'; out dx,al; inc dword [0x600000]; mov eax,[0x600000]; add al,'0';
/// out dx,al; mov al,10; out dx,al; cmp dword [0x600000],3; jae off; mov dx,0x602; mov al,1;
/// out dx,al (ACPI reset); hlt loop; off: mov dx,0x600; mov al,0x34; out dx,al (SLP_EN|S5)`.
const CODE: [u8; 52] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xff, 0x05, 0x00, 0x00, 0x60, 0x00, 0xa1, 0x00, 0x00,
    0x60, 0x00, 0x04, 0x30, 0xee, 0xb0, 0x0a, 0xee, 0x83, 0x3d, 0x00, 0x00, 0x60, 0x00, 0x03, 0x73,
    0x0a, 0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd, 0x66, 0xba, 0x00, 0x06, 0xb0,
    0x34, 0xee, 0xeb, 0xf4,
];

/// An ELF64 file with one loadable segment (`CODE` at `LOAD_ADDRESS`) and the PVH entry note
/// (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY).
fn pvh_elf() -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    const NOTE_OFFSET: u64 = 0x1100;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // name size ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descriptor size
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDRESS as u32).to_le_bytes());

    let mut elf = vec![0u8; 0x1200];
    let header: &mut [u8] = &mut elf[..64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little endian
    header[6] = 1; // version
    header[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    header[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    header[20..24].copy_from_slice(&1u32.to_le_bytes());
    header[24..32].copy_from_slice(&LOAD_ADDRESS.to_le_bytes()); // entry
    header[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    header[52..54].copy_from_slice(&64u16.to_le_bytes()); // header size
    header[54..56].copy_from_slice(&56u16.to_le_bytes()); // program header size
    header[56..58].copy_from_slice(&2u16.to_le_bytes()); // two of them
    header[58..60].copy_from_slice(&64u16.to_le_bytes()); // section header size
    let phdr = |kind: u32, flags: u32, offset: u64, address: u64, size: u64, align: u64| {
        let mut p = Vec::with_capacity(56);
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&address.to_le_bytes()); // virtual
        p.extend_from_slice(&address.to_le_bytes()); // physical
        p.extend_from_slice(&size.to_le_bytes()); // in the file
        p.extend_from_slice(&size.to_le_bytes()); // in memory
        p.extend_from_slice(&align.to_le_bytes());
        p
    };
    let load = phdr(1, 5, CODE_OFFSET, LOAD_ADDRESS, CODE.len() as u64, 0x1000);
    let note_phdr = phdr(4, 4, NOTE_OFFSET, 0, note.len() as u64, 4);
    elf[64..120].copy_from_slice(&load);
    elf[120..176].copy_from_slice(&note_phdr);
    elf[CODE_OFFSET as usize..CODE_OFFSET as usize + CODE.len()].copy_from_slice(&CODE);
    elf[NOTE_OFFSET as usize..NOTE_OFFSET as usize + note.len()].copy_from_slice(&note);
    elf
}

fn config(dir: &Path, on_reboot: OnReboot) -> (VmConfig, PathBuf) {
    let kernel = dir.join("reboot.elf");
    std::fs::write(&kernel, pvh_elf()).expect("write the payload");
    let console = dir.join("console.out");
    let config = VmConfig {
        kernel,
        initramfs: None,
        cmdline: String::new(),
        cpus: 2,
        memory: "size=64M".parse().expect("memory size"),
        root_ports: 2,
        serial: SerialConfig::File {
            path: console.clone(),
            max_size: 1 << 20,
        },
        api_socket: None,
        devices: Vec::new(),
        seccomp: SeccompMode::On,
        event_log: None,
        placement: Default::default(),
        cpu_affinity: None,
        on_reboot,
        hotplug: Default::default(),
    };
    (config, console)
}

fn kvm_available() -> bool {
    let available = Path::new("/dev/kvm").exists();
    if !available {
        eprintln!("no /dev/kvm on this machine: reboot in place is tested on real guests only");
    }
    available
}

#[test]
fn a_reset_reboots_the_vm_in_place_with_its_ram() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let (config, console) = config(dir.path(), OnReboot::Restart);
    let vm = Vm::new(&config).expect("build the VM");
    let counters = vm.counters().clone();
    let events = vm.events().subscribe();

    let exit = vm.run().expect("run the VM");

    assert_eq!(exit, VmExit::PowerOff);
    let output = std::fs::read_to_string(&console).expect("console output");
    assert_eq!(
        output, "R1\nR2\nR3\n",
        "one line per boot, the counter kept in RAM"
    );
    assert_eq!(counters.reboots(), 2);
    let mut rebooted = Vec::new();
    // The bus is closed after vm-shutdown: the stream ends.
    while let Received::Event(e) = events.recv_timeout(Duration::from_secs(5)) {
        if let EventKind::VmRebooted { reboots, .. } = e.kind {
            rebooted.push(reboots);
        }
    }
    assert_eq!(rebooted, [1, 2]);
}

#[test]
fn with_on_reboot_exit_a_reset_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let (config, console) = config(dir.path(), OnReboot::Exit);
    let vm = Vm::new(&config).expect("build the VM");

    let exit = vm.run().expect("run the VM");

    assert_eq!(exit, VmExit::Reset);
    assert_eq!(exit.exit_code(), 3);
    let output = std::fs::read_to_string(&console).expect("console output");
    assert_eq!(output, "R1\n");
}
