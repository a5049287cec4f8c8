//! SR-IOV VF pools with port policy: rvmm takes a free VF of a physical function, sets its port
//! policy on the PF and hands it to vfio-pci; on release it puts everything back.
//!
//! - [`pool`]: the PF (by PCI address or interface name) and its VFs from sysfs, and whether the
//!   host uses a VF.
//! - [`claim`]: an `flock`ed file per VF under `/run/rvmm/vf/`, so two rvmm processes never get
//!   the same VF and a crashed one's claims vanish with it.
//! - [`policy`]: MAC address, VLAN, spoof checking and trust; the stable MAC derived from the VM
//!   and device names.
//! - [`netlink`]: reading and setting those on the PF through rtnetlink.
//! - [`bind`]: `driver_override` to vfio-pci and back.
//! - [`Sriov::take`] ties them together and returns a [`VfLease`]; [`VfLease::release`] (or
//!   dropping it) undoes it in reverse order.

pub mod bind;
pub mod claim;
mod lease;
pub mod netlink;
pub mod policy;
pub mod pool;

use std::fmt;

use thiserror::Error;

use rvmm_pci::Bdf;

pub use bind::{BindError, Binding, DriverState};
pub use claim::{ClaimDir, ClaimError, ClaimRecord, Holder};
pub use lease::{Sriov, VfLease, VfOwner, VfRequest};
pub use netlink::{NetlinkError, RouteNetlink, VfControl};
pub use policy::{derive_mac, MacAddress, MacError, VfPolicy, VfSetting, VfSettings};
pub use pool::{
    HostUse, PfSpec, PfSpecError, PhysicalFunction, PoolError, PoolSysfs, VirtualFunction,
};

/// Why a VF of the pool is not free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TakenBy {
    /// Another rvmm (or this one) claims it.
    Claim(Holder),
    /// The host uses it.
    Host(HostUse),
    /// It could not be restored after an earlier tenant and is out of use (its claim file says
    /// why; an operator removes the file once the VF is checked).
    Quarantined {
        /// Why.
        reason: String,
        /// The claim file to remove.
        claim_file: std::path::PathBuf,
    },
}

/// A VF that is not free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakenVf {
    /// The VF.
    pub vf: VirtualFunction,
    /// Who has it.
    pub by: TakenBy,
}

impl fmt::Display for TakenVf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VF {} ({}) ", self.vf.index, self.vf.bdf)?;
        match &self.by {
            TakenBy::Claim(holder) => write!(f, "claimed by {holder}"),
            TakenBy::Host(using) => using.fmt(f),
            TakenBy::Quarantined { reason, claim_file } => write!(
                f,
                "quarantined ({reason}; check the VF, then remove {})",
                claim_file.display()
            ),
        }
    }
}

fn list(taken: &[TakenVf]) -> String {
    taken
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Errors of taking or giving back a VF.
#[derive(Debug, Error)]
pub enum SriovError {
    /// The PF cannot be used.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The claim directory or a claim file cannot be used.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// Every VF is taken.
    #[error("no free VF on physical function {pf} ({netdev}): {}; release one, or create more VFs while none is in use (echo 0, then echo N, > /sys/bus/pci/devices/{pf}/sriov_numvfs; N up to {total})", list(.taken))]
    NoFreeVf {
        /// The PF.
        pf: Bdf,
        /// Its interface.
        netdev: String,
        /// Most VFs it supports.
        total: u16,
        /// Each VF and who has it.
        taken: Vec<TakenVf>,
    },
    /// The VF's settings cannot be read from the PF.
    #[error("cannot read the settings of VF {vf} from physical function {pf} ({netdev})")]
    ReadSettings {
        /// The PF.
        pf: Bdf,
        /// Its interface.
        netdev: String,
        /// The VF index.
        vf: u16,
        /// The rtnetlink error.
        #[source]
        source: NetlinkError,
    },
    /// The PF (its driver or the kernel) refused a setting.
    #[error("physical function {pf} ({netdev}) refused {setting} on VF {vf}")]
    Refused {
        /// The PF.
        pf: Bdf,
        /// Its interface.
        netdev: String,
        /// The VF index.
        vf: u16,
        /// The setting.
        setting: VfSetting,
        /// The rtnetlink error (with the errno).
        #[source]
        source: NetlinkError,
    },
    /// The VF cannot be bound to vfio-pci or given back.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Result of VF pool operations.
pub type Result<T> = std::result::Result<T, SriovError>;

#[cfg(test)]
mod fake;
