"""Between owners (issue 28): what one table owner can make the shared worker and the shared views
do to everyone else. `tb_mal_*` roles are hostile owners; `tb_fair_victim` owns a table the
worker must keep filling within the bound README states (Security: between owners):

    (doppler.worker_batch_timeout + 1 s + 5 s) per other owner whose batch overruns, plus its own batch

Each test drops its hostile tables before it ends, so that the rest of the suite runs with a
worker nobody stalls.
"""
import time

import pytest

from conftest import set_system, wait_for
from test_trust import A, B, C, count_filled, data, error_of, fresh_role, hostile, log_rows

VICTIM = "tb_fair_victim"
TIMEOUT_S = 2
# one overrunning batch, its grace, the worker's restart, and the victim's own batch (with room
# for a loaded machine): without the fixes the victim is not filled at all
BOUND_S = TIMEOUT_S + 1 + 5 + 20


@pytest.fixture
def admin(cluster):
    with cluster.connect() as conn:
        # (a fresh cluster's worker may still be starting: settings reload and wake-ups need it)
        wait_for(lambda: conn.execute("SELECT doppler._worker_pid()").fetchone()[0], 60, 0.2, "the worker")
        yield conn


@pytest.fixture
def victim(cluster, admin):
    fresh_role(admin, VICTIM)
    with cluster.connect(user=VICTIM) as v:
        v.execute(f"CREATE TABLE {VICTIM}.t (id int PRIMARY KEY, img bytea, features real[])")
        v.execute(f"SELECT doppler.watch('{VICTIM}.t', 'img')")
        yield v


def filled_within(conn, table, n, seconds, what):
    t0 = time.time()
    wait_for(lambda: count_filled(conn, table) >= n, seconds, 0.2, f"{what} within {seconds}s")
    return time.time() - t0


def worker_pid(admin):
    return admin.execute("SELECT doppler._worker_pid()").fetchone()[0]


# A trigger on the write of a filled row (only doppler updates these tables) that never ends: it
# sleeps and swallows every cancel.
SWALLOWER = """
CREATE FUNCTION @r.stall() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    LOOP
        BEGIN
            PERFORM pg_catalog.pg_sleep(0.2);
        EXCEPTION WHEN query_canceled THEN NULL;
        END;
    END LOOP;
    RETURN NEW;
END $f$"""


def test_owners_that_swallow_the_cancel_cannot_stall_the_others(cluster, admin, victim):
    """Issue 28.1 and 28.2: two owners whose tables (all of the highest priority) have a trigger
    that swallows the batch timeout's cancel for ever. The worker ends itself after the timeout's
    grace (a FATAL no exception block catches), the table is backed off (doppler.status shows it)
    and left out of the next worker's first pass, owners whose tables ended workers go last, and
    the victim's rows are filled within the bound (one overrun per hostile owner at most)."""
    hostile_owners = ["tb_mal_stall1", "tb_mal_stall2"]
    bound = len(hostile_owners) * (TIMEOUT_S + 1 + 5) + 20
    for r in hostile_owners:
        fresh_role(admin, r)
    set_system(admin, cluster, worker_batch_timeout=f"{TIMEOUT_S}s")
    ended = 'terminating background worker "doppler worker" due to administrator command'
    ended_before = cluster.log().count(ended)
    try:
        for r in hostile_owners:
            with cluster.connect(user=r) as m:
                m.execute(SWALLOWER.replace("@r", r))
                for i in range(2):
                    t = f"{r}.t{i}"
                    m.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[])")
                    m.execute(f"CREATE TRIGGER stall BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {r}.stall()")
                    m.execute(f"SELECT doppler.watch('{t}', 'img', priority => 2147483647)")
                    m.execute(f"INSERT INTO {t} VALUES (1, %s)", (data(A),))
        victim.execute(f"INSERT INTO {VICTIM}.t VALUES (1, %s)", (data(B),))
        took = filled_within(victim, f"{VICTIM}.t", 1, bound, "the victim's first row")
        # the worker ended itself in a batch of a hostile owner's (it swallowed the cancel)
        wait_for(lambda: cluster.log().count(ended) > ended_before, 60, 0.2, "the worker ending itself")
        wait_for(lambda: "the previous worker ended in a batch of tb_mal_stall" in cluster.log(), 60, 0.2,
                 "the taken-over note")
        wait_for(lambda: admin.execute("""SELECT count(*) FROM doppler.status
                                          WHERE table_name::text LIKE 'tb_mal_stall%%' AND worker_overruns > 0
                                            AND worker_backoff_until > now() - interval '1 hour'""").fetchone()[0] >= 1,
                 60, 0.2, "a hostile table backed off in doppler.status")
        # and again, with the hostile tables still there
        victim.execute(f"INSERT INTO {VICTIM}.t VALUES (2, %s)", (data(C),))
        took2 = filled_within(victim, f"{VICTIM}.t", 2, bound, "the victim's second row")
        print(f"victim filled in {took:.1f} s and {took2:.1f} s")
        for r in hostile_owners:
            assert count_filled(admin, f"{r}.t0") + count_filled(admin, f"{r}.t1") == 0
    finally:
        for r in hostile_owners:
            admin.execute(f"DROP OWNED BY {r} CASCADE")
        # (not waiting for the worker's reload: it may be restarting after ending itself)
        set_system(admin, None, worker_batch_timeout=None)


def test_the_prune_does_not_wait_for_an_owners_lock(cluster, admin, victim):
    """Issue 28.3: an owner's open transaction that unwatched its table holds rows of
    doppler.batches; the worker's prune of old batches skips them instead of waiting, and the
    worker goes on filling the victim's table."""
    r = "tb_mal_prune"
    fresh_role(admin, r)
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.t', 'img', mode => 'manual')")
        m.execute(f"INSERT INTO {r}.t VALUES (1, %s)", (data(A),))
        m.execute(f"CALL doppler.fill('{r}.t')")
    victim.execute(f"INSERT INTO {VICTIM}.t VALUES (1, %s)", (data(B),))
    filled_within(victim, f"{VICTIM}.t", 1, 60, "the victim's row")
    # every batch log row is older than a day now (the owner's and the victim's)
    admin.execute("UPDATE doppler.batches SET finished_at = now() - interval '2 days'")
    with cluster.connect(user=r) as m:
        with m.transaction():
            assert m.execute(f"SELECT doppler.unwatch('{r}.t')").fetchone()[0]  # (holds its batch rows)
            # a new worker prunes when it starts
            wait_for(lambda: worker_pid(admin), 30, 0.1, "the worker")
            old = worker_pid(admin)
            admin.execute("SELECT pg_terminate_backend(%s)", (old,))
            wait_for(lambda: (worker_pid(admin) or old) != old, 30, 0.2, "a new worker")
            victim.execute(f"INSERT INTO {VICTIM}.t VALUES (2, %s)", (data(C),))
            filled_within(victim, f"{VICTIM}.t", 2, 60, "the victim's row while the owner holds batch rows")
            # the prune ran (the victim's old rows are gone) without the owner's held rows
            wait_for(lambda: admin.execute("""SELECT count(*) FROM doppler.batches
                                              WHERE relid::oid = %s::regclass::oid AND finished_at < now() - interval '1 day'""",
                                           (f"{VICTIM}.t",)).fetchone()[0] == 0, 30, 0.2, "the prune")
    admin.execute(f"DROP OWNED BY {r} CASCADE")


def advisory_locks(conn):
    return sorted(conn.execute("""SELECT objid::int FROM pg_locks WHERE locktype = 'advisory'
                                  AND pid = pg_backend_pid()""").fetchall())


def test_reading_status_leaves_every_session_as_it_was(cluster, admin, victim):
    """Issue 28.4 and 28.7: an owner changes its model column to an enum whose implicit cast to
    text trades advisory locks, and forces a row-level security policy that does the same. The
    type change ends the watch (a WARNING, nothing left to read), the policy's table shows NULL
    counts to everyone but its owner: reading doppler.status runs none of the owner's code, and
    every reader's session keeps exactly its own advisory locks."""
    r = "tb_mal_view"
    before = hostile(admin, cluster, r)
    # (each reader holds a lock of its own: 555001 the superuser, 555002 the victim)
    swap = ("PERFORM pg_catalog.pg_advisory_unlock(555001); PERFORM pg_catalog.pg_advisory_unlock(555002); "
            f"PERFORM pg_catalog.pg_advisory_lock(770001); PERFORM {r}.note('swap')")
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.t', 'img', mode => 'manual')")
        m.execute(f"INSERT INTO {r}.t VALUES (1, %s)", (data(A),))
        m.execute(f"CALL doppler.fill('{r}.t')")
        tag = m.execute(f"SELECT features_model FROM {r}.t").fetchone()[0]
        m.execute(f"CREATE TYPE {r}.mk AS ENUM ('{tag}', '!failed')")
        m.execute(f"""CREATE FUNCTION {r}.mkt({r}.mk) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $f$
                      BEGIN {swap}; RETURN pg_catalog.format('%s', $1); END $f$""")
        m.execute(f"CREATE CAST ({r}.mk AS text) WITH FUNCTION {r}.mkt({r}.mk) AS IMPLICIT")
        warnings = []
        m.add_notice_handler(lambda d: warnings.append((d.severity_nonlocalized, d.message_primary)))
        m.execute(f"ALTER TABLE {r}.t ALTER COLUMN features_model TYPE {r}.mk USING features_model::{r}.mk")
        assert any(s == "WARNING" and f"doppler no longer watches {r}.t" in msg for s, msg in warnings), warnings
        assert m.execute("SELECT count(*) FROM doppler.watched WHERE relid::oid = %s::regclass::oid",
                         (f"{r}.t",)).fetchone()[0] == 0
        code, text = error_of(m, f"CALL doppler.fill('{r}.t')")
        assert code == "42704" and "not watched" in text, (code, text)
        # the policy: forced on the owner, readable by all
        m.execute(f"CREATE TABLE {r}.p (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.p', 'img', mode => 'manual')")
        m.execute(f"INSERT INTO {r}.p VALUES (1, NULL), (2, NULL)")
        m.execute(f"""CREATE FUNCTION {r}.pol() RETURNS boolean LANGUAGE plpgsql AS $f$
                      BEGIN {swap}; RETURN true; END $f$""")
        m.execute(f"ALTER TABLE {r}.p ENABLE ROW LEVEL SECURITY")
        m.execute(f"ALTER TABLE {r}.p FORCE ROW LEVEL SECURITY")
        m.execute(f"CREATE POLICY p ON {r}.p USING ({r}.pol())")
        # an index whose predicate calls the owner's function: the planner folds it while it plans
        m.execute(f"CREATE TABLE {r}.q (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.q', 'img', mode => 'manual')")
        m.execute(f"INSERT INTO {r}.q VALUES (1, NULL)")
        m.execute(f"""CREATE FUNCTION {r}.always() RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $f$
                      BEGIN {swap}; RETURN true; END $f$""")
        m.execute(f"CREATE INDEX q_always ON {r}.q (id) WHERE {r}.always()")
        m.execute(f"GRANT SELECT ON {r}.t, {r}.p, {r}.q TO PUBLIC")
    admin.execute("SELECT pg_advisory_lock(555001)")
    victim.execute("SELECT pg_advisory_lock(555002)")
    try:
        for who, mine in ((admin, [(555001,)]), (victim, [(555002,)])):
            assert advisory_locks(who) == mine
            rows = dict(who.execute("SELECT table_name::text, total FROM doppler.status WHERE table_name::text LIKE %s",
                                    (f"{r}.%",)).fetchall())
            if who is admin:  # (row-level security is in force on p for the victim: no row of it)
                assert rows == {f"{r}.p": None, f"{r}.q": None}, rows
            else:
                assert rows == {f"{r}.q": None}, rows
            assert advisory_locks(who) == mine, "reading doppler.status changed the reader's session"
        readers = [admin.info.backend_pid, victim.info.backend_pid]
        ran = admin.execute(f"SELECT count(*) FROM {r}.log WHERE what = 'swap' AND pid = ANY (%s)", (readers,)).fetchone()[0]
        assert ran == 0, "the owner's code ran in a reader's session"
        # the owner's own session counts (its own code, in its own session)
        with cluster.connect(user=r) as m:
            assert m.execute(f"SELECT total FROM doppler.status WHERE table_name = '{r}.p'::regclass").fetchone()[0] == 2
    finally:
        admin.execute("SELECT pg_advisory_unlock_all()")
        victim.execute("SELECT pg_advisory_unlock_all()")
        admin.execute(f"DROP OWNED BY {r} CASCADE")
    del before


def test_a_lock_does_not_hang_status(cluster, admin, victim):
    """Issue 28.5: an owner holding its table (or one of its partitions) ACCESS EXCLUSIVE does not
    make doppler.status wait: that table shows NULL counts, the others theirs."""
    r = "tb_mal_lock"
    fresh_role(admin, r)
    victim.execute(f"INSERT INTO {VICTIM}.t VALUES (1, NULL)")
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.t', 'img', mode => 'manual')")
        m.execute(f"CREATE TABLE {r}.p (id int PRIMARY KEY, img bytea, features real[]) PARTITION BY RANGE (id)")
        m.execute(f"CREATE TABLE {r}.p1 PARTITION OF {r}.p FOR VALUES FROM (0) TO (10)")
        m.execute(f"SELECT doppler.watch('{r}.p', 'img', mode => 'manual')")
        try:
            for lock, how in ((f"{r}.t", "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE"),
                              (f"{r}.p1", "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE"),
                              (f"{r}.t", "REINDEX INDEX {}_pkey")):
                with m.transaction():
                    m.execute(how.format(lock))
                    admin.execute("SET statement_timeout = '10s'")
                    t0 = time.time()
                    rows = dict(admin.execute("""SELECT table_name::text, total FROM doppler.status
                                                 WHERE table_name::text LIKE ANY (%s)""",
                                              ([f"{r}.%", f"{VICTIM}.%"],)).fetchall())
                    assert time.time() - t0 < 5
                    locked = f"{r}.p" if lock.endswith("p1") else lock
                    assert rows[locked] is None and rows[f"{VICTIM}.t"] == 1, rows
        finally:
            admin.execute("RESET statement_timeout")
    admin.execute(f"DROP OWNED BY {r} CASCADE")


def test_temporary_tables_are_not_watched(cluster, admin):
    """Issue 28.6: a temporary table ends with its session, which no event reports: watching one
    is a clear error, so no watch outlives its table (and passes its settings to a later table
    with the same oid)."""
    r = "tb_mal_temp"
    fresh_role(admin, r)
    with cluster.connect(user=r) as m:
        m.execute("CREATE TEMP TABLE tt (id int PRIMARY KEY, img bytea, features real[])")
        code, text = error_of(m, "SELECT doppler.watch('pg_temp.tt', 'img')")
        assert code == "0A000" and "temporary" in text, (code, text)
        # (and a type named text that is not PostgreSQL's text: not a source doppler reads)
        m.execute(f"CREATE DOMAIN {r}.text AS pg_catalog.text")
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img {r}.text, features real[])")
        code, text = error_of(m, f"SELECT doppler.watch('{r}.t', 'img')")
        assert code == "42804" and f"{r}.text" in text, (code, text)
    admin.execute(f"DROP OWNED BY {r} CASCADE")


def test_a_retyped_source_ends_the_watch_clearly(cluster, admin):
    """Issue 28.7: the source column retyped from bytea to text after watch: the watch ends with a
    WARNING at the ALTER (a text source would be read as server paths the owner was never
    checked for), and fill says the table is not watched; never XX000."""
    r = "tb_retype"
    fresh_role(admin, r)
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, pic bytea, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.t', 'pic', mode => 'manual')")
        warnings = []
        m.add_notice_handler(lambda d: warnings.append(d.message_primary))
        m.execute(f"ALTER TABLE {r}.t ALTER COLUMN pic TYPE text USING encode(pic, 'base64')")
        assert any(f"doppler no longer watches {r}.t" in w and "pic is text" in w for w in warnings), warnings
        m.execute(f"INSERT INTO {r}.t VALUES (1, 'aGVsbG8=')")
        for conn in (m, admin):
            code, text = error_of(conn, f"CALL doppler.fill('{r}.t')")
            assert code == "42704", (code, text)
        # watching it again as a text source takes the owner's rights into account again
        code, text = error_of(m, f"SELECT doppler.watch('{r}.t', 'pic', mode => 'manual')")
        assert code == "42501" and "may not read server files" in text, (code, text)
    admin.execute(f"DROP OWNED BY {r} CASCADE")


def test_reentering_doppler_during_a_model_run_is_refused_clearly(cluster, admin):
    """Issue 28.8: a forced policy that calls doppler.extract_features runs during a batch's
    dedup lookup, inside the model run of a backend's own session: refused with 55006, not
    XX000 (with the inference service, the default, it simply works)."""
    r = "tb_mal_reenter"
    fresh_role(admin, r)
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
        m.execute(f"SELECT doppler.watch('{r}.t', 'img', hash_column => 'd_hash', dedup => true, mode => 'manual')")
        m.execute(f"ALTER TABLE {r}.t ENABLE ROW LEVEL SECURITY")
        m.execute(f"ALTER TABLE {r}.t FORCE ROW LEVEL SECURITY")
        m.execute(f"CREATE POLICY p ON {r}.t USING (img IS NULL OR doppler.extract_features(img) IS NOT NULL)")
        # a first row, filled (through the inference service, the default: the policy's call works)
        m.execute(f"INSERT INTO {r}.t VALUES (1, %s)", (data(A),))
        m.execute(f"CALL doppler.fill('{r}.t')")
        assert count_filled(m, f"{r}.t") == 1
        # a second of the same image: dedup looks its hash up, and the policy runs on row 1
        m.execute(f"INSERT INTO {r}.t VALUES (2, %s)", (data(A),))
    with cluster.connect() as su:
        su.execute("SET doppler.inference = backend")
        code, text = error_of(su, f"CALL doppler.fill('{r}.t')")
        assert code == "55006" and "during one of its own model runs" in text, (code, text)
        su.execute("RESET doppler.inference")
        su.execute(f"CALL doppler.fill('{r}.t')")
        assert count_filled(su, f"{r}.t") == 2
    admin.execute(f"DROP OWNED BY {r} CASCADE")


def test_fill_names_its_types_with_their_schema(cluster, admin, victim):
    """Issue 28 (also seen): fill's variables are declared with schema-qualified types, so a type
    of the same name in a schema on the caller's search_path is never used (its domain CHECK
    would run with the caller's rights)."""
    r = "tb_mal_types"
    before = hostile(admin, cluster, r)
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE DOMAIN {r}.timestamptz AS pg_catalog.timestamptz CHECK ({r}.note('timestamptz domain'))")
        m.execute(f"CREATE DOMAIN {r}.int8 AS pg_catalog.int8 CHECK ({r}.note('int8 domain'))")
        m.execute(f"CREATE DOMAIN {r}.chk AS pg_catalog.int8 CHECK ({r}.note('record field domain'))")
        m.execute(f"CREATE TYPE {r}.record AS (claimed {r}.chk, filled {r}.chk, failed {r}.chk, seconds float8)")
    victim.execute(f"INSERT INTO {VICTIM}.t VALUES (1, NULL)")
    victim.execute(f"SET search_path = {r}, pg_catalog")
    try:
        victim.execute(f"CALL doppler.fill('{VICTIM}.t')")
    finally:
        victim.execute("RESET search_path")
    runs = [x for x in log_rows(admin, r) if "domain" in x[2]]
    assert not runs, f"fill used a type of the caller's search_path: {runs}"
    admin.execute(f"DROP OWNED BY {r} CASCADE")
    del before


def test_deferred_owner_triggers_never_run_at_someone_elses_commit(cluster, admin):
    """A deferred constraint trigger that doppler's write (as the owner, security-restricted) would
    queue would fire at commit with the rights of whoever commits: the worker's superuser, or a
    superuser's fill. PostgreSQL refuses to queue it inside a security-restricted operation, so
    the row is a recorded write failure (42501) and the trigger never runs, for anyone."""
    r = "tb_mal_deferred"
    before = hostile(admin, cluster, r)
    with cluster.connect(user=r) as m:
        m.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, features real[])")
        m.execute(f"""CREATE FUNCTION {r}.later() RETURNS trigger LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {r}.note('deferred trigger'); RETURN NULL; END $f$""")
        m.execute(f"""CREATE CONSTRAINT TRIGGER later AFTER UPDATE ON {r}.t DEFERRABLE INITIALLY DEFERRED
                      FOR EACH ROW EXECUTE FUNCTION {r}.later()""")
        m.execute(f"SELECT doppler.watch('{r}.t', 'img', mode => 'manual')")
        m.execute(f"INSERT INTO {r}.t VALUES (1, %s)", (data(A),))
    admin.execute(f"CALL doppler.fill('{r}.t')")
    f = admin.execute(f"SELECT error_class, sqlstate, message FROM doppler.failures WHERE relid = '{r}.t'::regclass").fetchone()
    assert f is not None and f[0] == "write" and f[1] == "42501" and "deferred trigger" in f[2], f
    assert count_filled(admin, f"{r}.t") == 0
    assert admin.execute(f"SELECT count(*) FROM {r}.log WHERE what = 'deferred trigger'").fetchone()[0] == 0
    admin.execute(f"DROP OWNED BY {r} CASCADE")
    del before
