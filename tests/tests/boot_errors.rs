//! rvmm refusing what it cannot do, inside the test host: each case must end quickly with a
//! non-zero exit status (not a crash, not a timeout) and a message on stderr that names the
//! problem. One test host run tries every case; each test asserts on its own case's section.

use std::time::Duration;

use rvmm_tests::{shell_quote, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// Arguments of a valid run, so that each case differs from one by a single thing.
const VALID: &str = r#"--kernel "$GUEST_BZIMAGE" --initramfs "$GUEST_INITRAMFS" --cmdline "$(guest_cmdline basic)" --serial stdio"#;

/// One `rvmm_capture` line: case `name` runs `rvmm run <args> <VALID minus what args replace>`.
fn case(name: &str, kernel: Option<&str>, args: &str) -> String {
    let valid = match kernel {
        Some(kernel) => VALID.replacen("\"$GUEST_BZIMAGE\"", &shell_quote(kernel), 1),
        None => VALID.to_string(),
    };
    format!("rvmm_capture {name} run {valid} {args}\n")
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            let mut scenario = String::from(
                "RVMM_CAPTURE_TIMEOUT=30\n\
                 head -c 2097152 /dev/urandom >/tmp/garbage.bin\n\
                 hugepages_set 0\n",
            );
            scenario += &case("no_hugepage_pool", None, "--memory size=512M,hugepages=on");
            // As nobody: root's CAP_IPC_LOCK would lift the limit.
            scenario += "(ulimit -l 64\n RVMM_AS_USER=nobody\n";
            scenario += &case("memlock_limit_too_low", None, "--memory size=512M");
            scenario += ")\n";
            scenario += &case(
                "missing_kernel",
                Some("/nonexistent/vmlinuz"),
                "--memory size=512M",
            );
            scenario += &case(
                "garbage_kernel",
                Some("/tmp/garbage.bin"),
                "--memory size=512M",
            );
            scenario += &case("size_not_a_number", None, "--memory size=lots");
            scenario += &case("size_unknown_unit", None, "--memory size=512Q");
            scenario += &case("size_zero", None, "--memory size=0");
            scenario += &case(
                "hugepage_size_unsupported",
                None,
                "--memory size=512M,hugepages=on,hugepage_size=3M",
            );
            scenario += &case("zero_cpus", None, "--cpus 0 --memory size=512M");
            TestHost::new("boot_errors")
                .nvme_drives(0)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario)
        },
        Duration::from_secs(600),
    )
}

/// Asserts that case `name` failed cleanly ([`rvmm_tests::assert_refused`]) and said something
/// containing one of `needles` (case-insensitive) on stderr; returns its section.
#[track_caller]
fn assert_refused(name: &str, needles: &[&str]) -> Section<'static> {
    let run = run().section(name);
    let stderr = rvmm_tests::assert_refused(&run);
    let lower = stderr.to_lowercase();
    run.check(
        needles
            .iter()
            .any(|needle| lower.contains(&needle.to_lowercase())),
        &format!("rvmm's error message mentions none of {needles:?}"),
    );
    run
}

#[test]
fn hugepages_without_a_pool_are_refused() {
    assert_refused("no_hugepage_pool", &["huge"]);
}

#[test]
fn memlock_limit_below_guest_ram_is_refused() {
    let run = assert_refused("memlock_limit_too_low", &["memlock", "lock"]);

    run.check(
        run.host("rvmm_user")
            .is_some_and(|user| user.value.starts_with("nobody")),
        "the case did not run as nobody",
    );
}

#[test]
fn missing_kernel_file_is_refused_naming_the_path() {
    assert_refused("missing_kernel", &["/nonexistent/vmlinuz"]);
}

#[test]
fn garbage_kernel_file_is_refused() {
    assert_refused("garbage_kernel", &["kernel", "/tmp/garbage.bin"]);
}

#[test]
fn memory_size_that_is_not_a_number_is_refused_naming_it() {
    assert_refused("size_not_a_number", &["lots"]);
}

#[test]
fn memory_size_with_an_unknown_unit_is_refused_naming_it() {
    assert_refused("size_unknown_unit", &["512Q"]);
}

#[test]
fn zero_memory_size_is_refused() {
    assert_refused("size_zero", &["size", "memory"]);
}

#[test]
fn unsupported_hugepage_size_is_refused_naming_it() {
    assert_refused("hugepage_size_unsupported", &["3M"]);
}

#[test]
fn zero_cpus_are_a_command_line_error() {
    let run = assert_refused("zero_cpus", &["cpu"]);

    run.check(
        run.rvmm_exit() == 2,
        &format!(
            "rvmm exited with {}: a value out of range on the command line is exit 2",
            run.rvmm_exit()
        ),
    );
}
