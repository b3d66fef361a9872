#!/usr/bin/env python3
"""What pdqhash 0.2.8 (the PDQ reference doppler matches) costs per image, for comparison with
`cargo run --release -p doppler-core --example pdq -- DIR` on the same pixels.

  python scripts/bench_pdq.py [--reps R] DIR

Reads every image in DIR that PIL reads as `numpy.asarray(Image.open(f).convert('RGB'))` (not
timed), then times `pdqhash.compute` and `pdqhash.compute_dihedral` over all of them, best of R
passes (default 5), and prints milliseconds per image (the mean over the images).
"""
import argparse
import os
import time

import numpy as np
import pdqhash
from PIL import Image


def per_image(images, reps, f):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a in images:
            f(a)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(images)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    images = []
    for name in sorted(os.listdir(a.dir)):
        path = os.path.join(a.dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                images.append(np.ascontiguousarray(np.asarray(im.convert("RGB"))))
        except Exception:
            continue
    assert images, f"no image in {a.dir} that PIL reads"
    one = per_image(images, a.reps, pdqhash.compute)
    eight = per_image(images, a.reps, pdqhash.compute_dihedral)
    mp = sum(x.shape[0] * x.shape[1] for x in images) / len(images) / 1e6
    print(f"pdqhash compute: {one:.3f} ms/image, compute_dihedral: {eight:.3f} ms/image "
          f"({len(images)} images, {mp:.2f} Mpixel on average, best of {a.reps})")


if __name__ == "__main__":
    main()
