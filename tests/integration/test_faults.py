"""Real schemas and faults (issue 13, in part): sync mode on pgvector columns and typed keys, a
changed image resets what was derived from the old one, a row that cannot be written is recorded
and the rest of its batch written, and long work can be cancelled."""
import time

import psycopg
import pytest

from conftest import PG, fixture_paths, wait_for, worker_fresh_nap

GOOD = [p for p in fixture_paths() if "large_" not in p]
A, B, C = GOOD[0], GOOD[1], GOOD[2]


def data(path):
    with open(path, "rb") as f:
        return f.read()


def features(db, path):
    return db.execute("SELECT doppler.extract_features(%s::bytea)", (data(path),)).fetchone()[0]


def close(a, b, tol=1e-4):
    scale = max(1.0, max(abs(y) for y in b))
    return len(a) == len(b) == 2048 and max(abs(x - y) for x, y in zip(a, b)) <= tol * scale


KEYS = {
    "int": ("int", ["1", "2"]),
    "bigint": ("bigint", ["9000000000", "9000000001"]),
    "text": ("text", ["a b", "O'Brien"]),
    "uuid": ("uuid", ["7d444840-9dc0-11d1-b245-5ffdce74fad2", "7d444840-9dc0-11d1-b245-5ffdce74fad3"]),
    "enum": ("tf_key_enum", ["a", "b"]),
    "domain": ("tf_key_domain", ["k1", "k2"]),
    "citext": ("citext", ["Key1", "Key2"]),
}


@pytest.mark.parametrize("vtype", ["real[]", "vector(2048)", "halfvec(2048)"])
@pytest.mark.parametrize("key", sorted(KEYS))
def test_sync_mode_on_every_vector_and_key_type(db, cluster, vtype, key):
    """The sync trigger writes through the vector column's type and compares keys in the key's type,
    named by the catalog (schema-qualified), not by the watcher's search_path."""
    if vtype != "real[]" and not cluster.has_pgvector():
        pytest.skip("pgvector is not installed for this PostgreSQL")
    if key == "citext" and not db.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'citext'").fetchone()[0]:
        pytest.skip("citext is not installed for this PostgreSQL")
    schema = "tf_types"
    db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    db.execute(f"SET search_path = {schema}, public")  # the key's type is found through it here only
    try:
        if key == "citext":
            db.execute("CREATE EXTENSION IF NOT EXISTS citext SCHEMA public")
        if not db.execute("SELECT to_regtype('tf_types.tf_key_enum')").fetchone()[0]:
            db.execute("CREATE TYPE tf_types.tf_key_enum AS ENUM ('a', 'b')")
            db.execute("CREATE DOMAIN tf_types.tf_key_domain AS text CHECK (VALUE LIKE 'k%')")
        ktype, keys = KEYS[key]
        t = f"sync_{key}_{vtype.split('(')[0].replace('[]', 'arr')}"
        db.execute(f"DROP TABLE IF EXISTS {schema}.{t}")
        db.execute(f"CREATE TABLE {schema}.{t} (id {ktype} PRIMARY KEY, img bytea, features {vtype})")
        db.execute(f"SELECT doppler.watch('{schema}.{t}', 'img', mode => 'sync')")
        db.execute("RESET search_path")
        db.execute(f"INSERT INTO {schema}.{t} VALUES (%s, %s), (%s, %s)", (keys[0], data(A), keys[1], data(B)))
        got = dict(db.execute(f"SELECT id::text, features::real[] FROM {schema}.{t}").fetchall())
        tol = 2e-3 if vtype.startswith("halfvec") else 1e-4
        assert close(got[keys[0]], features(db, A), tol) and close(got[keys[1]], features(db, B), tol), key
        # an update of the source recomputes in the statement too
        db.execute(f"UPDATE {schema}.{t} SET img = %s WHERE id = %s", (data(C), keys[0]))
        v = db.execute(f"SELECT features::real[] FROM {schema}.{t} WHERE id = %s", (keys[0],)).fetchone()[0]
        assert close(v, features(db, C), tol)
    finally:
        db.execute("RESET search_path")


def test_a_changed_image_resets_hash_and_dedup_copy(db):
    """Two rows with the same picture share a vector through dedup; when row 2's picture changes,
    it gets the new picture's hash and vector, not row 1's."""
    db.execute("DROP TABLE IF EXISTS tf_changed")
    db.execute("CREATE TABLE tf_changed (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
    db.execute("SELECT doppler.watch('tf_changed', 'img', hash_column => 'd_hash', dedup => true, mode => 'sync')")
    db.execute("INSERT INTO tf_changed VALUES (1, %s), (2, %s)", (data(A), data(A)))
    h = dict(db.execute("SELECT id, d_hash FROM tf_changed").fetchall())
    assert h[1] == h[2] is not None
    db.execute("UPDATE tf_changed SET img = %s WHERE id = 2", (data(B),))
    row = db.execute("SELECT d_hash, features, features_model FROM tf_changed WHERE id = 2").fetchone()
    assert row[0] == db.execute("SELECT doppler.dhash(%s::bytea)", (data(B),)).fetchone()[0] != h[1]
    assert close(row[1], features(db, B)) and row[2] == "resnet50@1"
    # async too: the update clears vector, tag and hash; the worker fills them afresh
    db.execute("SELECT doppler.watch('tf_changed', 'img', hash_column => 'd_hash', dedup => true, mode => 'async')")
    with db.transaction():
        db.execute("UPDATE tf_changed SET img = %s WHERE id = 2", (data(C),))
        assert db.execute("SELECT d_hash, features, features_model FROM tf_changed WHERE id = 2").fetchone() == (None, None, None)
    wait_for(lambda: db.execute("SELECT d_hash IS NOT NULL AND features IS NOT NULL FROM tf_changed WHERE id = 2").fetchone()[0],
             60, 0.2, "row 2 refilled")
    assert close(db.execute("SELECT features FROM tf_changed WHERE id = 2").fetchone()[0], features(db, C))


def test_a_row_that_cannot_be_written_is_recorded_and_the_rest_written(db):
    """A CHECK constraint rejects row 2's vector: row 2 is recorded with SQLSTATE 23514, rows 1 and 3
    are written, nothing stays pending, and the worker does not infer row 2 again on every pass."""
    db.execute("DROP TABLE IF EXISTS tf_unwritable")
    db.execute("""CREATE TABLE tf_unwritable (id int PRIMARY KEY, img bytea, features real[],
                  CONSTRAINT no_vector_for_2 CHECK (id <> 2 OR features IS NULL))""")
    db.execute("INSERT INTO tf_unwritable VALUES (1, %s), (2, %s), (3, %s)", (data(A), data(B), data(C)))
    db.execute("SELECT doppler.watch('tf_unwritable', 'img', mode => 'manual', batch_size => 8)")

    def settled():  # (retried once after doppler.retry_backoff, then given up: max_attempts = 2)
        db.execute("CALL doppler.fill('tf_unwritable')")
        s = db.execute("SELECT done, pending, failed FROM doppler.status WHERE table_name = 'tf_unwritable'::regclass").fetchone()
        return s if s == (2, 0, 1) else None
    wait_for(settled, 60, 0.3, "rows 1 and 3 written, row 2 recorded and given up")
    f = db.execute("SELECT error_class, sqlstate, message FROM doppler.failures WHERE relid = 'tf_unwritable'::regclass").fetchall()
    assert len(f) == 1 and f[0][0] == "write" and f[0][1] == "23514" and "no_vector_for_2" in f[0][2], f
    assert db.execute("SELECT count(features) FROM tf_unwritable").fetchone()[0] == 2
    # held back by its failure record: neither fill nor the worker claims it until it is retried
    claimed = db.execute("SELECT coalesce(sum(claimed), 0) FROM doppler.batches WHERE relid = 'tf_unwritable'::regclass").fetchone()[0]
    db.execute("CALL doppler.fill('tf_unwritable')")
    worker_fresh_nap(db)  # and a whole worker pass
    assert db.execute("SELECT coalesce(sum(claimed), 0) FROM doppler.batches WHERE relid = 'tf_unwritable'::regclass").fetchone()[0] == claimed
    # a hash column too short for a dHash is refused up front
    db.execute("ALTER TABLE tf_unwritable ADD COLUMN short_hash varchar(8)")
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT doppler.watch('tf_unwritable', 'img', hash_column => 'short_hash')")
    assert e.value.sqlstate == "42804" and "too short" in str(e.value)


def test_duplicates_can_be_cancelled(db):
    """Above 15 bits doppler.duplicates compares every pair of distinct hashes (multi-index hashing
    gains nothing there): statement_timeout (and a cancel) must stop it between rows, not after
    the whole O(n²) pass."""
    db.execute("DROP TABLE IF EXISTS tf_many_hashes")
    db.execute("CREATE TABLE tf_many_hashes (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
    db.execute("""INSERT INTO tf_many_hashes (id, d_hash)
                  SELECT i, substr(md5(i::text), 1, 16) FROM generate_series(1, 150000) i""")
    db.execute("SELECT doppler.watch('tf_many_hashes', 'img', hash_column => 'd_hash', mode => 'manual')")
    db.execute("SET statement_timeout = '1s'")
    t0 = time.time()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            db.execute("SELECT count(*) FROM doppler.duplicates('tf_many_hashes', 40)")
    finally:
        db.execute("RESET statement_timeout")
    assert time.time() - t0 < 6, f"cancelled after {time.time() - t0:.1f}s"
    assert db.execute("SELECT 1").fetchone() == (1,)


def test_truncate_forgets_failure_records(db):
    """TRUNCATE leaves no failure records behind to hold back new rows with the same keys."""
    db.execute("DROP TABLE IF EXISTS tf_truncated")
    db.execute("CREATE TABLE tf_truncated (id int PRIMARY KEY, img bytea, features real[])")
    db.execute("SELECT doppler.watch('tf_truncated', 'img', mode => 'manual')")
    db.execute("INSERT INTO tf_truncated VALUES (1, %s)", (data(A)[:100],))

    db.execute("CALL doppler.fill('tf_truncated')")  # (and waits for the row if the worker's pass holds it)
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 'tf_truncated'::regclass").fetchone()[0] == 1
    db.execute("TRUNCATE tf_truncated")
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 'tf_truncated'::regclass").fetchone()[0] == 0
    # the same key, a good image: filled at once, not held back by the old record
    db.execute("INSERT INTO tf_truncated VALUES (1, %s)", (data(A),))
    db.execute("CALL doppler.fill('tf_truncated')")  # (and waits for the row if the worker's pass holds it)
    assert db.execute("SELECT features IS NOT NULL FROM tf_truncated").fetchone()[0]
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 'tf_truncated'::regclass").fetchone()[0] == 0


def test_clearing_held_marks_leaves_other_tables_sync(db, cluster):
    """retry_failed and unwatch clear a table's held marks with that table's sync trigger off (its
    rows are redone by the worker or fill, not in the call), and only that table's: a row that the
    owner's own trigger writes to another sync table meanwhile is filled in the statement, as it
    would be in any other. As a plain owner."""
    db.execute("DROP SCHEMA IF EXISTS tf_marks CASCADE")
    db.execute("DROP ROLE IF EXISTS tf_marks")
    db.execute("CREATE ROLE tf_marks LOGIN")
    db.execute("CREATE SCHEMA tf_marks AUTHORIZATION tf_marks")
    with cluster.connect(user="tf_marks") as c:
        c.execute("CREATE TABLE tf_marks.src (id int PRIMARY KEY, img bytea, features real[])")
        c.execute("CREATE TABLE tf_marks.log (id serial PRIMARY KEY, img bytea, features real[])")
        c.execute("CREATE TABLE tf_marks.pics (img bytea)")
        c.execute("INSERT INTO tf_marks.pics VALUES (%s)", (data(B),))
        c.execute("SELECT doppler.watch('tf_marks.src', 'img', mode => 'sync', on_error => 'defer')")
        c.execute("SELECT doppler.watch('tf_marks.log', 'img', mode => 'sync')")
        c.execute("""CREATE FUNCTION tf_marks.copy() RETURNS trigger LANGUAGE plpgsql AS $f$
                     BEGIN INSERT INTO tf_marks.log (img) SELECT img FROM tf_marks.pics; RETURN NULL; END $f$""")
        c.execute("CREATE TRIGGER copy AFTER UPDATE ON tf_marks.src FOR EACH ROW EXECUTE FUNCTION tf_marks.copy()")
        c.execute("INSERT INTO tf_marks.src VALUES (1, %s)", (data(A)[:100],))  # a broken image: held
        assert c.execute("SELECT features_model FROM tf_marks.src").fetchone()[0] == "!failed"
        want = features(c, B)
        for call in ["retry_failed", "unwatch"]:
            with c.transaction():  # (before the worker, woken at commit, can see either row)
                c.execute("SELECT FROM tf_marks.src FOR UPDATE")  # (nor retry row 1 meanwhile)
                if call == "retry_failed":  # (retry_failed clears the marks of rows without a record)
                    db.execute("DELETE FROM doppler.failures WHERE relid = 'tf_marks.src'::regclass")
                n = c.execute("SELECT count(*) FROM tf_marks.log").fetchone()[0]
                c.execute(f"SELECT doppler.{call}('tf_marks.src')")
                src = c.execute("SELECT features_model, features FROM tf_marks.src").fetchone()
                assert src == (None, None), (call, src)  # cleared, not filled in the call
                logged = c.execute("SELECT features FROM tf_marks.log ORDER BY id OFFSET %s", (n,)).fetchall()
                assert len(logged) == 1 and logged[0][0] is not None and close(logged[0][0], want), call
            if call == "retry_failed":  # held again for the next call: fill fails it once more
                c.execute("CALL doppler.fill('tf_marks.src')")
                assert c.execute("SELECT features_model FROM tf_marks.src").fetchone()[0] == "!failed"
    db.execute("DROP SCHEMA tf_marks CASCADE")
    db.execute("DROP ROLE tf_marks")


def test_dropping_a_watched_column_ends_the_watch_with_a_warning(db, cluster):
    """A dropped source, vector, hash or model column ends the watch (WARNING), instead of a batch
    that fails on every pass; other columns come and go freely. Works for a plain owner too."""
    notices = []
    db.add_notice_handler(lambda n: notices.append(n.message_primary))
    for col in ["features", "d_hash", "features_model", "img"]:
        db.execute("DROP TABLE IF EXISTS tf_dropcol")
        db.execute("CREATE TABLE tf_dropcol (id int PRIMARY KEY, img bytea, d_hash text, note text, features real[])")
        db.execute("SELECT doppler.watch('tf_dropcol', 'img', hash_column => 'd_hash', mode => 'manual')")
        db.execute("ALTER TABLE tf_dropcol DROP COLUMN note")  # not watched: nothing happens
        assert db.execute("SELECT count(*) FROM doppler.watched WHERE relid = 'tf_dropcol'::regclass").fetchone()[0] == 1
        notices.clear()
        db.execute(f"ALTER TABLE tf_dropcol DROP COLUMN {col} CASCADE")
        assert db.execute("SELECT count(*) FROM doppler.watched WHERE relid = 'tf_dropcol'::regclass").fetchone()[0] == 0, col
        assert any("no longer watches" in n and col in n for n in notices), (col, notices)
    db.execute("DROP ROLE IF EXISTS tf_plain")
    db.execute("CREATE ROLE tf_plain LOGIN")
    db.execute("DROP SCHEMA IF EXISTS tf_plain CASCADE")
    db.execute("CREATE SCHEMA tf_plain AUTHORIZATION tf_plain")
    with cluster.connect(user="tf_plain") as c:
        c.execute("CREATE TABLE tf_plain.t (id int PRIMARY KEY, img bytea, features real[])")
        c.execute("SELECT doppler.watch('tf_plain.t', 'img', mode => 'manual')")
        c.execute("ALTER TABLE tf_plain.t DROP COLUMN features")
        c.execute("TRUNCATE tf_plain.t")
        assert c.execute("SELECT count(*) FROM doppler.watched WHERE relid = 'tf_plain.t'::regclass").fetchone()[0] == 0
    db.execute("DROP SCHEMA tf_plain CASCADE")
    db.execute("DROP ROLE tf_plain")


def test_watches_follow_renames_of_tables_and_columns(db, cluster):
    """RENAME of a watched table and of every column a watch uses (key, source, vector, model tag,
    hash), by a plain owner, in async and sync mode: the watch names the new columns, a changed
    image still clears what was derived from it, and new rows are filled. A swap of two names
    through a third is followed step by step. A rename on a parent reaches a watched partition,
    one of a composite type (ALTER TYPE ... CASCADE) a typed table."""
    db.execute("DROP ROLE IF EXISTS tf_renamer")
    db.execute("CREATE ROLE tf_renamer LOGIN")
    db.execute("DROP SCHEMA IF EXISTS tf_ren CASCADE")
    db.execute("CREATE SCHEMA tf_ren AUTHORIZATION tf_renamer")
    with cluster.connect(user="tf_renamer") as c:
        for mode in ["async", "sync"]:
            t = f"tf_ren.t_{mode}"
            c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, note bytea, d_hash text, features real[])")
            c.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'd_hash', mode => '{mode}')")
            c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s)", (data(A), data(B)))
            c.execute(f"ALTER TABLE {t} RENAME TO r_{mode}")
            t = f"tf_ren.r_{mode}"
            for old, new in [("id", "key"), ("img", "picture"), ("features", "vec"),
                             ("features_model", "vec_model"), ("d_hash", "hh")]:
                c.execute(f"ALTER TABLE {t} RENAME COLUMN {old} TO {new}")
            # swap the source with an unwatched column: picture -> tmp, note -> picture, tmp -> note
            c.execute(f"ALTER TABLE {t} RENAME COLUMN picture TO tmp")
            c.execute(f"ALTER TABLE {t} RENAME COLUMN note TO picture")
            c.execute(f"ALTER TABLE {t} RENAME COLUMN tmp TO note")
            w = c.execute("SELECT source_column, vector_column, model_column, hash_column, key_columns::text[]"
                          " FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()
            assert w == ("note", "vec", "vec_model", "hh", ["key"]), (mode, w)
            c.execute(f"CALL doppler.fill('{t}')")  # (async: and waits for the rows the worker's pass holds)
            assert c.execute(f"SELECT bool_and(vec IS NOT NULL AND hh IS NOT NULL) FROM {t}").fetchone()[0], f"{t} filled"
            # a changed image (the source is "note" now) clears its vector, tag and hash
            if mode == "async":
                with c.transaction():  # (before the worker, woken at commit, fills it again)
                    c.execute(f"UPDATE {t} SET note = %s WHERE key = 1", (data(C),))
                    assert c.execute(f"SELECT vec IS NULL AND vec_model IS NULL AND hh IS NULL FROM {t} WHERE key = 1").fetchone()[0]
                c.execute(f"CALL doppler.fill('{t}')")
            else:
                c.execute(f"UPDATE {t} SET note = %s WHERE key = 1", (data(C),))
            c.execute(f"INSERT INTO {t} (key, note) VALUES (3, %s)", (data(A),))
            c.execute(f"CALL doppler.fill('{t}')")  # (async: and waits for the rows the woken worker holds)
            got = dict(c.execute(f"SELECT key, vec FROM {t}").fetchall())
            assert close(got[1], features(c, C)) and close(got[2], features(c, B)) and close(got[3], features(c, A)), mode
            # the column now called "picture" (the old note) is not watched: changing it clears nothing
            c.execute(f"UPDATE {t} SET picture = %s WHERE key = 2", (data(C),))
            assert c.execute(f"SELECT vec IS NOT NULL FROM {t} WHERE key = 2").fetchone()[0]
        # a partition is watched; the column is renamed on its parent
        c.execute("CREATE TABLE tf_ren.p (id int, img bytea, features real[], features_model text, PRIMARY KEY (id)) PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE tf_ren.p1 PARTITION OF tf_ren.p FOR VALUES FROM (0) TO (100)")
        c.execute("SELECT doppler.watch('tf_ren.p1', 'img', mode => 'manual')")
        c.execute("ALTER TABLE tf_ren.p RENAME COLUMN img TO picture")
        assert c.execute("SELECT source_column FROM doppler.watched WHERE relid = 'tf_ren.p1'::regclass").fetchone()[0] == "picture"
        # a typed table: its columns are renamed through its type
        c.execute("CREATE TYPE tf_ren.row_t AS (id int, img bytea, features real[], features_model text)")
        c.execute("CREATE TABLE tf_ren.typed OF tf_ren.row_t (PRIMARY KEY (id))")
        c.execute("SELECT doppler.watch('tf_ren.typed', 'img', mode => 'manual')")
        c.execute("ALTER TYPE tf_ren.row_t RENAME ATTRIBUTE img TO picture CASCADE")
        assert c.execute("SELECT source_column FROM doppler.watched WHERE relid = 'tf_ren.typed'::regclass").fetchone()[0] == "picture"
    db.execute("DROP SCHEMA tf_ren CASCADE")
    db.execute("DROP ROLE tf_renamer")


def test_composite_keys_and_pgvector_in_its_own_schema(db, cluster):
    """A composite primary key (int, text) in every mode (async through the worker, sync, manual +
    fill), with a hash column and dedup; and pgvector installed in a schema of its own that is on
    nobody's search_path (vector and halfvec columns, similar, create_index)."""
    # async, worker: composite key in the worker's database
    db.execute("DROP TABLE IF EXISTS tf_comp")
    db.execute("CREATE TABLE tf_comp (region int, name text, img bytea, h text, features real[], PRIMARY KEY (region, name))")
    db.execute("SELECT doppler.watch('tf_comp', 'img', hash_column => 'h', dedup => true)")
    db.execute("INSERT INTO tf_comp VALUES (1, 'a', %s), (1, 'b b', %s), (2, 'a', %s)", (data(A), data(B), data(A)))
    wait_for(lambda: db.execute("SELECT bool_and(features IS NOT NULL) FROM tf_comp").fetchone()[0], 120, 0.3, "tf_comp filled")
    db.execute("UPDATE tf_comp SET img = %s WHERE (region, name) = (2, 'a')", (data(C),))
    wait_for(lambda: db.execute("SELECT features IS NOT NULL FROM tf_comp WHERE region = 2").fetchone()[0], 120, 0.3, "refilled")
    got = {(r, n): v for r, n, v in db.execute("SELECT region, name, features FROM tf_comp").fetchall()}
    assert close(got[(1, "a")], features(db, A)) and close(got[(1, "b b")], features(db, B)) and close(got[(2, "a")], features(db, C))

    assert cluster.has_pgvector() == (PG == "pg18")  # pgvector ships with the PostgreSQL 18 build
    if PG != "pg18":
        return
    with cluster.connect("postgres") as c:
        c.execute("DROP DATABASE IF EXISTS tf_pgv")
        c.execute("CREATE DATABASE tf_pgv")
    with cluster.connect("tf_pgv") as c:
        c.execute("CREATE EXTENSION doppler")
        c.execute("CREATE SCHEMA pgv")
        c.execute("CREATE EXTENSION vector SCHEMA pgv")
        for mode, vtype, tol in [("sync", "pgv.vector(2048)", 1e-4), ("manual", "pgv.halfvec(2048)", 2e-3)]:
            t = f"t_{mode}"
            c.execute(f"CREATE TABLE {t} (region int, name text, img bytea, h text, features {vtype},"
                      " PRIMARY KEY (region, name))")
            c.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'h', dedup => true, mode => '{mode}')")
            c.execute(f"INSERT INTO {t} VALUES (1, 'a', %s), (1, 'b', %s), (2, 'a', %s)", (data(A), data(B), data(A)))
            c.execute(f"UPDATE {t} SET img = %s WHERE (region, name) = (1, 'b')", (data(C),))
            if mode == "manual":
                c.execute(f"CALL doppler.fill('{t}')")
            got = {(r, n): v for r, n, v in c.execute(f"SELECT region, name, features::real[] FROM {t}").fetchall()}
            assert close(got[(1, "a")], features(c, A), tol) and close(got[(2, "a")], features(c, A), tol), mode
            assert close(got[(1, "b")], features(c, C), tol), mode
            c.execute(f"SELECT doppler.create_index('{t}')")
            top = c.execute(f"SELECT row_key, distance FROM doppler.similar('{t}', %s::bytea, 1)", (data(C),)).fetchone()
            assert top[0] == "(1,b)" and top[1] < 0.05, (mode, top)
            assert c.execute(f"SELECT size FROM doppler.duplicates('{t}', 0)").fetchall() == [(2,)], mode
    with cluster.connect("postgres") as c:
        c.execute("DROP DATABASE tf_pgv")


def test_a_cancelled_fill_keeps_its_committed_batches(noworker):
    """pg_cancel_backend and statement_timeout stop a running fill between model runs, long before
    it would have finished; every batch it committed before stays written (and logged in
    doppler.batches). In a database no worker serves: only fill fills there."""
    import threading
    with noworker() as db:
        db.execute("DROP TABLE IF EXISTS tf_cancel")
        db.execute("CREATE TABLE tf_cancel (id int PRIMARY KEY, img bytea, features real[])")
        with db.cursor() as cur:
            cur.executemany("INSERT INTO tf_cancel VALUES (%s, %s)", [(i, data(GOOD[i % 6])) for i in range(80)])
        db.execute("SELECT doppler.watch('tf_cancel', 'img', mode => 'manual', batch_size => 2)")

        def committed():
            return db.execute("SELECT coalesce(sum(filled), 0) FROM doppler.batches"
                              " WHERE relid = 'tf_cancel'::regclass AND via = 'fill'").fetchone()[0]

        def filled():
            return db.execute("SELECT count(features) FROM tf_cancel").fetchone()[0]

        # statement_timeout
        db.execute("SET statement_timeout = '1500ms'")
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                db.execute("CALL doppler.fill('tf_cancel')")
        finally:
            db.execute("RESET statement_timeout")
        after_timeout = committed()
        assert 2 <= after_timeout < 80 and filled() == after_timeout, (after_timeout, filled())
        # pg_cancel_backend, after the first NOTICE (a committed batch)
        with noworker() as c:
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            notices, errors = [], []
            c.add_notice_handler(lambda n: notices.append(n.message_primary))

            def run():
                try:
                    c.execute("CALL doppler.fill('tf_cancel')")
                except psycopg.Error as e:
                    errors.append(e)
            t = threading.Thread(target=run)
            t.start()
            wait_for(lambda: notices, 60, 0.05, "fill's first NOTICE")
            db.execute("SELECT pg_cancel_backend(%s)", (pid,))
            t.join(60)
            assert not t.is_alive()
            assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
        assert after_timeout < committed() < 80 and filled() == committed(), (committed(), filled())
