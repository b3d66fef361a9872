"""Upgrades, dump and restore, and a worker whose database is missing (issue 13).

A cluster of its own: doppler 0.1.0 (the install script kept in sql/history) in database DB, and
workers for DB and for "doppler_restored", which does not exist until the restore test makes it.
The tests run in file order: update, compare with a fresh install, then dump and restore.
"""
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import AS_ROOT, BINDIR, DB, PG_CONFIG, Cluster, as_pg, fixture_paths, status, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OLD, NEW = "0.1.0", "0.11.0"
RESTORED = "doppler_restored"
MODELS = os.environ.get("DOPPLER_MODELS", os.environ.get("DOPPLER_DEPS", "/opt/doppler") + "/models")
GOOD = [p for p in fixture_paths() if "large_" not in p]


@pytest.fixture(scope="module")
def old():
    sharedir = subprocess.run([PG_CONFIG, "--sharedir"], check=True, capture_output=True, text=True).stdout.strip()
    # 0.1.0's install script next to the installed 0.2.0 and the update script
    shutil.copy(os.path.join(REPO, "sql", "history", f"doppler--{OLD}.sql"), os.path.join(sharedir, "extension"))
    c = Cluster(worker_db=f"{DB},{RESTORED}", version=OLD, name="upgrade")
    yield c
    c.destroy()


def snapshot(conn):
    """doppler's configuration and the tables' data, as text."""
    q = {
        "watched": "SELECT relid::text, source_column, source_kind, vector_column, vector_kind, key_columns::text,"
                   " mode, on_error, hash_column, dedup, model, model_column, batch_size, priority FROM doppler.watched",
        "models": "SELECT name, onnx_path, dim, version, input_size FROM doppler.models",
        "failures": "SELECT relid::text, row_key, source, error_class, sqlstate, attempts FROM doppler.failures",
        "up_async": "SELECT t::text FROM up.up_async t",
        "up_sync": "SELECT md5(t::text), t.id, t.features::text FROM up.up_sync t",
    }
    return {k: sorted(map(repr, conn.execute(v).fetchall())) for k, v in q.items()}


def filled(conn, table):
    return wait_for(lambda: (lambda s: s if s["pending"] == 0 else None)(status(conn, table)), 120,
                    what=f"{table} filled")


def data(path):
    with open(path, "rb") as f:
        return f.read()


def test_update_from_0_1_0_keeps_configuration_data_triggers_and_worker(old):
    with old.connect() as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'doppler'").fetchone()[0] == OLD
        assert (OLD, NEW) in [tuple(r) for r in c.execute(
            "SELECT source, target FROM pg_extension_update_paths('doppler') WHERE path IS NOT NULL").fetchall()]
        # a plain role's tables, a registered model, an async table with a failure record, a sync
        # table with a hash column
        c.execute("CREATE ROLE up_owner LOGIN IN ROLE pg_read_server_files")
        c.execute("CREATE SCHEMA up AUTHORIZATION up_owner")
        c.execute("SELECT doppler.register_model('tiny', %s, dim => 16, version => '3')", (f"{MODELS}/tiny.onnx",))
    with old.connect(user="up_owner") as c:
        c.execute("CREATE TABLE up.up_async (id int PRIMARY KEY, f_img text, features real[])")
        c.execute("INSERT INTO up.up_async VALUES (1, %s), (2, %s), (3, '/no/such/image.jpg')", (GOOD[0], GOOD[1]))
        c.execute("SELECT doppler.watch('up.up_async', model => 'tiny')")
        c.execute("CREATE TABLE up.up_sync (id bigint PRIMARY KEY, img bytea, h text, features real[])")
        c.execute("SELECT doppler.watch('up.up_sync', 'img', mode => 'sync', hash_column => 'h', model => 'tiny')")
        c.execute("INSERT INTO up.up_sync VALUES (1, %s)", (data(GOOD[2]),))
        s = filled(c, "up.up_async")
        assert (s["done"], s["failed"]) == (2, 1), s
        # the bad row is retried once (doppler.max_attempts = 2), then given up: a stable record
        wait_for(lambda: c.execute("SELECT count(*) FROM doppler.failures WHERE next_attempt IS NULL").fetchone()[0] == 1,
                 60, what="the failure given up")
        # 0.1.0 did not follow renames: the update names the watch that lost its column
        c.execute("CREATE TABLE up.up_renamed (id int PRIMARY KEY, img bytea, features real[])")
        c.execute("SELECT doppler.watch('up.up_renamed', 'img', mode => 'manual', model => 'tiny')")
        c.execute("ALTER TABLE up.up_renamed RENAME COLUMN img TO picture")
        before = snapshot(c)
    # the worker (0.2.0's library) says that the database's SQL objects are older
    wait_for(lambda: f"are version {OLD}, its library is {NEW}: run ALTER EXTENSION doppler UPDATE" in old.log(),
             30, what="the worker's version warning")
    assert before["failures"] and len(before["up_sync"]) == 1 and "None" not in before["up_sync"][0]

    with old.connect() as c:
        notices = []
        c.add_notice_handler(lambda n: notices.append(n.message_primary))
        c.execute("ALTER EXTENSION doppler UPDATE")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'doppler'").fetchone()[0] == NEW
        assert notices == ["doppler watches up.up_renamed, but it has no column img (renamed before doppler 0.2.0?)"], notices
        c.execute("SELECT doppler.unwatch('up.up_renamed')")
    before["watched"] = [w for w in before["watched"] if "up_renamed" not in w]
    # 0.5.0 registers the model its packages bundle
    before["models"] = sorted(before["models"] + [repr(
        ("efficientnet_lite0", "$sharedir/doppler/efficientnet-lite0.onnx", 1280, "1", 224))])
    with old.connect(user="up_owner") as c:
        assert snapshot(c) == before
        # the worker fills new rows, the sync trigger new ones in the statement
        c.execute("INSERT INTO up.up_async VALUES (4, %s)", (GOOD[3],))
        assert filled(c, "up.up_async")["done"] == 3
        c.execute("INSERT INTO up.up_sync VALUES (2, %s)", (data(GOOD[4]),))
        assert c.execute("SELECT features IS NOT NULL AND h IS NOT NULL FROM up.up_sync WHERE id = 2").fetchone()[0]
        # a changed image clears what was derived from the old one (0.1.0's trigger, 0.2.0's function)
        with c.transaction():  # (before the worker, woken at commit, fills it again)
            c.execute("UPDATE up.up_async SET f_img = %s WHERE id = 1", (GOOD[5],))
            assert c.execute("SELECT features IS NULL FROM up.up_async WHERE id = 1").fetchone()[0]
        assert filled(c, "up.up_async")["done"] == 3
        # and 0.2.0 follows renames of the columns a watch uses, on tables watched under 0.1.0
        c.execute("ALTER TABLE up.up_sync RENAME COLUMN img TO picture")
        c.execute("ALTER TABLE up.up_sync RENAME COLUMN h TO dhash")
        assert c.execute("SELECT source_column, hash_column FROM doppler.watched"
                         " WHERE relid = 'up.up_sync'::regclass").fetchone() == ("picture", "dhash")
        old_h = c.execute("SELECT dhash FROM up.up_sync WHERE id = 1").fetchone()[0]
        c.execute("UPDATE up.up_sync SET picture = %s WHERE id = 1", (data(GOOD[6]),))
        new = c.execute("SELECT features IS NOT NULL, dhash FROM up.up_sync WHERE id = 1").fetchone()
        assert new[0] and new[1] and new[1] != old_h, new


def fingerprint(conn):
    """Every SQL object of the extension and how it is defined."""
    return [r[0] for r in conn.execute(r"""
        WITH m AS (SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid
                   WHERE d.refclassid = 'pg_extension'::regclass AND e.extname = 'doppler' AND d.deptype = 'e'),
             rel AS (SELECT c.* FROM pg_class c JOIN m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid)
        SELECT 'member ' || pg_describe_object(classid, objid, 0) FROM m
        UNION ALL
        SELECT 'function ' || pg_get_functiondef(p.oid) || ' owner-acl ' || coalesce(p.proacl::text, '')
               || ' comment ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
        FROM pg_proc p JOIN m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid WHERE p.prokind <> 'a'
        UNION ALL
        SELECT format('relation %s kind %s rls %s acl %s comment %s view %s', r.oid::regclass, r.relkind,
                      r.relrowsecurity, r.relacl, obj_description(r.oid, 'pg_class'),
                      CASE WHEN r.relkind = 'v' THEN pg_get_viewdef(r.oid) END) FROM rel r
        UNION ALL
        SELECT format('column %s.%s %s not null %s default %s', r.oid::regclass, a.attname,
                      format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid))
        FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef ad ON ad.adrelid = r.oid AND ad.adnum = a.attnum
        UNION ALL
        SELECT format('constraint %s %s %s', k.conrelid::regclass, k.conname, pg_get_constraintdef(k.oid))
        FROM pg_constraint k JOIN rel r ON k.conrelid = r.oid
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN rel r ON i.indrelid = r.oid
        UNION ALL
        SELECT format('policy %s %s %s %s %s', p.tablename, p.policyname, p.cmd, p.roles, p.qual)
        FROM pg_policies p WHERE p.schemaname = 'doppler'
        UNION ALL
        SELECT format('trigger %s', pg_get_triggerdef(t.oid)) FROM pg_trigger t JOIN rel r ON t.tgrelid = r.oid AND NOT t.tgisinternal
        UNION ALL
        SELECT format('event trigger %s %s %s %s %s', t.evtname, t.evtevent, t.evttags, t.evtfoid::regproc, t.evtenabled)
        FROM pg_event_trigger t
        UNION ALL
        SELECT format('config %s %s', e.extconfig::regclass[], e.extcondition) FROM pg_extension e
        WHERE e.extname = 'doppler'
        ORDER BY 1""").fetchall()]


def test_updated_catalog_equals_a_fresh_install(old):
    """OLD + every update script up to NEW (ALTER EXTENSION doppler UPDATE) defines every object exactly as
    CREATE EXTENSION of NEW does."""
    with old.connect("postgres") as c:
        c.execute("DROP DATABASE IF EXISTS doppler_fresh")
        c.execute("CREATE DATABASE doppler_fresh")
    with old.connect("doppler_fresh") as c:
        c.execute("CREATE EXTENSION doppler")
        fresh = fingerprint(c)
    with old.connect() as c:
        updated = fingerprint(c)
    assert len(fresh) > 50
    only_fresh = sorted(set(fresh) - set(updated))
    only_updated = sorted(set(updated) - set(fresh))
    assert not only_fresh and not only_updated, (
        "the update script and the install script disagree:\n  fresh only:\n    "
        + "\n    ".join(only_fresh) + "\n  updated only:\n    " + "\n    ".join(only_updated))


def test_dump_and_restore_into_a_new_database(old, tmp_path):
    """pg_dump -Fc, then pg_restore into a database that did not exist: watches, models, failure
    records and triggers come back, and the worker (waiting quietly for that database since the
    server started) fills rows inserted after the restore."""
    # the worker of the missing database said so once, and did not FATAL every 5 s since
    # long enough for a worker that FATALs every 5 s to have done so several times
    wait_for(lambda: time.time() - old.started > 15, 30, 0.5, "15 s since the server started")
    log = old.log()
    missing = f'database "{RESTORED}" does not exist'
    assert log.count(missing) == 1, [l for l in log.splitlines() if RESTORED in l]
    assert "looking for it every" in log

    dump = os.path.join(old.dir, "doppler.dump")
    as_pg([f"{BINDIR}/pg_dump", "-h", old.dir, "-U", "postgres", "-Fc", "-f", dump, DB])
    with old.connect("postgres") as c:
        c.execute(f"CREATE DATABASE {RESTORED}")
    r = subprocess.run((["sudo", "-u", "postgres", "--"] if AS_ROOT else [])
                       + [f"{BINDIR}/pg_restore", "-h", old.dir, "-U", "postgres", "-d", RESTORED, dump],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with old.connect() as c:
        before = snapshot(c)
        triggers = c.execute("SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE tgname LIKE 'doppler%'"
                             " ORDER BY 1, 2").fetchall()
    with old.connect(RESTORED) as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'doppler'").fetchone()[0] == NEW
        assert snapshot(c) == before
        assert c.execute("SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE tgname LIKE 'doppler%'"
                         " ORDER BY 1, 2").fetchall() == triggers
        # the worker of the restored database fills what is inserted now
        c.execute("INSERT INTO up.up_async VALUES (5, %s)", (GOOD[7],))
        assert filled(c, "up.up_async")["done"] == 4
        pid = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'doppler worker'"
                        " AND datname = current_database()").fetchone()
        assert pid, "no worker in the restored database"
        # sync and renames work there too
        c.execute("INSERT INTO up.up_sync VALUES (3, %s)", (data(GOOD[8]),))
        assert c.execute("SELECT features IS NOT NULL FROM up.up_sync WHERE id = 3").fetchone()[0]
    assert f'database "{RESTORED}" is there now' in old.log()


def test_an_own_efficientnet_lite0_survives_update_dump_and_restore(old):
    """Before 0.5.0, CREATE EXTENSION registered only resnet50, and scripts/demo registered an
    efficientnet_lite0 by hand. A 0.4.0 dump of such a database restores into 0.5.0, whose CREATE
    EXTENSION registers an efficientnet_lite0 of its own: the dump's entry replaces it (no
    duplicate key; the watches that use it come back). ALTER EXTENSION UPDATE keeps it, and a dump
    of the updated database (the entry differs from the bundled one, so it is dumped) restores it."""
    sharedir = subprocess.run([PG_CONFIG, "--sharedir"], check=True, capture_output=True, text=True).stdout.strip()
    shutil.copy(os.path.join(REPO, "sql", "history", "doppler--0.4.0.sql"), os.path.join(sharedir, "extension"))
    own = (f"{MODELS}/efficientnet-lite0.onnx", 1280, "7")
    with old.connect("postgres") as c:
        for db in ["v4", "v4_restored", "v5_restored"]:
            c.execute(f"CREATE DATABASE {db}")
    with old.connect("v4") as c:
        c.execute("CREATE EXTENSION doppler VERSION '0.4.0'")
        c.execute("SELECT doppler.register_model('efficientnet_lite0', %s, dim => %s, divisor => 1,"
                  " mean => '{127,127,127}', std => '{128,128,128}', version => %s)", own)
        c.execute("CREATE TABLE v4t (id int PRIMARY KEY, f_img text, features real[])")
        c.execute("SELECT doppler.watch('v4t', mode => 'manual', model => 'efficientnet_lite0')")

    def entry(c):
        return c.execute("SELECT onnx_path, dim, version FROM doppler.models WHERE name = 'efficientnet_lite0'").fetchone()

    def dump_and_restore(src, dst):
        dump = os.path.join(old.dir, f"{src}.dump")
        as_pg([f"{BINDIR}/pg_dump", "-h", old.dir, "-U", "postgres", "-Fc", "-f", dump, src])
        r = subprocess.run((["sudo", "-u", "postgres", "--"] if AS_ROOT else [])
                           + [f"{BINDIR}/pg_restore", "-h", old.dir, "-U", "postgres", "-d", dst, dump],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with old.connect(dst) as c:
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'doppler'").fetchone()[0] == NEW
            assert entry(c) == own
            assert c.execute("SELECT model FROM doppler.watched").fetchall() == [("efficientnet_lite0",)]
            assert c.execute("SELECT count(*) FROM doppler.models WHERE name = 'resnet50'").fetchone()[0] == 1

    dump_and_restore("v4", "v4_restored")
    with old.connect("v4") as c:
        c.execute("ALTER EXTENSION doppler UPDATE")
        assert entry(c) == own
    dump_and_restore("v4", "v5_restored")
    # an unchanged built-in entry is not dumped: a fresh 0.5.0 database restores with its own
    with old.connect("v5_restored") as c:
        c.execute("SELECT doppler.unwatch('v4t')")
        c.execute("SELECT doppler.register_model('efficientnet_lite0', '$sharedir/doppler/efficientnet-lite0.onnx',"
                  " dim => 1280, divisor => 1, mean => '{127,127,127}', std => '{128,128,128}', version => '1')")
        dump = os.path.join(old.dir, "v5.dump")
        as_pg([f"{BINDIR}/pg_dump", "-h", old.dir, "-U", "postgres", "-Fc", "-f", dump, "v5_restored"])
        listing = as_pg([f"{BINDIR}/pg_restore", "-f", "-", "-a", dump]).stdout
        assert "efficientnet_lite0" not in listing and "resnet50" not in listing
