//! The SQL surface, one file per family.
pub mod features;
pub mod hash;
pub mod search;
pub mod status;
pub mod watch;
