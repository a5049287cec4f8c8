//! A VF claim file as the next rvmm reads it (`/run/rvmm/vf/<VF>.lock`): whatever a dead
//! process, a full disk or a hand edit left there goes through `ClaimFile::parse`.
//!
//! Invariants: nothing panics; what parses writes back to a text that parses to the same holder
//! pid, baseline and quarantine (so a claim a process records is the claim the next one reads);
//! a quarantine reason never spans lines.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rvmm_vfio::sriov::claim::{ClaimFile, ClaimRecord};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = ClaimFile::parse(&text);
    let record = file.holder.as_ref().and_then(|h| {
        Some(ClaimRecord {
            pid: h.pid?,
            vm: h.vm.clone().unwrap_or_default(),
            device: h.device.clone().unwrap_or_default(),
        })
    });
    let again = ClaimFile::parse(&file.text_for(record.as_ref()));
    assert_eq!(again.baseline, file.baseline);
    assert_eq!(
        again.holder.and_then(|h| h.pid),
        file.holder.and_then(|h| h.pid)
    );
    let reason = again.quarantined.map(|r| r.replace(['\n', '\r'], "?"));
    let expected = file.quarantined.map(|r| {
        r.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
    });
    assert_eq!(reason, expected);
});
