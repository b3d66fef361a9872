"""watch(mode => async | sync | manual): triggers, in a real cluster with the worker running."""
import io
import os
import shutil
import time

import numpy as np
import psycopg
import pytest

from conftest import fixture_paths, status, stays, wait_for, worker, worker_fresh_nap

SMALL = [p for p in fixture_paths() if "large_" not in p]


def triggers(db, table):
    return sorted(r[0] for r in db.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", (table,)).fetchall())


def close(a, b, tol=1e-5):
    a, b = np.array(a), np.array(b)
    return a.shape == b.shape == (2048,) and np.abs(a - b).max() <= tol


def batches(db, table, via):
    return db.execute("SELECT count(*), coalesce(sum(filled), 0) FROM doppler.batches WHERE relid = %s::regclass AND via = %s",
                      (table, via)).fetchone()


def test_async_insert_is_filled_without_fill_or_wake(db):
    db.execute("CREATE TABLE a_ins (id int PRIMARY KEY, f_img text, note text, features real[])")
    db.execute("SELECT doppler.watch('a_ins')")  # async is the default
    assert triggers(db, "a_ins") == ["doppler_clear_stale", "doppler_truncate", "doppler_wake"]
    worker_fresh_nap(db)  # the worker has just begun a 30 s nap: only a wake-up fills the row within 15 s
    db.execute("INSERT INTO a_ins VALUES (1, %s)", (SMALL[0],))
    v = wait_for(lambda: db.execute("SELECT features FROM a_ins WHERE id = 1").fetchone()[0], 15, 0.1, "async fill")
    assert close(v, db.execute("SELECT doppler.extract_features(%s::text)", (SMALL[0],)).fetchone()[0])

    # a changed path clears the stale vector and is recomputed
    db.execute("UPDATE a_ins SET f_img = %s WHERE id = 1", (SMALL[1],))
    v2 = wait_for(lambda: db.execute("SELECT features FROM a_ins WHERE id = 1").fetchone()[0], 15, 0.1, "recompute")
    assert close(v2, db.execute("SELECT doppler.extract_features(%s::text)", (SMALL[1],)).fetchone()[0])
    assert not close(v2, v)
    runs = batches(db, "a_ins", "worker")

    # another column, or the same path again: the vector is not stale (checked before the commit,
    # so that no worker pass can have refilled it), and no batch runs for the row
    with db.transaction():
        db.execute("UPDATE a_ins SET note = 'hello' WHERE id = 1")
        db.execute("UPDATE a_ins SET f_img = f_img WHERE id = 1")
        assert db.execute("SELECT features IS NOT NULL AND features_model IS NOT NULL FROM a_ins WHERE id = 1").fetchone()[0]
    worker_fresh_nap(db)  # a whole pass after the updates
    assert batches(db, "a_ins", "worker") == runs
    assert close(db.execute("SELECT features FROM a_ins WHERE id = 1").fetchone()[0], v2, 0)


def test_async_aborted_insert_does_not_wake(db):
    """The async trigger wakes the worker when the transaction commits, not when it aborts: a
    worker that has just begun its 30 s nap stays asleep (a woken worker reports a pass at once,
    which moves its state_change); a committed insert then wakes it."""
    db.execute("CREATE TABLE a_abort (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('a_abort')")
    nap = worker_fresh_nap(db)
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.transaction():
            db.execute("INSERT INTO a_abort VALUES (1, %s)", (SMALL[0],))
            db.execute("SELECT 1/0")
    stays(lambda: worker(db)[1] == nap, 2, "the sleeping worker's state")
    db.execute("INSERT INTO a_abort VALUES (1, %s)", (SMALL[0],))
    wait_for(lambda: worker(db)[1] != nap, 10, 0.05, "the worker woken by the committed insert")
    wait_for(lambda: db.execute("SELECT features IS NOT NULL FROM a_abort").fetchone()[0], 15, 0.1, "row filled")


def copy_rows(db, table, rows):
    with db.cursor() as cur:
        with cur.copy(f"COPY {table} (id, f_img) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)


def test_sync_copy_and_insert_select_are_filled_at_commit_in_batches(db):
    db.execute("SET doppler.intra_op_threads = 2")
    db.execute("CREATE TABLE s_rows (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('s_rows', mode => 'sync', batch_size => 32)")
    assert triggers(db, "s_rows") == ["doppler_clear_stale", "doppler_sync_insert", "doppler_sync_update", "doppler_truncate"]
    paths = [SMALL[i % len(SMALL)] for i in range(200)]
    with db.transaction():
        copy_rows(db, "s_rows", list(enumerate(paths)))
        # inside the same transaction, before commit, every row is already there
        assert db.execute("SELECT count(features) FROM s_rows").fetchone()[0] == 200
    runs, filled = batches(db, "s_rows", "sync")
    assert filled == 200 and runs <= 200 // 32 + 2, f"{runs} ORT runs for 200 rows"

    db.execute("CREATE TABLE s_src (id int, f_img text)")
    db.execute("INSERT INTO s_src SELECT 1000 + i, p FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, i)", (paths,))
    db.execute("INSERT INTO s_rows (id, f_img) SELECT id, f_img FROM s_src")
    assert db.execute("SELECT count(*) FILTER (WHERE features IS NULL), count(*) FROM s_rows").fetchone() == (0, 400)
    runs2, filled2 = batches(db, "s_rows", "sync")
    assert filled2 == 400 and runs2 - runs <= 200 // 32 + 2
    row = db.execute("SELECT f_img, features FROM s_rows WHERE id = 1003").fetchone()
    assert close(row[1], db.execute("SELECT doppler.extract_features(%s::text)", (row[0],)).fetchone()[0])

    # sync update of the path recomputes in the statement
    db.execute("UPDATE s_rows SET f_img = %s WHERE id = 0", (SMALL[2],))
    assert close(db.execute("SELECT features FROM s_rows WHERE id = 0").fetchone()[0],
                 db.execute("SELECT doppler.extract_features(%s::text)", (SMALL[2],)).fetchone()[0])


def test_sync_bad_image_raise_and_defer(db, cluster):
    db.execute("CREATE TABLE s_bad (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('s_bad', mode => 'sync')")
    bad = os.path.join(cluster.files, "notyet.png")
    with pytest.raises(psycopg.Error) as e:
        db.execute("INSERT INTO s_bad VALUES (1, %s), (2, %s)", (SMALL[0], bad))
    assert e.value.sqlstate == "58P01" and "notyet.png" in str(e.value) and "does not exist" in str(e.value)
    assert db.execute("SELECT count(*) FROM s_bad").fetchone()[0] == 0

    db.execute("SELECT doppler.watch('s_bad', mode => 'sync', on_error => 'defer')")
    db.execute("INSERT INTO s_bad VALUES (1, %s), (2, %s)", (SMALL[0], bad))
    assert db.execute("SELECT count(features) FROM s_bad").fetchone()[0] == 1
    f = db.execute("SELECT error_class, attempts FROM doppler.failures WHERE relid = 's_bad'::regclass").fetchone()
    assert f == ("not_found", 1)
    shutil.copy(SMALL[3], bad)
    os.chmod(bad, 0o644)
    db.execute("SELECT doppler.wake()")
    wait_for(lambda: db.execute("SELECT features IS NOT NULL FROM s_bad WHERE id = 2").fetchone()[0], 60, 0.3,
             "worker retry of the deferred row")
    assert db.execute("SELECT count(*) FROM doppler.failures WHERE relid = 's_bad'::regclass").fetchone()[0] == 0


def test_manual_mode_and_switching_and_unwatch(db):
    db.execute("CREATE TABLE m_rows (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('m_rows', mode => 'sync')")
    db.execute("SELECT doppler.watch('m_rows', mode => 'manual')")
    assert triggers(db, "m_rows") == ["doppler_truncate"]  # every mode: TRUNCATE forgets failure records
    with db.transaction():  # (the worker cannot see the row before commit)
        db.execute("INSERT INTO m_rows VALUES (1, %s)", (SMALL[0],))
        assert db.execute("SELECT features FROM m_rows").fetchone()[0] is None  # nothing in the statement
    # fill returns only when nothing is left to do (it waits for a row the worker's pass holds):
    # the row is filled when it returns, with no wait in which the worker could do fill's work
    db.execute("CALL doppler.fill('m_rows')")
    assert close(db.execute("SELECT features FROM m_rows WHERE id = 1").fetchone()[0],
                 db.execute("SELECT doppler.extract_features(%s::text)", (SMALL[0],)).fetchone()[0])
    db.execute("SELECT doppler.watch('m_rows', mode => 'async')")
    assert triggers(db, "m_rows") == ["doppler_clear_stale", "doppler_truncate", "doppler_wake"]
    db.execute("SELECT doppler.unwatch('m_rows')")
    assert triggers(db, "m_rows") == []
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT doppler.watch('m_rows', mode => 'sometimes')")
    assert e.value.sqlstate == "22023"


@pytest.mark.parametrize("mode", ["async", "sync", "manual"])
def test_odd_names_and_partitions_in_every_mode(db, mode):
    schema, table = f'"My Schema {mode}"', '"Odd Name"'
    qual = f"{schema}.{table}"
    db.execute(f"CREATE SCHEMA {schema}")
    db.execute(f'CREATE TABLE {qual} ("the key" int, "the path" text, "the vector" real[], PRIMARY KEY ("the key")) PARTITION BY RANGE ("the key")')
    db.execute(f'CREATE TABLE {schema}."part one" PARTITION OF {qual} FOR VALUES FROM (0) TO (100)')
    db.execute(f'CREATE TABLE {schema}."part two" PARTITION OF {qual} FOR VALUES FROM (100) TO (200)')
    db.execute(f"SELECT doppler.watch(%s, 'the path', 'the vector', mode => %s)", (qual, mode))
    db.execute(f'INSERT INTO {qual} VALUES (1, %s), (150, %s)', (SMALL[0], SMALL[1]))
    if mode == "manual":
        # nothing is left to do when fill returns (it waits for rows the worker's pass holds)
        db.execute("CALL doppler.fill(%s)", (qual,))
        assert db.execute(f'SELECT count("the vector") FROM {qual}').fetchone()[0] == 2
    else:
        wait_for(lambda: db.execute(f'SELECT count("the vector") FROM {qual}').fetchone()[0] == 2, 30, 0.2, f"{mode} fill")
    db.execute(f'UPDATE {qual} SET "the path" = %s WHERE "the key" = 150', (SMALL[2],))
    if mode == "manual":
        # manual: nothing reacts to the update; the old vector stays until someone clears it
        assert db.execute(f'SELECT "the vector" IS NOT NULL FROM {qual} WHERE "the key" = 150').fetchone()[0]
    else:
        want = db.execute("SELECT doppler.extract_features(%s::text)", (SMALL[2],)).fetchone()[0]
        got = wait_for(lambda: (lambda v: v if v and close(v, want) else None)(
            db.execute(f'SELECT "the vector" FROM {qual} WHERE "the key" = 150').fetchone()[0]), 30, 0.2, f"{mode} recompute")
        assert close(got, want)
