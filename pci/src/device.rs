//! The trait every PCI function implements, and the MSI delivery trait devices get at construction.

/// A PCI function as seen through configuration space.
///
/// Offsets are decoded by the caller (ECAM or 0xCF8/0xCFC) into a dword register index
/// `reg` (0..1024) and a byte `offset` within that dword (0..4). Implementations must accept any
/// value of both (an index past their config space reads as zero and ignores writes) and any
/// `data` length, ignoring lengths other than 1, 2 and 4 and accesses that cross the dword.
pub trait PciDevice: Send {
    /// Reads the 32-bit config register `reg`.
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of config register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// A reset of the bus the function is on (the bridge above set Secondary Bus Reset). By
    /// default nothing happens.
    fn reset(&mut self) {}
}

/// An MSI message as programmed by the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (64-bit).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Delivers an MSI to the guest (the VMM implements it with `KVM_SIGNAL_MSI`).
pub trait MsiSender: Send + Sync {
    /// Sends `msg` to the guest.
    fn send(&self, msg: MsiMessage) -> std::io::Result<()>;
}
