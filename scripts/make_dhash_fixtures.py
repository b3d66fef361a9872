#!/usr/bin/env python3
"""Generate images of many modes, formats and sizes, and their imagehash dHash strings.

Writes <out>/<n>.<ext> and <out>/dhash.tsv (file, str(imagehash.dhash(Image.open(f), hash_size=8))).
16-bit grayscale is left out: PIL clamps it to white on convert('L') and doppler deliberately does
not (see README).
"""
import argparse
import os

import imagehash
import numpy as np
from PIL import Image, ImageDraw

SIZES = [(1, 1), (2, 3), (9, 8), (8, 9), (10, 10), (17, 5), (3, 301), (64, 48), (100, 100), (333, 222),
         (640, 480), (480, 640), (1200, 900), (1500, 1000)]
MODES = [("RGB", "png"), ("RGB", "jpg"), ("RGBA", "png"), ("L", "png"), ("L", "jpg"), ("LA", "png"),
         ("P", "png"), ("P", "gif"), ("1", "png"), ("RGB", "bmp"), ("RGB", "webp"), ("CMYK", "jpg")]


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + y) / 7.0)], -1)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    n = 0
    for (w, h) in SIZES:
        for mode, ext in MODES:
            img = picture(w, h, n)
            if mode == "P":
                img = img.quantize(colors=32)
            elif mode != "RGB":
                img = img.convert(mode)
            name = f"{n:03d}_{mode}_{w}x{h}.{ext}"
            kw = {"lossless": True} if ext == "webp" else {"quality": 90} if ext == "jpg" else {}
            img.save(os.path.join(a.out, name), **kw)
            rows.append((name, str(imagehash.dhash(Image.open(os.path.join(a.out, name)), hash_size=8))))
            n += 1
    with open(os.path.join(a.out, "dhash.tsv"), "w") as f:
        for r in rows:
            f.write("\t".join(r) + "\n")
    print(f"wrote {len(rows)} images and their imagehash dHash to {a.out}")


if __name__ == "__main__":
    main()
