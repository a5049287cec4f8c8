//! rvmm library
