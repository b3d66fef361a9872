//! An image a caller names, read with the caller's rights and doppler's limits: a server path or
//! an http(s) URL (`load_text`), or bytes already in the database (`check_size`). The SQL
//! functions that take an image (`extract_features`, `dhash`, `similar`) start here; the fill
//! engine reads its rows' sources with the table owner's rights instead (`fill/`).

use doppler_core::{fetch, source, Error, ErrorKind};

use crate::errors::{raise_error, OrRaise};
use crate::{gucs, privileged};

/// A text source: a server path (superusers and pg_read_server_files members, inside
/// doppler.file_roots) or an http(s) URL (doppler.allow_urls, superusers and doppler_url_reader
/// members, under the URL policy). Returns the bytes and how messages name the source.
pub fn load_text(s: &str) -> (Vec<u8>, String) {
    privileged::check_may_read(s);
    let what = if fetch::is_url(s) {
        format!("image URL \"{s}\"")
    } else {
        source::describe_path(s)
    };
    // (a cancel acts while a URL is on its way: the request goes on, its answer dropped)
    let bytes = source::load_polled(s, &gucs::source_policy(), || {
        pgrx::check_for_interrupts!();
    })
    .or_raise();
    (bytes, what)
}

/// doppler.max_image_bytes, for values already in the database (54000 over it).
pub fn check_size(image: &[u8]) {
    let max = gucs::max_image_bytes();
    if image.len() as u64 > max {
        raise_error(
            Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{} is over the limit of {max} bytes",
                    source::describe_bytes(image.len())
                ),
            )
            .with_hint("Raise doppler.max_image_bytes to accept larger images."),
        );
    }
}
