//! The SQL surface, one file per family. A leaf: nothing else in doppler imports from here.
pub mod features;
pub mod fill;
pub mod hash;
pub mod pdq;
pub mod search;
pub mod status;
pub mod watch;
pub mod workers;
