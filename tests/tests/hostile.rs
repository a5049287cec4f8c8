//! A hostile guest: `/bin/hostile` (resources/guest/hostile.c, guest scenario `hostile`) writes
//! garbage to every PCI config register it can reach — every function on every bus through
//! 0xCF8/0xCFC and ECAM, the root ports' slot, MSI, window and bus-number registers, and a
//! passthrough NVMe's config space, BARs and MSI-X table — and rvmm survives it. Then a second VM
//! gets the same NVMe and uses it normally.
//!
//! The expectation, exactly:
//! - rvmm neither panics nor dies by a signal nor exits with an error of its own: its exit code is
//!   0 (the guest powered off) or 3 (the guest reset itself), never 1, 2, 4 or a signal status,
//!   and no "panicked" appears on the run's console;
//! - exit code 3 is accepted only when the guest itself died (it never printed `GUEST done`);
//!   after `GUEST done` only 0 is;
//! - the guest is expected to live through all of it (the program keeps MSI data it writes to
//!   known MSI registers harmless, so that rvmm's own hot-plug interrupts cannot INIT or NMI a
//!   vCPU): every phase ends (`GUEST hostile_phase <name> done`), rvmm's config emulation answers
//!   consistently while under attack (`GUEST hostile_check ... ok`);
//! - the second VM, with the same NVMe, writes and reads back its pattern and powers off with 0.
//!
//! One test host run, two rvmm runs (`hostile`, `after`); each test asserts one behaviour. The
//! garbage's seed is printed (`GUEST hostile_seed`); `RVMM_HOSTILE_SEED=<n>` replays one.

use std::process;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rvmm_tests::{GuestRun, Section, SharedRun, TestHost, TestHostOutput};

/// The phases of the hostile program, in order.
const PHASES: [&str; 6] = ["discover", "nvme", "ports", "pio", "ecam", "platform"];
/// rvmm's exit codes (vmm/src/vm/exit.rs): guest power-off and guest reset.
const EXIT_POWER_OFF: i64 = 0;
const EXIT_GUEST_RESET: i64 = 3;
/// Garbage writes per register in the hostile program's full passes.
const ROUNDS: u32 = 2;
/// Where the guest finds the NVMe: behind the first root port.
const GUEST_NVME_BDF: &str = "0000:01:00.0";
/// The hostile VM's control API socket in the test host.
const API_SOCKET: &str = "/tmp/hostile.sock";
/// How long the control API may take to answer `info` while the guest attacks.
const API_ANSWER_LIMIT_MS: u64 = 1000;
/// Most lines rvmm may log over the whole attack (its warnings are throttled).
const LOG_LINE_LIMIT: u64 = 500;

static RUN: SharedRun = SharedRun::new();

/// The garbage's seed: `RVMM_HOSTILE_SEED`, else one from the clock and the process.
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        if let Some(seed) = std::env::var("RVMM_HOSTILE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return seed;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        nanos ^ u64::from(process::id()) << 32
    })
}

fn scenario() -> String {
    let seed_param = format!("rvmm.hostile_seed={}", seed());
    let rounds = format!("rvmm.hostile_rounds={ROUNDS}");
    // iomem=relaxed: the guest kernel (CONFIG_IO_STRICT_DEVMEM) would refuse to map the ECAM
    // window, which it has claimed, through /dev/mem.
    let hostile = GuestRun::new("hostile")
        .cpus(2)
        .memory("size=512M")
        .guest_scenario(
            "hostile",
            &["iomem=relaxed", &seed_param, &rounds, "rvmm.hostile_hold=1"],
        )
        .arg("--device")
        .shell_arg("\"$NVME,id=victim\"")
        .arg("--api-socket")
        .arg(API_SOCKET)
        // A guest that resets itself under the attack ends the run (exit code 3) rather than
        // booting into the attack again.
        .arg("--on-reboot")
        .arg("exit")
        .timeout_secs(900)
        // Nothing here prints while rvmm runs (a marker could land inside a guest line): the
        // results go to files, printed as markers once rvmm has ended.
        .while_running(
            "GUEST hostile_phase discover begin",
            &format!("api_poller {API_SOCKET} /tmp/api_polls &\necho $! >/tmp/api_poller.pid"),
        )
        .while_running(
            "GUEST hostile_phase ports begin",
            &format!(
                "( start=$(uptime_ms); timeout -s KILL 90 \"$RVMM\" ctl --api-socket {API_SOCKET} \
                 add-device \"path=/sys/bus/pci/devices/$NVME_EXTRA,id=extra\" >/tmp/hot_add.out 2>&1; \
                 echo \"rc=$? ms=$(($(uptime_ms) - start))\" >/tmp/hot_add.rc ) &"
            ),
        )
        .while_running(
            "GUEST hostile_phase pio begin",
            "start=$(uptime_ms)\n\
             echo \"$NVME\" >/sys/bus/pci/drivers/vfio-pci/unbind\n\
             echo \"rc=$? ms=$(($(uptime_ms) - start))\" >/tmp/unbind.rc",
        )
        .while_running(
            "GUEST hostile_hold",
            &format!(
                "i=0; while [ ! -f /tmp/hot_add.rc ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i + 1)); done\n\
                 sleep 2\n\
                 timeout -s KILL 60 \"$RVMM\" ctl --api-socket {API_SOCKET} remove-device extra --surprise >/tmp/remove_extra.out 2>&1\n\
                 echo \"rc=$?\" >/tmp/remove_extra.rc\n\
                 timeout -s KILL 60 \"$RVMM\" ctl --api-socket {API_SOCKET} info >/tmp/info_final.out 2>&1\n\
                 kill \"$(cat /tmp/api_poller.pid)\"\n\
                 echo stop >/run/rvmm-stdin"
            ),
        );
    let pattern = format!("rvmm.pattern=hostile-{}", seed());
    let after = |name: &str| {
        GuestRun::new(name)
            .cpus(2)
            .memory("size=512M")
            .guest_scenario("nvme", &[&pattern])
            .arg("--device")
            .shell_arg("\"$NVME,id=disk0\"")
            .timeout_secs(150)
    };
    let mut script = String::from(
        "NVME=$(pci_find 1b36:0010 | sed -n 1p)\n\
         NVME_EXTRA=$(pci_find 1b36:0010 | sed -n 2p)\n\
         hmark nvme_device \"$NVME\"\n\
         hmark nvme_extra \"$NVME_EXTRA\"\n\
         vfio_bind \"$NVME\"\n\
         vfio_bind \"$NVME_EXTRA\"\n\
         rm -f /tmp/api_polls /tmp/hot_add.rc /tmp/unbind.rc /tmp/remove_extra.rc\n",
    );
    script += &hostile.script();
    // What the test host saw while the guest attacked, now that rvmm has ended.
    script += "hmark begin hostile_host\n\
               while read -r line; do hmark api_poll \"$line\"; done </tmp/api_polls\n\
               hmark hot_add \"$(cat /tmp/hot_add.rc 2>/dev/null)\" \"$(tr -d '\\n' </tmp/hot_add.out 2>/dev/null | tr -s ' ')\"\n\
               hmark unbind \"$(cat /tmp/unbind.rc 2>/dev/null)\"\n\
               hmark remove_extra \"$(cat /tmp/remove_extra.rc 2>/dev/null)\" \"$(tr -d '\\n' </tmp/remove_extra.out 2>/dev/null | tr -s ' ')\"\n\
               hmark info_final \"$(tr -d '\\n' </tmp/info_final.out 2>/dev/null | tr -s ' ')\"\n\
               hmark rvmm_log_lines \"$(grep -cE '^\\[[0-9]{4}-' /tmp/rvmm-hostile.out)\" \"bytes=$(grep -E '^\\[[0-9]{4}-' /tmp/rvmm-hostile.out | wc -c)\"\n\
               hmark end hostile_host\n\
               vfio_bind \"$NVME\"\n";
    script += &after("after").script();
    script
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("hostile")
                .nvme_drives(2)
                .igb(false)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(1200),
    )
}

fn hostile() -> Section<'static> {
    run().section("hostile")
}

#[test]
fn rvmm_survives_the_hostile_guest() {
    let run = hostile();
    let exit = run.rvmm_exit();
    let guest_done = run.guest("done").is_some();
    run.check(
        !run.contains("panicked"),
        "rvmm panicked while the guest wrote garbage to PCI config space",
    );
    run.check(
        exit == EXIT_POWER_OFF || exit == EXIT_GUEST_RESET,
        &format!(
            "rvmm exited with {exit} under the hostile guest: only 0 (guest power-off) or 3 \
             (guest reset) are acceptable; 1 is an rvmm error, 4 a vCPU failure, 128+N signal N \
             (134: rvmm aborted on a panic, 137: killed at the run's timeout). Seed {}",
            seed()
        ),
    );
    run.check(
        exit == EXIT_POWER_OFF || !guest_done,
        &format!(
            "rvmm exited with {exit} although the guest finished and powered off (GUEST done): \
             a reset code is acceptable only when the guest itself died. Seed {}",
            seed()
        ),
    );
}

#[test]
fn hostile_program_runs_every_phase_to_its_end() {
    let run = hostile();
    run.expect_guest("hostile_done");
    let ended: Vec<String> = run
        .guest_all("hostile_phase")
        .iter()
        .filter(|m| m.word(1) == Some("done"))
        .filter_map(|m| m.word(0).map(str::to_string))
        .collect();
    for phase in PHASES {
        run.check(
            ended.iter().any(|p| p == phase),
            &format!(
                "hostile phase {phase} did not end (ended: {ended:?}); seed {}",
                seed()
            ),
        );
    }
    let errors = run.guest_all("hostile_error");
    run.check(
        errors.is_empty(),
        &format!(
            "the hostile program could not do everything: {:?}",
            errors.iter().map(|m| m.value).collect::<Vec<_>>()
        ),
    );
}

#[test]
fn hostile_program_reaches_the_passthrough_nvme_and_its_msix_table() {
    let run = hostile();
    let nvme = run.expect_guest("hostile_nvme");
    run.check(
        nvme.word(0) == Some(GUEST_NVME_BDF),
        &format!(
            "the hostile program found the NVMe at {:?}, not {GUEST_NVME_BDF}",
            nvme.word(0)
        ),
    );
    run.expect_guest("hostile_msix");
    let functions = run.expect_guest_u64("hostile_functions");
    // Host bridge, 8 root ports, the NVMe.
    run.check(
        functions >= 10,
        &format!("the hostile program found only {functions} PCI functions"),
    );
}

#[test]
fn config_emulation_stays_consistent_under_attack() {
    let run = hostile();
    let checks = run.guest_all("hostile_check");
    for name in ["msix_readback", "cf8_readback", "host_bridge"] {
        let Some(check) = checks.iter().find(|m| m.word(0) == Some(name)) else {
            run.fail(&format!("no hostile_check {name} marker"));
        };
        run.check(
            check.word(1) == Some("ok"),
            &format!("hostile_check {}; seed {}", check.value, seed()),
        );
    }
}

#[test]
fn second_vm_uses_the_same_nvme_normally() {
    let output = run();
    let run = output.section("after");
    let pattern = run.expect_guest("nvme_pattern");
    run.check(
        pattern.word(1) == Some("ok"),
        &format!(
            "after the hostile VM, the NVMe's pattern check says {:?}",
            pattern.value
        ),
    );
    let exit = run.rvmm_exit();
    run.check(
        exit == EXIT_POWER_OFF,
        &format!("the second VM's rvmm exited with {exit}, not 0"),
    );
}

fn host_side() -> Section<'static> {
    run().section("hostile_host")
}

/// The value of `key=` in a marker value like `rc=0 ms=40`.
fn field_u64(value: &str, key: &str) -> Option<u64> {
    value
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[test]
fn control_api_answers_within_a_second_throughout_the_attack() {
    let run = host_side();
    let polls = run.host_all("api_poll");
    run.check(
        polls.len() >= 10,
        &format!("only {} info calls during the attack", polls.len()),
    );
    let failed: Vec<&str> = polls
        .iter()
        .map(|m| m.value)
        .filter(|v| field_u64(v, "rc") != Some(0))
        .collect();
    run.check(
        failed.is_empty(),
        &format!("info failed during the attack: {failed:?}"),
    );
    let slowest = polls
        .iter()
        .filter_map(|m| field_u64(m.value, "ms"))
        .max()
        .unwrap_or(0);
    run.check(
        slowest <= API_ANSWER_LIMIT_MS,
        &format!(
            "the control API took {slowest} ms to answer info while the guest attacked (limit \
             {API_ANSWER_LIMIT_MS} ms); seed {}",
            seed()
        ),
    );
}

#[test]
fn hot_add_and_host_unbind_during_the_attack_are_both_served() {
    let run = host_side();
    let hot_add = run.expect_host("hot_add");
    let unbind = run.expect_host("unbind");
    let info = run.expect_host("info_final").value;
    run.check(
        field_u64(hot_add.value, "rc").is_some_and(|rc| rc != 137),
        &format!(
            "the hot-add during the attack got no answer: {}",
            hot_add.value
        ),
    );
    run.check(
        field_u64(unbind.value, "rc") == Some(0),
        &format!(
            "the test host could not unbind the victim: {}",
            unbind.value
        ),
    );
    run.check(
        !info.contains("victim"),
        &format!("the victim the host took back is still in the VM: {info}"),
    );
}

#[test]
fn nothing_is_leaked_after_the_attack() {
    let run = host_side();
    let info = run.expect_host("info_final").value;
    run.check(
        info.contains("\"devices\": []"),
        &format!("devices are left after the victim and the extra drive went: {info}"),
    );
    for key in ["memory_slots", "msi_routes", "msi_gsis", "host_vectors"] {
        let value = info
            .split_once(&format!("\"{key}\": "))
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            });
        run.check(
            value == Some(0),
            &format!("after the attack info shows {key} {value:?}, not 0: {info}"),
        );
    }
}

#[test]
fn rvmm_log_stays_bounded_under_attack() {
    let run = host_side();
    let lines = run.expect_host("rvmm_log_lines");
    let count = lines
        .word(0)
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    run.check(
        count <= LOG_LINE_LIMIT,
        &format!(
            "rvmm logged {} under attack (limit {LOG_LINE_LIMIT} lines)",
            lines.value
        ),
    );
}
