//! Images from the wild (issue 17): odd but valid files of every claimed format
//! (scripts/make_wild_fixtures.py), each decoded and compared with what PIL made of it.
//! A file PIL reads must give PIL's pixels exactly (hence its features and its dHash), or be
//! refused as README's format table says; no decoder may fail with an internal error.

use std::collections::BTreeMap;

use doppler_core::{decode_rgb, dhash, ErrorKind, Limits};

/// Classes that doppler refuses on purpose (README, "Image formats"): class → the error kind.
/// CCITT Group 3 (fax) compression: the tiff crate does not decode it (Group 4 it does).
const REFUSED: &[(&str, ErrorKind)] = &[("tiff/bilevel_g3", ErrorKind::Unsupported)];

/// Classes read with a documented difference (README, "Image formats"): class → the largest
/// difference of a sample from PIL's. JPEG-compressed TIFF: the tiff crate's JPEG decoder
/// (zune-jpeg) rounds its colour conversion differently from the libjpeg that libtiff uses.
const DIFFERS: &[(&str, u8)] = &[("tiff/jpeg", 1)];

/// Classes whose samples are not 8-bit (the target counts 8-bit files).
const NOT_8_BIT: &[&str] = &[
    "png/rgb16_trns",
    "bmp/bilevel",
    "png/one_bit",
    "png/gray_2bit",
    "png/palette_4bit",
    "tiff/gray4",
    "tiff/bilevel",
    "tiff/bilevel_g3",
    "tiff/bilevel_g4",
];

fn dir() -> String {
    format!(
        "{}/wild",
        std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into())
    )
}

#[derive(Default)]
struct Tally {
    files: usize,
    equal: usize,
    refused_as_documented: usize,
    differs_as_documented: usize,
    wrong: Vec<String>,
}

#[test]
fn odd_images_decode_as_pil_decodes_them() {
    let dir = dir();
    let manifest = std::fs::read_to_string(format!("{dir}/manifest.tsv"))
        .unwrap_or_else(|e| panic!("{dir}/manifest.tsv: {e} (run scripts/setup first)"));
    let mut by_class: BTreeMap<String, Tally> = BTreeMap::new();
    let (mut readable, mut equal) = (0, 0);
    let (mut readable8, mut equal8) = (0, 0);
    for line in manifest.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (name, class, expect, width, height, want_hash) = (f[0], f[1], f[2], f[3], f[4], f[5]);
        let bytes = std::fs::read(format!("{dir}/{name}")).unwrap();
        let got = decode_rgb(&bytes, name, &Limits::default());
        let t = by_class.entry(class.to_string()).or_default();
        t.files += 1;
        if let Err(e) = &got {
            assert_ne!(
                e.kind,
                ErrorKind::Internal,
                "{name}: an internal error: {e}"
            );
        }
        if expect != "pil" {
            // PIL refuses it: so may doppler (any error); reading it is reported, not failed
            if got.is_ok() {
                t.wrong.push(format!("{name}: read, where PIL refuses it"));
            } else {
                t.equal += 1;
            }
            continue;
        }
        readable += 1;
        let eight_bit = !NOT_8_BIT.contains(&class);
        readable8 += eight_bit as usize;
        let documented = REFUSED.iter().find(|(c, _)| *c == class).map(|(_, k)| *k);
        match got {
            Err(e) if Some(e.kind) == documented => t.refused_as_documented += 1,
            Err(e) => t.wrong.push(format!("{name}: refused ({:?}): {e}", e.kind)),
            Ok(img) => {
                let want = std::fs::read(format!("{dir}/{name}.rgb")).unwrap();
                let size = format!("{}x{}", img.width, img.height);
                if size != format!("{width}x{height}") {
                    t.wrong
                        .push(format!("{name}: {size}, PIL {width}x{height}"));
                } else if img.data != want {
                    let diff = img.data.iter().zip(&want).filter(|(a, b)| a != b).count();
                    let max = img
                        .data
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| a.abs_diff(*b))
                        .max()
                        .unwrap_or(0);
                    let bound = DIFFERS.iter().find(|(c, _)| *c == class).map(|(_, b)| *b);
                    if bound.is_some_and(|b| max <= b) {
                        t.differs_as_documented += 1;
                        continue;
                    }
                    t.wrong.push(format!(
                        "{name}: {diff} of {} samples differ from PIL's (by up to {max})",
                        want.len()
                    ));
                } else if dhash::to_hex(dhash::dhash(&img)) != want_hash {
                    t.wrong.push(format!(
                        "{name}: dHash {} != imagehash's {want_hash}",
                        dhash::to_hex(dhash::dhash(&img))
                    ));
                } else {
                    t.equal += 1;
                    equal += 1;
                    equal8 += eight_bit as usize;
                }
            }
        }
    }
    let mut report = String::new();
    for (class, t) in &by_class {
        report.push_str(&format!(
            "{class:32} {:2} files, {:2} as PIL, {:2} refused / {:2} differing as documented{}\n",
            t.files,
            t.equal,
            t.refused_as_documented,
            t.differs_as_documented,
            if t.wrong.is_empty() { "" } else { "  <-- " }
        ));
        for w in &t.wrong {
            report.push_str(&format!("    {w}\n"));
        }
    }
    let share = equal8 as f64 / readable8.max(1) as f64;
    println!(
        "{report}{equal} of {readable} files that PIL reads give PIL's pixels ({:.1} %); \
         of the 8-bit ones, {equal8} of {readable8} ({:.1} %)",
        100.0 * equal as f64 / readable.max(1) as f64,
        100.0 * share
    );
    assert!(readable >= 90, "only {readable} files");
    let wrong: Vec<&String> = by_class.values().flat_map(|t| &t.wrong).collect();
    assert!(wrong.is_empty(), "{report}");
    // the target: 97 % of the 8-bit files PIL reads give PIL's pixels; every JPEG exactly
    assert!(share >= 0.97, "{report}");
    for (class, t) in by_class.iter().filter(|(c, _)| c.starts_with("jpeg/")) {
        assert_eq!(
            t.equal, t.files,
            "{class}: every JPEG that PIL reads is read as PIL reads it"
        );
    }
}
