//! Hotplug at run time: the [`controller::Controller`] (an event-loop subscriber) adds and
//! removes passthrough devices through the root-port slots, waiting for the guest's pciehp at
//! every step, and removes a device at once when the host takes it back; a device error the
//! host reports goes to the guest's AER recovery, with removal as the fallback.

pub mod controller;
pub mod mode;

pub use controller::Controller;
pub use mode::HotplugMode;
