//! Parsing of the control API's plain values at its edge (VLAN ids, descriptor numbers) and the
//! one error type of every value a request carries: PCI addresses, device ids, MAC addresses and
//! physical functions are the domain's own types ([`rvmm_pci::Bdf`], [`crate::device::DeviceId`],
//! [`rvmm_vfio::sriov::MacAddress`], [`rvmm_vfio::sriov::PfSpec`]), which parse from and
//! serialize to JSON strings themselves. A request that deserializes is well-formed (shape only:
//! nothing here touches the host).

use rvmm_pci::bdf::shown;
use rvmm_pci::BdfError;
use rvmm_vfio::sriov::{MacError, PfSpecError};
use thiserror::Error;

use crate::device::DeviceIdError;

/// Highest VLAN id a VF can be given (4095 is reserved).
pub const MAX_VLAN: u16 = 4094;

/// Errors of parsing an API value.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ValueError {
    /// Not a PCI address or host device.
    #[error(transparent)]
    Bdf(#[from] BdfError),
    /// Not a physical function reference.
    #[error(transparent)]
    PhysicalFunction(#[from] PfSpecError),
    /// Not a usable device id.
    #[error(transparent)]
    DeviceId(#[from] DeviceIdError),
    /// Not a MAC address a VF can be given.
    #[error(transparent)]
    Mac(#[from] MacError),
    /// A VLAN id out of range.
    #[error("invalid VLAN id {given}: use 0 (no VLAN) to {MAX_VLAN}")]
    Vlan {
        /// What was given.
        given: String,
    },
    /// Not a file descriptor number.
    #[error("invalid descriptor '{given}': expected a file descriptor number like 5")]
    Fd {
        /// What was given.
        given: String,
    },
}

/// Parses a VLAN id (0 means none).
pub fn parse_vlan(s: &str) -> Result<u16, ValueError> {
    s.parse::<u16>()
        .ok()
        .filter(|v| *v <= MAX_VLAN)
        .ok_or_else(|| ValueError::Vlan { given: shown(s) })
}

/// A file descriptor number (`group-fd=N`).
pub fn parse_fd(s: &str) -> Result<i32, ValueError> {
    s.parse::<i32>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ValueError::Fd { given: shown(s) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_range_is_0_to_4094() {
        assert_eq!(parse_vlan("0"), Ok(0));
        assert_eq!(parse_vlan("4094"), Ok(4094));
        assert!(parse_vlan("4095").is_err());
        assert!(parse_vlan("-1").is_err());
    }

    #[test]
    fn descriptor_numbers_are_not_negative() {
        assert_eq!(parse_fd("5"), Ok(5));
        assert!(parse_fd("-1").is_err());
        assert!(parse_fd("five").is_err());
    }
}
