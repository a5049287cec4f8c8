//! ACPI tables of rvmm, built from a plain description of the machine.
