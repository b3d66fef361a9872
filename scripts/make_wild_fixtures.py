#!/usr/bin/env python3
"""Odd but valid images, as scraped from the web (issue 17), and what PIL makes of each.

Writes to --out: the files, and `manifest.tsv` with one line per file:
name, class, expect, width, height, dhash, note
- expect `pil`: PIL opens the file and converts it to RGB; `<name>.rgb` holds those pixels (the
  seed's `Image.open(f).convert('RGB')`), dhash is imagehash's dHash;
- expect `refuse`: PIL refuses the file as well.
Each class is built from a clean image by editing its bytes the way broken encoders and tools do
(junk before a marker, a cut data segment, a GIF without a colour table, a tiled planar TIFF, ...).
crates/doppler-core/tests/wild.rs decodes every file and compares.
"""
import argparse
import io
import os
import struct
import zlib

import imagehash
import numpy as np
from PIL import Image, ImageDraw


def scene(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
    a = (a + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(a, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.text((w // 10, h // 2), "doppler", fill=(255, 255, 255))
    return img


def jpeg_bytes(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def segments(data):
    """JPEG marker segments before the scan: [(offset, marker, length incl. marker)], and the SOS offset."""
    out, i = [], 2
    while i < len(data):
        assert data[i] == 0xFF, i
        m = data[i + 1]
        if m == 0xDA:
            return out, i
        n = struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((i, m, n + 2))
        i += n + 2
    raise ValueError("no SOS")


def jpeg_cases(img):
    base = jpeg_bytes(img, quality=90)
    segs, sos = segments(base)
    dqt = next(o for o, m, _ in segs if m == 0xDB)
    eoi = base.rindex(b"\xff\xd9")
    yield "jpeg", "extraneous_before_marker", base[:dqt] + b"\x00\x13\x37" + base[dqt:], "junk bytes before a marker (libjpeg warns)"
    yield "jpeg", "ff00_after_soi", base[:2] + b"\xff\x00" + base[2:], "FF00 after the SOI (libjpeg warns)"
    yield "jpeg", "junk_before_eoi", base[:eoi] + b"garbage" + base[eoi:], "junk after the scan, before the EOI"
    yield "jpeg", "trailing_garbage", base + b"\x00" * 100 + b"trailing", "bytes after the EOI"
    tail = bytes(np.random.default_rng(7).integers(0, 256, 300000, dtype=np.uint8)) + b"\xff\xda\x00\x08"
    yield "jpeg", "trailing_video", base + tail, "300 kB of binary data after the EOI, ending in FF DA (a motion photo's video)"
    yield "jpeg", "mpo_like", base + base, "a second JPEG after the first (MPO)"
    app0 = next(o for o, m, _ in segs if m == 0xE0)
    jfif = bytearray(base)
    jfif[app0 + 9:app0 + 11] = b"\x09\x09"
    yield "jpeg", "unknown_jfif_version", bytes(jfif), "JFIF version 9.09 (libjpeg warns)"
    exif = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\x00\xff" + os.urandom(0) + b"\xde\xad\xbe\xef" * 8
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    yield "jpeg", "damaged_exif", base[:2] + app1 + base[2:], "an EXIF block with a broken IFD"
    icc_img = jpeg_bytes(img, quality=90, icc_profile=b"\x00" * 128 + b"acsp" + b"\x00" * 200)
    s2, _ = segments(icc_img)
    app2 = next((o, n) for o, m, n in s2 if m == 0xE2)
    sof = next((o, n) for o, m, n in s2 if m in (0xC0, 0xC1, 0xC2))
    seg = icc_img[app2[0]:app2[0] + app2[1]]
    without = icc_img[:app2[0]] + icc_img[app2[0] + app2[1]:]
    sof_end = sof[0] - app2[1] + sof[1]
    yield "jpeg", "icc_after_sof", without[:sof_end] + seg + without[sof_end:], "the ICC profile (APP2) after the SOF marker"
    bad_icc = bytearray(icc_img)
    bad_icc[app2[0] + 4 + 12] = 7  # sequence number 7 of 1
    yield "jpeg", "bad_icc_marker", bytes(bad_icc), "an ICC marker with a bad sequence number"
    cut = sos + (eoi - sos) * 6 // 10
    yield "jpeg", "data_segment_cut", base[:cut] + b"\xff\xd9", "scan data cut short, then an EOI (premature end of data segment)"
    prog = jpeg_bytes(img, quality=85, progressive=True)
    pcut = len(prog) * 7 // 10
    yield "jpeg", "progressive_cut", prog[:pcut] + b"\xff\xd9", "a progressive JPEG whose later scans are missing"
    yield "jpeg", "truncated", base[:cut], "the file ends in the scan, no EOI (PIL: image file is truncated)"
    yield "jpeg", "no_eoi", base[:-2], "only the EOI missing (PIL: image file is truncated)"
    yield ("jpeg", "junk_then_truncated", base[:dqt] + b"\x00\x13\x37" + base[dqt:cut + 3],
           "junk before a marker, and the file ends in the scan (the first warning is not the truncation)")
    rst = jpeg_bytes(img, quality=90, restart_marker_blocks=4)
    yield "jpeg", "restart_markers", rst, "restart markers every 4 blocks"
    i = rst.find(b"\xff\xd3", len(rst) // 2)
    if i > 0:
        yield "jpeg", "restart_marker_wrong", rst[:i] + b"\xff\xd5" + rst[i + 2:], "a restart marker out of sequence (libjpeg resyncs, warns)"


def gif_cases(img):
    pal = img.quantize(colors=64)
    b = io.BytesIO()
    pal.save(b, "GIF")
    base = b.getvalue()
    yield "gif", "plain", base, "palette GIF"
    b = io.BytesIO()
    pal.save(b, "GIF", transparency=3)
    yield "gif", "transparent_first_frame", b.getvalue(), "first frame with a transparent index"
    frames = [pal, img.rotate(90).quantize(colors=32)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], disposal=2, transparency=5, duration=100)
    yield "gif", "background_disposal", b.getvalue(), "animated, first frame transparent with background disposal"
    # a gray identity palette, then stripped: no colour table at all (PIL: mode L, index = gray)
    gray = img.convert("L")
    b = io.BytesIO()
    gray.save(b, "GIF")
    g = b.getvalue()
    flags = g[10]
    if flags & 0x80:
        size = 3 << ((flags & 7) + 1)
        stripped = g[:10] + bytes([flags & 0x70]) + g[11:13] + g[13 + size:]
        yield "gif", "no_color_table", stripped, "no global or local colour table"
    # the first frame smaller than the logical screen, at an offset
    w, h = pal.size
    d = bytearray(base)
    d[6:10] = struct.pack("<HH", w + 17, h + 9)
    i = d.index(b"\x2c", 13 + (3 << ((d[10] & 7) + 1)))
    d[i + 1:i + 5] = struct.pack("<HH", 11, 5)
    yield "gif", "frame_offset", bytes(d), "first frame smaller than the screen, at an offset"
    b = io.BytesIO()
    pal.save(b, "GIF", interlace=True)
    yield "gif", "interlaced", b.getvalue(), "interlaced"
    # a colour table shorter than the indices the frame uses (2 entries; indices up to 63)
    d = bytearray(base)
    size = 3 << ((d[10] & 7) + 1)
    short = bytes(d[:10]) + bytes([d[10] & 0xF8]) + bytes(d[11:13]) + bytes(d[13:19]) + bytes(d[13 + size:])
    yield "gif", "short_palette", short, "a 2-entry colour table, indices past it"


def tiff_ifd(entries, data_at):
    """Little-endian TIFF bytes: entries [(tag, type, values)], with out-of-line data appended."""
    types = {3: ("H", 2), 4: ("I", 4)}
    n = len(entries)
    ifd_size = 2 + 12 * n + 4
    extra = b""
    body = struct.pack("<H", n)
    for tag, typ, vals in sorted(entries):
        fmt, size = types[typ]
        raw = struct.pack("<" + fmt * len(vals), *vals)
        if len(raw) <= 4:
            body += struct.pack("<HHI", tag, typ, len(vals)) + raw.ljust(4, b"\x00")
        else:
            body += struct.pack("<HHII", tag, typ, len(vals), data_at + ifd_size + len(extra))
            extra += raw
    return body + b"\x00\x00\x00\x00" + extra


def tiff_planar_tiled(img, tile=16):
    a = np.asarray(img)
    h, w, _ = a.shape
    tx, ty = -(-w // tile), -(-h // tile)
    tiles = []
    for c in range(3):
        for j in range(ty):
            for i in range(tx):
                t = np.zeros((tile, tile), np.uint8)
                part = a[j * tile:(j + 1) * tile, i * tile:(i + 1) * tile, c]
                t[:part.shape[0], :part.shape[1]] = part
                tiles.append(t.tobytes())
    pix = b"".join(tiles)
    offs = [8 + k * tile * tile for k in range(len(tiles))]
    entries = [(256, 4, [w]), (257, 4, [h]), (258, 3, [8, 8, 8]), (259, 3, [1]), (262, 3, [2]),
               (277, 3, [3]), (284, 3, [2]), (322, 3, [tile]), (323, 3, [tile]),
               (324, 4, offs), (325, 4, [tile * tile] * len(tiles))]
    return b"II*\x00" + struct.pack("<I", 8 + len(pix)) + pix + tiff_ifd(entries, 8 + len(pix))


def tiff_gray4(img):
    a = np.asarray(img.convert("L")) >> 4
    h, w = a.shape
    rows = []
    for r in a:
        r = list(r) + ([0] if w % 2 else [])
        rows.append(bytes((r[k] << 4) | r[k + 1] for k in range(0, len(r), 2)))
    pix = b"".join(rows)
    entries = [(256, 4, [w]), (257, 4, [h]), (258, 3, [4]), (259, 3, [1]), (262, 3, [1]),
               (273, 4, [8]), (277, 3, [1]), (278, 4, [h]), (279, 4, [len(pix)])]
    return b"II*\x00" + struct.pack("<I", 8 + len(pix)) + pix + tiff_ifd(entries, 8 + len(pix))


def tiff_cases(img):
    def save(**kw):
        b = io.BytesIO()
        kw.pop("src", img).save(b, "TIFF", **kw)
        return b.getvalue()
    yield "tiff", "plain", save(), "uncompressed RGB"
    yield "tiff", "lzw", save(compression="tiff_lzw"), "LZW"
    yield "tiff", "deflate", save(compression="tiff_adobe_deflate"), "Deflate"
    yield "tiff", "packbits", save(compression="packbits"), "PackBits"
    yield "tiff", "planar_tiled", tiff_planar_tiled(img), "tiled, separate planes"
    yield "tiff", "gray4", tiff_gray4(img), "4-bit grayscale"
    yield "tiff", "bilevel", save(src=img.convert("1")), "1-bit"
    yield "tiff", "bilevel_g4", save(src=img.convert("1"), compression="group4"), "1-bit, CCITT Group 4"
    yield "tiff", "bilevel_g3", save(src=img.convert("1"), compression="group3"), "1-bit, CCITT Group 3"
    yield "tiff", "palette", save(src=img.quantize(colors=16)), "palette"
    b = io.BytesIO()
    img.save(b, "TIFF", save_all=True, append_images=[img.rotate(180)])
    yield "tiff", "multipage", b.getvalue(), "two pages (the first is read)"
    yield "tiff", "jpeg", save(compression="jpeg"), "JPEG-compressed"
    try:
        yield "tiff", "lzma", save(compression="tiff_lzma"), "LZMA"
    except Exception:
        pass
    yield "tiff", "lab", save(src=img.convert("LAB")), "CIE L*a*b*"
    yield "tiff", "cmyk", save(src=img.convert("CMYK")), "CMYK"
    for o in range(2, 9):
        yield "tiff", f"orientation_{o}", save(exif={274: o}), f"orientation tag {o}"


def bmp_cases(img):
    b = io.BytesIO()
    img.quantize(colors=16).save(b, "BMP")
    d = bytearray(b.getvalue())
    yield "bmp", "palette", bytes(d), "8-bit palette"
    # biClrUsed = 16: a short palette (the pixel data moves up)
    n = struct.unpack("<I", d[46:50])[0] or 256
    if n > 16:
        off = struct.unpack("<I", d[10:14])[0]
        short = d[:54 + 16 * 4] + d[off:]
        short[46:50] = struct.pack("<I", 16)
        short[10:14] = struct.pack("<I", 54 + 16 * 4)
        short[2:6] = struct.pack("<I", len(short))
        yield "bmp", "short_palette", bytes(short), "a 16-colour palette in an 8-bit BMP"
    b = io.BytesIO()
    img.convert("1").save(b, "BMP")
    yield "bmp", "bilevel", b.getvalue(), "1-bit"
    b = io.BytesIO()
    img.convert("RGBA").save(b, "BMP")
    yield "bmp", "rgba", b.getvalue(), "32-bit with alpha"


def png16(arr, trns=None):
    """A 16-bit RGB or gray PNG, with a tRNS chunk when given."""
    h, w = arr.shape[:2]
    ctype = 2 if arr.ndim == 3 else 0

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
    if trns is not None:
        out += chunk(b"tRNS", struct.pack(">" + "H" * len(trns), *trns))
    return out + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def png_cases(img):
    def save(src, **kw):
        b = io.BytesIO()
        src.save(b, "PNG", **kw)
        return b.getvalue()
    yield "png", "palette_trns", save(img.quantize(colors=32), transparency=2), "palette with tRNS"
    yield "png", "gray_trns", save(img.convert("L"), transparency=17), "gray with tRNS"
    yield "png", "rgb_trns", save(img, transparency=(1, 2, 3)), "RGB with tRNS"
    yield "png", "interlaced_note", save(img, optimize=True), "optimized"
    yield "png", "one_bit", save(img.convert("1")), "1-bit"
    a16 = np.asarray(img).astype(np.uint16) * 257
    a16[:8, :8] = (257, 514, 771)
    yield "png", "rgb16_trns", png16(a16, (257, 514, 771)), "16-bit RGB with tRNS"
    yield "png", "gray_2bit", save(img.convert("L").quantize(4).convert("L"), bits=2), "2-bit gray"
    yield "png", "palette_4bit", save(img.quantize(colors=16), bits=4), "4-bit palette"


def webp_cases(img):
    def save(src, **kw):
        b = io.BytesIO()
        src.save(b, "WEBP", **kw)
        return b.getvalue()
    yield "webp", "lossless", save(img, lossless=True), "lossless"
    yield "webp", "lossy", save(img, quality=80), "lossy"
    yield "webp", "lossy_alpha", save(img.convert("RGBA"), quality=80), "lossy with alpha"
    yield "webp", "lossless_alpha", save(img.convert("RGBA"), lossless=True), "lossless with alpha"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for k, (w, h) in enumerate([(320, 240), (123, 77), (500, 333)]):
        img = scene(w, h, 100 + k)
        for gen in (jpeg_cases, gif_cases, tiff_cases, bmp_cases, png_cases, webp_cases):
            for fmt, cls, data, note in gen(img):
                name = f"{fmt}_{cls}_{w}x{h}.{ {'jpeg': 'jpg', 'tiff': 'tif'}.get(fmt, fmt) }"
                path = os.path.join(a.out, name)
                with open(path, "wb") as f:
                    f.write(data)
                try:
                    with Image.open(path) as im:
                        rgb = im.convert("RGB")
                        dh = str(imagehash.dhash(im))
                    with open(path + ".rgb", "wb") as f:
                        f.write(rgb.tobytes())
                    rows.append((name, f"{fmt}/{cls}", "pil", rgb.width, rgb.height, dh, note))
                except Exception as e:  # PIL refuses it too
                    rows.append((name, f"{fmt}/{cls}", "refuse", 0, 0, "-", f"{note} (PIL: {type(e).__name__}: {e})".replace("\t", " ")))
    with open(os.path.join(a.out, "manifest.tsv"), "w") as man:
        for r in rows:
            man.write("\t".join(str(v) for v in r) + "\n")
    print(f"wrote {len(rows)} odd images ({sum(r[2] == 'pil' for r in rows)} that PIL reads) to {a.out}")


if __name__ == "__main__":
    main()
