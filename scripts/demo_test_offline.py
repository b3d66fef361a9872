#!/usr/bin/env python3
"""Offline checks of scripts/demo.py: no PostgreSQL, no doppler.

A fake connection stands in for the database (features: an 8x8 RGB thumbnail; dHash: imagehash;
a "worker" that fills a few rows per status poll), so main() runs end to end: photos, copies,
progress, search, duplicates, the check, the pictures, exit codes.

    /opt/doppler/venv/bin/python scripts/demo_test_offline.py [OUTDIR [PHOTO_DIR]]  # PNGs in OUTDIR
    /opt/doppler/venv/bin/python -m pytest scripts/demo_test_offline.py
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402

FIXTURES = Path("/opt/doppler/fixtures")


def features(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(demo.rgb(img).resize((8, 8), Image.BILINEAR), dtype=np.float64).ravel() / 255


class Result:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


class FakeConn:
    """Answers exactly the statements demo.py sends; anything else is an error."""

    def __init__(self, per_poll: int = 5, wrong_neighbour: bool = False, constant: bool = False,
                 failed_rows: int = 0, **_: Any) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.per_poll, self.wrong, self.log = per_poll, wrong_neighbour, []
        self.constant, self.failed_rows = constant, failed_rows

    def features(self, path: str) -> np.ndarray:
        return np.ones(192) if self.constant else features(path)

    def __enter__(self) -> FakeConn:
        return self

    def __exit__(self, *_: Any) -> None:
        pass

    def execute(self, sql: str, params: list[Any] | None = None) -> Result:
        self.log.append((sql, params))
        assert "%" not in sql.replace("%s", ""), sql
        if sql.startswith(("DROP TABLE", "CREATE TABLE")):
            return Result([])
        if "doppler.watch(" in sql:
            assert params == ["efficientnet_lite0"]
            return Result([("watching",)])
        if sql.startswith("INSERT INTO image_lookup"):
            for f in params[0]:
                self.rows[len(self.rows) + 1] = {"f_img": f, "features": None, "d_hash": None}
            return Result([(str(i), r["f_img"]) for i, r in self.rows.items()])
        if "FROM doppler.status" in sql:
            todo = [r for r in self.rows.values() if r["features"] is None][: self.per_poll]
            for r in todo:
                r["features"] = self.features(r["f_img"])
                with Image.open(r["f_img"]) as img:
                    r["d_hash"] = str(imagehash.dhash(img))
            done = sum(r["features"] is not None for r in self.rows.values())
            failed = self.failed_rows if done == len(self.rows) else 0
            return Result([(len(self.rows), done - failed, len(self.rows) - done, failed, 0, 12.5 if done else None)])
        if "FROM doppler.failures" in sql:
            return Result([("1", "x.jpg", "corrupt", "bad JPEG")] if self.failed_rows else [])
        if sql == "SELECT id::text, f_img FROM image_lookup":
            return Result([(str(i), r["f_img"]) for i, r in self.rows.items()])
        if m := re.search(r"doppler\.similar\('image_lookup', %s, k => (\d+)\)", sql):
            q = self.features(params[0])
            # ties: the query's own family first (its original, its sibling copy), so that a
            # constant model fails by the margin, not by the order of ties
            family = Path(params[0]).stem.split("__")[0]
            hits = sorted((float(np.linalg.norm(r["features"] - q)), Path(r["f_img"]).stem.split("__")[0] != family,
                           str(i), r["f_img"]) for i, r in self.rows.items() if r["features"] is not None)
            hits = [(d, k, f) for d, _, k, f in hits]
            if self.wrong:
                hits = hits[:1] + hits[-1:] + hits[1:-1]
            return Result([(k, f, d) for d, k, f in hits[: int(m.group(1))]])
        if "doppler.duplicates('image_lookup', max_bits => 6)" in sql:
            return Result(self.duplicates(6))
        if sql.startswith("SELECT id, f_img, features::real[]"):
            return Result([(i, r["f_img"], list(r["features"])) for i, r in self.rows.items()
                           if r["features"] is not None])
        raise AssertionError(f"unexpected SQL: {sql}")

    def duplicates(self, bits: int) -> list[tuple[Any, ...]]:
        keys = [k for k, r in self.rows.items() if r["d_hash"]]
        parent = {k: k for k in keys}

        def root(k: int) -> int:
            while parent[k] != k:
                k = parent[k]
            return k
        for a in keys:
            for b in keys:
                ha, hb = (imagehash.hex_to_hash(self.rows[x]["d_hash"]) for x in (a, b))
                if a < b and ha - hb <= bits:
                    parent[root(b)] = root(a)
        groups: dict[int, list[int]] = {}
        for k in keys:
            groups.setdefault(root(k), []).append(k)
        big = sorted((g for g in groups.values() if len(g) > 1), key=len, reverse=True)
        return [(n + 1, len(g), [str(k) for k in g], [self.rows[k]["d_hash"] for k in g])
                for n, g in enumerate(big)]


def make_photos(folder: Path) -> Path:
    """A dozen distinct synthetic 'photos', some fixtures in odd modes, and files to skip."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    palette = [(200, 60, 40), (40, 120, 200), (60, 170, 80), (230, 200, 60), (120, 60, 160), (30, 30, 30)]
    for i in range(12):
        img = Image.new("RGB", (320 + 20 * i, 240), palette[i % 6])
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, 300, 2)
            d.ellipse((x, y, x + 60 + 5 * i, y + 40 + 3 * i), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        name = "chelsea.png" if i == 5 else f"photo_{i:02d}.jpg"
        (folder / ("sub" if i % 4 == 0 else "")).mkdir(exist_ok=True)
        img.save(folder / ("sub" if i % 4 == 0 else "") / name)
    for f in ("landscape_640x480.jpg", "palette_300x200.png", "rgba_256x256.png", "gif_160x120.gif",
              "lossless_240x180.webp", "bitmap_123x77.bmp", "gray16_150x100.png"):
        if (FIXTURES / f).exists():
            (folder / f).write_bytes((FIXTURES / f).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("ignored")
    return folder


def run(tmp: Path, out: Path, *extra: str, photos: Path | None = None, **fake: Any) -> tuple[int, FakeConn]:
    conns: list[FakeConn] = []

    def connect(**kw: Any) -> FakeConn:
        assert kw == {"host": "/sock", "dbname": "postgres", "user": "postgres", "autocommit": True}
        conns.append(FakeConn(**fake))
        return conns[-1]
    photos = photos or make_photos(tmp / "photos")
    argv = ["--host", "/sock", "--photos", str(photos), "--work", str(tmp / "work"), "--out", str(out), *extra]
    return demo.main(argv, connect=connect), conns[0]


def check_pass(tmp: Path, out: Path) -> None:
    rc, conn = run(tmp, out)
    assert rc == 0
    images = tmp / "work" / "images"
    assert (images / "broken.jpg").exists() is False
    names = sorted(p.name for p in images.iterdir())
    assert sum("__resized" in n for n in names) == 8 and sum("__reencoded" in n for n in names) == 8
    assert (images / "chelsea.png").read_bytes() == (tmp / "photos" / "chelsea.png").read_bytes()
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in images.iterdir())
    for png in ("contact_sheet.png", "mosaic.png"):
        assert (out / png).stat().st_size < 2_000_000
    similar = [p for s, p in conn.log if "doppler.similar" in s]
    assert similar[0] == [str(images / "chelsea.png")]  # the cat is the default query


def test_pass(tmp_path: Path) -> None:
    check_pass(tmp_path, tmp_path / "out")


def test_fail_and_timeout_and_usage(tmp_path: Path) -> None:
    assert run(tmp_path / "a", tmp_path / "a" / "out", wrong_neighbour=True)[0] == 1
    assert run(tmp_path / "b", tmp_path / "b" / "out", "--timeout", "0.5", per_poll=0)[0] == 1
    rc, conn = run(tmp_path / "c", tmp_path / "c" / "out", "--limit", "3")
    assert rc == 0 and len(conn.rows) == 3 * 3
    with pytest.raises(SystemExit) as e:
        demo.main(["--host", "/sock", "--work", "w", "--out", "o", "--limit", "0"])
    assert e.value.code == 2


def test_a_constant_model_or_a_failed_row_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every picture at the same distance (a model that ignores its input): each copy's original
    comes first (ties), but not clearly nearer than the others, so the check fails. A row doppler
    could not fill fails the demo too."""
    assert run(tmp_path / "a", tmp_path / "a" / "out", constant=True)[0] == 1
    out = capsys.readouterr().out
    assert "no other picture at a distance > 0" in out and "near-duplicate check: FAIL (0/" in out
    assert run(tmp_path / "b", tmp_path / "b" / "out", failed_rows=1)[0] == 1
    assert "FAIL: 1 rows could not be filled" in capsys.readouterr().out


def test_rerun_and_name_clashes(tmp_path: Path) -> None:
    photos = make_photos(tmp_path / "photos")
    (photos / "deeper").mkdir()
    Image.new("RGB", (90, 60), (9, 99, 199)).save(photos / "deeper" / "photo_01.jpg")
    Image.new("RGB", (90, 60), (199, 99, 9)).save(photos / "photo_01.png")
    for _ in range(2):  # a second run in the same folders starts from a clean work/images
        assert run(tmp_path, tmp_path / "out")[0] == 0
    names = sorted(p.name for p in (tmp_path / "work" / "images").iterdir())
    assert len(names) == 21 + 16 and len(set(names)) == len(names)
    assert sum(n.endswith("_photo_01.jpg") for n in names) == 1


class Scripted:
    """Answers check_copies' searches with the hits scripted for each copy (key, source, distance)."""

    def __init__(self, hits: dict[str, list[tuple[str, str, float]]]) -> None:
        self.hits = hits

    def execute(self, sql: str, params: list[Any] | None = None) -> Result:
        assert "doppler.similar('image_lookup', %s, k => 4)" in sql, sql
        return Result(self.hits[params[0]])


def verdict(capsys: pytest.CaptureFixture[str], nearest: float, other: float, nearest_is_original: bool = True) -> bool:
    """check_copies' PASS/FAIL for one copy whose nearest picture is at `nearest` (its original,
    or a stranger) and whose nearest other picture is at `other`; the printed word agrees."""
    original, copy, stranger, far = (Path(f"/w/{n}") for n in ("cat.png", "cat__resized.jpg", "dog.png", "owl.png"))
    ids = {original: "1", copy: "2", stranger: "3", far: "4"}
    first, second = (original, stranger) if nearest_is_original else (stranger, original)
    hits = [("2", str(copy), 0.0), (ids[first], str(first), nearest), (ids[second], str(second), other),
            ("4", str(far), other + 1.0)]
    capsys.readouterr()
    passed, total = demo.check_copies(Scripted({str(copy): hits}), {copy: original}, ids)
    line = capsys.readouterr().out
    assert total == 1 and passed in (0, 1)
    assert line.split()[0] == ("PASS" if passed else "FAIL"), line
    return bool(passed)


# The margin, pinned: a copy passes when its original is at most 0.75 times as far as the nearest
# other picture (ratios are exact in binary at these distances: 0.75, 1.5 / 2, 3 / 4). The
# literal is deliberate: another MARGIN, or < for <=, or a difference for the ratio, fails here.
@pytest.mark.parametrize("nearest, other, ok", [
    (0.75, 1.0, True),  # at the margin: passes (<=)
    (0.75 - 1e-6, 1.0, True),  # just below
    (0.75 + 1e-6, 1.0, False),  # just above
    (1.5, 2.0, True),  # the same ratio at another scale: a ratio, not a difference
    (1.5 - 1e-6, 2.0, True),
    (1.5 + 1e-6, 2.0, False),
    (3.0, 4.0, True),
    (3.0 + 1e-6, 4.0, False),
    (0.5, 1.0, True),
    (0.8, 1.0, False),
    (0.0, 1e-3, True),  # dedup: the copy shares its original's vector
    (0.0, 0.0, False),  # every picture at 0 (a constant model): no margin at all
])
def test_the_margin_of_the_check(capsys: pytest.CaptureFixture[str], nearest: float, other: float, ok: bool) -> None:
    assert verdict(capsys, nearest, other) is ok


def test_a_stranger_nearest_fails_whatever_the_margin(capsys: pytest.CaptureFixture[str]) -> None:
    assert verdict(capsys, 0.1, 1.0, nearest_is_original=True)
    assert not verdict(capsys, 0.1, 1.0, nearest_is_original=False)


def test_grid_order_is_a_permutation() -> None:
    xy = np.random.default_rng(1).normal(size=(23, 2))
    order, side = demo.grid_order(xy)
    assert side == 5 and sorted(order) == list(range(23))
    assert demo.grid_order(xy)[0] == order


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/doppler-demo-offline").resolve()
    with tempfile.TemporaryDirectory() as t:
        if len(sys.argv) > 2:  # real photos (e.g. scripts/sample_data.py photos DIR): just run it
            sys.exit(run(Path(t), out_dir, photos=Path(sys.argv[2]))[0])
        check_pass(Path(t), out_dir)
    print(f"\noffline check passed; pictures in {out_dir}")
