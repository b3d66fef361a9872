"""The background worker, doppler.fill, failures, status and crash safety, in a real cluster."""
import os
import shutil
import signal
import threading

import numpy as np
import psycopg
import pytest

from conftest import PG, fixture_paths, set_system, status, wait_for, worker

GOOD = [p for p in fixture_paths() if "large_" not in p][:12]


def make_table(db, name, n_copies=1, extra_rows=(), vector_type="real[]", log=False):
    db.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    db.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, f_img text, d_hash text, features {vector_type})")
    rows = [p for _ in range(n_copies) for p in GOOD] + list(extra_rows)
    with db.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} (f_img) VALUES (%s)", [(p,) for p in rows])
    if log:
        # every write of the vector column, committed or not with its batch
        db.execute(f"CREATE TABLE {name}_writes (id int, at timestamptz DEFAULT clock_timestamp())")
        # (doppler writes as the table owner with search_path = pg_catalog, pg_temp: the trigger
        # names its table with its schema, as functions run by maintenance operations must)
        db.execute(f"""CREATE FUNCTION {name}_log() RETURNS trigger LANGUAGE plpgsql AS $$
                       BEGIN INSERT INTO public.{name}_writes (id) VALUES (NEW.id); RETURN NEW; END $$""")
        db.execute(f"""CREATE TRIGGER {name}_log AFTER UPDATE OF features ON {name}
                       FOR EACH ROW WHEN (NEW.features IS NOT NULL) EXECUTE FUNCTION {name}_log()""")
    return len(rows)


def wait_filled(db, table, timeout=240):
    return wait_for(lambda: (lambda s: s if s["pending"] == 0 else None)(status(db, table)), timeout, what=f"{table} filled")


def assert_written_once(db, table, n):
    counts = db.execute(f"SELECT id, count(*) FROM {table}_writes GROUP BY id").fetchall()
    assert len(counts) == n, f"{len(counts)} rows written, expected {n}"
    assert all(c == 1 for _, c in counts), [x for x in counts if x[1] != 1]


def test_worker_fills_valid_rows_and_records_bad_ones(db, cluster):
    corrupt = os.path.join(cluster.files, "corrupt.jpg")
    with open(GOOD[0], "rb") as f:
        data = f.read()
    with open(corrupt, "wb") as f:
        f.write(data[: len(data) // 2])
    os.chmod(corrupt, 0o644)
    bad = [corrupt, "/no/such/image.png", "/tmp", "relative/path.jpg"]
    n = make_table(db, "images", extra_rows=bad)
    db.execute("INSERT INTO images (f_img) VALUES (NULL)")  # nothing to extract: skipped, not failed
    msg = db.execute("SELECT doppler.watch('images')").fetchone()[0]
    assert "images" in msg and "(id)" in msg
    s = wait_filled(db, "images")
    assert s == {**s, "total": n + 1, "done": n - len(bad), "failed": len(bad), "skipped": 1, "pending": 0}
    assert s["worker_pid"] is not None

    # every filled row holds exactly what extract_features(path) returns
    rows = db.execute("SELECT f_img, features, doppler.extract_features(f_img) FROM images WHERE features IS NOT NULL").fetchall()
    assert len(rows) == n - len(bad)
    for path, got, want in rows:
        got, want = np.array(got), np.array(want)
        assert got.shape == (2048,)
        assert np.abs(got - want).max() <= 1e-5, path

    fails = {r[0]: r[1:] for r in db.execute(
        "SELECT source, error_class, sqlstate, message, attempts, next_attempt FROM doppler.failures WHERE relid = 'images'::regclass").fetchall()}
    assert len(fails) == len(bad)
    assert fails[corrupt][0] == "corrupt" and fails[corrupt][1] == "22P03" and "JPEG" in fails[corrupt][2]
    assert fails["/no/such/image.png"][0] == "not_found" and fails["/no/such/image.png"][1] == "58P01"
    assert fails["/tmp"][0] == "is_directory"
    assert fails["relative/path.jpg"][0] == "config"
    assert all(f[3] == 2 and f[4] is None for f in fails.values()), fails  # given up after max_attempts
    batches = db.execute("SELECT count(*), sum(filled) FROM doppler.batches WHERE relid = 'images'::regclass AND via = 'worker'").fetchone()
    assert batches[0] >= 1 and batches[1] == n - len(bad)
    assert_where_the_time_went(db, "images", "worker")


def test_worker_is_visible_and_reports_activity(db):
    pid, query = wait_for(lambda: db.execute(
        "SELECT pid, query FROM pg_stat_activity WHERE backend_type = 'doppler worker' AND datname = current_database()").fetchone(),
        60, what="worker in pg_stat_activity")
    assert query.startswith("doppler:")
    assert db.execute("SELECT doppler.wake()").fetchone()[0] == 1


def test_rows_inserted_while_running_and_concurrent_fill_never_write_twice(db, cluster):
    n = make_table(db, "busy", n_copies=4, log=True)
    db.execute("SELECT doppler.watch('busy', batch_size => 4)")
    # the worker is at it (its first batch committed) when a foreground fill starts on the same rows
    wait_for(lambda: db.execute("SELECT count(*) FROM doppler.batches WHERE relid = 'busy'::regclass"
                                " AND via = 'worker'").fetchone()[0] > 0, 120, 0.05, "the worker's first batch")
    with cluster.connect() as other:
        notices, errors = [], []
        other.add_notice_handler(lambda d: notices.append(d.message_primary))

        def run():
            try:
                other.execute("CALL doppler.fill('busy')")
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)
        t = threading.Thread(target=run)
        t.start()
        with db.cursor() as cur:  # and more rows arrive meanwhile
            cur.executemany("INSERT INTO busy (f_img) VALUES (%s)", [(p,) for p in GOOD])
        db.execute("SELECT doppler.wake()")
        t.join(300)
        assert not t.is_alive(), "fill did not finish"
        assert not errors, errors
    n += len(GOOD)
    s = wait_filled(db, "busy")
    assert s["done"] == n and s["failed"] == 0
    assert_written_once(db, "busy", n)
    via = dict(db.execute("SELECT via, sum(filled) FROM doppler.batches WHERE relid = 'busy'::regclass GROUP BY via").fetchall())
    assert sum(via.values()) == n
    # they overlapped: a worker batch ended while fill was running (from fill's first batch's start
    # to its last batch's end), not one after the other
    overlap = db.execute("""
        WITH f AS (SELECT min(finished_at - make_interval(secs => seconds)) AS t0, max(finished_at) AS t1
                   FROM doppler.batches WHERE relid = 'busy'::regclass AND via = 'fill')
        SELECT count(*) FROM doppler.batches b, f
        WHERE b.relid = 'busy'::regclass AND b.via = 'worker' AND b.finished_at BETWEEN f.t0 AND f.t1""").fetchone()[0]
    assert via.get("fill", 0) > 0 and overlap > 0, f"no race: {via}, {overlap} worker batches during fill"
    assert any("images/s" in m and "ETA" in m for m in notices), notices


def test_fill_by_hand_with_max_rows(noworker):
    """fill(max_rows => 3) fills exactly 3 rows (a batch of 2, then one of 1), in a database no
    worker serves, so that nothing else fills any."""
    with noworker() as c:
        n = make_table(c, "byhand")
        c.execute("SELECT doppler.watch('byhand', batch_size => 2, mode => 'manual')")
        c.execute("CALL doppler.fill('byhand', max_rows => 3)")
        assert c.execute("SELECT count(features) FROM byhand").fetchone()[0] == 3
        assert c.execute("SELECT count(*), sum(filled) FROM doppler.batches WHERE relid = 'byhand'::regclass"
                         " AND via = 'fill'").fetchone() == (2, 3)
        c.execute("CALL doppler.fill('byhand')")
        assert c.execute("SELECT count(features) FROM byhand").fetchone()[0] == n
        assert_where_the_time_went(c, "byhand", "fill")


def test_fill_waits_for_rows_others_hold(cluster, noworker):
    """fill claims with SKIP LOCKED; once nothing is left that it can claim, it waits for the rows
    that others hold (here a transaction that locked one; the worker's batch and another fill hold
    theirs the same way), fills those they leave to do, and returns with none left. lock_timeout
    ends the wait; under REPEATABLE READ, a row its holder filled is a serialization failure that
    fill gets past in a new transaction. As a plain owner, in a database no worker serves."""
    with noworker() as admin:
        admin.execute("DROP SCHEMA IF EXISTS fw CASCADE")
        admin.execute("DROP ROLE IF EXISTS fw_owner")
        admin.execute("CREATE ROLE fw_owner LOGIN")
        admin.execute("CREATE SCHEMA fw AUTHORIZATION fw_owner")
    images = []
    for p in GOOD[:5]:
        with open(p, "rb") as f:
            images.append(f.read())
    connect = lambda: cluster.connect("doppler_noworker", user="fw_owner")  # noqa: E731
    with connect() as c, connect() as holder, noworker() as watcher:
        c.execute("CREATE TABLE fw.t (id int PRIMARY KEY, img bytea, features real[])")
        c.execute("SELECT doppler.watch('fw.t', 'img', batch_size => 2, mode => 'manual')")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO fw.t VALUES (%s, %s)", list(enumerate(images, 1)))
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]

        def fill_behind(row):
            """Starts fill in a thread, and returns once it waits for `row`, which holder holds."""
            done, errors = threading.Event(), []

            def run():
                try:
                    c.execute("CALL doppler.fill('fw.t')")
                except Exception as e:  # noqa: BLE001 - asserted by the caller
                    errors.append(e)
                done.set()
            t = threading.Thread(target=run)
            t.start()

            def waiting():
                assert not done.is_set(), f"fill returned while row {row} was held: {errors}"
                return watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                       (pid,)).fetchone()[0] == "Lock"
            wait_for(waiting, 120, 0.05, f"fill waiting for row {row}")
            return t, errors

        def todo():
            return watcher.execute("SELECT array_agg(id ORDER BY id) FROM fw.t WHERE features IS NULL").fetchone()[0]

        holder.execute("BEGIN")
        holder.execute("SELECT FROM fw.t WHERE id = 3 FOR UPDATE")
        t, errors = fill_behind(3)
        assert todo() == [3]
        # waiting in a transaction of its own, on the table in ROW SHARE mode only: CREATE INDEX
        # and CREATE TRIGGER do not queue behind it
        assert watcher.execute("""SELECT array_agg(mode::text) FROM pg_locks WHERE pid = %s
                                  AND locktype = 'relation' AND relation = 'fw.t'::regclass""",
                               (pid,)).fetchone()[0] == ["RowShareLock"]
        holder.execute("ROLLBACK")  # row 3 is left to do: fill takes it
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert todo() is None
        # its lock_timeout ends the wait, with the batches before it committed
        c.execute("UPDATE fw.t SET features = NULL WHERE id IN (1, 2)")
        holder.execute("BEGIN")
        holder.execute("SELECT FROM fw.t WHERE id = 2 FOR UPDATE")
        c.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            c.execute("CALL doppler.fill('fw.t')")
        holder.execute("ROLLBACK")
        assert todo() == [2]
        # REPEATABLE READ: the holder fills row 2 itself; fill's wait fails to serialize, and the
        # next pass, in a new transaction, finds nothing left
        c.execute("RESET lock_timeout")
        c.execute("SET default_transaction_isolation = 'repeatable read'")
        holder.execute("BEGIN")
        holder.execute("SELECT FROM fw.t WHERE id = 2 FOR UPDATE")
        t, errors = fill_behind(2)
        holder.execute("UPDATE fw.t SET features = (SELECT features FROM fw.t WHERE id = 1) WHERE id = 2")
        holder.execute("COMMIT")
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert todo() is None
        c.execute("RESET default_transaction_isolation")
    with noworker() as admin:
        admin.execute("DROP SCHEMA fw CASCADE")
        admin.execute("DROP ROLE fw_owner")


def assert_where_the_time_went(db, table, via):
    """Every batch of `table` says where its time went: the backend's phases add up to no more than its
    wall time, and the decode threads' stages are there (they ran while the model did)."""
    rows = db.execute("""SELECT filled, seconds, claim_s, read_s, decode_s, resize_s, wait_s, infer_s, write_s
                          FROM doppler.batches WHERE relid = %s::regclass AND via = %s""", (table, via)).fetchall()
    assert any(r[0] for r in rows), rows
    for filled, seconds, claim, read, decode, resize, wait, infer, write in rows:
        assert None not in (claim, read, decode, resize, wait, infer, write), rows
        assert min(claim, read, decode, resize, wait, infer, write) >= 0 and write > 0, rows
        if filled:
            assert infer > 0 and decode > 0 and resize > 0 and read > 0, rows
        assert claim + wait + infer + write <= seconds * 1.001 + 1e-4, rows


def slow_writes(db, table, seconds=0.2):
    """Each write of the vector column waits (pg_sleep, in the owner's trigger): a batch lasts long
    enough to be caught in the middle."""
    db.execute(f"""CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN PERFORM pg_catalog.pg_sleep({seconds}); RETURN NEW; END $$""")
    db.execute(f"CREATE TRIGGER {table}_slow BEFORE UPDATE OF features ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow()")


def worker_mid_batch(db, table):
    """Waits until the worker is inside a batch of `table`: writing a row (its trigger's pg_sleep)
    and holding the table's lock. Returns its pid."""
    def inside():
        w = db.execute("""SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                          WHERE a.backend_type = 'doppler worker' AND a.wait_event = 'PgSleep'
                            AND l.relation = %s::regclass AND l.granted""", (table,)).fetchone()
        return w and w[0]
    return wait_for(inside, 120, 0.02, f"the worker inside a batch of {table}")


def test_kill_9_of_the_worker_mid_batch(db, cluster):
    n = make_table(db, "crashy", n_copies=4, log=True)
    slow_writes(db, "crashy")
    db.execute("SELECT doppler.watch('crashy', batch_size => 3)")
    wait_for(lambda: db.execute("SELECT count(*) FROM crashy_writes").fetchone()[0] > 0, 120, what="first batch")
    pid = worker_mid_batch(db, "crashy")
    os.kill(pid, signal.SIGKILL)  # the postmaster resets every backend and restarts the worker
    with pytest.raises(psycopg.OperationalError):
        for _ in range(50):
            db.execute("SELECT pg_sleep(0.1)")
    with cluster.connect() as c:
        wait_filled(c, "crashy")
        assert_written_once(c, "crashy", n)
        new_pid = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'doppler worker'").fetchone()[0]
        assert new_pid != pid


def test_server_restart_mid_run(db, cluster):
    n = make_table(db, "restarty", n_copies=4, log=True)
    slow_writes(db, "restarty")
    db.execute("SELECT doppler.watch('restarty', batch_size => 3)")
    wait_for(lambda: db.execute("SELECT count(*) FROM restarty_writes").fetchone()[0] > 0, 120, what="first batch")
    worker_mid_batch(db, "restarty")
    db.close()
    cluster.stop("immediate")  # the batch in flight is cut off: crash recovery at the start
    cluster.start()
    with cluster.connect() as c:
        assert c.execute("SELECT count(*) FROM restarty WHERE features IS NULL").fetchone()[0] > 0, "nothing left to do"
        wait_filled(c, "restarty")
        assert_written_once(c, "restarty", n)


def test_retry_failed_after_fixing_the_file(db, cluster):
    later = os.path.join(cluster.files, "arrives-later.png")
    make_table(db, "retry", extra_rows=[later])
    db.execute("SELECT doppler.watch('retry')")
    wait_for(lambda: db.execute(
        "SELECT next_attempt IS NULL FROM doppler.failures WHERE relid = 'retry'::regclass").fetchone() == (True,),
        180, what="failure given up")
    shutil.copy(GOOD[1], later)
    os.chmod(later, 0o644)
    assert db.execute("SELECT doppler.retry_failed('retry')").fetchone()[0] == 1
    wait_for(lambda: db.execute("SELECT features IS NOT NULL FROM retry WHERE f_img = %s", (later,)).fetchone()[0], 120, what="retried row")
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 'retry'::regclass").fetchone()[0] == 0


def test_bytea_source_and_odd_names(db):
    db.execute('CREATE SCHEMA IF NOT EXISTS "My Schema"')
    db.execute('CREATE TABLE "My Schema"."Odd Name" ("Key" int PRIMARY KEY, "the image" bytea, "the vector" real[])')
    with db.cursor() as cur:
        for i, p in enumerate(GOOD[:5]):
            with open(p, "rb") as f:
                cur.execute('INSERT INTO "My Schema"."Odd Name" VALUES (%s, %s)', (i, f.read()))
    db.execute("""SELECT doppler.watch('"My Schema"."Odd Name"', 'the image', 'the vector')""")
    wait_filled(db, '"My Schema"."Odd Name"')
    rows = db.execute('SELECT "the vector", doppler.extract_features("the image") FROM "My Schema"."Odd Name"').fetchall()
    assert len(rows) == 5 and all(np.abs(np.array(a) - np.array(b)).max() <= 1e-5 for a, b in rows)


@pytest.mark.skipif(PG != "pg18", reason="pgvector ships with the PostgreSQL 18 wheel")
def test_pgvector_columns(db):
    for kind in ["vector(2048)", "halfvec(2048)"]:
        name = "pgv_" + kind.split("(")[0]
        make_table(db, name, vector_type=kind)
        db.execute(f"SELECT doppler.watch('{name}')")
    for kind in ["vector", "halfvec"]:
        wait_filled(db, f"pgv_{kind}")
        rows = db.execute(f"SELECT features::real[], doppler.extract_features(f_img) FROM pgv_{kind}").fetchall()
        tol = 1e-5 if kind == "vector" else 1e-2
        assert all(np.abs(np.array(a) - np.array(b)).max() <= tol * max(1, np.abs(b).max()) for a, b in rows)


def test_watch_checks(db, cluster):
    def err(sql):
        with pytest.raises(psycopg.Error) as e:
            db.execute(sql)
        return e.value.sqlstate, str(e.value)

    db.execute("CREATE TABLE nokey (f_img text, features real[])")
    assert err("SELECT doppler.watch('nokey')")[0] == "42P16"
    db.execute("CREATE TABLE wrongtypes (id int PRIMARY KEY, f_img int, features text, v vector(3))" if cluster.has_pgvector()
               else "CREATE TABLE wrongtypes (id int PRIMARY KEY, f_img int, features text)")
    assert err("SELECT doppler.watch('wrongtypes')")[0] == "42804"
    assert err("SELECT doppler.watch('wrongtypes', 'nope')")[0] == "42703"
    if cluster.has_pgvector():
        db.execute("ALTER TABLE wrongtypes ADD COLUMN p text")
        code, msg = err("SELECT doppler.watch('wrongtypes', 'p', 'v')")
        assert code == "42804" and "3 dimensions" in msg
    db.execute("CREATE ROLE doppler_stranger")
    db.execute("CREATE TABLE strangers (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("GRANT USAGE ON SCHEMA public TO doppler_stranger")
    db.execute("SET ROLE doppler_stranger")
    try:
        assert err("SELECT doppler.watch('strangers')")[0] == "42501"
        assert err("CALL doppler.fill('strangers')")[0] in ("42501", "P0002", "42704")
    finally:
        db.execute("RESET ROLE")
    # a plain owner without pg_read_server_files may watch bytea, not paths
    db.execute("ALTER TABLE strangers OWNER TO doppler_stranger")
    code, msg = err("SELECT doppler.watch('strangers')")
    assert code == "42501" and "may not read server files" in msg
    # unwatch keeps the data
    make_table(db, "keepme")
    db.execute("SELECT doppler.watch('keepme')")
    db.execute("CALL doppler.fill('keepme')")  # races the worker: fill waits for the rows it holds
    assert status(db, "keepme")["pending"] == 0
    assert db.execute("SELECT doppler.unwatch('keepme')").fetchone()[0] is True
    assert db.execute("SELECT count(features) FROM keepme").fetchone()[0] == len(GOOD)
    assert db.execute("SELECT count(*) FROM doppler.watched WHERE relid = 'keepme'::regclass").fetchone()[0] == 0
    db.execute("DROP TABLE keepme")


def test_worker_survives_sighup_and_comes_back_after_sigterm(db, cluster):
    pid = wait_for(lambda: worker(db), 60, what="the worker")[0]
    reloaded = "reloaded its settings (naptime 20000 ms)"
    started = f'doppler worker started in database "{db.info.dbname}"'
    before = cluster.log().count(reloaded)
    try:
        set_system(db, worker_naptime="20s")
        wait_for(lambda: cluster.log().count(reloaded) > before, 30, 0.1, "the worker's reload")
        assert worker(db)[0] == pid  # the same process
        starts = cluster.log().count(started)
        assert db.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        new = wait_for(lambda: (lambda w: w if w and w[0] != pid else None)(worker(db)), 60, what="worker restarted")
        assert new[0] != pid
        wait_for(lambda: cluster.log().count(started) == starts + 1, 30, 0.1, "the new worker's start line")
    finally:
        set_system(db, cluster, worker_naptime=None)
