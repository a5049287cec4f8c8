//! A GPU-sized BAR through passthrough, proven inside the test host: an `ivshmem-plain` device
//! whose 64-bit prefetchable BAR 2 is 128 GiB of a sparse file on the build machine (QEMU's
//! `memory-backend-file`), passed through with the default `--root-ports`. The guest writes a
//! value at the first and at the last 32 bits of the BAR; both are then found at the two ends
//! of the file. The test host's CPU has 42 physical address bits (4 TiB), so rvmm's 64-bit
//! window, which reaches up to the host's address width, gives each of the 8 ports 256 GiB.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use rvmm_tests::{assert_clean_poweroff, paths, GuestRun, Section, SharedRun, TestHost};

/// The BAR, and the file behind it.
const BAR_SIZE: u64 = 128 << 30;
/// What the guest writes at the start and at the end of the BAR.
const START_VALUE: u32 = 0x5256_4d4d;
const END_VALUE: u32 = 0x454e_4421;
/// The test host's CPU: resources/testhost.sh's with 42 physical address bits (the last -cpu
/// wins). No igb in this run (its VFs break above 36 bits, see resources/testhost.sh).
const TEST_HOST_CPU: &str = "EPYC-Milan,+svm,phys-bits=42";

static RUN: SharedRun = SharedRun::new();

fn backing_file() -> PathBuf {
    paths::run_dir().join("large_bar-ivshmem.img")
}

fn scenario() -> String {
    let start = format!("rvmm.bar_start={START_VALUE:#x}");
    let end = format!("rvmm.bar_end={END_VALUE:#x}");
    let guest = GuestRun::new("large")
        .cpus(2)
        .memory("size=512M")
        .guest_scenario("bar_pattern", &[&start, &end])
        .arg("--device")
        .shell_arg("\"$IVSHMEM\"")
        .timeout_secs(300);
    let mut s = String::from(
        "IVSHMEM=$(pci_find 1af4:1110 | sed -n 1p)\n\
         hmark ivshmem \"$IVSHMEM\" \"$(sed -n 3p \"/sys/bus/pci/devices/$IVSHMEM/resource\")\"\n\
         hmark phys_bits \"$(grep -m1 'address sizes' /proc/cpuinfo)\"\n\
         vfio_bind \"$IVSHMEM\"\n",
    );
    s += &guest.script();
    s
}

fn run() -> Section<'static> {
    RUN.get(
        || {
            let file = backing_file();
            // A fresh sparse file: only what the guest writes takes space.
            let created = std::fs::create_dir_all(paths::run_dir())
                .and_then(|()| File::create(&file))
                .and_then(|f| f.set_len(BAR_SIZE));
            if let Err(e) = created {
                panic!("cannot create the sparse file {}: {e}", file.display());
            }
            TestHost::new("large_bar")
                .nvme_drives(0)
                .igb(false)
                .needs_rvmm(true)
                .qemu_arg("-cpu")
                .qemu_arg(TEST_HOST_CPU)
                .qemu_arg("-object")
                .qemu_arg(&format!(
                    "memory-backend-file,id=shm,mem-path={},size={BAR_SIZE},share=on",
                    file.display()
                ))
                .qemu_arg("-device")
                .qemu_arg("pcie-root-port,id=rpbig,chassis=60,slot=60")
                .qemu_arg("-device")
                .qemu_arg("ivshmem-plain,memdev=shm,bus=rpbig")
                .scenario(&scenario())
        },
        Duration::from_secs(600),
    )
    .section("large")
}

/// The little-endian 32-bit value at `offset` of the backing file.
fn file_value(offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    let read = File::open(backing_file()).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut bytes)
    });
    if let Err(e) = read {
        panic!(
            "cannot read {} at {offset:#x}: {e}",
            backing_file().display()
        );
    }
    u32::from_le_bytes(bytes)
}

#[test]
fn large_bar_is_mapped_whole_in_the_guest() {
    let run = run();
    let bar = run.expect_guest("bar_pattern");
    run.check(
        bar.field("size") == Some(&BAR_SIZE.to_string()),
        &format!("the guest's BAR 2 is not 128 GiB: {}", bar.value),
    );
    let expect = |field: &str, value: u32| {
        let read = bar
            .field(field)
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok());
        run.check(
            read == Some(value),
            &format!(
                "the guest read back {field}={read:x?}, not {value:#x}: {}",
                bar.value
            ),
        );
    };
    expect("start", START_VALUE);
    expect("end", END_VALUE);
}

#[test]
fn large_bar_writes_reach_both_ends_of_the_backing_file() {
    let run = run();
    run.expect_guest("bar_pattern");
    assert_eq!(
        file_value(0),
        START_VALUE,
        "the guest's write at the start of the BAR is not at the start of the file"
    );
    assert_eq!(
        file_value(BAR_SIZE - 4),
        END_VALUE,
        "the guest's write at the end of the BAR is not at the end of the file"
    );
}

#[test]
fn large_bar_guest_powers_off_and_rvmm_exits_zero() {
    let run = run();
    assert_clean_poweroff(&run, run.rvmm_exit(), &["bar_pattern"], "");
}
