"""dHash column, dedup, skip hashes, reverse image search (real[] and pgvector), HNSW recall, duplicates."""
import os

import numpy as np
import psycopg
import pytest
from PIL import Image

from conftest import FIXTURES, MODELS, PG, fixture_paths, status, wait_for

PHOTOS = [p for p in fixture_paths() if p.endswith((".jpg", ".png")) and "1x1" not in p and "7x5" not in p
          and "gray16" not in p][:8]


def copies(cluster):
    """For each photo, a rescaled, a re-encoded and a slightly cropped copy (the ways reposts differ)."""
    out = {}
    for i, p in enumerate(PHOTOS):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        made = []
        for kind in ["rescaled", "recompressed", "cropped"]:
            dst = os.path.join(cluster.files, f"copy{i}_{kind}.jpg")
            if kind == "rescaled":
                img.resize((max(1, w * 3 // 4), max(1, h * 3 // 4)), Image.LANCZOS).save(dst, quality=95)
            elif kind == "recompressed":
                img.save(dst, quality=55)
            else:
                img.crop((w // 50, h // 50, w - w // 50, h - h // 50)).save(dst, quality=95)
            os.chmod(dst, 0o644)
            made.append(dst)
        out[p] = made
    return out


def test_hash_column_dedup_and_skip_hashes(db, cluster):
    flat = os.path.join(cluster.files, "flat.png")
    Image.new("RGB", (64, 48), (90, 90, 90)).save(flat)  # dHash 0000000000000000: a skip hash
    os.chmod(flat, 0o644)
    db.execute("CREATE TABLE dd (id int PRIMARY KEY, f_img text, d_hash text, features real[])")
    rows = [(i, p, None) for i, p in enumerate(PHOTOS)]
    rows += [(100 + i, p, None) for i, p in enumerate(PHOTOS[:3])]        # the same images posted again
    rows += [(200, flat, None), (201, PHOTOS[0], "NOHASH")]             # skip hashes: computed, and given
    with db.cursor() as cur:
        cur.executemany("INSERT INTO dd VALUES (%s, %s, %s)", rows)
    db.execute("SELECT doppler.watch('dd', hash_column => 'd_hash', dedup => true, batch_size => 4)")
    # dedup looks hashes up for every model run: watch indexes the hash column (once)
    db.execute("SELECT doppler.watch('dd', hash_column => 'd_hash', dedup => true, batch_size => 4)")
    assert db.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'dd' AND indexdef LIKE '%(d_hash)%'").fetchone()[0] == 1
    s = wait_for(lambda: (lambda s: s if s["pending"] == 0 else None)(status(db, "dd")), 180, what="dd filled")
    assert s["done"] == len(PHOTOS) + 3 and s["skipped"] == 2 and s["failed"] == 0
    saved = db.execute("SELECT inferences_saved FROM doppler.status WHERE table_name = 'dd'::regclass").fetchone()[0]
    assert saved == 3
    assert db.execute("SELECT sum(filled) - sum(deduped) FROM doppler.batches WHERE relid = 'dd'::regclass").fetchone()[0] == len(PHOTOS)
    # every hash is imagehash's, and duplicates share their original's vector
    for i, p in enumerate(PHOTOS[:3]):
        a = db.execute("SELECT d_hash, features FROM dd WHERE id = %s", (i,)).fetchone()
        b = db.execute("SELECT d_hash, features FROM dd WHERE id = %s", (100 + i,)).fetchone()
        assert a[0] == b[0] == db.execute("SELECT doppler.dhash(%s::text)", (p,)).fetchone()[0]
        assert a[1] == b[1]
    assert db.execute("SELECT d_hash, features FROM dd WHERE id = 200").fetchone() == ("0000000000000000", None)
    assert db.execute("SELECT d_hash, features FROM dd WHERE id = 201").fetchone() == ("NOHASH", None)
    classes = db.execute("SELECT error_class FROM doppler.failures WHERE relid = 'dd'::regclass").fetchall()
    assert classes == [("skip_hash",), ("skip_hash",)]

    groups = db.execute("SELECT size, row_keys, hashes FROM doppler.duplicates('dd', 0)").fetchall()
    assert [g[0] for g in groups] == [2, 2, 2]
    assert all(len(set(g[2])) == 1 for g in groups)


def test_model_errors_are_raised_and_missing_hashes_backfilled(db):
    # a model that cannot load is the configuration's fault: the statement fails, no row is marked
    db.execute("CREATE TABLE hf (id int PRIMARY KEY, f_img text, d_hash text, features real[])")
    db.execute("SELECT doppler.watch('hf', hash_column => 'd_hash', mode => 'sync')")
    db.execute("SET doppler.model_path = '/no/such/model.onnx'")
    with pytest.raises(psycopg.Error) as e:
        db.execute("INSERT INTO hf VALUES (1, %s)", (PHOTOS[0],))
    assert e.value.sqlstate == "58P01" and "/no/such/model.onnx" in str(e.value)
    db.execute("RESET doppler.model_path")
    db.execute("INSERT INTO hf VALUES (1, %s)", (PHOTOS[0],))
    assert db.execute("SELECT d_hash IS NOT NULL AND features IS NOT NULL FROM hf").fetchone()[0]
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 'hf'::regclass").fetchone()[0] == 0
    # a row whose vector exists but whose hash is missing gets only its hash (from the worker)
    want = db.execute("SELECT d_hash FROM hf").fetchone()[0]
    db.execute("UPDATE hf SET d_hash = NULL")
    db.execute("SELECT doppler.wake()")
    assert wait_for(lambda: db.execute("SELECT d_hash FROM hf").fetchone()[0], 60, what="hash backfill") == want


@pytest.mark.parametrize("kind", ["real[]", "vector(2048)", "halfvec(2048)"])
def test_similar_finds_the_copy_first(db, cluster, kind):
    if kind != "real[]" and not cluster.has_pgvector():
        pytest.skip("pgvector is not installed for this server")
    name = "sim_" + kind.split("(")[0].replace("[]", "arr")
    cp = copies(cluster)
    db.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, f_img text, features {kind})")
    with db.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} (f_img) VALUES (%s)", [(c,) for cs in cp.values() for c in cs])
    db.execute(f"SELECT doppler.watch('{name}')")
    wait_for(lambda: status(db, name)["pending"] == 0, 240, what=f"{name} filled")
    n = len(cp) * 3
    for metric in ["l2", "cosine"]:
        for original, made in cp.items():
            hits = db.execute(f"SELECT source, distance FROM doppler.similar('{name}', %s::text, %s, %s)", (original, n, metric)).fetchall()
            assert len(hits) == n and hits == sorted(hits, key=lambda h: h[1])
            ranks = {h[0]: r for r, h in enumerate(hits)}
            rescaled, recompressed, cropped = made
            # the first two hits are the rescaled and the re-encoded copy
            assert {hits[0][0], hits[1][0]} == {rescaled, recompressed}, (metric, original, hits[:4])
            # the cropped copy is nearer than the typical other image (random weights are not crop-invariant)
            others = [h[1] for h in hits if h[0] not in made]
            assert hits[ranks[cropped]][1] < np.median(others), (metric, original, ranks[cropped])
    # bytes and vectors as queries
    with open(PHOTOS[0], "rb") as f:
        hits = db.execute(f"SELECT source FROM doppler.similar('{name}', %s::bytea, 1)", (f.read(),)).fetchall()
    assert hits[0][0] in cp[PHOTOS[0]]
    v = db.execute("SELECT doppler.extract_features(%s::text)", (PHOTOS[1],)).fetchone()[0]
    assert db.execute(f"SELECT source FROM doppler.similar('{name}', %s::real[], 1)", (v,)).fetchone()[0] in cp[PHOTOS[1]]


@pytest.mark.skipif(PG != "pg18", reason="pgvector ships with the PostgreSQL 18 wheel")
def test_hnsw_index_is_used_and_agrees_with_the_exact_scan(db):
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 1, (30, 2048)).astype(np.float32)
    vecs = np.concatenate([c + rng.normal(0, 0.3, (10, 2048)).astype(np.float32) for c in centers])  # 300 rows
    db.execute("CREATE TABLE ann (id int PRIMARY KEY, f_img text, features vector(2048))")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO ann VALUES (%s, %s, %s::real[]::vector)",
                        [(i, f"/img/{i}.jpg", v.tolist()) for i, v in enumerate(vecs)])
    db.execute("SELECT doppler.watch('ann', mode => 'manual')")
    exact = {}
    queries = rng.normal(0, 1, (20, 2048)).astype(np.float32) * 0.3 + centers[:20]
    for qi, q in enumerate(queries):
        exact[qi] = [r[0] for r in db.execute("SELECT row_key FROM doppler.similar('ann', %s::real[], 10)", (q.tolist(),)).fetchall()]
        want = np.argsort(np.linalg.norm(vecs - q, axis=1))[:10]
        assert exact[qi] == [str(i) for i in want]
    idx = db.execute("SELECT doppler.create_index('ann')").fetchone()[0]
    assert idx and db.execute("SELECT doppler.create_index('ann')").fetchone()[0] == idx  # idempotent
    db.execute("SET enable_seqscan = off")  # 300 rows: make the planner show its hand
    plan = "\n".join(r[0] for r in db.execute(
        "EXPLAIN SELECT id FROM ann t ORDER BY (t.features::halfvec(2048)) <-> (%s::real[]::halfvec(2048)) LIMIT 10",
        (queries[0].tolist(),)).fetchall())
    assert f"Index Scan using {idx}" in plan, plan
    found = 0
    for qi, q in enumerate(queries):
        got = [r[0] for r in db.execute("SELECT row_key FROM doppler.similar('ann', %s::real[], 10)", (q.tolist(),)).fetchall()]
        found += len(set(got) & set(exact[qi]))
    recall = found / (10 * len(queries))
    print(f"HNSW recall@10 on 300 rows: {recall:.3f}")
    assert recall >= 0.9


@pytest.mark.skipif(PG != "pg18", reason="pgvector ships with the PostgreSQL 18 wheel")
def test_similar_filters_and_returns_k_rows_past_stale_vectors(db):
    """With an HNSW index, similar() still returns k rows when most candidates are filtered out
    (other sites, vectors of an older model): pgvector's iterative scan, in exact order. The
    filter names columns and passes values as a parameter: no way to inject SQL."""
    rng = np.random.default_rng(11)
    vecs = rng.normal(0, 1, (3000, 16)).astype(np.float32)
    site = ["rare" if i % 40 == 0 else "common" for i in range(3000)]
    db.execute("SELECT doppler.register_model('tiny_filter', %s, dim => 16)",
               (os.path.join(MODELS, "tiny.onnx"),))
    db.execute("CREATE TABLE simf (id int PRIMARY KEY, f_img text, site text, features vector(16), features_model text)")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO simf VALUES (%s, %s, %s, %s::real[]::vector, 'tiny_filter@1')",
                        [(i, f"/img/{i}.jpg", site[i], v.tolist()) for i, v in enumerate(vecs)])
    db.execute("SELECT doppler.watch('simf', model => 'tiny_filter', mode => 'manual')")
    assert db.execute("SELECT doppler.create_index('simf')").fetchone()[0]
    db.execute("ANALYZE simf")
    q = rng.normal(0, 1, 16).astype(np.float32)
    d = np.linalg.norm(vecs - q, axis=1)
    rare = [i for i in np.argsort(d) if site[i] == "rare"][:10]
    got = db.execute("""SELECT row_key, distance FROM doppler.similar('simf', %s::real[], 10, filter => '{"site": "rare"}')""",
                     (q.tolist(),)).fetchall()
    assert [int(r[0]) for r in got] == [int(i) for i in rare], (got, rare)
    assert np.allclose([r[1] for r in got], d[rare], atol=1e-4)
    # the setting is back as it was after the call
    assert db.execute("SELECT current_setting('hnsw.iterative_scan')").fetchone()[0] == "off"
    # nine rows in ten with a vector of an older model: still k current rows, nearest first
    db.execute("UPDATE simf SET features_model = 'tiny_filter@0' WHERE id % 10 <> 0")
    cur_rows = [i for i in np.argsort(d) if i % 10 == 0][:12]
    got = db.execute("SELECT row_key FROM doppler.similar('simf', %s::real[], 12)", (q.tolist(),)).fetchall()
    assert [int(r[0]) for r in got] == [int(i) for i in cur_rows]
    # several columns, typed values; a value never becomes SQL; a key must be a column
    got = db.execute("""SELECT row_key FROM doppler.similar('simf', %s::real[], 5, filter => '{"site": "common", "id": 30}')""",
                     (q.tolist(),)).fetchall()
    assert got == [("30",)]
    assert db.execute("""SELECT count(*) FROM doppler.similar('simf', %s::real[], 5, filter => '{"site": "x'' OR ''1''=''1"}')""",
                      (q.tolist(),)).fetchone()[0] == 0
    for bad, code in [('{"site = site OR true --": 1}', "42703"), ('["site"]', "22023"), ('{"nope": 1}', "42703")]:
        with pytest.raises(psycopg.Error) as e:
            db.execute("SELECT * FROM doppler.similar('simf', %s::real[], 5, filter => %s::jsonb)", (q.tolist(), bad))
        assert e.value.sqlstate == code, (bad, e.value)
    # NULL filter: none; NULL query: no rows (as a strict function)
    assert db.execute("SELECT count(*) FROM doppler.similar('simf', %s::real[], 3, filter => NULL)", (q.tolist(),)).fetchone()[0] == 3
    assert db.execute("SELECT count(*) FROM doppler.similar('simf', NULL::real[], 3)").fetchone()[0] == 0


def test_similar_filter_on_an_exact_scan(db):
    """real[] columns (no index): the filter keeps the rows whose columns equal its values,
    converted to each column's type (a numeric beyond float precision stays exact), and a
    NOT NULL domain elsewhere in the row does not get in the way."""
    rng = np.random.default_rng(5)
    vecs = rng.normal(0, 1, (400, 16)).astype(np.float32)
    db.execute("SELECT doppler.register_model('tiny_filter2', %s, dim => 16)", (os.path.join(MODELS, "tiny.onnx"),))
    db.execute("DROP DOMAIN IF EXISTS tag_nn CASCADE")
    db.execute("CREATE DOMAIN tag_nn AS text NOT NULL")
    db.execute("""CREATE TABLE simx (id int PRIMARY KEY, f_img text, big numeric, tag tag_nn,
                                     features real[], features_model text)""")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO simx VALUES (%s, %s, %s, 't', %s, 'tiny_filter2@1')",
                        [(i, f"/img/{i}.jpg", 123456789012345678901234 + (i % 3), v.tolist()) for i, v in enumerate(vecs)])
    db.execute("SELECT doppler.watch('simx', model => 'tiny_filter2', mode => 'manual')")
    q = rng.normal(0, 1, 16).astype(np.float32)
    d = np.linalg.norm(vecs - q, axis=1)
    want = [int(i) for i in np.argsort(d) if i % 3 == 1][:7]
    got = db.execute("""SELECT row_key FROM doppler.similar('simx', %s::real[], 7,
                               filter => '{"big": 123456789012345678901235}')""", (q.tolist(),)).fetchall()
    assert [int(r[0]) for r in got] == want
    # a number no float holds is still a number (it matches nothing here); a value of the wrong type is
    # the column type's own error, not an internal one
    assert db.execute("SELECT count(*) FROM doppler.similar('simx', %s::real[], 3, filter => '{\"big\": 1e400}')",
                      (q.tolist(),)).fetchone()[0] == 0
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT * FROM doppler.similar('simx', %s::real[], 3, filter => '{\"id\": \"x\"}')", (q.tolist(),))
    assert e.value.sqlstate == "22P02", e.value
    # a column with its own collation; a value is not rounded to the column's typmod into a match
    db.execute("""ALTER TABLE simx ADD COLUMN site text COLLATE "C" DEFAULT 'a', ADD COLUMN price numeric(5,2) DEFAULT 1.23""")
    assert db.execute("""SELECT count(*) FROM doppler.similar('simx', %s::real[], 4, filter => '{"site": "a"}')""",
                      (q.tolist(),)).fetchone()[0] == 4
    assert db.execute("""SELECT count(*) FROM doppler.similar('simx', %s::real[], 4, filter => '{"price": 1.234}')""",
                      (q.tolist(),)).fetchone()[0] == 0
    assert db.execute("""SELECT count(*) FROM doppler.similar('simx', %s::real[], 4, filter => '{"price": 1.23}')""",
                      (q.tolist(),)).fetchone()[0] == 4
