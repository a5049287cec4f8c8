//! Taking a VF from a PF's pool ([`Sriov::take`]) and giving it back ([`VfLease::release`]).
//!
//! Take: find the PF and its VFs; claim the first VF nobody claims and the host does not use;
//! read its settings; apply the policy (MAC address always, the rest when asked for and
//! different); bind it to vfio-pci. Any failure undoes what was done so far.
//!
//! Release (after the VMM closed the device): put back every setting it changed, newest first,
//! give the VF back to its previous driver, drop the claim.

use std::fmt;
use std::sync::Arc;

use super::bind::Binding;
use super::claim::{Claim, ClaimDir, ClaimOutcome, ClaimRecord};
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
        let (vf, claim) = self.claim_free_vf(&pf, &record)?;
        let previous = self
            .control
            .settings(pf.ifindex, vf.index)
            .map_err(|source| SriovError::ReadSettings {
                pf: pf.bdf,
                netdev: pf.netdev.clone(),
                vf: vf.index,
                source,
            })?;
        let mut lease = VfLease {
            pf: pf.bdf,
            netdev: pf.netdev,
            ifindex: pf.ifindex,
            vf,
            previous,
            current: previous,
            applied: Vec::new(),
            binding: None,
            claim: Some(claim),
            sysfs: self.sysfs.clone(),
            control: self.control.clone(),
        };
        for setting in request.policy.settings(&owner.vm, &owner.device) {
            // The MAC address is always set: that makes it the administrative one, which the
            // PF driver enforces. Other settings already in place are left untouched.
            let needed = matches!(setting, VfSetting::Mac(_))
                || lease.current.same_kind_as(setting) != setting;
            if needed {
                lease.apply(setting)?;
            }
        }
        lease.binding = Some(Binding::to_vfio(&self.sysfs, vf.bdf)?);
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

    /// Claims the first VF of `pf` that no claim holds and the host does not use. The claim
    /// comes first, so that two rvmm processes never inspect the same free VF at once; a VF the
    /// host uses is let go again. Without one, the error lists every VF and who has it.
    fn claim_free_vf(
        &self,
        pf: &PhysicalFunction,
        record: &ClaimRecord,
    ) -> Result<(VirtualFunction, Claim)> {
        let mut taken = Vec::new();
        for vf in &pf.vfs {
            match self.claims.try_claim(&vf.bdf, record)? {
                ClaimOutcome::Held(holder) => taken.push(TakenVf {
                    vf: *vf,
                    by: TakenBy::Claim(holder),
                }),
                ClaimOutcome::Claimed(claim) => match self.sysfs.host_use(vf) {
                    Some(using) => taken.push(TakenVf {
                        vf: *vf,
                        by: TakenBy::Host(using),
                    }),
                    None => return Ok((*vf, claim)),
                },
            }
        }
        Err(SriovError::NoFreeVf {
            pf: pf.bdf,
            netdev: pf.netdev.clone(),
            total: pf.total_vfs,
            taken,
        })
    }
}

/// A VF taken from a pool, configured and bound to vfio-pci. Release it (or drop it) only after
/// the device is closed: it goes back to its previous driver.
pub struct VfLease {
    pf: Bdf,
    netdev: String,
    ifindex: u32,
    vf: VirtualFunction,
    previous: VfSettings,
    current: VfSettings,
    /// Settings changed, oldest first.
    applied: Vec<VfSetting>,
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
            .field("applied", &self.applied)
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

    /// The settings it had before, which release restores.
    pub fn previous(&self) -> VfSettings {
        self.previous
    }

    fn apply(&mut self, setting: VfSetting) -> Result<()> {
        self.control
            .apply(self.ifindex, self.vf.index, setting)
            .map_err(|source| SriovError::Refused {
                pf: self.pf,
                netdev: self.netdev.clone(),
                vf: self.vf.index,
                setting,
                source,
            })?;
        self.applied.push(setting);
        self.current = self.current.with(setting);
        Ok(())
    }

    /// Gives the VF back: previous settings, previous driver, claim released. Returns the first
    /// failure (the others are logged); the claim is released in any case.
    pub fn release(mut self) -> Result<()> {
        self.restore()
    }

    fn restore(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        while let Some(setting) = self.applied.pop() {
            let back = self.previous.same_kind_as(setting);
            match self.control.apply(self.ifindex, self.vf.index, back) {
                Ok(()) => self.current = self.current.with(back),
                Err(source) => failures.push(SriovError::Refused {
                    pf: self.pf,
                    netdev: self.netdev.clone(),
                    vf: self.vf.index,
                    setting: back,
                    source,
                }),
            }
        }
        if let Some(binding) = self.binding.take() {
            if let Err(e) = binding.restore(&self.sysfs) {
                failures.push(e.into());
            }
        }
        if self.claim.take().is_some() {
            log::info!(
                "released VF {} ({}) of {} ({})",
                self.vf.index,
                self.vf.bdf,
                self.pf,
                self.netdev
            );
        }
        let mut failures = failures.into_iter();
        let first = failures.next();
        for e in failures {
            log::warn!(
                "releasing VF {} ({}): {}",
                self.vf.index,
                self.vf.bdf,
                error_chain(&e)
            );
        }
        first.map_or(Ok(()), Err)
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
