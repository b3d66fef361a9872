//! PDQ parity with the reference, pdqhash 0.2.8 (scripts/make_pdq_fixtures.py wrote each fixture
//! directory's pdq.tsv: PIL's pixels' SHA-256, `pdqhash.compute`'s hash and quality,
//! `compute_dihedral`'s eight hashes and quality). Every file PIL reads is decoded by doppler; where doppler's
//! pixels equal PIL's (README's format table lists where they differ or are refused), its PDQ,
//! quality and dihedral hashes must equal the reference's, bit for bit.

use doppler_core::pdq::{hamming, parse_hex, pdq, pdq_dihedral, to_hex};
use doppler_core::{decode_rgb, Limits};
use sha2::{Digest, Sha256};

fn fixtures() -> String {
    std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| "/opt/doppler/fixtures".into())
}

#[derive(Default)]
struct Tally {
    files: usize,
    unreadable: usize,
    refused: usize,
    pixels_differ: usize,
    compared: usize,
    equal: usize,
    max_bits: u32,
    wrong: Vec<String>,
}

fn check_dir(dir: &str) -> Tally {
    let list = std::fs::read_to_string(format!("{dir}/pdq.tsv")).unwrap_or_else(|e| {
        panic!("{dir}/pdq.tsv: {e} (run scripts/setup, or scripts/make_pdq_fixtures.py)")
    });
    let mut t = Tally::default();
    for line in list.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 16, "{dir}/pdq.tsv: {line}");
        let (name, read, width, height, sha) = (f[0], f[1], f[2], f[3], f[4]);
        t.files += 1;
        if read != "pil" {
            t.unreadable += 1;
            continue;
        }
        let bytes = std::fs::read(format!("{dir}/{name}")).unwrap();
        let img = match decode_rgb(&bytes, name, &Limits::default()) {
            Ok(img) => img,
            Err(_) => {
                t.refused += 1;
                continue;
            }
        };
        let digest: String = Sha256::digest(&img.data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if format!("{}x{}", img.width, img.height) != format!("{width}x{height}") || digest != sha {
            t.pixels_differ += 1;
            continue;
        }
        t.compared += 1;
        let want = |s: &str| parse_hex(s).unwrap_or_else(|| panic!("{name}: bad hex {s}"));
        let (want_hash, want_quality) = (want(f[5]), f[6].parse::<u32>().unwrap());
        let want_dihedral_quality = f[15].parse::<u32>().unwrap();
        let got = pdq(&img);
        let (dihedral, dihedral_quality) = pdq_dihedral(&img);
        let mut bits = hamming(&got.hash, &want_hash);
        let mut problems = Vec::new();
        if bits > 0 {
            problems.push(format!(
                "hash {} != {} ({bits} bits)",
                to_hex(&got.hash),
                f[5]
            ));
        }
        if got.quality != want_quality || dihedral_quality != want_dihedral_quality {
            problems.push(format!(
                "quality {} / {dihedral_quality} != {want_quality} / {want_dihedral_quality}",
                got.quality
            ));
        }
        for (v, (h, w)) in dihedral.iter().zip(&f[7..15]).enumerate() {
            let d = hamming(h, &want(w));
            bits = bits.max(d);
            if d > 0 {
                problems.push(format!("dihedral {v}: {} != {w} ({d} bits)", to_hex(h)));
            }
        }
        t.max_bits = t.max_bits.max(bits);
        if problems.is_empty() {
            t.equal += 1;
        } else {
            t.wrong.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    t
}

#[test]
fn pdq_equals_pdqhash_wherever_the_pixels_equal_pils() {
    let root = fixtures();
    let mut report = String::new();
    let (mut compared, mut wrong) = (0, Vec::new());
    for sub in ["", "/dhash", "/wild", "/pdq"] {
        let dir = format!("{root}{sub}");
        let t = check_dir(&dir);
        report.push_str(&format!(
            "{dir:32} {:3} files: {:3} compared, {:3} equal (max {} bits off); skipped: {} PIL \
             cannot read, {} doppler refuses, {} with pixels other than PIL's\n",
            t.files, t.compared, t.equal, t.max_bits, t.unreadable, t.refused, t.pixels_differ
        ));
        for w in &t.wrong {
            report.push_str(&format!("    {w}\n"));
        }
        compared += t.compared;
        wrong.extend(t.wrong);
    }
    println!("{report}");
    assert!(compared >= 350, "only {compared} images compared\n{report}");
    assert!(wrong.is_empty(), "{report}");
}
