//! The 64-bit window each cold-plugged device needs, read from the host before the PCI segment
//! is built, so that the root port a device is attached to at boot gets a window that holds its
//! 64-bit prefetchable BARs (a GPU's 128 GiB BAR) even when the even share of the ports is
//! smaller.

use std::path::Path;

use crate::device::{DeviceSource, DeviceSpec};

/// `IORESOURCE_MEM` in a sysfs `resource` line's flags.
const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_PREFETCH`.
const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
/// `IORESOURCE_MEM_64`.
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// The BAR lines of a `resource` file (BARs 0-5; the ROM and bridge windows follow).
const BAR_LINES: usize = 6;

/// The 64-bit window each device of `devices` needs, in order (boot devices take the root
/// ports in order): the smallest power of two holding its 64-bit prefetchable BARs placed
/// largest first, naturally aligned; 0 for a device without such BARs, a VF taken from a pool
/// (not chosen yet) or a device whose sysfs cannot be read (its BARs are then checked, and
/// refused with the sizes if they do not fit, when it is attached).
pub fn mmio64_minimums(devices: &[DeviceSpec], sysfs_devices: &Path) -> Vec<u64> {
    devices
        .iter()
        .map(|spec| match &spec.source {
            DeviceSource::Host(bdf) => {
                std::fs::read_to_string(sysfs_devices.join(bdf.to_string()).join("resource"))
                    .map_or(0, |text| mmio64_need(&text))
            }
            DeviceSource::Vf(_) => 0,
        })
        .collect()
}

/// The window the 64-bit prefetchable BARs of a sysfs `resource` file need.
fn mmio64_need(resource: &str) -> u64 {
    let total = resource
        .lines()
        .take(BAR_LINES)
        .filter_map(|line| {
            let mut fields = line
                .split_whitespace()
                .map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok());
            let (start, end, flags) = (fields.next()??, fields.next()??, fields.next()??);
            let wanted = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64;
            (flags & wanted == wanted && end > start)
                .then(|| (end - start).checked_add(1))
                .flatten()
        })
        .map(|size| size.checked_next_power_of_two().unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add);
    if total == 0 {
        0
    } else {
        total.checked_next_power_of_two().unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test host's ivshmem-plain with a 128 GiB BAR 2.
    const IVSHMEM: &str = "\
0x00000000fe800000 0x00000000fe8000ff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000038000000000 0x0000039fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn a_128g_prefetchable_64_bit_bar_needs_128g() {
        assert_eq!(mmio64_need(IVSHMEM), 128 << 30);
    }

    #[test]
    fn several_bars_need_the_power_of_two_above_their_sum() {
        let text = "\
0x0000004000000000 0x00000043ffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000004400000000 0x0000004400ffffff 0x000000000014220c
";
        assert_eq!(mmio64_need(text), 32 << 30);
    }

    #[test]
    fn bars_that_are_not_64_bit_prefetchable_need_nothing() {
        // NVMe: a 64-bit non-prefetchable BAR 0; an I/O BAR; garbage.
        let text = "\
0x00000000febf0000 0x00000000febf3fff 0x0000000000140204
0x000000000000c000 0x000000000000c03f 0x0000000000040101
not a line
";
        assert_eq!(mmio64_need(text), 0);
        assert_eq!(mmio64_need(""), 0);
    }

    #[test]
    fn an_unreadable_device_needs_nothing() {
        let spec: DeviceSpec = "0000:7e:1f.7".parse().unwrap();
        assert_eq!(
            mmio64_minimums(&[spec], Path::new("/nonexistent/sysfs")),
            vec![0]
        );
    }
}
