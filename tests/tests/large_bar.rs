//! A GPU-sized BAR through passthrough, proven inside the test host: an `ivshmem-plain` device
//! whose 64-bit prefetchable BAR 2 is 128 GiB of a sparse file on the build machine (QEMU's
//! `memory-backend-file`), passed through with the default `--root-ports`. The guest writes a
//! value at the first and at the last 32 bits of the BAR; both are then found at the two ends
//! of the file.
//!
//! Two test host runs, one rvmm run each: with 42 physical address bits (4 TiB) rvmm's 64-bit
//! window, which reaches up to the host's address width, gives each of the 8 ports 256 GiB
//! (`wide`); with 39 bits (512 GiB) the even share is 32 GiB, and the port of the cold-plugged
//! device gets a 128 GiB window sized to its BAR while the others share the rest (`narrow`).

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
/// The test host's CPU: resources/testhost.sh's with that many physical address bits (the last
/// -cpu wins). No igb in these runs (its VFs break above 36 bits, see resources/testhost.sh).
fn test_host_cpu(bits: u32) -> String {
    format!("EPYC-Milan,+svm,phys-bits={bits}")
}

static WIDE: SharedRun = SharedRun::new();
static NARROW: SharedRun = SharedRun::new();

fn backing_file(name: &str) -> PathBuf {
    paths::run_dir().join(format!("{name}-ivshmem.img"))
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

/// The run of test host `name` with `bits` physical address bits.
fn run_with(shared: &'static SharedRun, name: &'static str, bits: u32) -> Section<'static> {
    shared
        .get(
            || {
                let file = backing_file(name);
                // A fresh sparse file: only what the guest writes takes space.
                let created = std::fs::create_dir_all(paths::run_dir())
                    .and_then(|()| File::create(&file))
                    .and_then(|f| f.set_len(BAR_SIZE));
                if let Err(e) = created {
                    panic!("cannot create the sparse file {}: {e}", file.display());
                }
                TestHost::new(name)
                    .nvme_drives(0)
                    .igb(false)
                    .needs_rvmm(true)
                    .qemu_arg("-cpu")
                    .qemu_arg(&test_host_cpu(bits))
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

fn wide() -> Section<'static> {
    run_with(&WIDE, "large_bar_wide", 42)
}

fn narrow() -> Section<'static> {
    run_with(&NARROW, "large_bar_narrow", 39)
}

/// The little-endian 32-bit value at `offset` of test host `name`'s backing file.
fn file_value(name: &str, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    let read = File::open(backing_file(name)).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut bytes)
    });
    if let Err(e) = read {
        panic!(
            "cannot read {} at {offset:#x}: {e}",
            backing_file(name).display()
        );
    }
    u32::from_le_bytes(bytes)
}

fn assert_mapped_whole(run: &Section<'_>) {
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

fn assert_in_file(run: &Section<'_>, name: &str) {
    run.expect_guest("bar_pattern");
    assert_eq!(
        file_value(name, 0),
        START_VALUE,
        "the guest's write at the start of the BAR is not at the start of the file"
    );
    assert_eq!(
        file_value(name, BAR_SIZE - 4),
        END_VALUE,
        "the guest's write at the end of the BAR is not at the end of the file"
    );
}

// --- a 42-bit host: the even share holds the BAR ---------------------------------------------

#[test]
fn large_bar_is_mapped_whole_in_the_guest() {
    assert_mapped_whole(&wide());
}

#[test]
fn large_bar_writes_reach_both_ends_of_the_backing_file() {
    assert_in_file(&wide(), "large_bar_wide");
}

#[test]
fn large_bar_guest_powers_off_and_rvmm_exits_zero() {
    let run = wide();
    assert_clean_poweroff(&run, run.rvmm_exit(), &["bar_pattern"], "");
}

// --- a 39-bit host: the boot device's port is sized to its BAR -------------------------------

#[test]
fn large_bar_on_a_narrow_host_is_mapped_whole_in_the_guest() {
    assert_mapped_whole(&narrow());
}

#[test]
fn large_bar_on_a_narrow_host_writes_reach_both_ends_of_the_backing_file() {
    assert_in_file(&narrow(), "large_bar_narrow");
}

#[test]
fn large_bar_on_a_narrow_host_guest_powers_off_and_rvmm_exits_zero() {
    let run = narrow();
    assert_clean_poweroff(&run, run.rvmm_exit(), &["bar_pattern"], "");
}
