//! The ACPI PCI hotplug register block: how the VMM tells an OS using ACPI hotplug (Linux's
//! `acpiphp`) which slot changed, and how the OS's `_EJ0` and `_OST` reach the VMM.
//!
//! One slot per root port, indexed from 0 (the port index). Every register is a bitmap of up to
//! [`MAX_SLOTS`] slots in [`BITMAP_DWORDS`] dwords, slot `n` being bit `n % 32` of dword `n / 32`:
//!
//! ```text
//! offset  name  access           meaning
//! 0x00    PCIU  read-to-clear    slots to notify with Device Check (a device was inserted)
//! 0x10    PCID  read-to-clear    slots to notify with Eject Request (the VMM asks for the device)
//! 0x20    PCIB  read-to-clear    slots whose root port to notify with Bus Check (a device left
//!                                 without the OS's consent: the OS drops it)
//! 0x30    PCIP  read-only        slots holding a device (the slot's `_STA`)
//! 0x40    PCEJ  write            the OS's `_EJ0`: the slot index it has let go of
//! 0x44    POST  write            the OS's `_OST`: event (bits 0..8), status (8..16),
//!                                 slot index (16..24)
//! ```
//!
//! The VMM sets the bits and raises the GED's PCI hotplug event (see [`crate::ged`]); the GED's
//! `_EVT` calls the DSDT's `PCNT`, which reads each read-to-clear dword once and notifies every
//! slot whose bit is set. `_EJ0` and `_OST` writes are queued for the VMM and wake it at once
//! through the wake line given at construction, as does a read that takes notifications.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::throttle::LogThrottle;
use crate::warn_throttled;
use crate::{BusDevice, Interrupt};

/// Most slots the block describes (the most root ports a VM may have).
pub const MAX_SLOTS: usize = 128;
/// Dwords of one bitmap register.
pub const BITMAP_DWORDS: usize = MAX_SLOTS / 32;
/// Offset of PCIU, the Device Check bitmap.
pub const UP_OFFSET: u64 = 0x00;
/// Offset of PCID, the Eject Request bitmap.
pub const DOWN_OFFSET: u64 = 0x10;
/// Offset of PCIB, the Bus Check bitmap.
pub const BUS_CHECK_OFFSET: u64 = 0x20;
/// Offset of PCIP, the presence bitmap.
pub const PRESENT_OFFSET: u64 = 0x30;
/// Offset of PCEJ, where `_EJ0` writes the slot index.
pub const EJECT_OFFSET: u64 = 0x40;
/// Offset of POST, where `_OST` writes event, status and slot index.
pub const OST_OFFSET: u64 = 0x44;
/// Bus range length of the block.
pub const PCI_HOTPLUG_PORT_COUNT: u64 = 0x48;

/// ACPI notification value: Bus Check (ACPI 6.5, table 5.187).
pub const NOTIFY_BUS_CHECK: u8 = 0;
/// ACPI notification value: Device Check.
pub const NOTIFY_DEVICE_CHECK: u8 = 1;
/// ACPI notification value: Eject Request.
pub const NOTIFY_EJECT_REQUEST: u8 = 3;
/// `_OST` status code: success (ACPI 6.5, table 6.171).
pub const OST_SUCCESS: u8 = 0;

/// An `_OST` evaluation the OS reported for a slot: how it handled a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OstReport {
    /// The slot (port index).
    pub slot: usize,
    /// The notification it answers ([`NOTIFY_DEVICE_CHECK`], ...).
    pub event: u8,
    /// Its status ([`OST_SUCCESS`], or a failure code).
    pub status: u8,
}

/// What the OS did, for the VMM to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestAction {
    /// `_EJ0` of a slot: the OS has let its device go.
    Ejected(usize),
    /// `_OST` of a slot.
    Ost(OstReport),
}

/// Most guest actions kept before the oldest are dropped (the VMM drains them at each wake-up).
const MAX_QUEUED: usize = 1024;

/// The register block.
pub struct PciHotplug {
    slots: usize,
    up: u128,
    down: u128,
    bus_check: u128,
    present: u128,
    actions: VecDeque<GuestAction>,
    wake: Arc<dyn Interrupt>,
    throttle: LogThrottle,
}

fn bit(slot: usize) -> u128 {
    1u128 << slot
}

fn dword(map: u128, index: usize) -> u32 {
    // Truncation is the point: dword `index` of the bitmap.
    (map >> (32 * index)) as u32
}

fn dword_mask(index: usize) -> u128 {
    u128::from(u32::MAX) << (32 * index)
}

impl PciHotplug {
    /// A block for `slots` slots (at most [`MAX_SLOTS`]; more are ignored) that signals guest
    /// actions on `wake`.
    pub fn new(slots: usize, wake: Arc<dyn Interrupt>) -> Self {
        Self {
            slots: slots.min(MAX_SLOTS),
            up: 0,
            down: 0,
            bus_check: 0,
            present: 0,
            actions: VecDeque::new(),
            wake,
            throttle: LogThrottle::default(),
        }
    }

    fn valid(&self, slot: usize) -> bool {
        slot < self.slots
    }

    /// A device is in slot `slot` before the OS runs: present, nothing to notify.
    pub fn set_present_at_boot(&mut self, slot: usize) {
        if self.valid(slot) {
            self.present |= bit(slot);
        }
    }

    /// A device was inserted in slot `slot`: present, Device Check pending. The caller raises
    /// the GED event.
    pub fn device_inserted(&mut self, slot: usize) {
        if self.valid(slot) {
            self.present |= bit(slot);
            self.bus_check &= !bit(slot);
            self.up |= bit(slot);
        }
    }

    /// The VMM asks the OS to let slot `slot`'s device go: Eject Request pending.
    pub fn request_eject(&mut self, slot: usize) {
        if self.valid(slot) {
            self.down |= bit(slot);
        }
    }

    /// The device left slot `slot` after the OS ejected it: not present, nothing to notify.
    pub fn device_ejected(&mut self, slot: usize) {
        if self.valid(slot) {
            self.present &= !bit(slot);
            self.up &= !bit(slot);
            self.down &= !bit(slot);
        }
    }

    /// The device left slot `slot` without the OS's consent: not present, Bus Check pending on
    /// its root port (any Device Check or Eject Request still pending is moot).
    pub fn device_gone(&mut self, slot: usize) {
        if self.valid(slot) {
            self.present &= !bit(slot);
            self.up &= !bit(slot);
            self.down &= !bit(slot);
            self.bus_check |= bit(slot);
        }
    }

    /// Whether slot `slot` has a notification the OS has not read yet.
    pub fn pending(&self, slot: usize) -> bool {
        self.valid(slot) && (self.up | self.down | self.bus_check) & bit(slot) != 0
    }

    /// Whether slot `slot` holds a device.
    pub fn present(&self, slot: usize) -> bool {
        self.valid(slot) && self.present & bit(slot) != 0
    }

    /// The guest actions since the last call, oldest first.
    pub fn take_actions(&mut self) -> Vec<GuestAction> {
        self.actions.drain(..).collect()
    }

    /// A reboot: notifications and actions dropped (the next OS enumerates the slots itself);
    /// presence stays.
    pub fn reset(&mut self) {
        self.up = 0;
        self.down = 0;
        self.bus_check = 0;
        self.actions.clear();
    }

    fn push(&mut self, action: GuestAction) {
        if self.actions.len() >= MAX_QUEUED {
            self.actions.pop_front();
        }
        self.actions.push_back(action);
        self.wake_vmm();
    }

    fn wake_vmm(&mut self) {
        if let Err(e) = self.wake.trigger() {
            warn_throttled!(self.throttle, "pci hotplug: cannot wake the VMM: {e}");
        }
    }

    /// Reads dword `index` of the read-to-clear bitmap at `map` and clears it.
    fn read_clear(map: &mut u128, index: usize) -> u32 {
        let value = dword(*map, index);
        *map &= !dword_mask(index);
        value
    }
}

impl BusDevice for PciHotplug {
    /// Dword reads of the bitmaps; anything else reads zero and clears nothing.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) || offset >= EJECT_OFFSET {
            warn_throttled!(
                self.throttle,
                "pci hotplug: ignored read of {} bytes at offset {offset:#x}",
                data.len()
            );
            return;
        }
        let index = ((offset % 0x10) / 4) as usize;
        let value = match offset / 0x10 {
            0 => Self::read_clear(&mut self.up, index),
            1 => Self::read_clear(&mut self.down, index),
            2 => Self::read_clear(&mut self.bus_check, index),
            _ => dword(self.present, index),
        };
        data.copy_from_slice(&value.to_le_bytes());
        if value != 0 && offset < PRESENT_OFFSET {
            log::debug!("pci hotplug: the guest read notifications {value:#x} at {offset:#04x}");
            // The guest took notifications: a slot waiting for them to be read may be free.
            self.wake_vmm();
        }
    }

    /// Dword writes of PCEJ and POST; anything else is ignored.
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) => u32::from_le_bytes(bytes),
            Err(_) => {
                warn_throttled!(
                    self.throttle,
                    "pci hotplug: ignored write of {} bytes at offset {offset:#x}",
                    data.len()
                );
                return;
            }
        };
        let action = match offset {
            EJECT_OFFSET => GuestAction::Ejected(value as usize),
            OST_OFFSET => GuestAction::Ost(OstReport {
                slot: ((value >> 16) & 0xff) as usize,
                event: (value & 0xff) as u8,
                status: ((value >> 8) & 0xff) as u8,
            }),
            _ => {
                warn_throttled!(
                    self.throttle,
                    "pci hotplug: ignored write at offset {offset:#x}"
                );
                return;
            }
        };
        let slot = match action {
            GuestAction::Ejected(s) => s,
            GuestAction::Ost(r) => r.slot,
        };
        if !self.valid(slot) {
            warn_throttled!(
                self.throttle,
                "pci hotplug: ignored {action:?} of a slot that does not exist"
            );
            return;
        }
        self.push(action);
    }
}

#[cfg(test)]
#[path = "pci_hotplug_tests.rs"]
mod tests;
