//! The host's interrupt counts of passthrough devices, from `/proc/interrupts`.
//!
//! vfio-pci names each host interrupt it requests after the device: `vfio-msix[N](BDF)`,
//! `vfio-msi[N](BDF)`, `vfio-intx(BDF)`. A line of `/proc/interrupts` holds the IRQ, one count
//! per online host CPU (as many as the header names), the chip and the names of the handlers
//! (comma-separated when the IRQ is shared). Lines that do not fit are skipped, never trusted.

use std::collections::BTreeMap;

use rvmm_pci::Bdf;
use serde::{Deserialize, Serialize};

/// The file read.
pub const PROC_INTERRUPTS: &str = "/proc/interrupts";
/// Most bytes of it read (a host with thousands of IRQs and CPUs stays far below).
pub const MAX_PROC_INTERRUPTS: u64 = 16 << 20;

/// The kind of a passthrough device's host interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VectorKind {
    /// An MSI-X vector.
    Msix,
    /// An MSI vector.
    Msi,
    /// The legacy INTx line.
    Intx,
}

/// Delivered interrupts of one vector of one device, summed over the host CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorCount {
    /// MSI-X, MSI or INTx.
    pub kind: VectorKind,
    /// The vector (0 for INTx).
    pub vector: u32,
    /// The host IRQ number.
    pub irq: u32,
    /// Interrupts the host took on it, all CPUs together.
    pub count: u64,
}

/// The host interrupts of every vfio device in `text` (the contents of `/proc/interrupts`),
/// by host address, each device's vectors sorted by kind and vector.
pub fn parse(text: &str) -> BTreeMap<Bdf, Vec<VectorCount>> {
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .map(|h| {
            h.split_whitespace()
                .filter(|t| t.starts_with("CPU"))
                .count()
        })
        .unwrap_or(0);
    let mut out: BTreeMap<Bdf, Vec<VectorCount>> = BTreeMap::new();
    for line in lines {
        let Some((label, rest)) = line.split_once(':') else {
            continue;
        };
        // Only numbered IRQs carry device handlers (NMI, LOC, ERR... do not).
        let Ok(irq) = label.trim().parse::<u32>() else {
            continue;
        };
        let count = rest
            .split_whitespace()
            .take(cpus)
            .map_while(|t| t.parse::<u64>().ok())
            .fold(0u64, u64::saturating_add);
        for name in rest
            .split([' ', '\t', ','])
            .filter(|t| t.starts_with("vfio-"))
        {
            if let Some((kind, vector, bdf)) = parse_name(name) {
                out.entry(bdf).or_default().push(VectorCount {
                    kind,
                    vector,
                    irq,
                    count,
                });
            }
        }
    }
    for vectors in out.values_mut() {
        vectors.sort_by_key(|v| (v.kind, v.vector, v.irq));
    }
    out
}

/// `vfio-msix[N](BDF)`, `vfio-msi[N](BDF)` or `vfio-intx(BDF)`.
fn parse_name(name: &str) -> Option<(VectorKind, u32, Bdf)> {
    let rest = name.strip_prefix("vfio-")?;
    let (head, bdf) = rest.strip_suffix(')')?.split_once('(')?;
    let bdf: Bdf = bdf.parse().ok()?;
    let (kind, vector) = match head {
        "intx" => (VectorKind::Intx, 0),
        _ => {
            let (kind, index) = head.strip_suffix(']')?.split_once('[')?;
            let kind = match kind {
                "msix" => VectorKind::Msix,
                "msi" => VectorKind::Msi,
                _ => return None,
            };
            (kind, index.parse().ok()?)
        }
    };
    Some((kind, vector, bdf))
}

/// Reads and parses [`PROC_INTERRUPTS`]; an unreadable file gives no counts (logged).
pub fn read_host() -> BTreeMap<Bdf, Vec<VectorCount>> {
    use std::io::Read;
    let mut text = String::new();
    let read = std::fs::File::open(PROC_INTERRUPTS)
        .and_then(|f| f.take(MAX_PROC_INTERRUPTS).read_to_string(&mut text));
    match read {
        Ok(_) => parse(&text),
        Err(e) => {
            log::warn!("cannot read {PROC_INTERRUPTS}: {e}; no interrupt counts");
            BTreeMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_CPUS: &str = "           CPU0       CPU1       
  0:         44          0   IO-APIC   2-edge      timer
  1:          0          9   IO-APIC   1-edge      i8042
 24:          0          0  PCI-MSIX-0000:00:02.0   0-edge      aerdrv, PCIe PME, pciehp
 40:         12          3  IR-PCI-MSIX-0000:01:00.0    0-edge      vfio-msix[0](0000:01:00.0)
 41:       1000        234  IR-PCI-MSIX-0000:01:00.0    1-edge      vfio-msix[1](0000:01:00.0)
 42:          7          0  IR-PCI-MSI-0000:02:00.0    0-edge      vfio-msi[0](0000:02:00.0)
 16:          5          6   IO-APIC  16-fasteoi   ehci_hcd:usb1, vfio-intx(0000:03:00.0)
NMI:          0          0   Non-maskable interrupts
LOC:      12345      23456   Local timer interrupts
ERR:          0
";

    fn bdf(s: &str) -> Bdf {
        s.parse().expect("valid test address")
    }

    #[test]
    fn msix_vectors_are_summed_over_cpus() {
        let counts = parse(TWO_CPUS);

        let nvme = &counts[&bdf("0000:01:00.0")];

        assert_eq!(
            nvme,
            &vec![
                VectorCount {
                    kind: VectorKind::Msix,
                    vector: 0,
                    irq: 40,
                    count: 15
                },
                VectorCount {
                    kind: VectorKind::Msix,
                    vector: 1,
                    irq: 41,
                    count: 1234
                },
            ]
        );
    }

    #[test]
    fn msi_and_shared_intx_are_found() {
        let counts = parse(TWO_CPUS);

        assert_eq!(counts[&bdf("0000:02:00.0")][0].kind, VectorKind::Msi);
        let intx = &counts[&bdf("0000:03:00.0")][0];
        assert_eq!(
            (intx.kind, intx.irq, intx.count),
            (VectorKind::Intx, 16, 11)
        );
        assert_eq!(counts.len(), 3, "non-vfio handlers are ignored");
    }

    #[test]
    fn counts_stop_at_the_cpu_columns() {
        // One CPU: the chip's number-like field (e.g. "0-edge" is not; a bare "3" could be)
        // never adds to the count.
        let text = "     CPU0\n 40:  5  3  PCI-MSIX  vfio-msix[0](0000:01:00.0)\n";

        assert_eq!(parse(text)[&bdf("0000:01:00.0")][0].count, 5);
    }

    #[test]
    fn garbage_is_skipped() {
        let text = "CPU0\nnot a line\n40: x y vfio-msix[](0000:01:00.0)\n41: 1 vfio-msix[1](zz)\n\
                    42: 1 vfio-foo[1](0000:01:00.0)\n43: 18446744073709551615 vfio-msi[4294967296](0000:01:00.0)\n\
                    44: 2 vfio-msix[2](0000:01:00.0\n";

        assert!(parse(text).is_empty());
    }

    #[test]
    fn empty_text_gives_nothing() {
        assert!(parse("").is_empty());
    }

    #[test]
    fn huge_counts_saturate() {
        let text = "CPU0 CPU1\n40: 18446744073709551615 5 PCI-MSIX vfio-msix[0](0000:01:00.0)\n";

        assert_eq!(parse(text)[&bdf("0000:01:00.0")][0].count, u64::MAX);
    }
}
