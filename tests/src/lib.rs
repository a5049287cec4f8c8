//! Harness for integration tests that boot rvmm guests in a QEMU test host.
