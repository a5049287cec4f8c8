//! The hot-plug slot of a root port: its state machine, the guest handshake and the hot-plug
//! interrupt.
//!
//! # The handshake with Linux pciehp
//!
//! Our slot advertises an attention button, a power controller and both indicators. Linux then
//! enables HPIE, CCIE, DLLSCE and ABPE (not PDCE: with an attention button it waits for the
//! button rather than for presence changes) and powers empty slots off. So a hot-add must be
//! announced by a Data Link Layer State Changed event: [`RootPort::insert_device`] sets presence
//! *and* brings the link up at once (as a card with auxiliary power that trains its link on
//! insertion), raising PDC and DLLSC. pciehp acts on that immediately: it powers the slot on
//! (PCC = 0), blinks the power indicator, finds the device, and turns the power indicator on,
//! at which point the slot is [`SlotState::Present`].
//!
//! Graceful removal is the attention button ([`RootPort::press_attention_button`]): pciehp
//! blinks the power indicator, waits 5 s, unbinds the driver, powers the slot off (the link
//! goes down: DLLSC), sleeps 1 s ("wait at least 1 second" after power-off) and turns the
//! indicator off. The power-off is the guest letting the device go: from then on the slot
//! reports [`RootPort::guest_powered_off`] and the manager may collect the device with
//! [`RootPort::take_device`] without waiting for that second. The slot takes a new device
//! only once the indicator is off too ([`RootPort::check_insert_ready`]): pciehp drops the
//! events that come during its sleep. [`RootPort::surprise_remove`] pulls the device at once.
//!
//! While a device is present the link follows the power controller: the guest powering the
//! slot off takes the link down, powering it on brings it back up.
//!
//! # Interrupts
//!
//! The MSI is sent when Hot-Plug Interrupt Enable is set and an enabled event bit goes from 0
//! to 1, and also whenever the interrupt condition (MSI enabled, HPIE set, an enabled event
//! pending) goes from false to true through a guest write (e.g. enabling HPIE or MSI with an
//! event pending), as the spec's edge-triggered MSI generation does. Every guest write to
//! Slot Control is a command that completes at once and sets Command Completed.

use std::sync::{Arc, Mutex};

use log::debug;
use rvmm_devices::sync::MutexExt;
use thiserror::Error;

use super::RootPort;
use crate::config::ConfigAccess;
use crate::device::PciDevice;
use crate::header;
use crate::msi::MsiState;
use crate::pcie_cap::{
    enabled_events, Indicator, LNKSTA, LNKSTA_DLLLA, SLTCTL, SLTCTL_ABPE, SLTCTL_DLLSCE,
    SLTCTL_HPIE, SLTCTL_PCC, SLTCTL_PDCE, SLTCTL_PIC, SLTCTL_PIC_ON, SLTSTA, SLTSTA_ABP, SLTSTA_CC,
    SLTSTA_DLLSC, SLTSTA_PDC, SLTSTA_PDS,
};

/// A device in a slot, shared with whoever else needs it (its BAR handlers, the manager).
pub type SlotDevice = Arc<Mutex<dyn PciDevice>>;

/// Observer of guest-driven slot changes.
pub trait SlotEvents: Send + Sync {
    /// The guest changed port `port`'s Slot Control (power, indicators, enables), cleared Slot
    /// Status bits or toggled MSI. Called on the vCPU thread with the port locked: it must be
    /// cheap, must not block and must not lock the port (e.g. write an eventfd).
    fn slot_changed(&self, port: usize);
}

/// Hot-plug state of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// No device.
    Empty,
    /// A device was inserted; the guest has not powered it on and lit the power indicator yet.
    Adding,
    /// The guest powered the slot on and turned the power indicator on.
    Present,
    /// Removal requested (attention button) or the guest powered the slot off.
    Removing,
}

/// Errors of slot operations.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SlotError {
    /// The slot already holds a device.
    #[error("slot {slot} is occupied")]
    Occupied {
        /// Physical slot number.
        slot: u16,
    },
    /// The guest has not enabled the notifications the operation relies on.
    #[error("slot {slot} is not ready: the guest has not enabled hot-plug notifications (slot control {control:#06x}, MSI enabled: {msi_enabled})")]
    NotReady {
        /// Physical slot number.
        slot: u16,
        /// Current Slot Control value.
        control: u16,
        /// Whether the port's MSI is enabled.
        msi_enabled: bool,
    },
    /// The guest has not yet powered the empty slot down (it is still finishing a removal).
    #[error("slot {slot} is still powered by the guest after its last device left (slot control {control:#06x})")]
    NotPoweredDown {
        /// Physical slot number.
        slot: u16,
        /// Current Slot Control value.
        control: u16,
    },
    /// Enabled events are still set in Slot Status: the guest has not handled them yet.
    #[error(
        "slot {slot} has hot-plug events the guest has not handled yet (slot status {status:#06x})"
    )]
    EventPending {
        /// Physical slot number.
        slot: u16,
        /// Current Slot Status value.
        status: u16,
    },
    /// The operation needs a device in the slot.
    #[error("slot {slot} is empty")]
    Empty {
        /// Physical slot number.
        slot: u16,
    },
    /// The operation is not valid in the slot's current state.
    #[error("slot {slot} is in state {state:?}, the operation needs {expected:?}")]
    WrongState {
        /// Physical slot number.
        slot: u16,
        /// Current state.
        state: SlotState,
        /// State the operation needs.
        expected: SlotState,
    },
    /// Graceful removal needs the guest to power the slot off first.
    #[error("slot {slot} has not been powered off by the guest")]
    NotPoweredOff {
        /// Physical slot number.
        slot: u16,
    },
}

impl SlotError {
    /// Whether the same request can succeed later without the caller changing anything: the
    /// guest has not enabled the slot yet, or has not acknowledged an earlier event.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SlotError::NotReady { .. }
                | SlotError::EventPending { .. }
                | SlotError::NotPoweredDown { .. }
        )
    }
}

/// Result type of slot operations.
pub type Result<T> = std::result::Result<T, SlotError>;

/// Slot state kept outside configuration space.
pub(crate) struct Slot {
    pub(crate) device: Option<SlotDevice>,
    pub(crate) state: SlotState,
    /// Data Link Layer Link Active (mirrored in Link Status).
    pub(crate) link_up: bool,
    /// The guest turned the slot's power off since the device was inserted.
    pub(crate) guest_powered_off: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            device: None,
            state: SlotState::Empty,
            link_up: false,
            guest_powered_off: false,
        }
    }
}

/// What a guest write is compared against.
pub(crate) struct WriteSnapshot {
    bridge_control: u16,
    control: u16,
    status: u16,
    msi: MsiState,
    asserted: bool,
}

fn powered_on(control: u16) -> bool {
    control & SLTCTL_PCC == 0
}

fn guest_enabled(control: u16) -> bool {
    powered_on(control) && Indicator::power(control) == Indicator::On
}

/// The guest has let the device go: it powered the slot off (pciehp does so once the driver
/// is unbound, and turns the power indicator off a second later).
fn guest_off(control: u16) -> bool {
    !powered_on(control)
}

impl RootPort {
    /// Current Slot Control value.
    pub fn slot_control(&self) -> u16 {
        self.cfg.read_u16(self.pcie + SLTCTL)
    }

    /// Current Slot Status value.
    pub fn slot_status(&self) -> u16 {
        self.cfg.read_u16(self.pcie + SLTSTA)
    }

    /// Hot-plug state of the slot.
    pub fn slot_state(&self) -> SlotState {
        self.slot.state
    }

    /// The device in the slot, if any.
    pub fn device(&self) -> Option<SlotDevice> {
        self.slot.device.clone()
    }

    /// Whether the Data Link Layer link to the slot is active (config accesses reach the
    /// device only then).
    pub fn link_active(&self) -> bool {
        self.slot.link_up
    }

    /// Whether a device is present and the guest has powered it on and lit the power indicator.
    pub fn guest_enabled(&self) -> bool {
        self.slot.device.is_some() && guest_enabled(self.slot_control())
    }

    /// Whether the guest turned the slot's power off while the current device was present:
    /// the device can be taken out with [`RootPort::take_device`].
    pub fn guest_powered_off(&self) -> bool {
        self.slot.device.is_some() && self.slot.guest_powered_off
    }

    /// Checks that a device could be inserted now: the slot is empty, the guest enabled the
    /// hot-plug interrupt (HPIE, PDCE or DLLSCE, and MSI) and handled every enabled event.
    pub fn check_insert_ready(&self) -> Result<()> {
        let slot = self.slot_number;
        if self.slot.device.is_some() {
            return Err(SlotError::Occupied { slot });
        }
        let control = self.slot_control();
        let msi_enabled = self.msi.state(&self.cfg).enabled;
        if control & SLTCTL_HPIE == 0
            || control & (SLTCTL_PDCE | SLTCTL_DLLSCE) == 0
            || !msi_enabled
        {
            return Err(SlotError::NotReady {
                slot,
                control,
                msi_enabled,
            });
        }
        let status = self.slot_status();
        if status & enabled_events(control) != 0 {
            return Err(SlotError::EventPending { slot, status });
        }
        // After a removal the guest acknowledges the events first and only then powers the slot
        // down and turns the indicator off; a device inserted in between would have its link
        // taken down by that late power-off and its presence event swallowed.
        if powered_on(control)
            || matches!(Indicator::power(control), Indicator::On | Indicator::Blink)
        {
            return Err(SlotError::NotPoweredDown { slot, control });
        }
        Ok(())
    }

    /// Hot-adds `device`: presence detected and link up, PDC and DLLSC raised, interrupt per the
    /// rule; the slot goes to [`SlotState::Adding`]. Refused (and `device` dropped: keep a
    /// clone) when [`RootPort::check_insert_ready`] fails. The device must be completely wired
    /// (BARs, DMA, interrupts) before this call: the guest may access it at once.
    pub fn insert_device(&mut self, device: SlotDevice) -> Result<()> {
        self.check_insert_ready()?;
        self.slot.device = Some(device);
        self.slot.state = SlotState::Adding;
        self.slot.guest_powered_off = false;
        let events = self.set_presence(true) | self.set_link(true);
        self.raise(events);
        Ok(())
    }

    /// Puts `device` in the slot before the guest runs: present, powered, link up, power
    /// indicator on, no event. The slot is [`SlotState::Present`].
    pub fn insert_device_at_boot(&mut self, device: SlotDevice) -> Result<()> {
        if self.slot.device.is_some() {
            return Err(SlotError::Occupied {
                slot: self.slot_number,
            });
        }
        self.slot.device = Some(device);
        self.slot.state = SlotState::Present;
        self.slot.guest_powered_off = false;
        self.set_presence(true);
        self.set_link(true);
        let control = (self.slot_control() & !(SLTCTL_PCC | SLTCTL_PIC)) | SLTCTL_PIC_ON;
        self.cfg.set_u16(self.pcie + SLTCTL, control);
        Ok(())
    }

    /// Presses the attention button to ask the guest to release the device: ABP raised,
    /// interrupt; the slot goes to [`SlotState::Removing`]. Needs a [`SlotState::Present`]
    /// slot, HPIE and ABPE enabled with MSI, and no unhandled button press.
    pub fn press_attention_button(&mut self) -> Result<()> {
        let slot = self.slot_number;
        if self.slot.device.is_none() {
            return Err(SlotError::Empty { slot });
        }
        if self.slot.state != SlotState::Present {
            return Err(SlotError::WrongState {
                slot,
                state: self.slot.state,
                expected: SlotState::Present,
            });
        }
        let control = self.slot_control();
        let msi_enabled = self.msi.state(&self.cfg).enabled;
        if control & SLTCTL_HPIE == 0 || control & SLTCTL_ABPE == 0 || !msi_enabled {
            return Err(SlotError::NotReady {
                slot,
                control,
                msi_enabled,
            });
        }
        let status = self.slot_status();
        if status & SLTSTA_ABP != 0 {
            return Err(SlotError::EventPending { slot, status });
        }
        self.slot.state = SlotState::Removing;
        self.raise(SLTSTA_ABP);
        Ok(())
    }

    /// Takes out a device the guest has powered off ([`RootPort::guest_powered_off`]):
    /// presence cleared, PDC raised; the slot is [`SlotState::Empty`].
    pub fn take_device(&mut self) -> Result<SlotDevice> {
        let slot = self.slot_number;
        if self.slot.device.is_none() {
            return Err(SlotError::Empty { slot });
        }
        if !self.slot.guest_powered_off {
            return Err(SlotError::NotPoweredOff { slot });
        }
        self.remove()
    }

    /// Removes the device without the guest's consent: presence and link cleared, PDC (and
    /// DLLSC if the link was up) raised, interrupt; the slot is [`SlotState::Empty`].
    pub fn surprise_remove(&mut self) -> Result<SlotDevice> {
        self.remove()
    }

    fn remove(&mut self) -> Result<SlotDevice> {
        let device = self.slot.device.take().ok_or(SlotError::Empty {
            slot: self.slot_number,
        })?;
        self.slot.state = SlotState::Empty;
        self.slot.guest_powered_off = false;
        let events = self.set_link(false) | self.set_presence(false);
        self.raise(events);
        Ok(device)
    }

    /// Updates Presence Detect State; returns PDC if it changed.
    fn set_presence(&mut self, present: bool) -> u16 {
        let was = self.slot_status() & SLTSTA_PDS != 0;
        self.cfg.update_u16(self.pcie + SLTSTA, SLTSTA_PDS, present);
        if was == present {
            0
        } else {
            SLTSTA_PDC
        }
    }

    /// Updates Data Link Layer Link Active; returns DLLSC if it changed.
    fn set_link(&mut self, up: bool) -> u16 {
        if self.slot.link_up == up {
            return 0;
        }
        self.slot.link_up = up;
        self.cfg.update_u16(self.pcie + LNKSTA, LNKSTA_DLLLA, up);
        SLTSTA_DLLSC
    }

    /// Sets `events` in Slot Status; returns whether an enabled event went 0 → 1 with HPIE set.
    fn set_events(&mut self, events: u16) -> bool {
        let control = self.slot_control();
        let old = self.slot_status();
        self.cfg.set_u16(self.pcie + SLTSTA, old | events);
        let new_events = events & !old;
        control & SLTCTL_HPIE != 0 && new_events & enabled_events(control) != 0
    }

    /// Sets `events` and sends the interrupt if the rule says so.
    fn raise(&mut self, events: u16) {
        if self.set_events(events) {
            self.msi.trigger(&mut self.cfg);
        }
    }

    /// The level of the hot-plug interrupt condition.
    fn interrupt_asserted(&self) -> bool {
        let control = self.slot_control();
        self.msi.state(&self.cfg).enabled
            && control & SLTCTL_HPIE != 0
            && self.slot_status() & enabled_events(control) != 0
    }

    /// Captures what [`RootPort::after_guest_write`] compares against.
    pub(crate) fn snapshot(&self) -> WriteSnapshot {
        WriteSnapshot {
            bridge_control: self.cfg.read_u16(header::BRIDGE_CONTROL),
            control: self.slot_control(),
            status: self.slot_status(),
            msi: self.msi.state(&self.cfg),
            asserted: self.interrupt_asserted(),
        }
    }

    /// Reacts to a guest write that has been applied to configuration space.
    pub(crate) fn after_guest_write(&mut self, access: ConfigAccess, before: WriteSnapshot) {
        let sbr = header::BRIDGE_CONTROL_SECONDARY_BUS_RESET;
        if self.cfg.read_u16(header::BRIDGE_CONTROL) & sbr != 0 && before.bridge_control & sbr == 0
        {
            // Secondary Bus Reset asserted: the device behind the port is reset (once per
            // assertion; the guest deasserts it after a few milliseconds).
            if let Some(device) = &self.slot.device {
                debug!("slot {}: secondary bus reset", self.slot_number);
                device.locked().reset();
            }
        }
        let mut interrupt = false;
        if access.overlaps(self.pcie + SLTCTL, 2) {
            interrupt = self.slot_command(before.control);
        }
        if self.msi.is_hit_by(&access) {
            self.msi.after_write(&mut self.cfg, before.msi);
        }
        if interrupt || (self.interrupt_asserted() && !before.asserted) {
            self.msi.trigger(&mut self.cfg);
        }
        if self.slot_control() != before.control
            || self.slot_status() != before.status
            || self.msi.state(&self.cfg).enabled != before.msi.enabled
        {
            self.events.slot_changed(self.index);
        }
    }

    /// Carries out a Slot Control command: power, link, slot state, Command Completed.
    /// Returns whether the per-event interrupt rule fired.
    fn slot_command(&mut self, old: u16) -> bool {
        let new = self.slot_control();
        debug!(
            "slot {}: guest slot control {old:#06x} -> {new:#06x}, state {:?}",
            self.slot_number, self.slot.state
        );
        let mut events = SLTSTA_CC;
        if powered_on(old) && !powered_on(new) {
            events |= self.set_link(false);
        } else if !powered_on(old) && powered_on(new) && self.slot.device.is_some() {
            events |= self.set_link(true);
        }
        self.update_state(old, new);
        self.set_events(events)
    }

    fn update_state(&mut self, old: u16, new: u16) {
        if self.slot.device.is_none() {
            return;
        }
        if guest_off(new) && !guest_off(old) {
            self.slot.guest_powered_off = true;
            if self.slot.state == SlotState::Present {
                self.slot.state = SlotState::Removing;
            }
            return;
        }
        let enabled_now = guest_enabled(new);
        let back_on = enabled_now && !guest_enabled(old);
        match self.slot.state {
            SlotState::Adding if enabled_now => self.enter_present(),
            SlotState::Removing if back_on => self.enter_present(),
            _ => {}
        }
    }

    fn enter_present(&mut self) {
        self.slot.state = SlotState::Present;
        self.slot.guest_powered_off = false;
    }
}

#[cfg(test)]
#[path = "slot_tests.rs"]
pub(crate) mod tests;
