"""Images from the wild through SQL (issue 17): every odd file of scripts/make_wild_fixtures.py that
PIL reads gives imagehash's dHash from doppler.dhash(bytea), and PIL's features from
extract_features (a sample, against the seeded model's features of PIL's pixels); every file
refused is refused with a data or feature SQLSTATE, never an internal error (XX000). As a
plain role."""
import io
import os

import numpy as np
import psycopg
import pytest
from PIL import Image

from conftest import FIXTURES

WILD = os.path.join(FIXTURES, "wild")

# README's format table: refused on purpose, or read with a documented difference
REFUSED = {"tiff/bilevel_g3": "0A000"}
DIFFERS = {"tiff/jpeg"}


def manifest():
    with open(os.path.join(WILD, "manifest.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def test_odd_images_through_sql(db):
    db.execute("DROP ROLE IF EXISTS wild_reader")
    db.execute("CREATE ROLE wild_reader")
    db.execute("SET ROLE wild_reader")
    rows = manifest()
    assert len(rows) >= 150
    wrong, internal = [], []
    for name, cls, expect, _w, _h, want_hash, _note in rows:
        data = open(os.path.join(WILD, name), "rb").read()
        try:
            got = db.execute("SELECT doppler.dhash(%s::bytea)", (data,)).fetchone()[0]
            err = None
        except psycopg.Error as e:
            got, err = None, e.sqlstate
        if err and err.startswith("XX"):
            internal.append(f"{name}: {err}")
        if expect != "pil":
            if err is None:
                wrong.append(f"{name}: read, where PIL refuses it")
            elif err not in ("22P03", "0A000"):
                wrong.append(f"{name}: refused with {err}")
        elif cls in REFUSED:
            if err != REFUSED[cls]:
                wrong.append(f"{name}: {err or 'read'}, documented as refused with {REFUSED[cls]}")
        elif cls not in DIFFERS and got != want_hash:
            wrong.append(f"{name}: {err or got}, imagehash {want_hash}")
    db.execute("RESET ROLE")
    assert not internal, internal
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("cls", ["jpeg/extraneous_before_marker", "jpeg/data_segment_cut", "gif/no_color_table",
                                 "gif/transparent_first_frame", "tiff/planar_tiled", "tiff/orientation_6",
                                 "tiff/palette"])
def test_odd_images_give_pils_features(db, cls):
    """The features of an odd file equal the seeded ResNet-50's features of PIL's pixels of it
    (the fixture's .rgb, resized and normalized as the seed does, run here through the same
    model from a PNG of those pixels: the PNG path is exact, so the odd path must match it)."""
    name = next(r[0] for r in manifest() if r[1] == cls and r[2] == "pil" and "_123x77" in r[0])
    w, h = (int(v) for v in next(r[3:5] for r in manifest() if r[0] == name))
    pixels = np.frombuffer(open(os.path.join(WILD, name + ".rgb"), "rb").read(), np.uint8).reshape(h, w, 3)
    png = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(png, "PNG")
    a, b = db.execute(
        "SELECT doppler.extract_features(%s::bytea), doppler.extract_features(%s::bytea)",
        (open(os.path.join(WILD, name), "rb").read(), png.getvalue())).fetchone()
    assert len(a) == 2048
    assert np.max(np.abs(np.array(a) - np.array(b))) == 0.0, name
