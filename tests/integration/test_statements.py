"""Every statement doppler builds over a user table, fed identifiers with quotes, dots and spaces.

doppler writes a watched table's schema, table and column names into SQL text (claims, writes,
dedup lookups, the stale-model scan, held-row clearing, the sync trigger's read of its transition
table, the stale-clearing trigger's WHEN, the pending index, status counts, similar, duplicates,
near_duplicates, the hamming, PDQ and HNSW indexes, the PDQ matches). One table whose every name needs quoting, with a
one-column and a composite key, goes through each of them as a plain owner, in a database no
worker serves (so that each outcome is the statement's own), and each must do what it does for
plain names: a name quoted wrongly is a syntax error or, worse, another column.
"""
import json
import os

import numpy as np
import pytest

from conftest import FIXTURES, wait_for

SCHEMA = '"we.ird ""s"" ema"'
TABLE = f'{SCHEMA}."t.a ""b"" c"'
KEY1 = '"the ""key"". 1"'
KEY2 = '"k2 . ""x"""'
SRC = '"pic .""p"""'
HASH = '"h ""a"". sh"'
PDQ = '"p ""d"". q"'
PDQQ = '"p.q ""q"""'
MODEL = 'm.""o"" del'  # a name (unquoted form), as watch(model_column => ...) takes it
MODEL_Q = '"m.""o"" del"'
IMAGES = [os.path.join(FIXTURES, f) for f in ("landscape_640x480.jpg", "gray_320x240.png", "gif_160x120.gif")]
ROLE = "st_owner"


def name(quoted):
    """The name a quoted identifier stands for (what watch's name arguments take)."""
    assert quoted[0] == quoted[-1] == '"'
    return quoted[1:-1].replace('""', '"')


def close(a, b, tol=1e-4):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return a.shape == b.shape and np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


@pytest.fixture
def owner(cluster, noworker):
    with noworker() as admin:
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            admin.execute(f"DROP OWNED BY {ROLE} CASCADE")
            admin.execute(f"DROP ROLE {ROLE}")
        admin.execute(f"CREATE ROLE {ROLE} LOGIN")
        admin.execute(f"GRANT pg_read_server_files TO {ROLE}")
        admin.execute(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION {ROLE}")
    with cluster.connect("doppler_noworker", user=ROLE) as c:
        c.autocommit = True
        yield c
    with noworker() as admin:
        admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


@pytest.mark.parametrize("key", ["one", "composite"])
def test_identifiers_with_quotes_dots_and_spaces_reach_every_statement(cluster, noworker, owner, key):
    c = owner
    vec = '"vec. ""v"" x"'
    keys = f"{KEY1}, {KEY2}" if key == "composite" else KEY1
    c.execute(f"CREATE TABLE {TABLE} ({KEY1} text, {KEY2} int, {SRC} text, {vec} real[], {HASH} text, "
              f"{PDQ} bit(256), {PDQQ} smallint, PRIMARY KEY ({keys}))")
    pdq_args = f"pdq_column => '{name(PDQ).replace(chr(39), chr(39) * 2)}', pdq_quality_column => '{name(PDQQ)}'"
    said = c.execute(
        f"SELECT doppler.watch(%s, %s, %s, mode => 'manual', hash_column => %s, dedup => true, model_column => %s, {pdq_args})",
        (TABLE, name(SRC), name(vec), name(HASH), name(MODEL_Q))).fetchone()[0]
    assert "doppler watches" in said
    # three rows, two of the same image (dedup), one path that is not there (a failure)
    rows = [("a'b", 1, IMAGES[0]), ('c"d', 2, IMAGES[1]), ("e.f g", 3, IMAGES[1]), ("h", 4, "/nonexistent/x.jpg")]
    for k1, k2, path in rows:
        c.execute(f"INSERT INTO {TABLE} ({KEY1}, {KEY2}, {SRC}) VALUES (%s, %s, %s)", (k1, k2, path))

    # claims (pending index), infer, dedup lookup, writes, failure records
    c.execute("CALL doppler.fill(%s)", (TABLE,))
    got = dict(c.execute(f"SELECT {KEY1}, {vec}::real[] FROM {TABLE} WHERE {vec} IS NOT NULL").fetchall())
    assert set(got) == {"a'b", 'c"d', "e.f g"}
    for k1, _, path in rows[:3]:
        want = c.execute("SELECT doppler.extract_features(%s::text)", (path,)).fetchone()[0]
        assert close(got[k1], want), k1
    hashes = dict(c.execute(f"SELECT {KEY1}, {HASH} FROM {TABLE}").fetchall())
    assert hashes["a'b"] == c.execute("SELECT doppler.dhash(%s::text)", (IMAGES[0],)).fetchone()[0]
    pdqs = dict(c.execute(f"SELECT {KEY1}, ({PDQ}::text, {PDQQ}::int) FROM {TABLE}").fetchall())
    assert pdqs["a'b"] == c.execute("SELECT (hash::text, quality) FROM doppler.pdq(%s::text)", (IMAGES[0],)).fetchone()[0]
    tags = {t for (t,) in c.execute(f"SELECT DISTINCT {MODEL_Q} FROM {TABLE}").fetchall()}
    assert tags == {"resnet50@1", "!failed"}, tags
    assert c.execute("SELECT error_class FROM doppler.failures WHERE relid = %s::regclass", (TABLE,)).fetchone()[0] == "not_found"
    st = c.execute("SELECT total, done, retrying, exact FROM doppler.status WHERE table_name = %s::regclass", (TABLE,)).fetchone()
    assert st == (4, 3, 1, True)
    assert c.execute("SELECT inferences_saved FROM doppler.status WHERE table_name = %s::regclass", (TABLE,)).fetchone()[0] >= 1

    # a due retry (claimed by key, in the key's type), then a due record whose row is gone
    assert c.execute("SELECT doppler.retry_failed(%s)", (TABLE,)).fetchone()[0] == 1
    c.execute("CALL doppler.fill(%s)", (TABLE,))
    # (claimed again through its due record, and failed again: a new attempt, due later)
    assert c.execute("SELECT attempts, next_attempt > now() FROM doppler.failures WHERE relid = %s::regclass",
                     (TABLE,)).fetchone() == (1, True)
    c.execute(f"DELETE FROM {TABLE} WHERE {KEY1} = 'h'")
    c.execute("SELECT doppler.retry_failed(%s)", (TABLE,))
    c.execute("CALL doppler.fill(%s)", (TABLE,))
    assert c.execute("SELECT count(*) FROM doppler.failures WHERE relid = %s::regclass", (TABLE,)).fetchone()[0] == 0

    # the planner's estimate and the pending index (status over doppler.status_exact_rows)
    with noworker() as admin:
        admin.execute(f"ANALYZE {TABLE}")
        admin.execute("SET doppler.status_exact_rows = 0")
        st = admin.execute("SELECT total, done, pending, exact FROM doppler.status WHERE table_name = %s::regclass", (TABLE,)).fetchone()
        assert st == (3, 3, 0, False), st

    # search, duplicates, near_duplicates, the hamming index (and HNSW on a vector column)
    found = c.execute("SELECT row_key, distance FROM doppler.similar(%s, %s::text, 3)", (TABLE, IMAGES[1])).fetchall()
    assert len(found) == 3 and found[0][1] < 1e-3 and found[1][1] < 1e-3
    assert c.execute("SELECT count(*) FROM doppler.similar(%s, %s::text, 3, filter => %s)",
                     (TABLE, IMAGES[1], json.dumps({name(KEY1): "a'b"}))).fetchone()[0] == 1
    groups = c.execute("SELECT size FROM doppler.duplicates(%s, 0)", (TABLE,)).fetchall()
    assert groups == [(2,)]
    assert c.execute("SELECT doppler.create_index(%s, 'hamming')", (TABLE,)).fetchone()[0]
    near = c.execute("SELECT count(*) FROM doppler.near_duplicates(%s, %s, 0)", (TABLE, hashes['c"d'])).fetchone()[0]
    assert near == 2
    # the PDQ index, one hash through it, a list as an array and as a table whose names need quoting too
    assert c.execute("SELECT doppler.create_index(%s, 'pdq')", (TABLE,)).fetchone()[0]
    q = f"(SELECT {PDQ} FROM {TABLE} WHERE {KEY1} = 'c\"d')"
    assert c.execute(f"SELECT count(*) FROM doppler.near_duplicates(%s, {q}, 0, 0)", (TABLE,)).fetchone()[0] == 2
    assert c.execute(f"SELECT count(*) FROM doppler.pdq_matches(%s, ARRAY[{q}], 0, 0)", (TABLE,)).fetchone()[0] == 2
    c.execute(f'CREATE TABLE {SCHEMA}."l.i ""s"" t" ("h ""x"" ." text)')
    c.execute(f'INSERT INTO {SCHEMA}."l.i ""s"" t" SELECT doppler.pdq_to_hex({q})')
    assert c.execute("SELECT count(*) FROM doppler.pdq_list_matches(%s, %s, %s, 0, 0)",
                     (TABLE, f'{SCHEMA}."l.i ""s"" t"', 'h "x" .')).fetchone()[0] == 2

    # another model: the stale-model claims (a scan outside the pending index) re-embed every row
    c.execute(f"SELECT doppler.watch(%s, %s, %s, mode => 'manual', hash_column => %s, dedup => true, model => 'efficientnet_lite0', {pdq_args})",
              (TABLE, name(SRC), name(vec), name(HASH)))
    assert c.execute("SELECT stale FROM doppler.status WHERE table_name = %s::regclass", (TABLE,)).fetchone()[0] == 3
    c.execute("CALL doppler.fill(%s)", (TABLE,))
    tags = {t for (t,) in c.execute(f"SELECT DISTINCT {MODEL_Q} FROM {TABLE}").fetchall()}
    assert tags == {"efficientnet_lite0@1"}, tags
    assert c.execute("SELECT stale FROM doppler.status WHERE table_name = %s::regclass", (TABLE,)).fetchone()[0] == 0
    lite = c.execute(f"SELECT {vec} FROM {TABLE} WHERE {KEY1} = 'a''b'").fetchone()[0]
    assert close(lite, c.execute("SELECT doppler.extract_features(%s::text, 'efficientnet_lite0')", (IMAGES[0],)).fetchone()[0])

    # sync mode: the trigger reads its transition table, and a changed source clears the row
    # (the stale-clearing trigger's WHEN compares the keys as text, OLD and NEW)
    c.execute(f"SELECT doppler.watch(%s, %s, %s, mode => 'sync', hash_column => %s, dedup => true, {pdq_args})",
              (TABLE, name(SRC), name(vec), name(HASH)))
    c.execute(f"INSERT INTO {TABLE} ({KEY1}, {KEY2}, {SRC}) VALUES ('i''j', 5, %s)", (IMAGES[2],))
    assert c.execute(f"SELECT {vec} IS NOT NULL FROM {TABLE} WHERE {KEY2} = 5").fetchone()[0]
    c.execute(f"UPDATE {TABLE} SET {SRC} = %s WHERE {KEY2} = 5", (IMAGES[0],))
    v, h, p = c.execute(f"SELECT {vec}, {HASH}, ({PDQ}::text, {PDQQ}::int) FROM {TABLE} WHERE {KEY2} = 5").fetchone()
    assert h == hashes["a'b"] and p == pdqs["a'b"]
    assert close(v, lite)  # (the same image: dedup copied the vector of row a'b)

    # unwatch: doppler's triggers and indexes go, the table stays
    assert c.execute("SELECT doppler.unwatch(%s)", (TABLE,)).fetchone()[0]
    left = c.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE 'doppler%%'", (TABLE,)).fetchone()[0]
    assert left == 0
    assert c.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] == 4
