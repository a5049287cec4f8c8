//! `--hotplug native|acpi`: how the guest learns about hotplug.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How hotplug reaches the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HotplugMode {
    /// Native PCIe hotplug: the guest's `pciehp` drives each root port's slot (attention
    /// button, power controller, indicators), as on physical servers. The default.
    #[default]
    Native,
    /// ACPI hotplug: `_OSC` keeps native hotplug from the guest; each slot is an ejectable ACPI
    /// device notified through the GED (Linux: `acpiphp`). Graceful removal does not wait for
    /// pciehp's 5-second attention-button delay.
    Acpi,
}

/// A `--hotplug` value that is neither `native` nor `acpi`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown hotplug mode \"{0}\": give native (PCIe hotplug, the default) or acpi (ACPI hotplug)"
)]
pub struct InvalidHotplugMode(String);

impl FromStr for HotplugMode {
    type Err = InvalidHotplugMode;

    fn from_str(s: &str) -> Result<Self, InvalidHotplugMode> {
        match s {
            "native" => Ok(HotplugMode::Native),
            "acpi" => Ok(HotplugMode::Acpi),
            _ => Err(InvalidHotplugMode(s.chars().take(40).collect())),
        }
    }
}

impl fmt::Display for HotplugMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HotplugMode::Native => "native",
            HotplugMode::Acpi => "acpi",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in [HotplugMode::Native, HotplugMode::Acpi] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        assert_eq!(HotplugMode::default(), HotplugMode::Native);
    }

    #[test]
    fn unknown_mode_is_refused_with_the_choices() {
        let e = "pciehp".parse::<HotplugMode>().unwrap_err().to_string();
        assert!(
            e.contains("pciehp") && e.contains("native") && e.contains("acpi"),
            "{e}"
        );
    }

    #[test]
    fn mode_serialises_lowercase() {
        assert_eq!(
            serde_json::to_string(&HotplugMode::Acpi).unwrap(),
            "\"acpi\""
        );
    }
}
