//! The controller's ACPI hotplug steps (`--hotplug acpi`): the guest's `acpiphp` instead of
//! `pciehp` on the other side of every slot.
//!
//! | step | native (pciehp) | acpi (acpiphp) |
//! |---|---|---|
//! | slot ready for a device | hot-plug interrupt enabled, events handled, slot powered down | no notification of the slot still unread |
//! | hot-add | presence + link up, PDC/DLLSC interrupt | presence + link up, Device Check through the GED |
//! | guest has the device | power indicator on | `_OST` of the Device Check, success (or the guest enabled the device's decoding) |
//! | graceful removal | attention button | Eject Request through the GED |
//! | guest let it go | slot powered off | `_EJ0` |
//! | surprise removal | presence + link down, PDC/DLLSC interrupt | presence + link down, Bus Check of the root port |
//!
//! A notification the guest has not read a second after the GED interrupt (the guest was not
//! listening yet, e.g. still booting) is signalled again. The guest's `_EJ0` and `_OST` and its
//! reads of the notification registers wake the controller at once through the slot notifier.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rvmm_devices::ged::EVENT_PCI_HOTPLUG;
use rvmm_devices::pci_hotplug::{
    GuestAction, OstReport, PciHotplug, NOTIFY_DEVICE_CHECK, OST_SUCCESS,
};
use rvmm_devices::sync::MutexExt;
use rvmm_pci::{PciDevice, SlotDevice, SlotState};

use super::{Controller, Op};
use crate::device::passthrough::PassthroughError;
use crate::device::DeviceId;

/// How long a notification may stay unread before the GED interrupt is raised again.
pub(super) const RENOTIFY_AFTER: Duration = Duration::from_secs(1);
/// Command register bits that show the guest has taken a device: I/O, memory, bus master.
const COMMAND_ENABLES: u32 = 0x7;

/// The ACPI hotplug state of the controller.
pub(super) struct AcpiSlots {
    registers: Arc<Mutex<PciHotplug>>,
    /// Slots whose `_EJ0` the guest evaluated since their last removal request.
    ejected: HashSet<usize>,
    /// The guest's last `_OST` of a Device Check, per slot.
    device_checked: HashMap<usize, OstReport>,
    /// When the GED interrupt was last raised for hotplug.
    last_signal: Option<Instant>,
}

/// Where an ACPI hot-add stands.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AcpiAdd {
    /// The guest has not finished with the device yet.
    Waiting,
    /// The guest has the device.
    Taken,
    /// The guest reported a failure (`_OST` status).
    Failed(u8),
}

/// Where a hot-add stands from the guest's `_OST` of the Device Check (if any) and the device's
/// command register (dword 1, as the guest last wrote it).
fn add_state(device_check: Option<&OstReport>, command: u32) -> AcpiAdd {
    match device_check {
        Some(r) if r.status == OST_SUCCESS => AcpiAdd::Taken,
        Some(r) => AcpiAdd::Failed(r.status),
        None if command & COMMAND_ENABLES != 0 => AcpiAdd::Taken,
        None => AcpiAdd::Waiting,
    }
}

impl Controller {
    /// Uses ACPI hotplug through `registers` (and the GED given by
    /// [`Controller::with_power_button`]) instead of native PCIe hotplug.
    pub fn with_acpi_hotplug(mut self, registers: Arc<Mutex<PciHotplug>>) -> Self {
        self.acpi = Some(AcpiSlots {
            registers,
            ejected: HashSet::new(),
            device_checked: HashMap::new(),
            last_signal: None,
        });
        self
    }

    /// Takes in what the guest did through the registers since the last look.
    pub(super) fn acpi_collect(&mut self) {
        let Some(acpi) = self.acpi.as_mut() else {
            return;
        };
        for action in acpi.registers.locked().take_actions() {
            log::debug!("acpi hotplug: guest {action:?}");
            match action {
                GuestAction::Ejected(slot) => {
                    acpi.ejected.insert(slot);
                }
                GuestAction::Ost(report) if report.event == NOTIFY_DEVICE_CHECK => {
                    acpi.device_checked.insert(report.slot, report);
                }
                GuestAction::Ost(_) => {}
            }
        }
    }

    /// Raises the GED's PCI hotplug event.
    fn acpi_signal(&mut self) {
        let Some(acpi) = self.acpi.as_mut() else {
            return;
        };
        acpi.last_signal = Some(Instant::now());
        log::debug!("acpi hotplug: raising the GED's PCI hotplug event");
        if let Some(ged) = &self.power_button {
            if let Err(e) = ged.locked().notify(EVENT_PCI_HOTPLUG) {
                log::warn!("acpi hotplug: cannot raise the GED interrupt: {e}");
            }
        } else {
            log::error!("acpi hotplug: the VM has no GED to notify the guest through");
        }
    }

    /// Puts `device` into slot `port_index` when no notification of the slot is still unread:
    /// present and link up, Device Check signalled. `Ok(false)`: not yet.
    pub(super) fn acpi_insert(
        &mut self,
        port_index: usize,
        device: SlotDevice,
    ) -> Result<bool, PassthroughError> {
        let Some(acpi) = self.acpi.as_mut() else {
            return Ok(false);
        };
        if acpi.registers.locked().pending(port_index) {
            return Ok(false);
        }
        self.port_insert(port_index, device, true)?;
        if let Some(acpi) = self.acpi.as_mut() {
            acpi.ejected.remove(&port_index);
            acpi.device_checked.remove(&port_index);
            acpi.registers.locked().device_inserted(port_index);
        }
        self.acpi_signal();
        Ok(true)
    }

    /// Whether the guest has taken device `id` in slot `port_index`: its `_OST` of the Device
    /// Check (or the device's decoding enabled by its driver).
    pub(super) fn acpi_guest_took(&self, id: &DeviceId, port_index: usize) -> AcpiAdd {
        let Some(acpi) = self.acpi.as_ref() else {
            return AcpiAdd::Waiting;
        };
        let command = self.passthrough.get(id).map_or(0, |d| {
            let mut device = d.device.clone();
            device.read_config_register(1)
        });
        add_state(acpi.device_checked.get(&port_index), command)
    }

    /// Asks the guest to let the device in slot `port_index` go: Eject Request signalled.
    pub(super) fn acpi_request_eject(&mut self, port_index: usize) -> Result<(), String> {
        let state = self
            .segment
            .port(port_index)
            .map(|p| p.locked().slot_state());
        if state != Some(SlotState::Present) {
            return Err(format!(
                "slot {} holds no device the guest has taken ({state:?})",
                port_index + 1
            ));
        }
        let Some(acpi) = self.acpi.as_mut() else {
            return Err("this VM does not use ACPI hotplug".into());
        };
        acpi.ejected.remove(&port_index);
        acpi.registers.locked().request_eject(port_index);
        self.acpi_signal();
        Ok(())
    }

    /// Whether the guest evaluated slot `port_index`'s `_EJ0` since the removal request.
    pub(super) fn acpi_ejected(&self, port_index: usize) -> bool {
        self.acpi
            .as_ref()
            .is_some_and(|a| a.ejected.contains(&port_index))
    }

    /// The device left slot `port_index`: after the guest's `_EJ0` nothing more to tell; without
    /// its consent (`surprise`), a Bus Check of the root port makes the guest drop it.
    pub(super) fn acpi_slot_left(&mut self, port_index: usize, surprise: bool) {
        let Some(acpi) = self.acpi.as_mut() else {
            return;
        };
        acpi.ejected.remove(&port_index);
        acpi.device_checked.remove(&port_index);
        if surprise {
            acpi.registers.locked().device_gone(port_index);
            self.acpi_signal();
        } else {
            acpi.registers.locked().device_ejected(port_index);
        }
    }

    /// Signals again when an operation waits on a notification the guest has not read for
    /// [`RENOTIFY_AFTER`].
    pub(super) fn acpi_renotify(&mut self, now: Instant) {
        if self.acpi_next_wake().is_some_and(|at| at <= now) {
            log::debug!("acpi hotplug: notification unread, raising the GED interrupt again");
            self.acpi_signal();
        }
    }

    /// When an unread notification is due to be signalled again, if one is.
    pub(super) fn acpi_next_wake(&self) -> Option<Instant> {
        let acpi = self.acpi.as_ref()?;
        let registers = acpi.registers.locked();
        let unread = self.ops.iter().any(|(id, op)| {
            matches!(op, Op::WaitingForGuest { .. } | Op::Removing(_))
                && self
                    .passthrough
                    .get(id)
                    .is_some_and(|d| registers.pending(d.port))
        });
        let last = acpi.last_signal?;
        unread.then(|| last + RENOTIFY_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(status: u8) -> OstReport {
        OstReport {
            slot: 0,
            event: NOTIFY_DEVICE_CHECK,
            status,
        }
    }

    #[test]
    fn add_waits_without_ost_or_enabled_decoding() {
        assert_eq!(add_state(None, 0), AcpiAdd::Waiting);
        // Status bits in the upper half are not the command register.
        assert_eq!(add_state(None, 0x0010_0000), AcpiAdd::Waiting);
    }

    #[test]
    fn successful_device_check_ost_means_the_guest_has_the_device() {
        assert_eq!(add_state(Some(&report(OST_SUCCESS)), 0), AcpiAdd::Taken);
    }

    #[test]
    fn failed_device_check_ost_fails_the_add_even_with_decoding_on() {
        assert_eq!(add_state(Some(&report(0x80)), 0x6), AcpiAdd::Failed(0x80));
    }

    #[test]
    fn driver_enabling_memory_or_bus_mastering_means_the_guest_has_the_device() {
        assert_eq!(add_state(None, 0x2), AcpiAdd::Taken);
        assert_eq!(add_state(None, 0x4), AcpiAdd::Taken);
        assert_eq!(add_state(None, 0x1), AcpiAdd::Taken);
    }
}
