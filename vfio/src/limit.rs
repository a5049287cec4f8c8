//! The limit on passthrough devices per VM.
//!
//! Each passthrough device sits behind its own root port, takes KVM memory slots for its BARs and
//! GSIs for its vectors; 32 keeps all of that well inside KVM's and our allocators' limits.

use thiserror::Error;

/// Maximum number of passthrough devices one VM may have.
pub const MAX_PASSTHROUGH_DEVICES: usize = 32;

/// Errors of the limit check.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    /// The VM already has the maximum number of passthrough devices.
    #[error(
        "the VM already has {attached} passthrough devices, the maximum is {max}; remove one first"
    )]
    TooMany {
        /// Devices already attached.
        attached: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks that one more device may be attached to a VM that has `attached` passthrough devices.
pub fn check_passthrough_limit(attached: usize) -> Result<(), LimitError> {
    if attached >= MAX_PASSTHROUGH_DEVICES {
        return Err(LimitError::TooMany {
            attached,
            max: MAX_PASSTHROUGH_DEVICES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_second_device_is_accepted() {
        assert_eq!(check_passthrough_limit(31), Ok(()));
    }

    #[test]
    fn thirty_third_device_is_refused() {
        let err = check_passthrough_limit(32).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the VM already has 32 passthrough devices, the maximum is 32; remove one first"
        );
    }
}
