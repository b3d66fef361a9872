#!/usr/bin/env python3
"""Generate the test images and the reference features of the seed's Python pipeline.

Images are made with PIL (natural-looking content: gradients, noise, shapes, text) in many sizes,
aspect ratios, modes and formats. For each image this writes, next to it:
  <name>.rgb224  the 224x224 RGB8 pixels after the seed's Image.open().convert('RGB') + Resize((224,224))
  <name>.f32     the reference features (little-endian float32) of the seeded ResNet-50
and a manifest `manifest.tsv` (name, width, height, PIL mode, note).

The reference is the seed's exact chain: PIL open -> convert('RGB') -> torchvision Resize((224, 224)),
i.e. img.resize((224, 224), Image.BILINEAR) -> ToTensor (/255, float32) -> Normalize(ImageNet mean/std)
-> onnxruntime. One documented deviation: 16-bit grayscale, which PIL clamps to 255 on convert('RGB');
doppler keeps the high byte of each 16-bit sample (as PIL itself does for 16-bit RGB), and so does the
reference here for that one image.
"""
import argparse
import os
import struct
import zlib

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def scene(w, h, seed):
    """An RGB picture with a gradient sky, noise, shapes and text."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * (x / max(w - 1, 1))
    g = 255 * (y / max(h - 1, 1))
    b = 128 + 127 * np.sin((x + 2 * y) / max(w, h) * 6.28 * 3)
    arr = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, max(2, w // 3))), y0 + int(rng.integers(1, max(2, h // 3)))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=col)
    d.text((w // 10, h // 2), "doppler", fill=(255, 255, 255))
    if w > 8 and h > 8:
        img = img.filter(ImageFilter.SMOOTH)
    return img


def png16(path, arr):
    """Write a 16-bit PNG (gray: 2-D, RGB: 3-D uint16) by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    ctype = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def make_images(out):
    """Returns [(file, note)]."""
    items = []

    def save(img, name, note, **kw):
        img.save(os.path.join(out, name), **kw)
        items.append((name, note))

    save(scene(640, 480, 1), "landscape_640x480.jpg", "baseline JPEG 4:2:0", quality=90)
    save(scene(300, 500, 2), "portrait_300x500.png", "RGB PNG")
    save(scene(7, 5, 3), "tiny_7x5.png", "tiny, upscaled")
    save(scene(3000, 2000, 4), "large_3000x2000.jpg", "large JPEG", quality=85)
    save(scene(320, 240, 5).convert("L"), "gray_320x240.png", "8-bit grayscale PNG")
    save(scene(200, 300, 6).convert("L"), "gray_200x300.jpg", "grayscale JPEG", quality=92)
    rgba = scene(256, 256, 7).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((256, 256)))
    save(rgba, "rgba_256x256.png", "RGBA PNG (alpha dropped, not composited)")
    pal = scene(300, 200, 8).quantize(colors=64)
    save(pal, "palette_300x200.png", "palette PNG", transparency=0)
    save(scene(100, 80, 9).convert("LA"), "la_100x80.png", "gray+alpha PNG")
    a16 = np.asarray(scene(200, 150, 10)).astype(np.uint16) * 257 + np.random.default_rng(10).integers(0, 257, (150, 200, 3)).astype(np.uint16)
    png16(os.path.join(out, "rgb16_200x150.png"), a16)
    items.append(("rgb16_200x150.png", "16-bit RGB PNG"))
    g16 = np.asarray(scene(150, 100, 11).convert("L")).astype(np.uint16) * 257
    png16(os.path.join(out, "gray16_150x100.png"), g16)
    items.append(("gray16_150x100.png", "16-bit grayscale PNG (documented deviation: scaled, not clamped)"))
    save(scene(800, 600, 12), "progressive_800x600.jpg", "progressive JPEG", quality=88, progressive=True)
    save(scene(200, 200, 13).convert("CMYK"), "cmyk_200x200.jpg", "CMYK JPEG (Adobe)", quality=90)
    save(scene(333, 222, 14), "yuv444_333x222.jpg", "JPEG 4:4:4", quality=95, subsampling=0)
    save(scene(250, 190, 15), "yuv422_250x190.jpg", "JPEG 4:2:2", quality=80, subsampling=1)
    save(scene(160, 120, 16).convert("P", palette=Image.Palette.ADAPTIVE, colors=100), "gif_160x120.gif", "GIF (first frame, palette)")
    save(scene(123, 77, 17), "bitmap_123x77.bmp", "BMP")
    save(scene(90, 60, 18), "tiff_90x60.tif", "TIFF")
    save(scene(240, 180, 19), "lossless_240x180.webp", "lossless WebP", lossless=True)
    save(scene(224, 224, 20), "exact_224x224.png", "already 224x224: no resize")
    save(scene(224, 400, 21), "narrow_224x400.png", "vertical resize only")
    save(scene(1, 1, 22), "one_1x1.png", "1x1")
    return items


def reference_rgb(path, note):
    img = Image.open(path)
    if img.mode == "I;16" or img.mode.startswith("I;16"):
        # documented deviation: high byte of each 16-bit sample, not PIL's clamp to 255
        a = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(a, "L")
    img = img.convert("RGB")
    return img.resize((224, 224), Image.BILINEAR)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    items = make_images(a.out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    with open(os.path.join(a.out, "manifest.tsv"), "w") as man:
        for name, note in items:
            p = os.path.join(a.out, name)
            src = Image.open(p)
            rgb = reference_rgb(p, note)
            arr = np.asarray(rgb, dtype=np.uint8)
            with open(p + ".rgb224", "wb") as f:
                f.write(arr.tobytes())
            x = (arr.astype(np.float32) / np.float32(255.0) - MEAN) / STD
            x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
            feats = sess.run(None, {"input": x})[0].reshape(-1).astype("<f4")
            with open(p + ".f32", "wb") as f:
                f.write(feats.tobytes())
            man.write(f"{name}\t{src.width}\t{src.height}\t{src.mode}\t{note}\n")
    print(f"wrote {len(items)} images and references to {a.out}")


if __name__ == "__main__":
    main()
