#!/usr/bin/env python3
"""The client half of `scripts/demo`: reverse image search with doppler, end to end.

Loads photos (plus near-duplicates it makes itself) into a watched table, waits for doppler's
background worker to fill the feature vectors, searches by image, groups near-duplicates by
dHash, checks that every copy finds its original, and draws a contact sheet and a mosaic.

    python scripts/demo.py --host SOCKET_DIR --dbname postgres --user postgres \
        --photos PHOTO_DIR --work WORKDIR --out OUTDIR [--model efficientnet_lite0 --dim 1280]

Exit codes: 0 the check passed, 1 it failed (or the fill timed out), 2 bad usage.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import psycopg
from PIL import Image, ImageDraw, ImageFont, ImageOps

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
COPY_KINDS = ("resized", "reencoded")
MAX_COPIED = 8  # originals that get near-duplicate copies (all of them when there are fewer)


def header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def sql(conn: Any, query: str, params: Sequence[Any] | None = None, show: bool = True) -> Any:
    """Runs one statement (values always as server-side parameters), printing it first."""
    if show:
        values = [f"<{len(v)} values>" if isinstance(v, list) else repr(v) for v in params or []]
        print("  SQL> " + " ".join(query.split()) + (f"   -- %s = {', '.join(values)}" if values else ""), flush=True)
    return conn.execute(query, params)


def find_photos(photo_dir: Path | None, work: Path) -> list[Path]:
    """Photos under photo_dir (recursive, sorted); the scikit-image samples when there are none."""
    found: list[Path] = []
    if photo_dir is not None and photo_dir.is_dir():
        found = sorted(p for p in photo_dir.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not found:
        try:
            from sample_data import skimage_photos  # scripts/sample_data.py, when present
        except ImportError:
            return []
        found = sorted(Path(p) for p in skimage_photos(photo_dir or work / "sample_photos"))
    return found


def opens(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception as e:  # PIL raises many kinds for broken or unknown files
        print(f"  skipped {path} (Pillow cannot open it: {e.__class__.__name__})")
        return False


def world_readable(path: Path) -> Path:
    path.chmod(0o755 if path.is_dir() else 0o644)
    return path


def rgb(img: Image.Image) -> Image.Image:
    """PIL's convert('RGB'), but 16-bit gray keeps its high byte (as doppler does) instead of clamping."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


def make_copies(original: Path, dest: Path) -> list[Path]:
    """`<stem>__resized.jpg` (60 %, bilinear, JPEG q90) and `<stem>__reencoded.jpg` (JPEG q40)."""
    with Image.open(original) as img:
        exif = img.info.get("exif")  # keep the orientation tag, so both copies face the same way
        pixels = rgb(img)
    extra = {"exif": exif} if exif else {}
    small = pixels.resize((max(1, round(pixels.width * 0.6)), max(1, round(pixels.height * 0.6))), Image.BILINEAR)
    stem = original.stem  # a.jpg and a.png: the second gets a_png__resized.jpg
    if (dest / f"{stem}__{COPY_KINDS[0]}.jpg").exists():
        stem = original.name.replace(".", "_")
    out = [dest / f"{stem}__{kind}.jpg" for kind in COPY_KINDS]
    small.save(out[0], "JPEG", quality=90, **extra)
    pixels.save(out[1], "JPEG", quality=40, **extra)
    return [world_readable(p) for p in out]


def place_photos(photos: list[Path], work: Path, limit: int | None) -> dict[Path, Path]:
    """Copies the first `limit` photos Pillow opens (bytes unchanged) into work/images."""
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)  # ours, from an earlier run
    images.mkdir(parents=True)
    world_readable(images)
    placed: dict[Path, Path] = {}
    for i, photo in enumerate(p for p in photos if opens(p)):
        dest = images / photo.name
        if dest.exists():  # two photos with one name in different folders
            dest = images / f"{i:04d}_{photo.name}"
        shutil.copyfile(photo, dest)
        placed[photo.resolve()] = world_readable(dest.resolve())
        if len(placed) == limit:
            break
    return placed


def make_near_duplicates(originals: list[Path], query: Path) -> dict[Path, Path]:
    """Copies of the query photo and of up to MAX_COPIED - 1 others, evenly spaced; {copy: original}."""
    rest, k = [p for p in originals if p != query], MAX_COPIED - (query in originals)
    others = rest if len(rest) <= k else [rest[round(i * (len(rest) - 1) / (k - 1))] for i in range(k)]
    picks = [query] * (query in originals) + others
    return {c: o for o in picks for c in make_copies(o, o.parent)}


def pick_query(query: Path | None, placed: dict[Path, Path], work: Path) -> Path:
    """--query (its copy in work/, which the server reads), else the cat, else the first photo."""
    if query is None:
        cats = [p for p in placed.values() if "chelsea" in p.name.lower()]
        return (cats or list(placed.values()))[0]
    if query.resolve() in placed:
        return placed[query.resolve()]
    folder = work / "query"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(query, world_readable(folder) / query.name)
    return world_readable(folder / query.name)


def create_table(conn: Any, dim: int, model: str) -> None:
    sql(conn, "DROP TABLE IF EXISTS image_lookup")
    sql(conn, f"CREATE TABLE image_lookup (id bigserial PRIMARY KEY, f_img text NOT NULL, "
              f"d_hash text, features vector({int(dim)}))")
    sql(conn, "SELECT doppler.watch('image_lookup', 'f_img', 'features', hash_column => 'd_hash', "
              "dedup => true, model => %s)", [model])


def insert_rows(conn: Any, paths: list[Path]) -> dict[Path, str]:
    """One INSERT of every path, committed (autocommit): the trigger wakes the worker at commit."""
    rows = sql(conn, "INSERT INTO image_lookup (f_img) SELECT unnest(%s::text[]) RETURNING id::text, f_img",
               [[str(p) for p in paths]]).fetchall()
    return {Path(f): key for key, f in rows}


def bar(done: int, total: int, rate: float, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {rate:.1f} img/s"


def wait_filled(conn: Any, timeout: float, tty: bool) -> tuple[tuple[Any, ...] | None, float]:
    """Polls doppler.status until nothing is pending; returns its last row (None on timeout), seconds."""
    query = ("SELECT total, done, pending, failed, skipped, recent_images_per_sec "
             "FROM doppler.status WHERE table_name = 'image_lookup'::regclass")
    print("  SQL> " + query + "   (every 0.25 s)")
    start, last_print = time.monotonic(), -math.inf
    while True:
        row = sql(conn, query, show=False).fetchone()
        elapsed = time.monotonic() - start
        if row is not None:
            total, done, pending = row[0], row[1], row[2]
            rate = float(row[5]) if row[5] is not None else done / max(elapsed, 1e-9)
            if tty:
                print("\r  " + bar(done, total, rate) + "   ", end="", flush=True)
            elif pending == 0 or time.monotonic() - last_print >= 2:
                print("  " + bar(done, total, rate), flush=True)
                last_print = time.monotonic()
            if pending == 0:
                if tty:
                    print()
                return tuple(row), elapsed
        if elapsed > timeout:
            left = f"{row[2]} of {row[0]} rows still pending" if row else "no doppler.status row for image_lookup"
            print(f"\n  ERROR: timed out after {timeout:g} s: {left}")
            print("  Is doppler's background worker running on this database? See the server log.")
            return None, elapsed
        time.sleep(0.25)


def similar(conn: Any, path: Path, k: int) -> list[tuple[str, str, float]]:
    return sql(conn, "SELECT row_key, source, distance FROM doppler.similar('image_lookup', %s, k => "
                     f"{int(k)})", [str(path)], show=False).fetchall()


def print_duplicates(conn: Any, names: dict[str, str]) -> None:
    groups = sql(conn, "SELECT group_id, size, row_keys, hashes FROM doppler.duplicates('image_lookup', "
                       "max_bits => 6)").fetchall()
    if not groups:
        print("  no groups of pictures within 6 bits of each other")
    for group_id, size, keys, hashes in groups:
        print(f"  group {group_id} ({size} pictures, dHashes {', '.join(sorted(set(hashes)))}):")
        for key in keys:
            print(f"      {names.get(key, key)}")


# A copy passes when its original (or its sibling copy) is the nearest picture, and clearly so: at
# most this fraction of the distance to the nearest other picture. (With dedup a copy may share its
# original's vector, distance 0; a model that gave every picture the same vector would put every
# picture at 0, and must fail.)
MARGIN = 0.75


def check_copies(conn: Any, copies: dict[Path, Path], ids: dict[Path, str]) -> tuple[int, int]:
    """Each copy's nearest picture other than itself must be its original (or its sibling copy),
    nearer than MARGIN times the nearest other picture."""
    passed = 0
    for copy, original in copies.items():
        same = {ids.get(original)} | {ids.get(c) for c, o in copies.items() if o == original and c != copy}
        try:
            hits = [h for h in similar(conn, copy, 4) if h[0] != ids.get(copy)]
        except psycopg.Error as e:  # e.g. the copy's image could not be read
            hits, error = [], str(e).splitlines()[0]
        else:
            error = "no other rows" if not hits else ""
        other = next(((Path(s).name, d) for key, s, d in hits if key not in same), None)
        ok = (bool(hits) and hits[0][0] in same and other is not None and other[1] > 0
              and hits[0][2] <= MARGIN * other[1])
        passed += ok
        found = f"{Path(hits[0][1]).name} at {hits[0][2]:.4f}" if hits else error
        margin = (f"; nearest other picture {other[0]} at {other[1]:.4f} (ratio {hits[0][2] / other[1]:.2f},"
                  f" at most {MARGIN})" if other and other[1] > 0 else
                  "; no other picture at a distance > 0" if hits else "")
        print(f"  {'PASS' if ok else 'FAIL'}  {copy.name:<40} -> {found}{margin}")
    return passed, len(copies)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def thumb(path: Path, size: int) -> Image.Image:
    with Image.open(path) as img:
        return ImageOps.contain(rgb(ImageOps.exif_transpose(img)), (size, size))


def contact_sheet(query: Path, hits: list[tuple[str, str, float]], out: Path) -> Path:
    """The query photo large on the left; its matches on the right, with rank and distance."""
    big, small, pad, cols = 400, 180, 16, 3
    rows = max(1, math.ceil(len(hits) / cols))
    cell_h = small + 44
    sheet = Image.new("RGB", (big + 2 * pad + cols * (small + pad) + pad,
                              max(big + 80, rows * cell_h + 60) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), "doppler.similar('image_lookup', query, k => 6)", fill="black", font=font(20))
    q = thumb(query, big)
    sheet.paste(q, (pad + (big - q.width) // 2, 44))
    draw.text((pad, 44 + q.height + 8), f"query: {query.name}", fill="black", font=font(16))
    x0 = big + 3 * pad
    for i, (_, source, distance) in enumerate(hits):
        x, y = x0 + (i % cols) * (small + pad), 44 + (i // cols) * cell_h
        t = thumb(Path(source), small)
        sheet.paste(t, (x + (small - t.width) // 2, y + (small - t.height) // 2))
        draw.rectangle((x - 1, y - 1, x + small, y + small), outline=(180, 180, 180))
        draw.text((x, y + small + 4), f"#{i + 1}  distance {distance:.4f}", fill="black", font=font(14))
        draw.text((x, y + small + 22), Path(source).name[:26], fill=(90, 90, 90), font=font(12))
    path = out / "contact_sheet.png"
    sheet.save(path, optimize=True)
    return path


def pca_2d(features: np.ndarray) -> np.ndarray:
    """Projects rows onto their first two principal components (signs fixed: deterministic)."""
    centered = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    axes = vt[:2]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    xy = centered @ axes.T
    return xy if xy.shape[1] == 2 else np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


def grid_order(xy: np.ndarray) -> tuple[list[int], int]:
    """Grid cell -> point: sorted by y into rows of ceil(sqrt(n)), each row by x."""
    side = max(1, math.ceil(math.sqrt(len(xy))))
    by_y = np.argsort(xy[:, 1], kind="stable")
    order: list[int] = []
    for r in range(0, len(by_y), side):
        row = by_y[r:r + side]
        order += [int(i) for i in row[np.argsort(xy[row, 0], kind="stable")]]
    return order, side


def mosaic(paths: list[Path], features: np.ndarray, out: Path, marked: set[Path]) -> Path:
    """The whole set on a grid laid out by visual similarity (PCA of the features)."""
    order, side = grid_order(pca_2d(features))
    size = max(32, min(96, 1600 // side))
    cell = size + 6
    rows = math.ceil(len(order) / side)
    img = Image.new("RGB", (side * cell + 4, rows * cell + 4), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for n, i in enumerate(order):
        x, y = 2 + (n % side) * cell, 2 + (n // side) * cell
        t = thumb(paths[i], size)
        img.paste(t, (x + 3 + (size - t.width) // 2, y + 3 + (size - t.height) // 2))
        colour = (230, 120, 20) if paths[i] in marked else (170, 170, 170)
        draw.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=colour, width=2)
    path = out / "mosaic.png"
    img.save(path, optimize=True)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True, help="PostgreSQL socket directory (or host)")
    p.add_argument("--dbname", default="postgres")
    p.add_argument("--user", default="postgres")
    p.add_argument("--photos", type=Path, help="folder of photos (default: scikit-image's samples)")
    p.add_argument("--work", type=Path, required=True, help="folder the server can read (images go here)")
    p.add_argument("--out", type=Path, required=True, help="folder for contact_sheet.png and mosaic.png")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--dim", type=int, default=1280, help="feature dimensions of the model")
    p.add_argument("--limit", type=int, help="use only the first N photos")
    p.add_argument("--query", type=Path, help="photo to search with (default: the cat, else the first)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the fill")
    args = p.parse_args(argv)
    if args.dim <= 0 or (args.limit is not None and args.limit <= 0):
        p.error("--dim and --limit must be positive")
    if args.query is not None and not args.query.is_file():
        p.error(f"--query {args.query}: no such file")
    return args


def search_and_check(conn: Any, query: Path, copies: dict[Path, Path], ids: dict[Path, str]) -> tuple[list[Any], bool]:
    """Steps 4 to 6: search by image, near-duplicate groups, the copies-find-their-originals check."""
    header(f"4. Reverse image search for {query.name}")
    print("  SQL> SELECT row_key, source, distance FROM doppler.similar('image_lookup', %s, k => 6)"
          f"   -- %s = '{query}'")
    hits = similar(conn, query, 6)
    print(f"  {'rank':>4}  {'distance':>8}  file")
    for rank, (_, source, distance) in enumerate(hits, 1):
        print(f"  {rank:>4}  {distance:8.4f}  {Path(source).name}")
    if any(d < 1e-6 and Path(src).name != query.name for _, src, d in hits):
        saved = sql(conn, "SELECT inferences_saved FROM doppler.status WHERE table_name = 'image_lookup'::regclass",
                    show=False).fetchone()[0]
        print("  (distance 0: copies with the same dHash as their original share its features: dedup copied them"
              f" instead of running the model; doppler.status.inferences_saved = {saved})")

    header("5. Near-duplicate groups by dHash")
    names = {k: Path(f).name for k, f in sql(conn, "SELECT id::text, f_img FROM image_lookup").fetchall()}
    print_duplicates(conn, names)

    header("6. The check: does every copy find its original?")
    print("  SQL> SELECT row_key, source, distance FROM doppler.similar('image_lookup', %s, k => 4)"
          "   -- %s = each copy")
    passed, total = check_copies(conn, copies, ids)
    print(f"  near-duplicate check: {'PASS' if passed == total else 'FAIL'} ({passed}/{total})")
    return hits, passed == total


def main(argv: Sequence[str] | None = None, connect: Callable[..., Any] = psycopg.connect) -> int:
    args = parse_args(argv)
    work, out = args.work.resolve(), args.out.resolve()
    if args.photos and work / "images" in (args.photos.resolve(), *args.photos.resolve().parents):
        print(f"  --photos must not be inside {work / 'images'} (the demo rewrites that folder)", file=sys.stderr)
        return 2
    for folder in (work, out):
        folder.mkdir(parents=True, exist_ok=True)

    header("1. Photos")
    placed = place_photos(find_photos(args.photos, work), work, args.limit)
    originals = list(placed.values())
    if not originals:
        print(f"  no photos Pillow can open in {args.photos} ({', '.join(sorted(EXTENSIONS))})", file=sys.stderr)
        return 2
    query = pick_query(args.query, placed, work)
    copies = make_near_duplicates(originals, query)
    print(f"  {len(originals)} photos copied to {work / 'images'}, plus {len(copies)} near-duplicates made "
          f"from {len(copies) // 2} of them (resized to 60 %, and re-encoded as JPEG quality 40)")
    if not work.stat().st_mode & 0o001:
        print(f"  warning: {work} is not world-searchable; the server may not be able to read the images")

    try:
        with connect(host=args.host, dbname=args.dbname, user=args.user, autocommit=True) as conn:
            header("2. A table that doppler watches")
            create_table(conn, args.dim, args.model)
            ids = insert_rows(conn, originals + list(copies))
            print(f"  inserted {len(ids)} rows; the worker fills `features` and `d_hash` in the background")

            header("3. Waiting for doppler's background worker")
            status, seconds = wait_filled(conn, args.timeout, sys.stdout.isatty())
            if status is None or status[3] > 0:  # timed out, or some images failed: say why
                for key, source, error_class, message in sql(
                        conn, "SELECT row_key, source, error_class, message FROM doppler.failures "
                              "WHERE relid = 'image_lookup'::regclass").fetchall():
                    print(f"  failed: row {key} {source}: {error_class}: {message}")
            if status is None:
                return 1
            total, done, failed = status[0], status[1], status[3]
            print(f"  {done} of {total} rows filled in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s)")
            hits, ok = search_and_check(conn, query, copies, ids)
            if failed:
                print(f"  FAIL: {failed} rows could not be filled (above)")
                ok = False

            header("7. Pictures")
            rows = sql(conn, "SELECT id, f_img, features::real[] FROM image_lookup WHERE features IS NOT NULL "
                             "ORDER BY id").fetchall()
    except psycopg.Error as e:
        print(f"\n  ERROR from PostgreSQL: {e}", file=sys.stderr)
        return 1
    sheet = contact_sheet(query, hits, out)
    paths = [Path(f) for _, f, _ in rows]
    grid = mosaic(paths, np.array([v for _, _, v in rows], dtype=np.float64), out, set(copies)) if rows else None
    print(f"  contact sheet: {sheet}\n  mosaic:        {grid}  (copies framed in orange)")

    header("Summary")
    print(f"  photos {len(originals)}, copies {len(copies)}, rows filled {done}/{total} in {seconds:.1f} s "
          f"({done / max(seconds, 1e-9):.1f} images/s)")
    print(f"  pictures in {out}")
    print(f"  overall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
