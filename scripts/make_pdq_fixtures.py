#!/usr/bin/env python3
"""PDQ expectations from the reference: pdqhash 0.2.8 (Meta ThreatExchange's C++ behind Cython).

For every image file in each directory, writes <dir>/pdq.tsv, one line per file (a first line
starting with '#' names the columns):

  name  read  width  height  pixels_sha256  hash  quality  d0 .. d7  dihedral_quality

read is "pil" when `Image.open(f).convert('RGB')` works (then the other columns are filled) or
"unreadable" (the rest "-"). pixels_sha256 is the SHA-256 of those RGB8 bytes, row-major, so the
Rust test compares PDQ only where doppler decodes the same pixels. hash is pdqhash.compute's bits
as 64 hex digits (np.packbits of its 256-element vector: the reference's own hex text), d0..d7 are
compute_dihedral's eight (original, rotate 90, 180, 270, flip X, flip Y, flip +1, flip -1) and
its quality (which may differ from compute's for a 64x64 image: only compute_dihedral blurs it).

Default directories: $DOPPLER_FIXTURES, its dhash/ and wild/, and its pdq/, which this script
first fills with the sizes PDQ treats specially (under 5 pixels a side: a zero hash; exactly
64x64: no blur in compute, a blur in compute_dihedral, and two images where that changes the
hash), extreme aspect ratios, flat images (ties at the median) and noise, all PNG.

  python scripts/make_pdq_fixtures.py            # the default directories
  python scripts/make_pdq_fixtures.py DIR ...    # just these (nothing generated)
"""
import argparse
import hashlib
import os

import numpy as np
import pdqhash
from PIL import Image, ImageFilter

COLUMNS = (["name", "read", "width", "height", "pixels_sha256", "hash", "quality"] + [f"d{i}" for i in range(8)]
           + ["dihedral_quality"])
SKIP_SUFFIXES = (".tsv", ".rgb", ".rgb224", ".f32", ".stamp", ".txt", ".json")


def hex_of(bits):
    """pdqhash's 256-element 0/1 vector (first element = the hex text's first bit) as 64 hex digits."""
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def edge_images(out):
    """Images whose size or content PDQ treats specially, as lossless RGB PNGs."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20240607)

    def noise(w, h):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def smooth(w, h):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        a = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1),
                      128 + 100 * np.sin((x + 2 * y) / max(w, h) * 9)], -1)
        return np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)

    def flat(v):
        return lambda w, h: np.full((h, w, 3), v, dtype=np.uint8)

    def checker(w, h):
        y, x = np.mgrid[0:h, 0:w]
        return np.repeat(((((x // 3) + (y // 3)) % 2) * 255).astype(np.uint8)[..., None], 3, -1)

    kinds = {"noise": noise, "smooth": smooth, "gray": flat(128), "black": flat(0), "checker": checker}
    sizes = [(1, 1), (2, 3), (4, 4), (4, 100), (100, 4), (5, 5), (5, 4), (6, 7), (17, 9), (63, 64),
             (64, 64), (65, 64), (64, 65), (127, 129), (128, 128), (200, 199), (1, 2000), (2000, 1),
             (5, 3000), (3000, 5), (4100, 9), (12, 2600)]
    n = 0
    for w, h in sizes:
        for kind, make in kinds.items():
            if kind in ("gray", "black", "checker") and (w, h) not in [(5, 5), (64, 64), (200, 199), (4, 4)]:
                continue
            Image.fromarray(make(w, h), "RGB").save(os.path.join(out, f"{n:03d}_{kind}_{w}x{h}.png"))
            n += 1
    # 64x64 images on which compute (no blur) and compute_dihedral (blur of window 1: a running sum
    # whose rounding drifts) disagree: about 1 in 700 blurred noise images
    found, seed = 0, np.random.default_rng(3)
    for _ in range(20000):
        if found == 2:
            break
        a = seed.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(int(seed.integers(0, 6)))))
        if (pdqhash.compute(a)[0] != pdqhash.compute_dihedral(a)[0][0]).any():
            Image.fromarray(a, "RGB").save(os.path.join(out, f"{n:03d}_split_64x64.png"))
            n, found = n + 1, found + 1
    return n


def rows_for(d):
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        if not os.path.isfile(path) or name.startswith(".") or name.endswith(SKIP_SUFFIXES):
            continue
        try:
            with Image.open(path) as im:
                rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        except Exception:  # PIL refuses it: nothing to compare with
            yield [name, "unreadable"] + ["-"] * (len(COLUMNS) - 2)
            continue
        h, q = pdqhash.compute(rgb)
        hs, q8 = pdqhash.compute_dihedral(rgb)
        yield ([name, "pil", str(rgb.shape[1]), str(rgb.shape[0]), hashlib.sha256(rgb.tobytes()).hexdigest(),
                hex_of(h), str(int(q))] + [hex_of(x) for x in hs] + [str(int(q8))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", help="directories of images (default: the fixtures, see above)")
    a = ap.parse_args()
    dirs = a.dirs
    if not dirs:
        root = os.environ.get("DOPPLER_FIXTURES", "/opt/doppler/fixtures")
        made = edge_images(os.path.join(root, "pdq"))
        print(f"wrote {made} edge-case images to {root}/pdq")
        dirs = [root, os.path.join(root, "dhash"), os.path.join(root, "wild"), os.path.join(root, "pdq")]
    for d in dirs:
        rows = list(rows_for(d))
        with open(os.path.join(d, "pdq.tsv"), "w") as f:
            f.write("#" + "\t".join(COLUMNS) + "\n")
            for r in rows:
                f.write("\t".join(r) + "\n")
        read = sum(r[1] == "pil" for r in rows)
        print(f"{d}/pdq.tsv: {len(rows)} files, {read} read by PIL, PDQ from pdqhash {pdqhash.__version__}")


if __name__ == "__main__":
    main()
