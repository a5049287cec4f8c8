//! The virtual config space of a passthrough device.
//!
//! Every dword has a policy: which bits read from our virtual copy (the rest read live from the
//! device), which bytes of a guest write reach the device, and which bits of those keep the
//! device's current value. BARs, the expansion ROM, MSI and MSI-X are emulated; capability
//! pointers are re-linked to hide capabilities the guest must not use (conventional PCI AF,
//! ARI, SR-IOV, Resizable BAR); PCIe control fields that could break the host (FLR initiate,
//! link disable, retrain, ASPM, MPS) keep their host value. A guest's Initiate FLR is reported
//! ([`ConfigWrite::flr`]) and carried out by the device model through VFIO. The AER capability
//! is the guest's own, emulated ([`crate::aer`]).

use std::io;
use std::ops::Range;

use rvmm_devices::{log_throttled, warn_throttled, LogThrottle};
use thiserror::Error;
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

use crate::access::{byte_mask, merge_write};
use crate::aer::VirtualAer;
use crate::backend::DeviceBackend;
use crate::bars::{BarError, Bars, BAR0_REG, NUM_BARS, ROM_REG};
use crate::caps::{self, CAP_ID_AF, CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX, EXT_CAP_START};
use crate::interrupts::{Interrupts, IrqMode};
use crate::msi::{MsiCap, MsiWrite};
use crate::msix::{MsixState, MsixWrite};

const STD_SIZE: usize = 0x100;
const COMMAND_REG: usize = 1;
const HEADER_TYPE: usize = 0x0e;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

/// Command register: I/O space decode.
pub const COMMAND_IO: u16 = 0x1;
/// Command register: memory space decode.
pub const COMMAND_MEMORY: u16 = 0x2;
/// Command register: bus master.
pub const COMMAND_BUS_MASTER: u16 = 0x4;

// PCIe capability registers (offsets from the capability) and protected bits.
const EXP_DEVCAP: usize = 0x04;
const EXP_DEVCAP_FLR: u32 = 1 << 28;
const EXP_DEVCTL: usize = 0x08;
/// MPS (7:5), phantom functions (9), initiate FLR (15).
const EXP_DEVCTL_KEEP: u32 = 0x0000_82e0;
/// Device Control: Initiate Function Level Reset.
const EXP_DEVCTL_FLR: u32 = 1 << 15;
const EXP_LNKCTL: usize = 0x10;
/// ASPM control (1:0), link disable (4), retrain link (5).
const EXP_LNKCTL_KEEP: u32 = 0x0000_0033;
const EXP_DEVCTL2: usize = 0x28;
/// ARI forwarding enable (5).
const EXP_DEVCTL2_KEEP: u32 = 0x0000_0020;

/// Errors of building the virtual config space.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The VFIO config region is missing or too small.
    #[error("config region of {size} bytes is smaller than a PCI header")]
    TooSmall {
        /// Its size.
        size: u64,
    },
    /// Reading the config space failed.
    #[error("cannot read the device's config space")]
    Read(#[source] io::Error),
    /// The function is not a type 0 (endpoint) function.
    #[error(
        "header type {header_type:#x} is not an endpoint; only endpoints can be passed through"
    )]
    NotEndpoint {
        /// The header type read.
        header_type: u8,
    },
    /// The BARs are unusable.
    #[error("invalid BARs")]
    Bars(#[source] BarError),
}

/// What a guest config write changed that the device must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The command register (decode or bus master bits may have moved).
    pub command: bool,
    /// A BAR or the ROM register.
    pub bars: bool,
    /// The MSI capability.
    pub msi: MsiWrite,
    /// The MSI-X capability control.
    pub msix: MsixWrite,
    /// The guest set Initiate Function Level Reset in Device Control.
    pub flr: bool,
    /// The guest cleared uncorrectable error status bits of the emulated AER capability (the
    /// last step of its error recovery).
    pub aer_cleared: bool,
}

impl ConfigWrite {
    const NONE: Self = Self {
        command: false,
        bars: false,
        msi: MsiWrite::None,
        msix: MsixWrite::None,
        flr: false,
        aer_cleared: false,
    };
}

#[derive(Clone, Copy, Debug, Default)]
struct RegPolicy {
    /// Bits read from the virtual copy.
    virt: u32,
    /// Bytes (as a bit mask) of guest writes forwarded to the device.
    write: u32,
    /// Bits of forwarded bytes that keep the device's current value.
    keep: u32,
}

/// The virtual config space.
pub struct VirtualConfig {
    shadow: Vec<u8>,
    policy: Vec<RegPolicy>,
    bars: Bars,
    msi: Option<MsiCap>,
    msix: Option<MsixState>,
    /// Offset of the PCI Express capability.
    exp: Option<usize>,
    /// The emulated AER capability.
    aer: Option<VirtualAer>,
    command: u16,
    /// Limits what a guest can make us log through config accesses.
    throttle: LogThrottle,
}

fn dword(cfg: &[u8], offset: usize) -> u32 {
    cfg.get(offset..offset.saturating_add(4))
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn read_config(backend: &dyn DeviceBackend) -> Result<Vec<u8>, ConfigError> {
    let size = backend
        .region(VFIO_PCI_CONFIG_REGION_INDEX)
        .map_or(0, |r| r.size);
    if size < STD_SIZE as u64 {
        return Err(ConfigError::TooSmall { size });
    }
    let size = if size >= caps::EXT_CONFIG_SIZE as u64 {
        caps::EXT_CONFIG_SIZE
    } else {
        STD_SIZE
    };
    let mut cfg = vec![0u8; size];
    if let Err(e) = backend.read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg) {
        // Some hosts refuse the extended space; fall back to the standard header.
        if size == STD_SIZE {
            return Err(ConfigError::Read(e));
        }
        log::warn!("cannot read extended config space ({e}); exposing 256 bytes");
        cfg.truncate(STD_SIZE);
        backend
            .read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
            .map_err(ConfigError::Read)?;
    }
    Ok(cfg)
}

impl VirtualConfig {
    /// Reads the device's config space and builds the virtual one. `bar_sizes` and `rom_size`
    /// are the VFIO region sizes; `intx` says whether the guest gets an INTx line.
    pub fn new(
        backend: &dyn DeviceBackend,
        bar_sizes: [u64; NUM_BARS],
        rom_size: u64,
        intx: bool,
    ) -> Result<Self, ConfigError> {
        let real = read_config(backend)?;
        let header_type = real.get(HEADER_TYPE).copied().unwrap_or(0);
        if header_type & 0x7f != 0 {
            return Err(ConfigError::NotEndpoint { header_type });
        }
        let mut raw_bars = [0u32; NUM_BARS];
        for (i, raw) in raw_bars.iter_mut().enumerate() {
            *raw = dword(&real, (BAR0_REG + i) * 4);
        }
        let bars = Bars::new(raw_bars, bar_sizes, rom_size).map_err(ConfigError::Bars)?;

        let mut shadow = real.clone();
        let all = RegPolicy {
            virt: 0,
            write: u32::MAX,
            keep: 0,
        };
        let mut this = Self {
            policy: vec![all; real.len() / 4],
            shadow: Vec::new(),
            bars,
            msi: None,
            msix: None,
            exp: None,
            aer: None,
            command: 0,
            throttle: LogThrottle::default(),
        };

        this.virtualize_header(&real, &mut shadow, intx);
        this.virtualize_caps(&real, &mut shadow, backend.can_reset());
        this.virtualize_ext_caps(&mut shadow);
        this.place_aer(&mut shadow);
        this.shadow = shadow;
        Ok(this)
    }

    /// Header: IDs, class, header type, BIST, BARs, CIS, subsystem, ROM, pointers and the
    /// interrupt line/pin are virtual; cache line size, latency timer, command and status pass
    /// through. The pin is kept only when the guest gets an INTx line.
    fn virtualize_header(&mut self, real: &[u8], shadow: &mut [u8], intx: bool) {
        self.virtualize(0x00..0x04);
        self.virtualize(0x08..0x0c);
        self.virtualize(0x0e..0x40);
        if let Some(b) = shadow.get_mut(HEADER_TYPE) {
            *b &= 0x7f;
        }
        if let Some(b) = shadow.get_mut(INTERRUPT_LINE) {
            *b = 0;
        }
        let pin = real.get(INTERRUPT_PIN).copied().unwrap_or(0);
        if let Some(b) = shadow.get_mut(INTERRUPT_PIN) {
            *b = if intx && (1..=4).contains(&pin) {
                pin
            } else {
                0
            };
        }
    }

    /// Standard capabilities: Advanced Features hidden; every header virtual; MSI and MSI-X
    /// emulated; PCI Express with FLR advertised when VFIO can reset the device (rvmm carries
    /// a guest's FLR out with `VFIO_DEVICE_RESET`) and the control bits rvmm owns kept.
    fn virtualize_caps(&mut self, real: &[u8], shadow: &mut [u8], can_reset: bool) {
        for range in caps::hide_caps(shadow, |id| id == CAP_ID_AF) {
            self.virtualize(range);
        }
        for cap in caps::walk(shadow) {
            let off = cap.offset;
            self.virtualize(off..off + 2);
            let header = u16::from_le_bytes([
                shadow.get(off).copied().unwrap_or(0),
                shadow.get(off + 1).copied().unwrap_or(0),
            ]);
            match cap.id {
                CAP_ID_MSI => {
                    let mut msi = MsiCap::new(off, dword(real, off));
                    msi.set_header(header);
                    self.virtualize(off..(off + msi.len()).min(STD_SIZE));
                    self.msi = Some(msi);
                }
                CAP_ID_MSIX => {
                    let mut msix = MsixState::new(
                        off,
                        [dword(real, off), dword(real, off + 4), dword(real, off + 8)],
                    );
                    msix.set_header(header);
                    self.virtualize(off..(off + 12).min(STD_SIZE));
                    self.msix = Some(msix);
                }
                CAP_ID_EXP => {
                    let devcap = off + EXP_DEVCAP;
                    let value = if can_reset {
                        dword(shadow, devcap) | EXP_DEVCAP_FLR
                    } else {
                        dword(shadow, devcap) & !EXP_DEVCAP_FLR
                    };
                    self.exp = Some(off);
                    if let Some(b) = shadow.get_mut(devcap..devcap + 4) {
                        b.copy_from_slice(&value.to_le_bytes());
                    }
                    self.virtualize(devcap..devcap + 4);
                    self.keep(off + EXP_DEVCTL, EXP_DEVCTL_KEEP);
                    self.keep(off + EXP_LNKCTL, EXP_LNKCTL_KEEP);
                    self.keep(off + EXP_DEVCTL2, EXP_DEVCTL2_KEEP);
                }
                _ => {}
            }
        }
    }

    /// Extended capabilities: ARI, SR-IOV and resizable BARs hidden; every header virtual.
    fn virtualize_ext_caps(&mut self, shadow: &mut [u8]) {
        if shadow.len() <= STD_SIZE {
            return;
        }
        let hidden = caps::hide_ext_caps(shadow, |id| {
            matches!(
                id,
                caps::EXT_CAP_ID_ARI
                    | caps::EXT_CAP_ID_SRIOV
                    | caps::EXT_CAP_ID_REBAR
                    | caps::EXT_CAP_ID_VF_REBAR
            )
        });
        for range in hidden {
            self.virtualize(range);
        }
        self.virtualize(EXT_CAP_START..EXT_CAP_START + 4);
        for cap in caps::walk_ext(shadow) {
            self.virtualize(cap.offset..cap.offset + 4);
        }
    }

    /// The AER capability: the device's own taken over, or one provided at 0x100
    /// ([`VirtualAer::place`]); its registers are virtual.
    fn place_aer(&mut self, shadow: &mut [u8]) {
        if shadow.len() <= STD_SIZE {
            return;
        }
        self.aer = VirtualAer::place(shadow, self.exp.is_some());
        if let Some(range) = self.aer.as_ref().map(VirtualAer::range) {
            self.virtualize(range);
        }
    }

    /// Makes `range` read from the virtual copy and drops guest writes to it.
    fn virtualize(&mut self, range: Range<usize>) {
        for offset in range {
            if let Some(p) = self.policy.get_mut(offset / 4) {
                let bits = 0xffu32 << ((offset % 4) * 8);
                p.virt |= bits;
                p.write &= !bits;
            }
        }
    }

    /// Makes the `bits` of the dword at `offset` keep the device's value on guest writes.
    fn keep(&mut self, offset: usize, bits: u32) {
        if let Some(p) = self.policy.get_mut(offset / 4) {
            p.keep |= bits;
        }
    }

    /// The BAR registers.
    pub fn bars(&self) -> &Bars {
        &self.bars
    }

    /// The BAR registers, for firmware-style placement by the VMM.
    pub fn bars_mut(&mut self) -> &mut Bars {
        &mut self.bars
    }

    /// The emulated MSI capability, if the device has one.
    pub fn msi(&self) -> Option<&MsiCap> {
        self.msi.as_ref()
    }

    /// The emulated MSI-X state, if the device has MSI-X.
    pub fn msix(&self) -> Option<&MsixState> {
        self.msix.as_ref()
    }

    /// The emulated MSI-X state, for table writes.
    pub fn msix_mut(&mut self) -> Option<&mut MsixState> {
        self.msix.as_mut()
    }

    /// The emulated AER capability, if the device has one.
    pub fn aer(&self) -> Option<&VirtualAer> {
        self.aer.as_ref()
    }

    /// The emulated AER capability, to record an error.
    pub fn aer_mut(&mut self) -> Option<&mut VirtualAer> {
        self.aer.as_mut()
    }

    /// The command register as the guest last wrote it.
    pub fn command(&self) -> u16 {
        self.command
    }

    /// The command register value a guest write would produce, if the write touches it.
    pub fn command_after(&self, reg: usize, offset: u64, data: &[u8]) -> Option<u16> {
        if reg != COMMAND_REG || byte_mask(offset, data.len()) & 0xffff == 0 {
            return None;
        }
        merge_write(u32::from(self.command), offset, data).map(|v| v as u16)
    }

    /// Number of dword registers.
    pub fn len(&self) -> usize {
        self.policy.len()
    }

    /// Whether the config space is empty (never: at least the header exists).
    pub fn is_empty(&self) -> bool {
        self.policy.is_empty()
    }

    fn virtual_read(&self, reg: usize, irqs: &Interrupts) -> u32 {
        let offset = reg * 4;
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self.bars.read(reg - BAR0_REG);
        }
        if reg == ROM_REG {
            return self.bars.read_rom();
        }
        if let Some(msi) = self.msi.as_ref() {
            if (msi.offset()..msi.offset() + msi.len()).contains(&offset) {
                let mut pending = 0u32;
                if let IrqMode::Msi(n) = irqs.mode() {
                    for v in 0..n.min(32) {
                        if msi.masked(v) && irqs.pending(v as usize) {
                            pending |= 1 << v;
                        }
                    }
                }
                return msi.read(offset - msi.offset(), pending);
            }
        }
        if let Some(msix) = self.msix.as_ref() {
            let start = msix.info().cap_offset;
            if (start..start + 12).contains(&offset) {
                return msix.read_cap(offset - start);
            }
        }
        if let Some(aer) = self.aer.as_ref().filter(|a| a.covers(offset)) {
            return aer.read(offset);
        }
        dword(&self.shadow, offset)
    }

    /// Reads config register `reg`; registers past the config space read as zero.
    pub fn read(&mut self, reg: usize, backend: &dyn DeviceBackend, irqs: &Interrupts) -> u32 {
        let Some(policy) = self.policy.get(reg) else {
            return 0;
        };
        let mut value = 0;
        if policy.virt != u32::MAX {
            let mut bytes = [0u8; 4];
            match backend.read(VFIO_PCI_CONFIG_REGION_INDEX, reg as u64 * 4, &mut bytes) {
                Ok(()) => value = u32::from_le_bytes(bytes),
                Err(e) => {
                    warn_throttled!(self.throttle, "config read of register {reg} failed: {e}");
                    value = u32::MAX;
                }
            }
        }
        if policy.virt != 0 {
            value = (value & !policy.virt) | (self.virtual_read(reg, irqs) & policy.virt);
        }
        value
    }

    fn virtual_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut result = ConfigWrite::NONE;
        let cfg_offset = reg * 4;
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            result.bars = self.bars.write(reg - BAR0_REG, offset, data);
        } else if reg == ROM_REG {
            result.bars = self.bars.write_rom(offset, data);
        } else if cfg_offset == INTERRUPT_LINE && offset == 0 {
            // The interrupt line is a scratch register for the guest's OS.
            if let (Some(&line), Some(b)) = (data.first(), self.shadow.get_mut(INTERRUPT_LINE)) {
                *b = line;
            }
        } else if let Some(msi) = self
            .msi
            .as_mut()
            .filter(|m| (m.offset()..m.offset() + m.len()).contains(&cfg_offset))
        {
            let start = msi.offset();
            result.msi = msi.write(cfg_offset - start, offset, data);
        } else if let Some(msix) = self
            .msix
            .as_mut()
            .filter(|m| (m.info().cap_offset..m.info().cap_offset + 12).contains(&cfg_offset))
        {
            let start = msix.info().cap_offset;
            result.msix = msix.write_cap(cfg_offset - start, offset, data);
        } else if let Some(aer) = self.aer.as_mut().filter(|a| a.covers(cfg_offset)) {
            if let Some(value) = merge_write(0, offset, data) {
                let before = aer.registers().uncorrectable_status();
                aer.write(cfg_offset, value, byte_mask(offset, data.len()));
                result.aer_cleared = before & !aer.registers().uncorrectable_status() != 0;
            }
        }
        result
    }

    /// Writes `data` at byte `offset` of register `reg`: virtual parts go to the emulation,
    /// the rest (filtered) to the device. Invalid accesses are ignored.
    pub fn write(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
        backend: &dyn DeviceBackend,
    ) -> ConfigWrite {
        let Some(policy) = self.policy.get(reg).copied() else {
            return ConfigWrite::NONE;
        };
        let mask = byte_mask(offset, data.len());
        let Some(guest) = merge_write(0, offset, data) else {
            log::debug!(
                "ignored config write to register {reg} at byte {offset}, {} bytes",
                data.len()
            );
            return ConfigWrite::NONE;
        };
        let mut result = ConfigWrite::NONE;
        if mask & policy.virt != 0 {
            result = self.virtual_write(reg, offset, data);
        }
        let forward = mask & policy.write;
        if forward != 0 {
            let mut value = guest;
            if forward & policy.keep != 0 {
                let mut current = [0u8; 4];
                if let Err(e) =
                    backend.read(VFIO_PCI_CONFIG_REGION_INDEX, reg as u64 * 4, &mut current)
                {
                    warn_throttled!(
                        self.throttle,
                        "config write to register {reg} dropped: cannot read it: {e}"
                    );
                    return result;
                }
                let current = u32::from_le_bytes(current);
                value = (value & !policy.keep) | (current & policy.keep);
                if value & forward != guest & forward {
                    log_throttled!(
                        self.throttle,
                        log::Level::Info,
                        "filtered guest write to config {:#x}: {:#x} -> {:#x}",
                        reg * 4,
                        guest & forward,
                        value & forward
                    );
                }
            }
            write_runs(backend, &mut self.throttle, reg, forward, value);
        }
        if let Some(command) = self.command_after(reg, offset, data) {
            result.command = command != self.command;
            self.command = command;
        }
        result.flr = self.exp.is_some_and(|exp| reg * 4 == exp + EXP_DEVCTL)
            && mask & EXP_DEVCTL_FLR != 0
            && guest & EXP_DEVCTL_FLR != 0;
        result
    }
}

/// Writes the bytes of `value` selected by `forward` to register `reg`, one contiguous run at
/// a time.
fn write_runs(
    backend: &dyn DeviceBackend,
    throttle: &mut LogThrottle,
    reg: usize,
    forward: u32,
    value: u32,
) {
    let bytes = value.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        if forward & (0xff << (i * 8)) == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < 4 && forward & (0xff << (i * 8)) != 0 {
            i += 1;
        }
        let Some(run) = bytes.get(start..i) else {
            return;
        };
        let offset = (reg * 4 + start) as u64;
        if let Err(e) = backend.write(VFIO_PCI_CONFIG_REGION_INDEX, offset, run) {
            warn_throttled!(throttle, "config write at {offset:#x} failed: {e}");
        }
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
