"""dHash column, dedup, skip hashes, reverse image search (real[] and pgvector), HNSW recall, duplicates."""
import os

import numpy as np
import psycopg
import pytest
from PIL import Image

from conftest import FIXTURES, PG, fixture_paths, status, wait_for

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
