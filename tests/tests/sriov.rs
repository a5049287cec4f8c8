//! SR-IOV VF pools with port policy, inside the test host with its emulated igb NIC (PF
//! 8086:10c9 with two VFs, 8086:10ca): `rvmm run --vf` and `rvmm ctl add-device vf=` take a free
//! VF, set its MAC address, VLAN, spoof checking and trust on the PF through rtnetlink, bind it
//! to vfio-pci and pass it through; the end of the VM or of the device gives everything back.
//!
//! Everything is asserted from both sides: the guest's own view of its interface (`GUEST vf_mac`
//! and `GUEST vf_mac_change` of the guest scenario `vf_mac`) and the test host's view of the PF's
//! VFs through iproute2 (`HOST vf_view <label> <index> mac= vlan= spoofchk= trust=`), plus the
//! claim files (`HOST claim`), `rvmm ctl` answers and what rvmm logged (`took VF <n> (<bdf>)`).
//! Several VMs run at once, so each one's console goes to a file and becomes its section when it
//! ends; guests hold until the test host has looked, then are shut down through the API.
//!
//! One test host run, in order: two VMs started at the same moment (`pair_a` by PF address with
//! a given MAC, `pair_b` by interface name with a derived MAC); a guest without trust that tries
//! to change its MAC (`trust_off`) and one with trust (`trust_on`); then `holder` takes one VF
//! with `--vf`, `hot` gets the other hot-added through the API, a third rvmm finds no VF left
//! (`novf`), `hot` gives its VF back through hot-remove and `taker` takes it; last, tenant
//! isolation: `tenant_a` takes a VF with a MAC, VLAN 77, trust on and spoof checking off and is
//! killed with SIGKILL (no destructor runs), then `tenant_b` asks for a VF with no policy, gets
//! the same one, and must find it clean.

use std::time::Duration;

use rvmm_tests::{Marker, Section, SharedRun, TestHost, TestHostOutput};

static RUN: SharedRun = SharedRun::new();

/// MAC addresses given with `mac=` (pair_a, trust_off/trust_on, hot) and the one the guests of
/// the trust runs try to set.
const PAIR_A_MAC: &str = "52:54:00:5e:00:0a";
const TRUST_MAC: &str = "52:54:00:5e:00:0b";
const HOT_MAC: &str = "52:54:00:5e:00:0c";
const GUEST_NEW_MAC: &str = "52:54:00:77:00:01";
/// The MAC address tenant A's VF is given before rvmm is killed.
const TENANT_A_MAC: &str = "52:54:00:de:ad:01";
/// How long the guests hold their VF: they are shut down through the API once the test host has
/// looked, so this is only a bound, far beyond the scenario's worst case. A hold that ran out
/// while another guest was still booting once turned one slow boot into three failures.
const HOLD: &str = "rvmm.hold=800";
/// A VF the PF has not been told anything about.
const NO_MAC: &str = "00:00:00:00:00:00";

/// Scenario helpers: VMs whose consoles go to files (several run at once), printed as one
/// section each when they end; the PF's VFs through iproute2; the claim files; `rvmm ctl`.
const HELPERS: &str = r#"
RVMM_CAPTURE_TIMEOUT=60
VM_ARGS="--kernel $GUEST_VMLINUX --initramfs $GUEST_INITRAMFS --memory size=256M"

# vm_start NAME ARG...: rvmm run in the background; the guest console goes to
# /tmp/vm-NAME.console, rvmm's own messages (its info log included) to /tmp/vm-NAME.out.
vm_start() {
  local name="$1"
  shift
  rm -f "/tmp/vm-$name.console" "/tmp/vm-$name.out"
  hmark vm_start "$name" "$*"
  RUST_LOG=info timeout -s KILL 900 "$RVMM" run $VM_ARGS --serial "file=/tmp/vm-$name.console" \
    "$@" >"/tmp/vm-$name.out" 2>&1 </dev/null &
  echo $! >"/tmp/vm-$name.pid"
}

# vm_wait_text NAME TEXT [SECS]: waits until VM NAME's console shows TEXT.
vm_wait_text() {
  local deadline pid
  deadline=$(($(date +%s) + ${3:-180}))
  pid=$(cat "/tmp/vm-$1.pid")
  while ! grep -qF -- "$2" "/tmp/vm-$1.console" 2>/dev/null; do
    if [ "$(date +%s)" -gt "$deadline" ] || [ ! -d "/proc/$pid" ]; then
      hmark vm_wait "$1" timeout "$2"
      return 1
    fi
    sleep 0.2
  done
  hmark vm_wait "$1" ok "$2"
}

# vm_end NAME: waits for VM NAME to end, then prints its run as section NAME.
vm_end() {
  local rc line
  wait "$(cat "/tmp/vm-$1.pid")"
  rc=$?
  hmark begin "$1"
  cat "/tmp/vm-$1.console" 2>/dev/null
  echo
  while IFS= read -r line || [ -n "$line" ]; do hmark rvmm_out "$line"; done <"/tmp/vm-$1.out"
  hmark rvmm_exit "$rc"
  hmark end "$1"
}

# vf_view LABEL: each VF of the PF as iproute2 shows it:
# HOST vf_view LABEL <index> mac=<mac> vlan=<id> spoofchk=<on|off> trust=<on|off>.
vf_view() {
  local line index mac vlan spoof trust
  if ! /usr/sbin/ip link show dev "$PFNET" >/tmp/ipshow 2>&1; then
    hmark vf_view "$1" fail "$(cat /tmp/ipshow)"
    return 1
  fi
  grep -E '^ *vf [0-9]+ ' /tmp/ipshow | while IFS= read -r line; do
    hmark vf_line "$1" "$line"
    index=$(echo "$line" | sed -nE 's/^ *vf ([0-9]+) .*/\1/p')
    mac=$(echo "$line" | sed -nE 's/.*link\/ether ([0-9a-f:]+).*/\1/p')
    vlan=$(echo "$line" | sed -nE 's/.*, vlan ([0-9]+).*/\1/p')
    spoof=$(echo "$line" | sed -nE 's/.*spoof checking (on|off).*/\1/p')
    trust=$(echo "$line" | sed -nE 's/.*trust (on|off).*/\1/p')
    hmark vf_view "$1" "$index" "mac=$mac" "vlan=${vlan:-0}" "spoofchk=$spoof" "trust=$trust"
  done
}

# claims_view LABEL: HOST claim LABEL <file> bytes=<size> <content on one line>.
claims_view() {
  local file
  for file in /run/rvmm/vf/*; do
    [ -e "$file" ] || continue
    hmark claim "$1" "$(basename "$file")" "bytes=$(wc -c <"$file")" "$(tr '\n' ' ' <"$file")"
  done
}

# ctl LABEL ARG...: rvmm ctl; HOST ctl LABEL rc=<rc>, the answer on one line as
# HOST ctl_json LABEL ..., the error as HOST ctl_err LABEL ....
ctl() {
  local label="$1" rc
  shift
  timeout -s KILL 120 "$RVMM" ctl "$@" >/tmp/ctl.out 2>/tmp/ctl.err
  rc=$?
  hmark ctl "$label" "rc=$rc"
  hmark ctl_json "$label" "$(tr -d '\n' </tmp/ctl.out | tr -s ' ')"
  hmark ctl_err "$label" "$(tr -d '\n' </tmp/ctl.err)"
}

PF=$(pci_find 8086:10c9 | sed -n 1p)
PFNET=""
for net in /sys/bus/pci/devices/"$PF"/net/*; do [ -e "$net" ] && PFNET=$(basename "$net"); done
hmark sriov_pf "$PF" "$PFNET"
# The PF up first: igb answers its VFs' mailbox only while it is up.
ip link set "$PFNET" up
sriov_enable "$PF" 2
vf_view initial
"#;

/// The guest command line of guest scenario `vf_mac` with `params`.
fn cmdline(params: &str) -> String {
    format!("--cmdline \"$(guest_cmdline vf_mac {params})\"")
}

fn scenario() -> String {
    let mut s = String::from(HELPERS);
    // Two VMs at the same moment: each must get its own VF.
    // The guests hold until the test host has looked, then are shut down through the API.
    s += &format!(
        "vm_start pair_a {} --api-socket /tmp/pair_a.sock --vf \"pf=$PF,id=net0,mac={PAIR_A_MAC},vlan=100,spoofchk=on\"\n",
        cmdline(HOLD)
    );
    s += &format!(
        "vm_start pair_b {} --api-socket /tmp/pair_b.sock --vf \"$PFNET,id=net0,vlan=200,spoofchk=off\"\n",
        cmdline(HOLD)
    );
    s += "vm_wait_text pair_a 'GUEST vf_hold'\n\
          vm_wait_text pair_b 'GUEST vf_hold'\n\
          vf_view pair\n\
          claims_view pair\n\
          ctl pair_b_info --api-socket /tmp/pair_b.sock info\n\
          ctl pair_a_shutdown --api-socket /tmp/pair_a.sock shutdown\n\
          ctl pair_b_shutdown --api-socket /tmp/pair_b.sock shutdown\n\
          vm_end pair_a\n\
          vm_end pair_b\n\
          vf_view after_pair\n\
          claims_view after_pair\n";
    // A guest trying to change its MAC, without and with trust.
    for (name, trust) in [("trust_off", "off"), ("trust_on", "on")] {
        s += &format!(
            "vm_start {name} {} --api-socket /tmp/{name}.sock --vf \"pf=$PF,id=net0,mac={TRUST_MAC},trust={trust}\"\n\
             vm_wait_text {name} 'GUEST vf_hold'\n\
             vf_view {name}\n\
             ctl {name}_shutdown --api-socket /tmp/{name}.sock shutdown\n\
             vm_end {name}\n",
            cmdline(&format!("{HOLD} rvmm.newmac={GUEST_NEW_MAC}"))
        );
    }
    s += "vf_view after_trust\n";
    // One VF taken at boot, the other hot-added; none left for a third rvmm; the hot one given
    // back and taken by another VM.
    s += &format!(
        "vm_start holder {} --api-socket /tmp/holder.sock --vf \"pf=$PF,id=net0\"\n\
         vm_start hot {} --api-socket /tmp/hot.sock\n\
         vm_wait_text holder 'GUEST vf_hold'\n\
         vm_wait_text hot 'GUEST scenario vf_mac begin'\n\
         ctl hot_add --api-socket /tmp/hot.sock add-device \"vf=$PF,id=hot0,mac={HOT_MAC},vlan=300,spoofchk=off\"\n\
         vm_wait_text hot 'GUEST vf_hold'\n\
         vf_view hot_added\n\
         claims_view hot_added\n\
         rvmm_capture novf run $VM_ARGS {} --serial off --vf \"pf=$PF,id=late\"\n\
         ctl hot_remove --api-socket /tmp/hot.sock remove-device hot0\n\
         vf_view hot_removed\n\
         claims_view hot_removed\n\
         vm_start taker {} --api-socket /tmp/taker.sock --vf \"pf=$PF,id=net0,vlan=400\"\n\
         vm_wait_text taker 'GUEST vf_hold'\n\
         vf_view taker\n\
         ctl taker_shutdown --api-socket /tmp/taker.sock shutdown\n\
         vm_end taker\n\
         ctl holder_shutdown --api-socket /tmp/holder.sock shutdown\n\
         ctl hot_shutdown --api-socket /tmp/hot.sock shutdown\n\
         vm_end holder\n\
         vm_end hot\n\
         vf_view final\n\
         claims_view final\n",
        cmdline(HOLD),
        cmdline(&format!("{HOLD} rvmm.wait=200")),
        cmdline(""),
        cmdline(HOLD),
    );
    // Tenant isolation: rvmm killed with SIGKILL while its VF has a policy; the next VM that asks
    // for a VF without one must get that VF clean. busybox `timeout` execs rvmm in its own
    // process, so the pid `vm_start` recorded is rvmm's.
    s += &format!(
        "vm_start tenant_a {hold} --vf \"pf=$PF,id=net0,mac={TENANT_A_MAC},vlan=77,trust=on,spoofchk=off\"\n\
         vm_wait_text tenant_a 'GUEST vf_hold'\n\
         vf_view tenant_a\n\
         TENANT_A_RVMM=$(cat /tmp/vm-tenant_a.pid)\n\
         hmark tenant_a_kill \"$TENANT_A_RVMM\"\n\
         kill -KILL $TENANT_A_RVMM\n\
         vm_end tenant_a\n\
         vf_view tenant_a_killed\n\
         claims_view tenant_a_killed\n\
         vm_start tenant_b {hold} --api-socket /tmp/tenant_b.sock --vf \"pf=$PF,id=net0\"\n\
         vm_wait_text tenant_b 'GUEST vf_hold'\n\
         vf_view tenant_b\n\
         ctl tenant_b_shutdown --api-socket /tmp/tenant_b.sock shutdown\n\
         vm_end tenant_b\n\
         vf_view after_tenants\n\
         claims_view after_tenants\n",
        hold = cmdline(HOLD),
    );
    s
}

fn run() -> &'static TestHostOutput {
    RUN.get(
        || {
            TestHost::new("sriov")
                .nvme_drives(0)
                .igb(true)
                .needs_rvmm(true)
                .scenario(&scenario())
        },
        Duration::from_secs(1200),
    )
}

fn vm(name: &str) -> Section<'static> {
    run().section(name)
}

/// One VF as the test host's iproute2 showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VfView {
    index: u16,
    mac: String,
    vlan: u16,
    spoofchk: String,
    trust: String,
}

/// Every VF of `HOST vf_view <label>`, by index.
fn vf_view(label: &str) -> Vec<VfView> {
    let all = run().all();
    let views: Vec<VfView> = all
        .host_all("vf_view")
        .iter()
        .filter(|m| m.word(0) == Some(label))
        .filter_map(|m| {
            Some(VfView {
                index: m.word(1)?.parse().ok()?,
                mac: m.field("mac")?.to_string(),
                vlan: m.field("vlan")?.parse().ok()?,
                spoofchk: m.field("spoofchk")?.to_string(),
                trust: m.field("trust")?.to_string(),
            })
        })
        .collect();
    all.check(
        views.len() == 2,
        &format!(
            "the test host showed {} VFs at '{label}', not 2",
            views.len()
        ),
    );
    views
}

/// The VF `label`'s view shows at `index`.
fn vf_at(label: &str, index: u16) -> VfView {
    match vf_view(label).into_iter().find(|v| v.index == index) {
        Some(view) => view,
        None => run()
            .all()
            .fail(&format!("no VF {index} in the test host's view '{label}'")),
    }
}

/// The index and address of the VF rvmm logged taking in `run` ("took VF <n> (<bdf>)").
fn took(run: &Section<'_>) -> (u16, String) {
    let line = run
        .host_all("rvmm_out")
        .into_iter()
        .find_map(|m| m.value.split_once("took VF ").map(|(_, rest)| rest));
    let parsed = line.and_then(|rest| {
        let mut words = rest.split_whitespace();
        let index = words.next()?.parse().ok()?;
        let bdf = words.next()?.trim_matches(|c| c == '(' || c == ')');
        Some((index, bdf.to_string()))
    });
    match parsed {
        Some(took) => took,
        None => run.fail("rvmm did not log which VF it took"),
    }
}

/// The guest's `GUEST vf_mac <if> <mac>`: its interface's MAC address.
fn guest_mac<'a>(run: &Section<'a>) -> Marker<'a> {
    let marker = run.expect_guest("vf_mac");
    run.check(
        marker.word(1).is_some_and(|mac| mac.contains(':')),
        &format!(
            "the guest has no VF interface: 'GUEST vf_mac {}'",
            marker.value
        ),
    );
    marker
}

/// The `HOST ctl_json <label>` answer.
fn ctl_json(label: &str) -> String {
    let all = run().all();
    let rc = all
        .host_all("ctl")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .and_then(|m| m.field("rc"));
    let err = all
        .host_all("ctl_err")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .map(|m| m.value.to_string())
        .unwrap_or_default();
    all.check(
        rc == Some("0"),
        &format!("rvmm ctl {label} failed (rc={rc:?}): {err}"),
    );
    all.host_all("ctl_json")
        .into_iter()
        .find(|m| m.word(0) == Some(label))
        .map(|m| m.value.to_string())
        .unwrap_or_default()
}

#[test]
fn vms_started_together_get_different_vfs() {
    let (a, a_bdf) = took(&vm("pair_a"));
    let (b, b_bdf) = took(&vm("pair_b"));

    vm("pair_b").check(
        a != b && a_bdf != b_bdf,
        &format!("both VMs took VF {a} ({a_bdf} / {b_bdf})"),
    );
}

#[test]
fn both_guests_of_the_pair_held_until_shut_down() {
    for name in ["pair_a", "pair_b"] {
        let run = vm(name);
        run.check(run.rvmm_exit() == 0, "rvmm did not exit 0");
        run.expect_guest("vf_hold");
        run.check(
            run.guest("vf_hold_done").is_none(),
            "the guest ended its hold before the test host had looked",
        );
    }
}

#[test]
fn guest_interface_has_the_given_mac() {
    let run = vm("pair_a");

    let mac = guest_mac(&run);

    assert_eq!(mac.word(1), Some(PAIR_A_MAC));
}

#[test]
fn guest_interface_has_the_derived_mac_rvmm_reports() {
    let run = vm("pair_b");
    let info = ctl_json("pair_b_info");
    let mac = guest_mac(&run).word(1).unwrap_or_default().to_string();

    run.check(
        info.contains(&format!("\"mac\": \"{mac}\"")),
        &format!("info does not report the guest's MAC {mac}: {info}"),
    );
    let first_octet = u8::from_str_radix(mac.get(..2).unwrap_or_default(), 16).unwrap_or(1);
    run.check(
        first_octet & 0x03 == 0x02,
        &format!("derived MAC {mac} is not a locally administered unicast address"),
    );
}

#[test]
fn host_shows_the_vlan_and_spoof_checking_of_each_vm() {
    let (a, _) = took(&vm("pair_a"));
    let (b, _) = took(&vm("pair_b"));
    let b_mac = guest_mac(&vm("pair_b"))
        .word(1)
        .unwrap_or_default()
        .to_string();

    let va = vf_at("pair", a);
    let vb = vf_at("pair", b);

    assert_eq!(
        (va.mac.as_str(), va.vlan, va.spoofchk.as_str()),
        (PAIR_A_MAC, 100, "on")
    );
    assert_eq!(
        (vb.mac.as_str(), vb.vlan, vb.spoofchk.as_str()),
        (b_mac.as_str(), 200, "off")
    );
}

#[test]
fn info_reports_the_vf_and_its_policy() {
    let (b, _) = took(&vm("pair_b"));

    let info = ctl_json("pair_b_info");

    for field in [
        format!("\"index\": {b}"),
        "\"vlan\": 200".to_string(),
        "\"spoofchk\": false".to_string(),
    ] {
        assert!(info.contains(&field), "no {field} in {info}");
    }
}

#[test]
fn claims_name_the_holding_processes_while_the_vms_run() {
    let all = run().all();
    let claims: Vec<Marker<'_>> = all
        .host_all("claim")
        .into_iter()
        .filter(|m| m.word(0) == Some("pair"))
        .collect();

    let held = claims.iter().filter(|m| m.value.contains("pid=")).count();

    all.check(
        held == 2,
        &format!("{held} claim files name a holder: {claims:?}"),
    );
}

#[test]
fn vf_settings_are_restored_when_the_vms_end() {
    let initial = vf_view("initial");

    let after = vf_view("after_pair");

    assert_eq!(after, initial);
}

#[test]
fn initial_vfs_have_no_mac_and_default_policy() {
    let v = vf_at("initial", 0);

    assert_eq!(
        (v.mac.as_str(), v.vlan, v.trust.as_str()),
        (NO_MAC, 0, "off")
    );
}

#[test]
fn claims_keep_the_baseline_and_name_no_holder_when_the_vms_end() {
    let all = run().all();
    let claims: Vec<Marker<'_>> = all
        .host_all("claim")
        .into_iter()
        .filter(|m| m.word(0) == Some("after_pair"))
        .collect();

    all.check(!claims.is_empty(), "no claim files after the pair");
    for claim in &claims {
        all.check(
            !claim.value.contains("pid=") && claim.value.contains("baseline_vlan=0"),
            &format!("a released claim should keep only the VF's baseline: {claim:?}"),
        );
    }
}

#[test]
fn untrusted_guest_cannot_change_its_mac() {
    let run = vm("trust_off");

    let change = run.expect_guest("vf_mac_change");
    let after = run.expect_guest("vf_mac_after");

    run.check(
        change.field("rc") != Some("0"),
        &format!("the guest's MAC change succeeded: {}", change.value),
    );
    assert_eq!(after.word(1), Some(TRUST_MAC));
}

#[test]
fn untrusted_guest_leaves_the_host_side_mac_unchanged() {
    let (index, _) = took(&vm("trust_off"));

    let view = vf_at("trust_off", index);

    assert_eq!((view.mac.as_str(), view.trust.as_str()), (TRUST_MAC, "off"));
}

#[test]
fn trusted_guest_changes_its_mac() {
    let run = vm("trust_on");

    let change = run.expect_guest("vf_mac_change");
    let after = run.expect_guest("vf_mac_after");

    run.check(
        change.field("rc") == Some("0"),
        &format!("the trusted guest's MAC change failed: {}", change.value),
    );
    assert_eq!(after.word(1), Some(GUEST_NEW_MAC));
}

#[test]
fn trusted_guest_changes_the_host_side_mac() {
    let (index, _) = took(&vm("trust_on"));

    let view = vf_at("trust_on", index);

    assert_eq!(
        (view.mac.as_str(), view.trust.as_str()),
        (GUEST_NEW_MAC, "on")
    );
}

#[test]
fn trust_and_mac_are_restored_after_the_trusted_guest() {
    assert_eq!(vf_view("after_trust"), vf_view("initial"));
}

#[test]
fn hot_added_vf_reaches_the_guest_with_its_mac() {
    let info = ctl_json("hot_add");

    let mac = guest_mac(&vm("hot"));

    assert_eq!(mac.word(1), Some(HOT_MAC));
    assert!(info.contains("\"id\": \"hot0\""), "{info}");
}

#[test]
fn hot_added_vf_has_its_policy_on_the_host() {
    let (holder, _) = took(&vm("holder"));
    let hot = 1 - holder.min(1);

    let view = vf_at("hot_added", hot);

    assert_eq!(
        (view.mac.as_str(), view.vlan, view.spoofchk.as_str()),
        (HOT_MAC, 300, "off")
    );
}

#[test]
fn no_free_vf_is_a_clear_error_naming_the_holders() {
    let run = vm("novf");
    let stderr = run.stderr();

    run.check(run.rvmm_exit() == 1, "rvmm did not exit with 1");
    for needle in [
        "no free VF on physical function",
        "VM ",
        " as net0",
        " as hot0",
        "(rvmm)",
    ] {
        run.check(
            stderr.contains(needle),
            &format!("the error does not name '{needle}': {stderr}"),
        );
    }
}

#[test]
fn hot_removed_vf_has_its_settings_restored() {
    let (holder, _) = took(&vm("holder"));
    let hot = 1 - holder.min(1);

    let removed = vf_at("hot_removed", hot);

    assert_eq!(removed, vf_at("initial", hot));
}

#[test]
fn hot_removed_vf_claim_is_released() {
    let all = run().all();
    let claims: Vec<Marker<'_>> = all
        .host_all("claim")
        .into_iter()
        .filter(|m| m.word(0) == Some("hot_removed"))
        .collect();

    let held = claims.iter().filter(|m| m.value.contains("pid=")).count();

    all.check(
        held == 1,
        &format!("{held} claims held after the hot-remove (only holder's should be): {claims:?}"),
    );
}

#[test]
fn another_vm_takes_the_vf_given_back() {
    let (holder, _) = took(&vm("holder"));
    let (taker, _) = took(&vm("taker"));

    let view = vf_at("taker", taker);

    assert_eq!(taker, 1 - holder.min(1));
    assert_eq!(view.vlan, 400);
    vm("taker").expect_guest("vf_mac");
}

#[test]
fn every_vf_is_back_to_its_first_state_at_the_end() {
    assert_eq!(vf_view("final"), vf_view("initial"));
}

// --- tenant isolation --------------------------------------------------------------------------

#[test]
fn killed_tenant_left_its_policy_on_the_vf() {
    // The precondition of the isolation test: SIGKILL ran no destructor.
    let (a, _) = took(&vm("tenant_a"));
    let left = vf_at("tenant_a_killed", a);

    assert_eq!(
        (left.vlan, left.trust.as_str(), left.spoofchk.as_str()),
        (77, "on", "off")
    );
    vm("tenant_a").check(
        vm("tenant_a").rvmm_exit() == 137,
        "tenant A's rvmm was not killed by SIGKILL",
    );
}

#[test]
fn next_tenant_gets_the_same_vf_clean() {
    let (a, _) = took(&vm("tenant_a"));
    let b_run = vm("tenant_b");
    let (b, _) = took(&b_run);

    let view = vf_at("tenant_b", b);

    b_run.check(
        a == b,
        &format!("tenant B got VF {b}, not tenant A's VF {a}"),
    );
    assert_eq!(
        (view.vlan, view.trust.as_str(), view.spoofchk.as_str()),
        (0, "off", "on"),
        "tenant B's VF: {view:?}"
    );
    assert_ne!(view.mac, TENANT_A_MAC);
}

#[test]
fn next_tenant_restores_the_vf_before_taking_it() {
    let b_run = vm("tenant_b");

    b_run.check(
        b_run
            .host_all("rvmm_out")
            .iter()
            .any(|m| m.value.contains("ended without giving it back")),
        "tenant B's rvmm did not report restoring the VF tenant A left",
    );
}

#[test]
fn vfs_are_back_to_their_first_state_after_the_tenants() {
    assert_eq!(vf_view("after_tenants"), vf_view("initial"));
}
