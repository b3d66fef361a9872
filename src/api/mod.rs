//! The SQL surface, one file per family.
pub mod features;
pub mod watch;
