//! doppler's pure image pipeline, usable without Postgres:
//! source bytes → [`decode`] (PIL's `convert('RGB')`) → [`resize`] (PIL's bilinear, exact) →
//! [`preprocess`] (ToTensor + Normalize into a batch slot) → [`model`] (one batched ORT run).
//!
//! Nothing in this crate calls Postgres, so every piece is testable with plain `cargo test`, and
//! everything but [`model::Model::run`] may run on any thread.

pub mod batch;
pub mod decode;
pub mod dhash;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod model;
pub mod near;
pub mod pdq;
pub mod pdq_near;
pub mod preprocess;
pub mod resize;
pub mod source;

pub use batch::{prepare_stream, Marks, PreparedImage, Source, StreamOptions, StreamStats};
pub use decode::{decode_rgb, Limits, RgbImage};
pub use error::{catch_panic, Error, ErrorKind, Result};
pub use model::{Model, Provider, SessionConfig};
pub use preprocess::Preprocess;
pub use resize::Filter;

/// Decodes image bytes and writes the preprocessed pixels into `slot`.
/// Panics inside decoders are caught and returned as [`ErrorKind::Internal`].
pub fn prepare(
    bytes: &[u8],
    what: &str,
    limits: &Limits,
    pre: &Preprocess,
    slot: &mut [f32],
) -> Result<()> {
    catch_panic("decoding an image", || {
        let img = decode_rgb(bytes, what, limits)?;
        pre.write_slot(&img, slot);
        Ok(())
    })
}
