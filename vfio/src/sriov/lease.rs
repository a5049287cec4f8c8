//! Taking a VF from a PF's pool ([`Sriov::take`]) and giving it back ([`VfLease::release`]).
//!
//! Take: find the PF and its VFs; claim the first VF nobody claims, nobody quarantined and the
//! host does not use; record its baseline (the settings and driver it had before any rvmm, kept
//! in the claim file) before changing anything; if the claim file says an earlier holder died
//! without giving the VF back, restore the baseline first (a VF that cannot be restored is
//! quarantined and the next one tried); apply the policy, every setting (those not asked for get
//! the PF's defaults, so nothing of an earlier tenant leaks); bind it to vfio-pci. Any failure
//! undoes what was done so far.
//!
//! Release (after the VMM closed the device): put back every setting that differs from the
//! baseline, newest first, give the VF back to its baseline driver, leave the baseline in the
//! claim file and drop the claim; a VF that cannot be restored is quarantined.

use std::fmt;
use std::sync::Arc;

use super::bind::{Binding, DriverState};
use super::claim::{Baseline, Claim, ClaimDir, ClaimOutcome, ClaimRecord};
use super::netlink::{RouteNetlink, VfControl};
use super::policy::{VfPolicy, VfSetting, VfSettings};
use super::pool::{PfSpec, PhysicalFunction, PoolSysfs, VirtualFunction};
use super::{Result, SriovError, TakenBy, TakenVf};
use rvmm_devices::error_chain;
use rvmm_pci::Bdf;

/// A VF asked for: which PF's pool and what port policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfRequest {
    /// The physical function.
    pub pf: PfSpec,
    /// The port policy.
    pub policy: VfPolicy,
}

/// Who takes the VF: written into its claim and used to derive its MAC address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfOwner {
    /// The VM's name.
    pub vm: String,
    /// The device id in the VM.
    pub device: String,
}

/// The host's VF pools: sysfs, claim files and the PF drivers' rtnetlink.
pub struct Sriov {
    sysfs: PoolSysfs,
    claims: ClaimDir,
    control: Arc<dyn VfControl>,
}

impl Default for Sriov {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Sriov {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sriov")
            .field("sysfs", &self.sysfs)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

impl Sriov {
    /// The real host: `/sys`, claims in `/run/rvmm/vf`, the kernel's rtnetlink.
    pub fn new() -> Self {
        Self::with_parts(
            PoolSysfs::new(),
            ClaimDir::new(),
            Arc::new(RouteNetlink::new()),
        )
    }

    /// Over the given parts (tests).
    pub fn with_parts(sysfs: PoolSysfs, claims: ClaimDir, control: Arc<dyn VfControl>) -> Self {
        Self {
            sysfs,
            claims,
            control,
        }
    }

    /// Takes a free VF of `request.pf` for `owner`, applies `request.policy` and binds the VF
    /// to vfio-pci. The VF is the caller's until the lease is released or dropped.
    pub fn take(&self, request: &VfRequest, owner: &VfOwner) -> Result<VfLease> {
        let pf = self.sysfs.find_pf(&request.pf)?;
        if !pf.up {
            log::warn!(
                "physical function {} ({}) is down: many PF drivers (igb, ixgbe, i40e) answer their VFs only while it is up; bring it up with `ip link set {} up`",
                pf.bdf,
                pf.netdev,
                pf.netdev
            );
        }
        let record = ClaimRecord::this_process(&owner.vm, &owner.device);
        let mut lease = self.claim_free_vf(&pf, &record)?;
        for setting in request.policy.settings(&owner.vm, &owner.device) {
            // The MAC address is always set: that makes it the administrative one, which the
            // PF driver enforces. Other settings already in place are left untouched.
            let needed = matches!(setting, VfSetting::Mac(_))
                || lease.current.same_kind_as(setting) != setting;
            if needed {
                lease.apply(setting)?;
            }
        }
        let vf = lease.vf;
        lease.binding = Some(Binding::to_vfio(
            &self.sysfs,
            vf.bdf,
            lease.baseline_driver.clone(),
        )?);
        log::info!(
            "took VF {} ({}) of {} ({}) for {}/{}: mac {}, vlan {}, spoofchk {}, trust {}",
            vf.index,
            vf.bdf,
            lease.pf,
            lease.netdev,
            owner.vm,
            owner.device,
            lease.current.mac,
            lease.current.vlan,
            lease.current.spoofchk,
            lease.current.trust
        );
        Ok(lease)
    }

    /// Claims the first VF of `pf` that no claim holds, nobody quarantined and the host does
    /// not use, and leases it ([`Sriov::lease`]). The claim comes first, so that two rvmm
    /// processes never inspect the same free VF at once; a VF the host uses is let go again, its
    /// claim file as it was. Without one, the error lists every VF and who has it.
    fn claim_free_vf(&self, pf: &PhysicalFunction, record: &ClaimRecord) -> Result<VfLease> {
        let mut taken = Vec::new();
        for vf in &pf.vfs {
            let claim = match self.claims.try_claim(&vf.bdf, record)? {
                ClaimOutcome::Held(holder) => {
                    taken.push(TakenVf {
                        vf: *vf,
                        by: TakenBy::Claim(holder),
                    });
                    continue;
                }
                ClaimOutcome::Quarantined(reason) => {
                    taken.push(TakenVf {
                        vf: *vf,
                        by: TakenBy::Quarantined {
                            reason,
                            claim_file: self.claims.path_of(&vf.bdf),
                        },
                    });
                    continue;
                }
                ClaimOutcome::Claimed(claim) => claim,
            };
            if let Some(using) = self.sysfs.host_use(vf) {
                taken.push(TakenVf {
                    vf: *vf,
                    by: TakenBy::Host(using),
                });
                continue;
            }
            match self.lease(pf, *vf, claim, record)? {
                Ok(lease) => return Ok(lease),
                Err(reason) => taken.push(TakenVf {
                    vf: *vf,
                    by: TakenBy::Quarantined {
                        reason,
                        claim_file: self.claims.path_of(&vf.bdf),
                    },
                }),
            }
        }
        Err(SriovError::NoFreeVf {
            pf: pf.bdf,
            netdev: pf.netdev.clone(),
            total: pf.total_vfs,
            taken,
        })
    }

    /// Leases claimed VF `vf`: its baseline (recorded in the claim file, or its state now on a
    /// first use) is recorded, synced, before anything changes; a VF whose earlier holder died
    /// without giving it back is restored to it first. `Ok(Err(reason))`: that restore failed
    /// and the VF is quarantined.
    fn lease(
        &self,
        pf: &PhysicalFunction,
        vf: VirtualFunction,
        mut claim: Claim,
        record: &ClaimRecord,
    ) -> Result<std::result::Result<VfLease, String>> {
        let current = self
            .control
            .settings(pf.ifindex, vf.index)
            .map_err(|source| SriovError::ReadSettings {
                pf: pf.bdf,
                netdev: pf.netdev.clone(),
                vf: vf.index,
                source,
            })?;
        let left_by = claim.found().holder.clone();
        let baseline = match claim.found().baseline.clone() {
            Some(baseline) => baseline,
            None => {
                if let Some(holder) = &left_by {
                    log::warn!(
                        "VF {} ({}): {holder} left it without a recorded baseline; its settings now become its baseline",
                        vf.index,
                        vf.bdf
                    );
                }
                Baseline {
                    settings: current,
                    driver: DriverState::read(&self.sysfs, &vf.bdf),
                }
            }
        };
        claim.record(record, &baseline)?;
        let mut lease = VfLease {
            pf: pf.bdf,
            netdev: pf.netdev.clone(),
            ifindex: pf.ifindex,
            vf,
            previous: baseline.settings,
            current,
            baseline_driver: baseline.driver.clone(),
            binding: None,
            claim: Some(claim),
            sysfs: self.sysfs.clone(),
            control: self.control.clone(),
        };
        let Some(holder) = left_by else {
            return Ok(Ok(lease));
        };
        log::warn!(
            "VF {} ({}) of {}: {holder} ended without giving it back; restoring its baseline before it is handed out",
            vf.index,
            vf.bdf,
            pf.bdf
        );
        // Whatever the dead holder bound goes back to the recorded driver.
        lease.binding = Some(Binding::recorded(vf.bdf, baseline.driver));
        let failures = lease.put_back();
        if let Some(first) = failures.first() {
            let reason = format!("restoring it after {holder} failed: {}", error_chain(first));
            lease.quarantine(&reason);
            return Ok(Err(reason));
        }
        Ok(Ok(lease))
    }
}

/// A VF taken from a pool, configured and bound to vfio-pci. Release it (or drop it) only after
/// the device is closed: it goes back to its baseline driver.
pub struct VfLease {
    pf: Bdf,
    netdev: String,
    ifindex: u32,
    vf: VirtualFunction,
    /// The baseline settings: what the VF had before any rvmm, restored on release.
    previous: VfSettings,
    current: VfSettings,
    /// The baseline driver state, put back on release.
    baseline_driver: DriverState,
    binding: Option<Binding>,
    claim: Option<Claim>,
    sysfs: PoolSysfs,
    control: Arc<dyn VfControl>,
}

impl fmt::Debug for VfLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfLease")
            .field("pf", &self.pf)
            .field("netdev", &self.netdev)
            .field("vf", &self.vf)
            .field("previous", &self.previous)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl VfLease {
    /// The VF (its index and PCI address).
    pub fn vf(&self) -> VirtualFunction {
        self.vf
    }

    /// The PF's PCI address.
    pub fn pf(&self) -> Bdf {
        self.pf
    }

    /// The PF's network interface.
    pub fn pf_netdev(&self) -> &str {
        &self.netdev
    }

    /// The VF's port settings as rvmm left them (the guest may have changed its MAC address
    /// since, if trusted).
    pub fn settings(&self) -> VfSettings {
        self.current
    }

    /// The settings it had before any rvmm changed it, which release restores.
    pub fn previous(&self) -> VfSettings {
        self.previous
    }

    fn apply(&mut self, setting: VfSetting) -> Result<()> {
        self.control
            .apply(self.ifindex, self.vf.index, setting)
            .map_err(|source| self.refused(setting, source))?;
        self.current = self.current.with(setting);
        Ok(())
    }

    fn refused(&self, setting: VfSetting, source: super::NetlinkError) -> SriovError {
        SriovError::Refused {
            pf: self.pf,
            netdev: self.netdev.clone(),
            vf: self.vf.index,
            setting,
            source,
        }
    }

    /// Gives the VF back: baseline settings, baseline driver, claim released (the baseline stays
    /// in the claim file). Returns the first failure (the others are logged); a VF that could
    /// not be restored is quarantined.
    pub fn release(mut self) -> Result<()> {
        self.restore()
    }

    /// Puts back every setting that differs from the baseline (as the PF reports them now: a
    /// trusted guest may have changed its MAC address), newest first, then the baseline driver.
    fn put_back(&mut self) -> Vec<SriovError> {
        let now = self
            .control
            .settings(self.ifindex, self.vf.index)
            .unwrap_or(self.current);
        let mut failures = Vec::new();
        for setting in self.previous.all().into_iter().rev() {
            if now.same_kind_as(setting) == setting {
                continue;
            }
            match self.control.apply(self.ifindex, self.vf.index, setting) {
                Ok(()) => self.current = self.current.with(setting),
                Err(source) => failures.push(self.refused(setting, source)),
            }
        }
        if let Some(binding) = self.binding.take() {
            if let Err(e) = binding.restore(&self.sysfs) {
                failures.push(e.into());
            }
        }
        failures
    }

    /// Takes the VF out of use: its claim file keeps the baseline and says why.
    fn quarantine(&mut self, reason: &str) {
        let Some(mut claim) = self.claim.take() else {
            return;
        };
        log::error!(
            "VF {} ({}) of {} ({}) is quarantined: {reason}; check it (`ip link show {}`, its driver), then remove {} to give it back to the pool",
            self.vf.index,
            self.vf.bdf,
            self.pf,
            self.netdev,
            self.netdev,
            claim.path().display()
        );
        if let Err(e) = claim.quarantine(reason) {
            log::error!(
                "VF {}: cannot record its quarantine: {}",
                self.vf.bdf,
                error_chain(&e)
            );
        }
    }

    fn restore(&mut self) -> Result<()> {
        if self.claim.is_none() {
            return Ok(());
        }
        let mut failures = self.put_back().into_iter();
        let Some(first) = failures.next() else {
            self.claim = None;
            log::info!(
                "released VF {} ({}) of {} ({})",
                self.vf.index,
                self.vf.bdf,
                self.pf,
                self.netdev
            );
            return Ok(());
        };
        for e in failures {
            log::warn!(
                "releasing VF {} ({}): {}",
                self.vf.index,
                self.vf.bdf,
                error_chain(&e)
            );
        }
        self.quarantine(&format!(
            "restoring it on release failed: {}",
            error_chain(&first)
        ));
        Err(first)
    }
}

impl Drop for VfLease {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::warn!(
                "releasing VF {} ({}) of {}: {}",
                self.vf.index,
                self.vf.bdf,
                self.pf,
                error_chain(&e)
            );
        }
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
