//! Reboot in place: a guest reset (i8042, ACPI reset register, triple fault) restarts the VM
//! inside the same process (`--on-reboot restart`, the default) instead of ending it
//! (`--on-reboot exit`, exit code 3).
//!
//! [`crate::vm::Vm::run`] stops and joins the vCPU threads as for any end, keeping their fds,
//! then instead of releasing everything it resets what the last guest changed, in this order:
//! hotplug operations in flight finished (an add waiting for the guest rolled back, a graceful
//! removal completed), root ports and passthrough devices reset (see
//! [`crate::hotplug::controller::Controller::prepare_reboot`]), the platform devices (serial
//! registers, i8042, GED) back to power-on, the in-kernel PIC, IOAPIC and PIT back to the
//! state captured right after they were created ([`PowerOnState`]), the ACPI tables written
//! again, the kernel, initramfs and command line loaded again, and every vCPU put back in its
//! power-on state ([`crate::cpu::reset`]). Then new vCPU threads start on the same fds.
//! Guest memory (reserved, locked, DMA-mapped), the devices with their VF leases, the event
//! loop, the console connection and the control API stay. Any error on the way ends the VM
//! through the one release path of `run`.
//!
//! The CMOS keeps its NVRAM (as on real hardware; its clock is the host's) and kvmclock keeps
//! counting: the next kernel sets it up again. Guest RAM is not cleared.

use std::path::PathBuf;
use std::time::Instant;

use event_manager::SubscriberId;
use kvm_bindings::{
    kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};

use crate::api::{Event, EventKind};
use crate::boot::{self, BootSource};
use crate::cpu::reset::reset_vcpu;
use crate::hotplug::controller::{Controller, RebootOutcome};
use crate::vm::event_loop::EventLoop;
use crate::vm::{kvm_err, Result, Vm, VmError};

/// What a guest reset does (`--on-reboot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReboot {
    /// The VM restarts in place, in the same process (the default).
    #[default]
    Restart,
    /// The VM ends and `rvmm run` exits with code 3.
    Exit,
}

impl std::fmt::Display for OnReboot {
    /// The command-line form: `restart` or `exit`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnReboot::Restart => "restart",
            OnReboot::Exit => "exit",
        })
    }
}

rvmm_pci::serde_as_string!(OnReboot);

impl std::str::FromStr for OnReboot {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "restart" => Ok(OnReboot::Restart),
            "exit" => Ok(OnReboot::Exit),
            _ => Err(format!(
                "--on-reboot {s:?} is not understood: use restart (reboot the VM in place) or exit (end rvmm with exit code 3)"
            )),
        }
    }
}

/// What the VM's payload is loaded from, again at each reboot.
#[derive(Clone, Debug)]
pub(crate) struct Payload {
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: Option<PathBuf>,
    pub(crate) cmdline: String,
}

/// The in-kernel interrupt controllers and PIT as KVM created them, written back at a reboot.
pub(crate) struct PowerOnState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl PowerOnState {
    /// Reads the PIC (master, slave), IOAPIC and PIT of a VM that has not run yet.
    pub(crate) fn capture(vm_fd: &VmFd) -> Result<Self> {
        let mut chips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        let pit = vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        Ok(Self { chips, pit })
    }

    /// Writes them back.
    pub(crate) fn restore(&self, vm_fd: &VmFd) -> Result<()> {
        for chip in &self.chips {
            vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        vm_fd.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))
    }
}

/// The controller as the event loop holds it, with its id there (for its `EventOps`).
pub(crate) struct ControllerHandle {
    pub(crate) controller: Arc<Mutex<Controller>>,
    pub(crate) id: SubscriberId,
}

impl Vm {
    /// Resets the VM for a reboot in place; the vCPU threads have ended and `self.vcpus` holds
    /// their fds again. See the module documentation for what is reset and what stays.
    pub(crate) fn reboot(
        &mut self,
        event_loop: &mut EventLoop,
        controller: Option<&ControllerHandle>,
    ) -> Result<()> {
        let started = Instant::now();
        let outcome = match controller {
            Some(c) => event_loop
                .with_ops(c.id, |ops| {
                    use rvmm_devices::sync::MutexExt;
                    c.controller.locked().prepare_reboot(ops)
                })
                .map_err(VmError::EventLoop)?,
            None => RebootOutcome::default(),
        };
        self.devices.reset_platform();
        self.power_on.restore(&self.vm_fd)?;
        let rsdp = self.devices.write_acpi_tables(&self.memory)?;
        let entry = boot::load(
            &self.memory,
            &BootSource {
                kernel: &self.payload.kernel,
                initramfs: self.payload.initramfs.as_deref(),
                cmdline: &self.payload.cmdline,
                rsdp,
            },
        )?;
        for (index, (vcpu, power_on)) in self.vcpus.iter().zip(&self.vcpus_power_on).enumerate() {
            // At most MAX_CPUS (254) vCPUs exist.
            reset_vcpu(vcpu, power_on, &self.memory, entry, index as u8)?;
        }
        self.counters.count_reboot();
        let reboots = self.counters.reboots();
        log::info!(
            "reboot {reboots} in place: reset in {:?}; hot-adds rolled back: {:?}, removals completed: {:?}, device resets failed: {:?}",
            started.elapsed(),
            outcome.rolled_back,
            outcome.removed,
            outcome.reset_failed,
        );
        self.events.publish(Event::now(EventKind::VmRebooted {
            reboots,
            rolled_back: outcome.rolled_back,
            removed: outcome.removed,
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_reboot_parses_its_two_values() {
        assert_eq!("restart".parse(), Ok(OnReboot::Restart));
        assert_eq!("exit".parse(), Ok(OnReboot::Exit));
        assert_eq!(OnReboot::default(), OnReboot::Restart);
    }

    #[test]
    fn an_unknown_on_reboot_value_says_what_is_accepted() {
        let err = "reset".parse::<OnReboot>().unwrap_err();
        assert!(err.contains("restart") && err.contains("exit"), "{err}");
    }
}
