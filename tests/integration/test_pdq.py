"""PDQ (doppler 0.11.0): Meta's 256-bit perceptual hash through SQL, in a real cluster.

What is proven here:
* the reference: doppler.pdq(path | bytea) (hash and quality) and doppler.pdq_dihedral equal
  pdqhash's compute and compute_dihedral of PIL's RGB pixels, on the fixtures and on the dHash,
  odd-file and PDQ edge-case corpora; pdq_to_hex(hash) is the reference's own hex text, and bit i
  of the bit(256) is bit i of that text read left to right;
* the hex forms: round trips, either case, bad input (22P02, 22026), NULL in, NULL out; hamming;
* watch(..., pdq_column, pdq_quality_column) as a plain owner, with a hash column too, in manual
  (fill), sync (the INSERT itself) and async (the worker) mode: each row's PDQ hash, quality,
  dHash and vector are those of its image; a row with a current vector but no PDQ hash gets its
  hash without a model run; an UPDATE of the image refills everything; bad arguments are refused;
  a RENAME of the PDQ column is followed, a DROP or an ALTER TYPE of it ends the watch; the
  partitions of a watched partitioned table are filled;
* near_duplicates(tbl, pdq bit) and pdq_matches (array and list table, text or bit) equal brute
  force on 20 000 rows, with and without create_index(tbl, 'pdq') (used up to 47 bits), with
  the quality floor on and off; a role without SELECT is refused, one with it gets the same
  answer; bad arguments are refused;
* pdq_matches(tbl, pdq_dihedral(image)) finds flipped and rotated copies, each through the
  dihedral hash of the reference's order, where near_duplicates of the hash finds only the image;
* an external doppler-worker --once fills the PDQ column; worker_write refuses malformed or
  missing PDQ answers (22023).

Roles and schemas here are prefixed pq_; tables belong to plain LOGIN roles and hold bytea images
(no pg_read_server_files needed), except where a server path is the point.
"""
import hashlib
import io
import json
import os
import random
import time

import numpy as np
import psycopg
import pytest
from PIL import Image

from conftest import DB, FIXTURES, MODELS, fixture_paths, wait_for

MODEL = "tiny_pdq"  # $DOPPLER_MODELS/tiny.onnx, 16 dimensions
NOWORKER = "doppler_noworker"
PHOTOS = [os.path.join(FIXTURES, n) for n in ("portrait_300x500.png", "landscape_640x480.jpg", "palette_300x200.png",
                                              "gif_160x120.gif", "bitmap_123x77.bmp", "cmyk_200x200.jpg")]
PDQ_INDEX_COMMENT = "doppler: PDQ chunks for near-duplicate search"


def data(path):
    with open(path, "rb") as f:
        return f.read()


def close(a, b, tol=1e-4):
    if a is None or b is None or len(a) != len(b) or not b:
        return False
    scale = max(1.0, max(abs(y) for y in b))
    return max(abs(x - y) for x, y in zip(a, b)) <= tol * scale


def error_code(conn, sql, params=None):
    """The SQLSTATE `sql` raises, or None when it succeeds."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def plain_role(cluster, role, dbs=(), member_of=()):
    """A LOGIN role (once per cluster: roles are cluster-wide), with a fresh schema of its own name
    in each database of `dbs`, and nothing more."""
    with cluster.connect() as a:
        if not a.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            a.execute(f"CREATE ROLE {role} LOGIN")
        for m in member_of:
            a.execute(f"GRANT {m} TO {role}")
    for d in dbs:
        with cluster.connect(d) as a:
            a.execute(f"DROP SCHEMA IF EXISTS {role} CASCADE")
            a.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")


@pytest.fixture(scope="module")
def models(cluster, noworker):
    """The tiny model, registered once in the worker's database and in the one no worker serves."""
    for d in (DB, NOWORKER):
        with cluster.connect(d) as a:
            a.execute("SELECT doppler.register_model(%s, %s, dim => 16)", (MODEL, os.path.join(MODELS, "tiny.onnx")))
    return MODEL


def ref_hex(bits):
    """pdqhash's 256-element 0/1 vector as the reference's 64 hex digits. pdqhash's hash_to_vector
    puts bit k of the C++ Hash256 (bit k % 16 of word w[k / 16]) at position 255 - k, and
    Hash256::format prints w[15] .. w[0], four hex digits each, most significant first: element j
    of the vector is bit j of the hex text read left to right, so packing the vector most
    significant bit first gives the text (scripts/make_pdq_fixtures.py converts the same way)."""
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def ref_bits(bits):
    """The vector as the text of PostgreSQL's bit(256): element i is bit i."""
    return "".join(str(int(b)) for b in bits)


# ---------------------------------------------------------------------------------------------
# 1. the reference

SKIP_SUFFIXES = (".tsv", ".rgb", ".rgb224", ".f32", ".stamp", ".txt", ".json")
# README's format table: odd files refused on purpose, or read with a documented difference
# what doppler refuses although this Pillow reads it (README's format table; issue #32's to read)
REFUSED = {"tiff/bilevel_g3": "0A000", "tiff/lab": "0A000"}
DIFFERS = {"tiff/jpeg"}


def corpus():
    """(path, class) of every image compared with the reference: the fixtures, then the dHash,
    odd-file (with its manifest's class) and PDQ edge-case corpora, those that exist."""
    out = [(p, None) for p in fixture_paths()]
    classes = {}
    manifest = os.path.join(FIXTURES, "wild", "manifest.tsv")
    if os.path.exists(manifest):
        with open(manifest) as f:
            classes = {line.split("\t")[0]: line.split("\t")[1] for line in f if line.strip()}
    for sub in ("dhash", "wild", "pdq"):
        d = os.path.join(FIXTURES, sub)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if os.path.isfile(path) and not name.startswith(".") and not name.endswith(SKIP_SUFFIXES):
                out.append((path, classes.get(name) if sub == "wild" else None))
    return out


def expectations():
    """scripts/make_pdq_fixtures.py's expectations, {path: its pdq.tsv row}, from each corpus
    directory that has one (name, read, width, height, pixels_sha256, hash, quality, d0 .. d7)."""
    out = {}
    for sub in ("", "dhash", "wild", "pdq"):
        tsv = os.path.join(FIXTURES, sub, "pdq.tsv")
        if os.path.exists(tsv):
            with open(tsv) as f:
                for line in f:
                    if line.strip() and not line.startswith("#"):
                        row = line.rstrip("\n").split("\t")
                        out[os.path.join(FIXTURES, sub, row[0])] = row
    return out


def reference(pdqhash, path, expected):
    """The reference's (hex, bits, quality, dihedral hexes) of PIL's RGB pixels of the file, or None
    where PIL cannot read it, or reads it otherwise than doppler by design (16-bit gray: PIL clamps
    it to white, doppler keeps the high byte, README's documented difference). From the corpus's
    pdq.tsv where it has the file with these very pixels (pdqhash is slow on large images), else
    from pdqhash here."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                return None
            rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except Exception:  # PIL refuses it: nothing to compare with
        return None
    row = expected.get(path)
    if row and row[1] == "pil" and row[4] == hashlib.sha256(rgb.tobytes()).hexdigest():
        return row[5], f"{int(row[5], 16):0256b}", int(row[6]), row[7:15]
    bits, quality = pdqhash.compute(rgb)
    dihedral, _ = pdqhash.compute_dihedral(rgb)
    return ref_hex(bits), ref_bits(bits), int(quality), [ref_hex(b) for b in dihedral]


def test_pdq_equals_the_reference(noworker):
    """doppler.pdq(path) and doppler.pdq(bytea), hash and quality, and pdq_dihedral (path and
    bytea) equal pdqhash.compute / compute_dihedral of numpy.asarray(PIL.Image.open(p).convert('RGB'))
    on every image PIL reads; the bit(256)'s text is the reference's bits in order, pdq_to_hex its
    hex text."""
    pdqhash = pytest.importorskip("pdqhash")
    # the fixtures from pdqhash itself (the bits straight from its vector: bit i of doppler's
    # bit(256) is element i), the corpora from their pdq.tsv where it is current
    fixtures = set(fixture_paths())
    expected = {p: row for p, row in expectations().items() if p not in fixtures}
    wrong, checked, wild = [], 0, 0
    with noworker() as c:
        for path, cls in corpus():
            want = reference(pdqhash, path, expected)
            if want is None:
                continue
            name = os.path.relpath(path, FIXTURES)
            try:
                got = c.execute(
                    """SELECT doppler.pdq_to_hex(a.hash), a.hash::text, a.quality, doppler.pdq_to_hex(b.hash), b.quality,
                              ARRAY(SELECT doppler.pdq_to_hex(u.h) FROM unnest(doppler.pdq_dihedral(%(img)s::bytea))
                                    WITH ORDINALITY u(h, n) ORDER BY u.n),
                              ARRAY(SELECT doppler.pdq_to_hex(u.h) FROM unnest(doppler.pdq_dihedral(%(path)s::text))
                                    WITH ORDINALITY u(h, n) ORDER BY u.n)
                       FROM doppler.pdq(%(path)s::text) a, doppler.pdq(%(img)s::bytea) b""",
                    {"path": path, "img": data(path)}).fetchone()
                err = None
            except psycopg.Error as e:
                got, err = None, e.sqlstate
            if cls in REFUSED:
                if err != REFUSED[cls]:
                    wrong.append(f"{name}: {err or 'read'}, documented as refused with {REFUSED[cls]}")
                continue
            if err:
                wrong.append(f"{name}: refused with {err}, where PIL reads it")
                continue
            if cls in DIFFERS:  # documented: another JPEG decoder's rounding
                continue
            hexs, bits, quality, dihedral = want
            want_row = (hexs, bits, quality, hexs, quality, dihedral, dihedral)
            if tuple(got) != want_row:
                what = [k for k, g, e in zip(["pdq(path) hex", "pdq(path) bits", "pdq(path) quality", "pdq(bytea) hex",
                                             "pdq(bytea) quality", "pdq_dihedral(bytea)", "pdq_dihedral(path)"],
                                            got, want_row) if g != e]
                wrong.append(f"{name}: {', '.join(what)} differ: doppler {got[0]} q{got[2]}, pdqhash {hexs} q{quality}")
            checked += 1
            wild += path.startswith(os.path.join(FIXTURES, "wild") + os.sep)
    assert not wrong, f"{len(wrong)} images differ from pdqhash:\n" + "\n".join(wrong[:40])
    assert checked >= len(fixture_paths()) - 2, f"only {checked} images compared"
    if os.path.isdir(os.path.join(FIXTURES, "wild")):
        assert wild >= 100, f"only {wild} odd files compared"
    print(f"PDQ equal to pdqhash on {checked} images ({wild} odd files)")


# ---------------------------------------------------------------------------------------------
# 2. hex forms


def test_hex_forms_and_bad_input(noworker, cluster):
    """pdq_from_hex / pdq_to_hex round trips (either case in, lower case out; bit i = the i-th bit
    of the text), ('x' || hex)::bit(256) reads the same; anything but 64 hex digits is 22P02, a bit
    string of another length than 256 is 22026; NULL in, NULL out; hamming counts differing bits;
    the OUT columns are hash and quality; pdq(path) is for those who may read server files."""
    rng = random.Random(256)
    hexes = ["0" * 64, "f" * 64, "8" + "0" * 63, "0" * 63 + "1"] + [f"{rng.getrandbits(256):064x}" for _ in range(20)]
    with noworker() as c:
        for h in hexes:
            got = c.execute("""SELECT doppler.pdq_from_hex(%s)::text, doppler.pdq_to_hex(doppler.pdq_from_hex(%s)),
                                      doppler.pdq_from_hex(upper(%s)) = ('x' || %s)::bit(256),
                                      length(doppler.pdq_from_hex(%s))""", (h, h, h, h, h)).fetchone()
            assert got == (f"{int(h, 16):0256b}", h, True, 256), (h, got)
        for a, b in zip(hexes, hexes[1:]):
            d = c.execute("SELECT doppler.hamming(doppler.pdq_from_hex(%s), doppler.pdq_from_hex(%s))", (a, b)).fetchone()[0]
            assert d == bin(int(a, 16) ^ int(b, 16)).count("1"), (a, b, d)
        assert c.execute("SELECT doppler.hamming(B'101', B'011'), doppler.hamming(B'1', B'1')").fetchone() == (2, 0)
        assert error_code(c, "SELECT doppler.hamming(B'101', B'0111')") == "22026"
        # bad text
        for bad in ["0" * 63, "0" * 65, "g" * 64, "", "0x" + "0" * 62, "0123456789abcdef" * 3 + "0123456789abcdez"]:
            code = error_code(c, "SELECT doppler.pdq_from_hex(%s)", (bad,))
            assert code == "22P02", (bad, code)
        # bit strings of another length
        for bad in ["101", "0" * 255, "1" * 257]:
            code = error_code(c, f"SELECT doppler.pdq_to_hex('{bad}'::bit({len(bad)}))")
            assert code == "22026", (len(bad), code)
        # strict
        assert c.execute("""SELECT doppler.pdq_from_hex(NULL) IS NULL, doppler.pdq_to_hex(NULL::bit) IS NULL,
                                   doppler.hamming(NULL::bit, B'1') IS NULL, (doppler.pdq(NULL::bytea)).hash IS NULL,
                                   (doppler.pdq(NULL::bytea)).quality IS NULL, doppler.pdq_dihedral(NULL::bytea) IS NULL,
                                   doppler.pdq(NULL::text) IS NULL""").fetchone() == (True,) * 7
        # the OUT columns, their types
        img = data(PHOTOS[0])
        cur = c.execute("SELECT * FROM doppler.pdq(%s::bytea)", (img,))
        row = cur.fetchone()
        assert [d.name for d in cur.description] == ["hash", "quality"]
        cur = c.execute("SELECT (doppler.pdq(%s::bytea)).*", (img,))
        assert [d.name for d in cur.description] == ["hash", "quality"] and cur.fetchone() == row
        assert c.execute("""SELECT pg_typeof(p.hash)::text, length(p.hash), pg_typeof(doppler.pdq_dihedral(%s::bytea))::text,
                                   cardinality(doppler.pdq_dihedral(%s::bytea))
                            FROM doppler.pdq(%s::bytea) p""", (img, img, img)).fetchone() == ("bit", 256, "bit[]", 8)
        assert 0 <= row[1] <= 100
        # not an image: a data error, never an internal one
        code = error_code(c, "SELECT doppler.pdq('\\x00010203'::bytea)")
        assert code in ("22P03", "0A000"), code
        # a role that may not read server files gets the bytes' hash, not a path's
        c.execute("DROP ROLE IF EXISTS pq_plain")
        c.execute("CREATE ROLE pq_plain")
        c.execute("SET ROLE pq_plain")
        try:
            assert c.execute("SELECT * FROM doppler.pdq(%s::bytea)", (img,)).fetchone() == row
            assert error_code(c, "SELECT * FROM doppler.pdq(%s::text)", (PHOTOS[0],)) == "42501"
            assert error_code(c, "SELECT doppler.pdq_dihedral(%s::text)", (PHOTOS[0],)) == "42501"
        finally:
            c.execute("RESET ROLE")
        assert c.execute("SELECT * FROM doppler.pdq(%s::text)", (PHOTOS[0],)).fetchone() == row


# ---------------------------------------------------------------------------------------------
# 3. watch fills the PDQ column

W = "pq_w"  # the plain owner of test 3 (a schema in both databases)


def make_watched(c, t, mode, pdq="pdq", quality="pdq_q"):
    c.execute(f"""CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[], features_model text, d_hash text,
                                    {pdq} bit(256), {quality} int)""")
    c.execute(f"""SELECT doppler.watch('{t}', 'img', model => '{MODEL}', hash_column => 'd_hash', mode => '{mode}',
                                       pdq_column => '{pdq}', pdq_quality_column => '{quality}')""")


def wrong_rows(c, t, pdq="pdq", quality="pdq_q", where="true", hash_column="d_hash"):
    """Ids of the rows whose vector, PDQ hash, quality or dHash is not their image's."""
    dh = f"{hash_column} IS NOT DISTINCT FROM doppler.dhash(img)" if hash_column else "true"
    rows = c.execute(f"""SELECT id, features, doppler.extract_features(img, %s),
                                {pdq}::text IS NOT DISTINCT FROM (doppler.pdq(img)).hash::text,
                                {quality} IS NOT DISTINCT FROM (doppler.pdq(img)).quality,
                                {dh}
                         FROM {t} WHERE {where} ORDER BY id""", (MODEL,)).fetchall()
    assert rows, f"no rows in {t} where {where}"
    return [r[0] for r in rows if not (close(r[1], r[2]) and r[3] and r[4] and r[5])]


def pdq_of(c, img):
    return c.execute("SELECT hash::text, quality FROM doppler.pdq(%s::bytea)", (img,)).fetchone()


def warnings_of(c):
    got = []
    c.add_notice_handler(lambda d: got.append((d.severity_nonlocalized, d.message_primary)))
    return got


def test_watch_fills_pdq_in_every_mode(noworker, cluster, models):
    """watch(..., pdq_column, pdq_quality_column), a hash column too, as a plain owner of bytea
    tables: manual (fill), sync (in the INSERT and the UPDATE themselves) and async (the worker)
    fill each row's PDQ hash and quality with its vector and dHash; a row with a current vector
    (another image's, on purpose) and no PDQ hash gets the hash and keeps the vector (no model
    run); an UPDATE of the image clears everything at once and refills it; bad arguments are
    refused; RENAME of the PDQ and quality columns is followed, DROP and ALTER TYPE end the watch;
    a partitioned table (bit varying and bigint columns) is filled on its partitions."""
    A, B, C, D = (data(p) for p in PHOTOS[:4])
    plain_role(cluster, W, dbs=[DB, NOWORKER])
    with cluster.connect(NOWORKER, user=W) as c:
        # --- manual
        t = f"{W}.manual"
        make_watched(c, t, "manual")
        c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s), (3, %s)", (A, B, C))
        assert c.execute(f"SELECT count(pdq) FROM {t}").fetchone()[0] == 0, "manual mode filled in the INSERT"
        c.execute(f"CALL doppler.fill('{t}')")
        assert wrong_rows(c, t) == [], "manual: rows whose PDQ, quality, dHash or vector is not their image's"
        assert c.execute(f"SELECT array_agg(DISTINCT features_model) FROM {t}").fetchone()[0] == [f"{MODEL}@1"]
        # a current vector (row 1's, of image A) on image D, no PDQ hash, no dHash: only the hashes are filled
        c.execute(f"INSERT INTO {t} (id, img, features, features_model) SELECT 4, %s, features, features_model FROM {t} WHERE id = 1", (D,))
        c.execute(f"CALL doppler.fill('{t}')")
        v1, v4, p4, q4, h4 = c.execute(f"""SELECT a.features, b.features, b.pdq::text, b.pdq_q, b.d_hash
                                          FROM {t} a, {t} b WHERE a.id = 1 AND b.id = 4""").fetchone()
        assert (p4, q4) == pdq_of(c, D), "manual: the PDQ hash of a row with a current vector was not filled"
        assert h4 == c.execute("SELECT doppler.dhash(%s::bytea)", (D,)).fetchone()[0]
        assert v4 == v1, "manual: a row with a current vector got a new one (a model run)"
        assert not close(v4, c.execute("SELECT doppler.extract_features(%s::bytea, %s)", (D, MODEL)).fetchone()[0])
        c.execute(f"DELETE FROM {t} WHERE id = 4")

        # RENAME of the PDQ and quality columns is followed; filling goes on
        c.execute(f"ALTER TABLE {t} RENAME COLUMN pdq TO pdq_hash")
        c.execute(f"ALTER TABLE {t} RENAME COLUMN pdq_q TO pdq_quality")
        w = c.execute("SELECT pdq_column, pdq_quality_column FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()
        assert w == ("pdq_hash", "pdq_quality"), w
        c.execute(f"INSERT INTO {t} (id, img) VALUES (5, %s)", (D,))
        c.execute(f"CALL doppler.fill('{t}')")
        assert wrong_rows(c, t, "pdq_hash", "pdq_quality") == [], "after RENAME COLUMN"
        # ALTER TYPE of the PDQ column to text: the type no longer fits, the watch ends
        notes = warnings_of(c)
        c.execute(f"ALTER TABLE {t} ALTER COLUMN pdq_hash TYPE text USING pdq_hash::text")
        assert any(s == "WARNING" and "no longer watches" in m and "pdq_hash" in m for s, m in notes), notes
        assert c.execute("SELECT count(*) FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0
        assert error_code(c, f"CALL doppler.fill('{t}')") == "42704"

        # DROP COLUMN of the PDQ column, or of its quality column: the watch ends with a WARNING
        for col in ["pdq", "pdq_q"]:
            t = f"{W}.drop_{col}"
            make_watched(c, t, "manual")
            c.execute(f"ALTER TABLE {t} ADD COLUMN note text")
            c.execute(f"ALTER TABLE {t} DROP COLUMN note")  # not watched: nothing happens
            assert c.execute("SELECT count(*) FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()[0] == 1
            notes = warnings_of(c)
            c.execute(f"ALTER TABLE {t} DROP COLUMN {col}")
            assert any(s == "WARNING" and "no longer watches" in m and col in m for s, m in notes), (col, notes)
            assert c.execute("SELECT count(*) FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0, col

        # bad arguments: nothing watched
        t = f"{W}.bad"
        c.execute(f"""CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[], d_hash text,
                                        p_text text, p64 bit(64), p bit(256), q_text text, q int)""")
        cases = [
            ("a text PDQ column", "pdq_column => 'p_text'", ["42804"]),
            ("a bit(64) PDQ column", "pdq_column => 'p64'", ["42804"]),
            ("a text quality column", "pdq_column => 'p', pdq_quality_column => 'q_text'", ["42804"]),
            ("a quality column without a PDQ column", "pdq_quality_column => 'q'", ["22023"]),
            # (the same column twice: it cannot be both bit(256) and an integer, so the type check
            # may answer first)
            ("the same column twice", "pdq_column => 'p', pdq_quality_column => 'p'", ["22023", "42804"]),
            ("a missing PDQ column", "pdq_column => 'nope'", ["42703"]),
            ("a missing quality column", "pdq_column => 'p', pdq_quality_column => 'nope'", ["42703"]),
        ]
        for what, args, codes in cases:
            code = error_code(c, f"SELECT doppler.watch('{t}', 'img', model => '{MODEL}', mode => 'manual', {args})")
            assert code in codes, f"{what}: {code}, not {codes}"
            assert c.execute("SELECT count(*) FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0, what
        c.execute(f"SELECT doppler.watch('{t}', 'img', model => '{MODEL}', mode => 'manual', pdq_column => 'p', pdq_quality_column => 'q')")
        assert c.execute("SELECT pdq_column, pdq_quality_column FROM doppler.watched WHERE relid = %s::regclass",
                         (t,)).fetchone() == ("p", "q")

        # --- sync: filled in the statements themselves
        t = f"{W}.sync"
        make_watched(c, t, "sync")
        c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s)", (A, B))
        assert wrong_rows(c, t) == [], "sync: the INSERT did not fill the row's PDQ, quality, dHash or vector"
        c.execute(f"UPDATE {t} SET img = %s WHERE id = 1", (C,))
        assert c.execute(f"SELECT pdq::text, pdq_q FROM {t} WHERE id = 1").fetchone() == pdq_of(c, C), "sync: UPDATE"
        assert wrong_rows(c, t) == [], "sync: the UPDATE of the image did not refill the row"

        # --- a partitioned table: parent watched, partitions of the same owner
        t = f"{W}.parts"
        c.execute(f"""CREATE TABLE {t} (id int, img bytea, features real[], features_model text, pdq bit varying, pdq_q bigint,
                                        PRIMARY KEY (id)) PARTITION BY RANGE (id)""")
        c.execute(f"CREATE TABLE {W}.parts_a PARTITION OF {t} FOR VALUES FROM (0) TO (100)")
        c.execute(f"CREATE TABLE {W}.parts_b PARTITION OF {t} FOR VALUES FROM (100) TO (200)")
        c.execute(f"""SELECT doppler.watch('{t}', 'img', model => '{MODEL}', mode => 'manual',
                                           pdq_column => 'pdq', pdq_quality_column => 'pdq_q')""")
        c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s), (101, %s), (102, %s)", (A, B, C, D))
        c.execute(f"CALL doppler.fill('{t}')")
        assert wrong_rows(c, t, hash_column=None) == [], "partitions"
        on = c.execute(f"SELECT tableoid::regclass::text, count(pdq) FROM {t} GROUP BY 1 ORDER BY 1").fetchall()
        assert [(p.split(".")[-1], n) for p, n in on] == [("parts_a", 2), ("parts_b", 2)], on

    # --- async: the worker fills them (the worker's database)
    with cluster.connect(DB, user=W) as c:
        t = f"{W}.async"
        make_watched(c, t, "async")
        c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s), (3, %s)", (A, B, C))

        def filled(n, where="true"):
            return c.execute(f"""SELECT count(*) FROM {t} WHERE {where} AND features IS NOT NULL AND d_hash IS NOT NULL
                                 AND pdq IS NOT NULL AND pdq_q IS NOT NULL""").fetchone()[0] == n
        wait_for(lambda: filled(3), 120, what=f"{t} filled by the worker")
        assert wrong_rows(c, t) == [], "async: rows whose PDQ, quality, dHash or vector is not their image's"
        # a current vector (row 1's) on image D without hashes: the worker fills only the hashes
        c.execute(f"INSERT INTO {t} (id, img, features, features_model) SELECT 4, %s, features, features_model FROM {t} WHERE id = 1", (D,))
        wait_for(lambda: filled(1, "id = 4"), 120, what="the PDQ hash of a row with a current vector")
        v1, v4, p4, q4 = c.execute(f"SELECT a.features, b.features, b.pdq::text, b.pdq_q FROM {t} a, {t} b WHERE a.id = 1 AND b.id = 4").fetchone()
        assert (p4, q4) == pdq_of(c, D) and v4 == v1, "async: a row with a current vector"
        c.execute(f"DELETE FROM {t} WHERE id = 4")
        # an UPDATE of the image clears the vector, tag, dHash, PDQ hash and quality at once; the worker refills them
        with c.transaction():  # (before the worker, woken at commit, fills it again)
            c.execute(f"UPDATE {t} SET img = %s WHERE id = 2", (D,))
            cleared = c.execute(f"SELECT features, features_model, d_hash, pdq, pdq_q FROM {t} WHERE id = 2").fetchone()
            assert cleared == (None,) * 5, f"async: the UPDATE left {cleared}"
        wait_for(lambda: filled(3), 120, what="the updated row refilled")
        assert c.execute(f"SELECT pdq::text, pdq_q FROM {t} WHERE id = 2").fetchone() == pdq_of(c, D)
        assert wrong_rows(c, t) == [], "async: after the UPDATE"


# ---------------------------------------------------------------------------------------------
# 4. near_duplicates and pdq_matches: the exact answer

ND = "pq_nd"
ND_READER = "pq_nd_reader"
N_ROWS = 20000
POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def flipped(rng, h, k):
    for b in rng.sample(range(256), k):
        h ^= 1 << b
    return h


def pdq_table_rows(seed):
    """(rows [(id, hex | None, quality | None)], query hashes): random hashes, and for each of 20
    query hashes 40 planted copies at exactly k flipped bits (k on both sides of 15/16, 31/32,
    47/48, up to 89); 2 % without a hash; a quarter of quality under 50, some NULL, some exactly 50."""
    rng = random.Random(seed)
    queries = [rng.getrandbits(256) for _ in range(20)]
    hashes = []
    for q in queries:
        ks = [0, 1, 15, 16, 30, 31, 32, 33, 46, 47, 48, 49] + [rng.randrange(0, 60) for _ in range(24)] \
            + [rng.randrange(60, 90) for _ in range(4)]
        hashes += [flipped(rng, q, k) for k in ks]
    while len(hashes) < N_ROWS:
        hashes.append(None if rng.random() < 0.02 else rng.getrandbits(256))
    rng.shuffle(hashes)

    def quality():
        r = rng.random()
        return None if r < 0.03 else rng.randrange(0, 50) if r < 0.25 else 50 if r < 0.3 else rng.randrange(51, 101)
    rows = [(i + 1, None if h is None else f"{h:064x}", quality()) for i, h in enumerate(hashes)]
    return rows, [f"{q:064x}" for q in queries]


class Brute:
    """Every distance, by numpy: the exact answers."""

    def __init__(self, rows):
        self.rows = rows
        self.mat = np.zeros((len(rows), 32), np.uint8)
        self.ok = np.zeros(len(rows), bool)
        for i, (_, h, _) in enumerate(rows):
            if h is not None:
                self.mat[i] = np.frombuffer(bytes.fromhex(h), np.uint8)
                self.ok[i] = True
        self.quality = np.array([q if q is not None else 0 for _, _, q in rows])

    def distances(self, h):
        return POP8[self.mat ^ np.frombuffer(bytes.fromhex(h), np.uint8)].sum(axis=1)

    def near(self, h, max_bits, min_quality, d=None):
        d = self.distances(h) if d is None else d
        sel = np.nonzero(self.ok & (d <= max_bits) & (self.quality >= min_quality))[0]
        return sorted((int(d[i]), str(self.rows[i][0]), self.rows[i][1], self.rows[i][2]) for i in sel)


NEAR = """SELECT distance, row_key, doppler.pdq_to_hex(pdq), quality
          FROM doppler.near_duplicates('pq_nd.nd', doppler.pdq_from_hex(%s), %s::int, %s::int)"""
MATCH_ARRAY = """SELECT listed, row_key, distance, doppler.pdq_to_hex(pdq), quality
                 FROM doppler.pdq_matches('pq_nd.nd',
                          (SELECT array_agg(('x' || u.h)::bit(256) ORDER BY u.n) FROM unnest(%s::text[]) WITH ORDINALITY u(h, n)),
                          %s::int, %s::int)"""
MATCH_TABLE = """SELECT doppler.pdq_to_hex(listed), row_key, distance, doppler.pdq_to_hex(pdq), quality
                 FROM doppler.pdq_list_matches('pq_nd.nd'::regclass, %s::regclass, %s::name, %s::int, %s::int)"""


def index_scans(c, index):
    c.execute("SELECT pg_stat_force_next_flush()")
    c.execute("SELECT pg_stat_clear_snapshot()")
    return c.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelid = %s::regclass", (index,)).fetchone()[0]


def test_near_duplicates_and_matches_equal_brute_force(noworker, cluster, models):
    """20 000 rows of PDQ hashes (planted copies at 0 to 89 bits of 20 query hashes, random ones,
    NULLs, qualities on both sides of 50 and NULL): near_duplicates at max_bits 0 to 80 (and 256)
    equals brute force, nearest first then row_key, with the quality floor and without, before and
    after create_index(tbl, 'pdq') (idempotent, a GIN index of 16 chunk tokens, used up to 47
    bits, not beyond); pdq_matches of a 300-hash list (NULLs, duplicates) as an array and as a
    list table (text hex loaded with COPY, either case; bit(256)) gives every (row, listed) pair
    within max_bits; a reader without SELECT is refused (42501), one with it (and with SELECT on
    the list) gets the same answers; bad arguments are refused."""
    rows, queries = pdq_table_rows(2024)
    brute = Brute(rows)
    rng = random.Random(7)
    queries += [f"{rng.getrandbits(256):064x}" for _ in range(3)] + [h for _, h, _ in rng.sample(rows, 4) if h][:2]
    plain_role(cluster, ND, dbs=[NOWORKER])
    plain_role(cluster, ND_READER)
    with cluster.connect(NOWORKER, user=ND) as c:
        c.execute(f"CREATE TABLE {ND}.nd (id int PRIMARY KEY, img bytea, features real[], features_model text, pdq bit(256), q int)")
        c.execute(f"""INSERT INTO {ND}.nd (id, pdq, q)
                      SELECT u.i, ('x' || u.h)::bit(256), u.q FROM unnest(%s::int[], %s::text[], %s::int[]) u(i, h, q)""",
                  ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
        c.execute(f"""SELECT doppler.watch('{ND}.nd', 'img', model => '{MODEL}', mode => 'manual',
                                           pdq_column => 'pdq', pdq_quality_column => 'q')""")
        c.execute(f"ANALYZE {ND}.nd")
        dist = {q: brute.distances(q) for q in queries}

        def check(max_bits_list, min_quality=50, qs=queries):
            for q in qs:
                for mb in max_bits_list:
                    got = c.execute(NEAR, (q, mb, min_quality)).fetchall()
                    want = brute.near(q, mb, min_quality, dist[q])
                    assert got == want, f"near_duplicates({q[:12]}..., {mb}, {min_quality}): {len(got)} rows, brute force {len(want)}"
        check([0, 15, 31, 32, 47, 48, 80])
        check([31, 80], 0, queries[:5])
        check([31, 80], 100, queries[:5])
        # the defaults: 31 bits, quality 50
        got = c.execute(f"SELECT distance, row_key, doppler.pdq_to_hex(pdq), quality FROM doppler.near_duplicates('{ND}.nd', "
                        "doppler.pdq_from_hex(%s))", (queries[0],)).fetchall()
        assert got == brute.near(queries[0], 31, 50), "near_duplicates with its defaults"
        # every row with a hash
        got = c.execute(NEAR, (queries[1], 256, 0)).fetchall()
        assert got == brute.near(queries[1], 256, 0) and len(got) == int(brute.ok.sum())

        # the index: idempotent, GIN over 16 chunk tokens, doppler's comment
        notes = []
        c.add_notice_handler(lambda d: notes.append(d.message_primary))
        idx = c.execute(f"SELECT doppler.create_index('{ND}.nd', 'pdq')").fetchone()[0]
        assert idx, idx
        assert c.execute(f"SELECT doppler.create_index('{ND}.nd', 'pdq')").fetchone()[0] == idx
        assert any("already has the PDQ index" in n for n in notes), notes
        info = c.execute("""SELECT obj_description(i.indexrelid, 'pg_class'), am.amname, i.indrelid = %s::regclass,
                                   pg_get_indexdef(i.indexrelid)
                            FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid JOIN pg_am am ON am.oid = x.relam
                            WHERE i.indexrelid = %s::regclass""", (f"{ND}.nd", idx)).fetchone()
        assert info[:3] == (PDQ_INDEX_COMMENT, "gin", True), info
        assert info[3].lower().count("substring") == 16, info[3]
        # up to 47 bits through the index, beyond a scan; the same answers
        before = index_scans(c, idx)
        check([0, 15, 31, 32, 47])
        check([31], 0, queries[:5])
        served = index_scans(c, idx)
        assert served >= before + 5 * len(queries) + 5, f"the PDQ index was not used: {before} -> {served} scans"
        check([48, 80])
        check([80], 0, queries[:5])
        assert index_scans(c, idx) == served, "the PDQ index was used beyond 47 bits"

        # pdq_matches: a list of 300 hashes (query hashes, hashes of rows, random ones, NULLs, duplicates)
        with_hash = [h for _, h, _ in rows if h]
        listed = queries[:20] + rng.sample(with_hash, 150) + [f"{rng.getrandbits(256):064x}" for _ in range(105)] + [None] * 10
        listed += rng.sample([h for h in listed if h], 15)
        rng.shuffle(listed)
        assert len(listed) == 300
        ldist = {pos: brute.distances(h) for pos, h in enumerate(listed, 1) if h}

        def matches(max_bits, min_quality):
            out = []
            for pos, d in ldist.items():
                out += [(pos, row_key, dd, h, q) for dd, row_key, h, q in brute.near(listed[pos - 1], max_bits, min_quality, d)]
            return sorted(out)
        for mb, mq in [(0, 50), (31, 50), (31, 0), (47, 50), (80, 0)]:
            got = sorted(c.execute(MATCH_ARRAY, (listed, mb, mq)).fetchall())
            want = matches(mb, mq)
            assert got == want, f"pdq_matches(array, {mb}, {mq}): {len(got)} pairs, brute force {len(want)}"
        assert len(matches(31, 50)) > 150, "too few pairs to mean anything"
        # NULL and empty lists: nothing
        assert c.execute(MATCH_ARRAY, ([None, None], 31, 50)).fetchall() == []
        assert c.execute(f"SELECT count(*) FROM doppler.pdq_matches('{ND}.nd', '{{}}'::bit[])").fetchone()[0] == 0

        # list tables: text (as ThreatExchange exports, some in upper case, loaded with COPY), bit(256)
        text_list = [None if h is None else (h.upper() if i % 7 == 0 else h) for i, h in enumerate(listed)]
        c.execute(f"CREATE TABLE {ND}.list_text (h text)")
        with c.cursor() as cur:
            with cur.copy(f"COPY {ND}.list_text (h) FROM STDIN") as cp:
                for h in text_list:
                    cp.write_row((h,))
        c.execute(f"CREATE TABLE {ND}.list_bits (h bit(256))")
        c.execute(f"INSERT INTO {ND}.list_bits SELECT ('x' || h)::bit(256) FROM {ND}.list_text")

        def listed_pairs(max_bits, min_quality):
            return sorted((listed[pos - 1], row_key, d, h, q) for pos, row_key, d, h, q in matches(max_bits, min_quality))
        for lst in ["list_text", "list_bits"]:
            for mb, mq in [(31, 50), (80, 0)]:
                got = sorted(c.execute(MATCH_TABLE, (f"{ND}.{lst}", "h", mb, mq)).fetchall())
                assert got == listed_pairs(mb, mq), f"pdq_matches({lst}, {mb}, {mq}): {len(got)} pairs"
        got = sorted(c.execute(f"SELECT doppler.pdq_to_hex(listed), row_key, distance, doppler.pdq_to_hex(pdq), quality "
                               f"FROM doppler.pdq_list_matches('{ND}.nd'::regclass, '{ND}.list_text'::regclass, 'h'::name)").fetchall())
        assert got == listed_pairs(31, 50), "pdq_matches(list) with its defaults"

        # bad arguments
        c.execute(f"CREATE TABLE {ND}.list_bad (h int, t text)")
        c.execute(f"INSERT INTO {ND}.list_bad VALUES (1, %s)", ("0" * 63,))
        c.execute(f"CREATE TABLE {ND}.plain (id int PRIMARY KEY, pdq bit(256))")
        c.execute(f"CREATE TABLE {ND}.nopdq (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{ND}.nopdq', 'img', model => '{MODEL}', mode => 'manual')")
        q = queries[0]
        bad = [
            (NEAR, (q, -1, 50), "22023"), (NEAR, (q, 257, 50), "22023"),
            (NEAR, (q, 31, -1), "22023"), (NEAR, (q, 31, 101), "22023"),
            (MATCH_ARRAY, ([q], -1, 50), "22023"), (MATCH_ARRAY, ([q], 257, 50), "22023"),
            (MATCH_ARRAY, ([q], 31, -1), "22023"), (MATCH_ARRAY, ([q], 31, 101), "22023"),
            (f"SELECT * FROM doppler.near_duplicates('{ND}.nd', B'101')", None, "22026"),
            (f"SELECT * FROM doppler.pdq_matches('{ND}.nd', ARRAY[doppler.pdq_from_hex(%s), B'101'])", (q,), "22026"),
            (f"SELECT * FROM doppler.near_duplicates('{ND}.plain', doppler.pdq_from_hex(%s))", (q,), "42704"),
            (f"SELECT * FROM doppler.pdq_matches('{ND}.plain', ARRAY[doppler.pdq_from_hex(%s)])", (q,), "42704"),
            (f"SELECT * FROM doppler.near_duplicates('{ND}.nopdq', doppler.pdq_from_hex(%s))", (q,), "42703"),
            (f"SELECT * FROM doppler.pdq_matches('{ND}.nopdq', ARRAY[doppler.pdq_from_hex(%s)])", (q,), "42703"),
            (f"SELECT doppler.create_index('{ND}.nopdq', 'pdq')", None, "42703"),
            (MATCH_TABLE, (f"{ND}.list_bad", "nope", 31, 50), "42703"),
            (MATCH_TABLE, (f"{ND}.list_bad", "h", 31, 50), "42804"),
            (MATCH_TABLE, (f"{ND}.list_bad", "t", 31, 50), "22P02"),
        ]
        for sql, params, code in bad:
            got = error_code(c, sql, params)
            assert got == code, f"{' '.join(sql.split())[:120]} {params and str(params)[:80]}: {got}, not {code}"

    # the role matrix: no SELECT, no answer; SELECT, the same answers
    with cluster.connect(NOWORKER, user=ND_READER) as r:
        assert error_code(r, NEAR, (queries[0], 31, 50)) == "42501"
        assert error_code(r, MATCH_ARRAY, (listed, 31, 50)) == "42501"
    with noworker() as admin:
        admin.execute(f"GRANT USAGE ON SCHEMA {ND} TO {ND_READER}")
        admin.execute(f"GRANT SELECT ON {ND}.nd TO {ND_READER}")
    with cluster.connect(NOWORKER, user=ND_READER) as r:
        assert r.execute(NEAR, (queries[0], 31, 50)).fetchall() == brute.near(queries[0], 31, 50)
        assert sorted(r.execute(MATCH_ARRAY, (listed, 31, 50)).fetchall()) == matches(31, 50)
        # the list is read with the caller's rights
        assert error_code(r, MATCH_TABLE, (f"{ND}.list_text", "h", 31, 50)) == "42501"
        assert error_code(r, f"SELECT doppler.create_index('{ND}.nd', 'pdq')") == "42501"
    with noworker() as admin:
        admin.execute(f"GRANT SELECT ON {ND}.list_text TO {ND_READER}")
    with cluster.connect(NOWORKER, user=ND_READER) as r:
        assert sorted(r.execute(MATCH_TABLE, (f"{ND}.list_text", "h", 31, 50)).fetchall()) == listed_pairs(31, 50)


# ---------------------------------------------------------------------------------------------
# 5. flipped and rotated copies

# PIL's transposes, and the place (1-based) in pdq_dihedral of the hash each one's PDQ hash is
# nearest to (the reference's order: original, rotated 90, 180, 270, flipped X, flipped Y,
# flipped +1, flipped -1; pdqhash agrees on these photos, within 0 to 28 bits)
TRANSPOSES = [("FLIP_LEFT_RIGHT", 6), ("FLIP_TOP_BOTTOM", 5), ("ROTATE_90", 2), ("ROTATE_180", 3),
              ("ROTATE_270", 4), ("TRANSPOSE", 7), ("TRANSVERSE", 8)]


def test_dihedral_finds_flipped_copies(noworker, cluster, models):
    """Three photos and their seven flipped and rotated copies (PNG), in a bytea table whose PDQ
    column fill fills: pdq_matches(tbl, pdq_dihedral(photo)) finds every copy within 31 bits,
    nearest to the dihedral hash of its transform; near_duplicates(tbl, pdq(photo).hash) finds
    only the photo itself."""
    r = "pq_dh"
    plain_role(cluster, r, dbs=[NOWORKER])
    photos = PHOTOS[:3]
    rows = []
    for k, p in enumerate(photos):
        rows.append((100 * k, data(p)))
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        for j, (how, _) in enumerate(TRANSPOSES, 1):
            buf = io.BytesIO()
            rgb.transpose(getattr(Image.Transpose, how)).save(buf, "PNG")
            rows.append((100 * k + j, buf.getvalue()))
    t = f"{r}.dh"
    with cluster.connect(NOWORKER, user=r) as c:
        c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[], features_model text, pdq bit(256), pdq_q int)")
        with c.cursor() as cur:
            cur.executemany(f"INSERT INTO {t} (id, img) VALUES (%s, %s)", rows)
        c.execute(f"""SELECT doppler.watch('{t}', 'img', model => '{MODEL}', mode => 'manual',
                                           pdq_column => 'pdq', pdq_quality_column => 'pdq_q')""")
        c.execute(f"CALL doppler.fill('{t}')")
        assert c.execute(f"SELECT count(pdq) FROM {t}").fetchone()[0] == len(rows)
        for k, p in enumerate(photos):
            img = data(p)
            mine = {str(100 * k + j) for j in range(len(TRANSPOSES) + 1)}
            near = {row[0] for row in c.execute(
                f"SELECT row_key FROM doppler.near_duplicates('{t}', (doppler.pdq(%s::bytea)).hash, 31, 0)", (img,))}
            found = {}
            for key, listed, d in c.execute(
                    f"SELECT row_key, listed, distance FROM doppler.pdq_matches('{t}', doppler.pdq_dihedral(%s::bytea), 31, 0)",
                    (img,)).fetchall():
                if key not in found or d < found[key][1]:
                    found[key] = (listed, d)
            name = os.path.basename(p)
            assert near & mine == {str(100 * k)}, f"{name}: near_duplicates found {sorted(near & mine)}"
            assert found.get(str(100 * k)) == (1, 0), f"{name}: the photo itself: {found.get(str(100 * k))}"
            for j, (how, place) in enumerate(TRANSPOSES, 1):
                key = str(100 * k + j)
                assert key in found, f"{name} {how}: not found by the dihedral hashes"
                assert found[key][0] == place, f"{name} {how}: nearest to dihedral hash {found[key][0]}, not {place}"
            assert len(mine & set(found)) > len(mine & near)


# ---------------------------------------------------------------------------------------------
# 6. external workers

EXT = "pq_ext"
EXT_WORKER = "pq_ext_worker"


def test_external_worker_fills_pdq(cluster, models):
    """A table watched for workers => 'external' with a PDQ column: one doppler-worker --once run
    fills every row's PDQ hash and quality (doppler.pdq's) with its vector and dHash, in batches of
    the worker's. A worker's answer (SQL, as the worker role) with a PDQ hash of 63 or 65 digits,
    not hex, NULL or missing, one for all the rows, a quality of 101 or -1 or none, is refused
    (22023) and writes nothing; a right one (upper case too) is taken."""
    from test_workers import BIN, Worker  # (here: only this test needs the worker's helpers)
    if not os.access(BIN, os.X_OK):
        pytest.skip(f"no doppler-worker binary at {BIN} (cargo build -p doppler-worker)")
    plain_role(cluster, EXT, dbs=[DB])
    plain_role(cluster, EXT_WORKER, member_of=["doppler_worker"])
    images = [data(p) for p in PHOTOS]
    with cluster.connect() as admin, cluster.connect(user=EXT) as c:
        ref = {}
        for img in images:
            ref[img] = admin.execute("SELECT doppler.pdq_to_hex(p.hash), p.quality, doppler.dhash(%s::bytea) FROM doppler.pdq(%s::bytea) p",
                                     (img, img)).fetchone()

        def make(t):
            c.execute(f"""CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[], features_model text, d_hash text,
                                            pdq bit(256), pdq_q int)""")
            c.execute(f"""SELECT doppler.watch('{t}', 'img', model => '{MODEL}', hash_column => 'd_hash', workers => 'external',
                                               pdq_column => 'pdq', pdq_quality_column => 'pdq_q')""")
            c.execute(f"INSERT INTO {t} (id, img) SELECT * FROM unnest(%s::int[], %s::bytea[])",
                      (list(range(1, len(images) + 1)), images))

        # one --once run fills the table
        t = f"{EXT}.once"
        make(t)
        w = Worker(cluster, "pdq-once", user=EXT_WORKER, once=True, batch=4)
        try:
            rc = w.wait(120)
            assert rc == 0, f"exit {rc}:\n{w.text()}"
        finally:
            w.kill()
        assert wrong_rows(c, t) == [], "rows the worker filled whose PDQ, quality, dHash or vector is not their image's"
        assert admin.execute("SELECT coalesce(sum(filled), 0) FROM doppler.batches WHERE relid = %s::regclass AND via = 'external'",
                             (t,)).fetchone()[0] == len(images)

        # a hostile worker, by hand
        t = f"{EXT}.hostile"
        make(t)
        with cluster.connect(user=EXT_WORKER) as wk:
            wid = wk.execute("SELECT id FROM doppler.worker_register(%s, %s, 'cpu', '0.11.0')", ("sql-pdq", os.getpid())).fetchone()[0]

            def attempt(change):
                """Claims the batch, answers it as `change` makes the right answer, rolls back unless
                the answer is taken: (sqlstate or None, message)."""
                wk.execute("BEGIN")
                done = False
                try:
                    claimed = [dict(zip(["n", "tbl", "model", "source", "image"], row)) for row in wk.execute(
                        "SELECT n, tbl, model, source, image FROM doppler.worker_claim(%s, 32)", (wid,)).fetchall()]
                    assert len(claimed) == len(images), claimed
                    model = claimed[0]["model"]
                    sha = (model if isinstance(model, dict) else json.loads(model))["sha256"]
                    answer = {"n": [r["n"] for r in claimed],
                              "pdq": [ref[bytes(r["image"])][0] for r in claimed],
                              "quality": [ref[bytes(r["image"])][1] for r in claimed],
                              "hashes": [ref[bytes(r["image"])][2] for r in claimed]}
                    change(answer)
                    try:
                        wk.execute("SELECT doppler.worker_write(%s, %s, %s::int[], %s::real[], %s::text[], '[]'::jsonb,"
                                   " %s::text[], %s::int[])",
                                   (wid, sha, answer["n"], [0.25] * (16 * len(answer["n"])), answer["hashes"],
                                    answer["pdq"], answer["quality"]))
                    except psycopg.Error as e:
                        return e.sqlstate, str(e)
                    wk.execute("COMMIT")
                    done = True
                    return None, "written"
                finally:
                    if not done:
                        wk.execute("ROLLBACK")

            def setting(key, i, value):
                def change(a):
                    a[key][i] = value
                return change

            def emptied(*keys):
                def change(a):
                    for key in keys:
                        a[key] = []
                return change
            cases = {
                "a PDQ hash of 63 hex digits": lambda a: a["pdq"].__setitem__(0, a["pdq"][0][:63]),
                "a PDQ hash of 65 hex digits": lambda a: a["pdq"].__setitem__(0, a["pdq"][0] + "0"),
                "a PDQ hash that is not hex": setting("pdq", 0, "g" * 64),
                "a NULL PDQ hash": setting("pdq", 1, None),
                "a quality of 101": setting("quality", 0, 101),
                "a quality of -1": setting("quality", 2, -1),
                "a NULL quality": setting("quality", 1, None),
                "no PDQ hashes": emptied("pdq", "quality"),
                "no qualities": emptied("quality"),
                "one PDQ hash for all the rows": lambda a: (a.__setitem__("pdq", a["pdq"][:1]), a.__setitem__("quality", a["quality"][:1])),
            }
            for what, change in cases.items():
                code, msg = attempt(change)
                assert code == "22023", f"{what}: {code} {msg}"
            assert c.execute(f"SELECT count(pdq), count(features) FROM {t}").fetchone() == (0, 0), "a refused answer wrote rows"
            code, msg = attempt(lambda a: a.__setitem__("pdq", [h.upper() for h in a["pdq"]]))
            assert code is None, f"the right answer: {code} {msg}"
        got = c.execute(f"""SELECT count(*) FILTER (WHERE pdq::text = (doppler.pdq(img)).hash::text
                                                     AND pdq_q = (doppler.pdq(img)).quality AND d_hash = doppler.dhash(img)
                                                     AND features = array_fill(0.25::real, ARRAY[16])), count(*)
                            FROM {t}""").fetchone()
        assert got == (len(images), len(images)), got


# ---------------------------------------------------------------------------------------------
# 7. what one caller may ask for, and a quality column added later

LIM = "pq_lim"


def test_bounds_of_an_answer_and_a_quality_column_added_later(noworker, cluster, models):
    """As a plain owner: a key column is refused as the PDQ or quality column (22023); an answer of
    more than a million (row, listed hash) pairs is refused (54000) before it is built, and a list
    that repeats one hash is indexed once; statement_timeout ends a match whose list is compared
    with every row (max_bits 90) within the table's one heap chunk, not after it; a bigint quality
    beyond int4 reads clamped, never fails the lookup; a quality column added to a filled watch is
    filled for every row without a model run (the vector stays)."""
    plain_role(cluster, LIM, dbs=[NOWORKER])
    with cluster.connect(NOWORKER, user=LIM) as c:
        c.execute(f"CREATE TABLE {LIM}.k (id int PRIMARY KEY, img bytea, features real[], pdq bit(256), q bigint)")
        for args, code in [("pdq_column => 'pdq', pdq_quality_column => 'id'", "22023"),
                           ("pdq_column => 'id'", "42804")]:
            got = error_code(c, f"SELECT doppler.watch('{LIM}.k', 'img', model => '{MODEL}', mode => 'manual', {args})")
            assert got == code, (args, got)

        # 600 rows of one hash: 1 000 copies of it listed is 600 000 pairs, 2 000 copies too many
        h = "f0" * 32
        c.execute(f"INSERT INTO {LIM}.k (id, pdq, q) SELECT i, ('x' || %s)::bit(256), 100 FROM generate_series(1, 600) i", (h,))
        c.execute(f"INSERT INTO {LIM}.k (id, pdq, q) VALUES (0, ('x' || %s)::bit(256), 3000000000)", ("0f" * 32,))
        c.execute(f"SELECT doppler.watch('{LIM}.k', 'img', model => '{MODEL}', mode => 'manual', "
                  "pdq_column => 'pdq', pdq_quality_column => 'q')")
        many = f"SELECT count(*) FROM doppler.pdq_matches('{LIM}.k', array_fill(('x' || %s)::bit(256), ARRAY[%s]), 0, 0)"
        assert c.execute(many, (h, 1000)).fetchone()[0] == 600_000
        assert error_code(c, many, (h, 2000)) == "54000"
        assert error_code(c, f"SELECT count(*) FROM doppler.near_duplicates('{LIM}.k', ('x' || %s)::bit(256), 256, 0)",
                          (h,)) is None
        # the bigint quality beyond int4
        got = c.execute(f"SELECT row_key, quality FROM doppler.near_duplicates('{LIM}.k', ('x' || %s)::bit(256), 0)",
                        ("0f" * 32,)).fetchall()
        assert got == [("0", 2147483647)], got

        # a long list compared with every row: the timeout acts within the chunk
        c.execute(f"""CREATE TABLE {LIM}.biglist AS
                      SELECT array_agg(('x' || md5(i::text) || md5((i + 1)::text))::bit(256)) AS a
                      FROM generate_series(1, 200000) i""")
        c.execute(f"INSERT INTO {LIM}.k (id, pdq, q) SELECT i, ('x' || md5(i::text) || md5((-i)::text))::bit(256), 100 "
                  "FROM generate_series(1000, 20999) i")
        c.execute("SET statement_timeout = '1500ms'")
        t0 = time.time()
        code = error_code(c, f"SELECT count(*) FROM doppler.pdq_matches('{LIM}.k', (SELECT a FROM {LIM}.biglist), 90, 0)")
        took = time.time() - t0
        c.execute("RESET statement_timeout")
        assert code == "57014" and took < 6, (code, took)

        # a quality column added to a filled watch: filled by the next fill, the vectors kept
        c.execute(f"CREATE TABLE {LIM}.later (id int PRIMARY KEY, img bytea, features real[], pdq bit(256))")
        c.execute(f"INSERT INTO {LIM}.later (id, img) VALUES (1, %s), (2, %s)", (data(PHOTOS[0]), data(PHOTOS[1])))
        c.execute(f"SELECT doppler.watch('{LIM}.later', 'img', model => '{MODEL}', mode => 'manual', pdq_column => 'pdq')")
        c.execute(f"CALL doppler.fill('{LIM}.later')")
        before = c.execute(f"SELECT id, features, pdq::text FROM {LIM}.later ORDER BY id").fetchall()
        assert all(r[1] and r[2] for r in before), before
        c.execute(f"ALTER TABLE {LIM}.later ADD COLUMN q smallint")
        c.execute(f"SELECT doppler.watch('{LIM}.later', 'img', model => '{MODEL}', mode => 'manual', "
                  "pdq_column => 'pdq', pdq_quality_column => 'q')")
        assert c.execute(f"SELECT pending FROM doppler.status WHERE table_name = '{LIM}.later'::regclass").fetchone()[0] == 2
        runs = c.execute(f"SELECT count(*) FROM doppler.batches WHERE relid = '{LIM}.later'::regclass").fetchone()[0]
        c.execute(f"CALL doppler.fill('{LIM}.later')")
        after = c.execute(f"SELECT id, features, pdq::text, q FROM {LIM}.later ORDER BY id").fetchall()
        for (i, f, p, q), (_, f0, p0), path in zip(after, before, PHOTOS):
            want = c.execute("SELECT quality FROM doppler.pdq(%s::bytea)", (data(path),)).fetchone()[0]
            assert (f, p, q) == (f0, p0, want), i
        batch = c.execute(f"SELECT claimed, filled FROM doppler.batches WHERE relid = '{LIM}.later'::regclass "
                          "ORDER BY finished_at DESC LIMIT 1").fetchone()
        assert c.execute(f"SELECT count(*) FROM doppler.batches WHERE relid = '{LIM}.later'::regclass").fetchone()[0] == runs + 1
        assert batch == (2, 0), batch  # claimed for the quality, no vector made
