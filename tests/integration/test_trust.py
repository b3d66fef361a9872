"""Trust boundaries (issue 12): doppler works on other roles' tables with its own (the worker's,
the extension owner's) rights. These tests are adversarial: hostile table owners plant casts,
operators, domains, triggers, rules, policies and index expressions where doppler evaluates them;
a hostile unrelated role calls doppler's functions on other owners' tables. After each attack:

* the attacker's role is unchanged (role attributes and pg_auth_members),
* every hostile function recorded current_user = the attacker (the functions write
  current_user, then session_user, into a log table the attacker owns, before trying to escalate
  and swallowing the error),
* where doppler must evaluate the attacker's code (a cast on the key or the model column, a
  domain, a trigger...), it did: the log has its run, in the backend or for the session user
  that made doppler run it (the log keeps each run's backend pid),
* nothing of another owner leaked (rows of doppler.status/watched/batches/failures, paths in
  error messages).

And a role matrix: the main scenarios (watch, async/sync/manual, fill, worker, dedup, search,
failures and retry, unwatch, DROP) as a plain (non-superuser) table owner.

Every role and schema here is prefixed tb_; each role gets its own schema (PG 15+ revokes CREATE
on public). Roles are dropped and re-created by each test that uses them, so the file can be run
again in the same cluster.
"""
import uuid

import numpy as np
import psycopg
import pytest

from conftest import fixture_paths, set_system, wait_for

GOOD = [p for p in fixture_paths() if "large_" not in p]
A, B, C = GOOD[0], GOOD[1], GOOD[2]


def data(path):
    with open(path, "rb") as f:
        return f.read()


def corrupt():
    d = data(A)  # a JPEG (test_worker relies on it too): its first half is "corrupt", 22P03
    return d[: len(d) // 2]


# ---------------------------------------------------------------------------------------------
# helpers


def fresh_role(admin, role, member_of=()):
    """(Re)creates a LOGIN role with a schema of its own name, dropping whatever a previous run left."""
    if admin.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)).fetchone():
        admin.execute(f"DROP OWNED BY {role} CASCADE")
        admin.execute(f"DROP ROLE {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    for m in member_of:
        admin.execute(f"GRANT {m} TO {role}")
    admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")


def snapshot(admin, role):
    """What a privilege escalation would change: role attributes and memberships."""
    return admin.execute(
        """SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls,
                  coalesce((SELECT pg_catalog.array_agg(m.roleid::regrole::text ORDER BY m.roleid::regrole::text)
                            FROM pg_catalog.pg_auth_members m WHERE m.member OPERATOR(pg_catalog.=) r.oid), '{}')
           FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) %s""",
        (role,),
    ).fetchone()


# The attacker's payload: records who runs it FIRST (a statement of its own), then tries to
# escalate and swallows the error, so that doppler's batch goes on either way.
NOTE = """
CREATE FUNCTION @r.note(what text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO @r.log (cu, su, what) VALUES (current_user, session_user, what);
    BEGIN
        EXECUTE 'ALTER ROLE @r SUPERUSER CREATEROLE BYPASSRLS';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        EXECUTE 'GRANT pg_read_server_files, pg_execute_server_program TO @r';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END $f$"""


def hostile(admin, cluster, role):
    """A fresh attacker role with its log table and payload; returns its snapshot."""
    fresh_role(admin, role)
    with cluster.connect(user=role) as c:
        c.execute(f"""CREATE TABLE {role}.log (cu text, su text, what text, at timestamptz DEFAULT clock_timestamp(),
                                              pid int DEFAULT pg_catalog.pg_backend_pid())""")
        # whoever ends up running the payload must be able to record it
        c.execute(f"GRANT USAGE ON SCHEMA {role} TO PUBLIC")
        c.execute(f"GRANT SELECT, INSERT ON {role}.log TO PUBLIC")
        c.execute(NOTE.replace("@r", role))
    return snapshot(admin, role)


def log_rows(admin, role):
    return admin.execute(f"SELECT cu, su, what FROM {role}.log ORDER BY at").fetchall()


def assert_ran(admin, role, what, pid=None, su=None):
    """`role`'s payload `what` ran (in backend `pid`, with session user `su`, where given), and
    every such run as `role`: proof that doppler evaluated it, with the owner's rights."""
    runs = admin.execute(f"SELECT cu, su, pid FROM {role}.log WHERE what = %s ORDER BY at", (what,)).fetchall()
    mine = [r for r in runs if (pid is None or r[2] == pid) and (su is None or r[1] == su)]
    assert mine, f"{what!r} never ran (in backend {pid}, session user {su}): all its runs {runs}"
    assert all(r[0] == role for r in mine), f"{what!r} ran as another role than {role}: {mine}"


def assert_contained(admin, role, before, require=()):
    rows = log_rows(admin, role)
    problems = []
    foreign = [r for r in rows if r[0] != role]
    if foreign:
        problems.append(f"hostile code of {role} ran as another role (current_user, session_user, what): {foreign[:6]}")
    after = snapshot(admin, role)
    if after != before:
        problems.append(f"role {role} changed (super, createrole, createdb, replication, bypassrls, member of): {before} -> {after}")
    for what in require:
        if not any(r[2] == what for r in rows):
            problems.append(f"{what!r} never ran (log of {role}: {rows[:10]})")
    assert not problems, "\n".join(problems)


def oid_of(conn, table):
    return conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0]


def count_filled(conn, table):
    return conn.execute(f"SELECT count(features) FROM {table}").fetchone()[0]


def wait_filled(conn, table, n, timeout=150, waker=None):
    """Waits for n vectors in table, waking the worker through `waker` (a superuser's connection:
    test_plain_owner_wakes_the_worker checks a plain owner's wake on its own)."""
    def done():
        if waker is not None:
            waker.execute("SELECT doppler.wake()")
        return count_filled(conn, table) == n
    wait_for(done, timeout, 0.5, f"{table}: {n} vectors")


def failure(conn, table, key):
    return conn.execute(
        """SELECT error_class, sqlstate, attempts, next_attempt, message, source FROM doppler.failures
           WHERE relid::oid OPERATOR(pg_catalog.=) %s::regclass::oid AND row_key OPERATOR(pg_catalog.=) %s""",
        (table, key),
    ).fetchone()


def error_of(conn, sql, params=None):
    """(sqlstate, full text) of the error `sql` raises, or (None, result) when it succeeds."""
    try:
        cur = conn.execute(sql, params)
        return None, (cur.fetchall() if cur.description else None)
    except psycopg.Error as e:
        d = e.diag
        text = " | ".join(str(x) for x in [e, d.message_detail, d.message_hint, d.context] if x)
        return e.sqlstate, text


def make_failing_table(c, r, mode="manual"):
    """{r}.t, watched (bytea): row 1 corrupt and given up (max_attempts 2), row 2 filled."""
    t = f"{r}.t"
    c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[])")
    c.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 4, mode => '{mode}')")
    c.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s)", (corrupt(), data(A)))

    def settled():
        c.execute(f"CALL doppler.fill('{t}')")
        f = failure(c, t, "1")
        return count_filled(c, t) == 1 and f is not None and f[3] is None and f[2] >= 2
    wait_for(settled, 90, 0.5, f"{t}: row 1 given up, row 2 filled")
    return t


ENUM_CAST = """
CREATE TYPE @r.k AS ENUM ('a', 'b', 'c');
CREATE FUNCTION @r.kt(@r.k) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM @r.note('key cast');
    RETURN pg_catalog.format('%s', $1);
END $f$;
CREATE CAST (@r.k AS text) WITH FUNCTION @r.kt(@r.k);
"""

REQ_OPERATOR = """
CREATE FUNCTION @r.req(regclass, regclass) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM @r.note('operator =(regclass, regclass)');
    RETURN $1::oid OPERATOR(pg_catalog.=) $2::oid;
END $f$"""


@pytest.fixture
def admin(cluster):
    with cluster.connect() as conn:
        yield conn


# ---------------------------------------------------------------------------------------------
# adversarial: hostile table owners


def test_attack_cast_on_key_type_in_claim(cluster, admin):
    """Issue 12.1: the claim evaluates key::text; the owner's cast on its enum key must run as the owner."""
    r = "tb_keycast"
    before = hostile(admin, cluster, r)
    t = f"{r}.t"
    with cluster.connect(user=r) as c:
        c.execute(ENUM_CAST.replace("@r", r))
        c.execute(f"CREATE TABLE {t} (id {r}.k PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 4, mode => 'manual')")
        c.execute(f"INSERT INTO {t} VALUES ('a', %s), ('b', %s)", (data(A), data(B)))
    # claimed by a superuser's fill (or by the worker's pass, whose rows fill waits for): either
    # way in a session of postgres, never of the owner; nothing is left to do when fill returns
    admin.execute(f"CALL doppler.fill('{t}')")
    assert count_filled(admin, t) == 2
    assert_ran(admin, r, "key cast", su="postgres")
    assert_contained(admin, r, before, require=("key cast",))


def test_attack_cast_on_key_type_changed_after_watch_in_search(cluster, admin):
    """similar/duplicates evaluate key::text: after the owner changes its key to an enum with a cast,
    a superuser's or a reader's search must not run that cast with their rights."""
    r = "tb_keysearch"
    reader = "tb_keysearch_reader"
    before = hostile(admin, cluster, r)
    fresh_role(admin, reader)
    reader_before = snapshot(admin, reader)
    t = f"{r}.t"
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE TABLE {t} (id text PRIMARY KEY, img bytea, d_hash text, features real[])")
        c.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'd_hash', batch_size => 4, mode => 'manual')")
        c.execute(f"INSERT INTO {t} VALUES ('a', %s), ('b', %s)", (data(A), data(A)))
        c.execute(f"CALL doppler.fill('{t}')")  # (nothing left to do when it returns)
        assert c.execute(f"SELECT count(features), count(d_hash) FROM {t}").fetchone() == (2, 2)
        # now the key becomes an enum whose cast to text is the payload
        c.execute(ENUM_CAST.replace("@r", r))
        c.execute(f"ALTER TABLE {t} ALTER COLUMN id TYPE {r}.k USING id::{r}.k")
        c.execute(f"GRANT SELECT ON {t} TO PUBLIC")
    q = f"SELECT row_key FROM doppler.similar('{t}', (SELECT features FROM {t} LIMIT 1), 2)"
    d = f"SELECT size, row_keys FROM doppler.duplicates('{t}')"
    assert sorted(k for k, in admin.execute(q).fetchall()) == ["a", "b"]
    assert [(n, sorted(k)) for n, k in admin.execute(d).fetchall()] == [(2, ["a", "b"])]
    # the keys above came through the owner's cast, run in the superuser's backend as the owner
    assert_ran(admin, r, "key cast", pid=admin.info.backend_pid)
    with cluster.connect(user=reader) as rc:
        assert sorted(k for k, in rc.execute(q).fetchall()) == ["a", "b"]
        assert [(n, sorted(k)) for n, k in rc.execute(d).fetchall()] == [(2, ["a", "b"])]
        assert_ran(admin, r, "key cast", pid=rc.info.backend_pid, su=reader)
    assert snapshot(admin, reader) == reader_before
    assert_contained(admin, r, before, require=("key cast",))


def test_attack_model_column_cast_in_status(cluster, admin):
    """Issue 12.3, then 28.4: the model column becomes an enum with an implicit cast to text after
    watch. The status counts would go through that cast in every reader's session: the type change
    ends the watch instead (a WARNING), and no reader (the owner, a superuser, a stranger, a
    reader) runs the cast through doppler."""
    r = "tb_counts"
    reader = "tb_counts_reader"
    before = hostile(admin, cluster, r)
    fresh_role(admin, reader)
    reader_before = snapshot(admin, reader)
    t = f"{r}.t"
    what = "model column cast"

    def counts(conn):
        return conn.execute("""SELECT model, total, done, pending, failed, stale, skipped FROM doppler.status
                               WHERE table_name::oid = %s::regclass::oid""", (t,)).fetchall()
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 4, mode => 'manual')")
        c.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s)", (data(A), data(B)))
        c.execute(f"CALL doppler.fill('{t}')")
        assert count_filled(c, t) == 2  # (nothing left to do when fill returns)
        tag = c.execute(f"SELECT DISTINCT features_model FROM {t}").fetchone()[0]
        assert counts(c) == [(tag, 2, 2, 0, 0, 0, 0)]
        c.execute(f"CREATE TYPE {r}.mk AS ENUM ('{tag}')")
        # (declared IMMUTABLE, a lie: the pending index's predicate compares the model column
        # with '!failed', and PostgreSQL takes only immutable functions there)
        c.execute(f"""CREATE FUNCTION {r}.mkt({r}.mk) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $f$
                      BEGIN PERFORM {r}.note('model column cast'); RETURN pg_catalog.format('%s', $1); END $f$""")
        c.execute(f"CREATE CAST ({r}.mk AS text) WITH FUNCTION {r}.mkt({r}.mk) AS IMPLICIT")
        warnings = []
        c.add_notice_handler(lambda d: warnings.append(str(d.message_primary)))
        c.execute(f"ALTER TABLE {t} ALTER COLUMN features_model TYPE {r}.mk USING features_model::{r}.mk")
        assert [w for w in warnings if f"doppler no longer watches {t}" in w and "features_model is" in w], warnings
        assert counts(c) == []
        code, _ = error_of(c, f"CALL doppler.fill('{t}')")
        assert code == "42704"
        c.execute(f"GRANT SELECT ON {t} TO {reader}")
    readers = [admin.info.backend_pid]
    assert counts(admin) == []
    with cluster.connect(user=reader) as rc:
        readers.append(rc.info.backend_pid)
        assert counts(rc) == []
    ran = admin.execute(f"SELECT count(*) FROM {r}.log WHERE what = %s AND pid = ANY (%s)", (what, readers)).fetchone()[0]
    assert ran == 0, "a reader ran the owner's cast"
    assert snapshot(admin, reader) == reader_before
    assert_contained(admin, r, before)


@pytest.mark.parametrize("call", ["unwatch", "retry_failed", "fill", "watch"])
def test_attack_operator_on_callers_search_path(cluster, admin, call):
    """Issue 12.2: an exact =(regclass, regclass) in the caller's own schema, first on its search_path,
    must never run as the extension owner (doppler's catalog statements must not resolve names
    through the caller's search_path)."""
    r = f"tb_op_{call}"
    before = hostile(admin, cluster, r)
    with cluster.connect(user=r) as c:
        t = make_failing_table(c, r)
        c.execute(REQ_OPERATOR.replace("@r", r))
        c.execute(f"CREATE OPERATOR {r}.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = {r}.req)")
        c.execute(f"SET search_path = {r}, pg_catalog")
        try:
            if call == "unwatch":
                assert c.execute(f"SELECT doppler.unwatch('{t}')").fetchone()[0] is True
            elif call == "retry_failed":
                assert c.execute(f"SELECT doppler.retry_failed('{t}')").fetchone()[0] == 1
            elif call == "fill":
                c.execute(f"CALL doppler.fill('{t}')")
            else:
                c.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 2, mode => 'manual')")
        finally:
            c.execute("RESET search_path")
    assert_contained(admin, r, before)


def test_attack_power_on_callers_search_path(cluster, admin):
    """Issue 12.2: an exact power(int, int) on the caller's search_path must not run as the extension
    owner when a retried row fails again (the backoff computation)."""
    r = "tb_op_power"
    before = hostile(admin, cluster, r)
    with cluster.connect(user=r) as c:
        t = make_failing_table(c, r)
        oid = oid_of(c, t)
        c.execute(f"""CREATE FUNCTION {r}.power(integer, integer) RETURNS double precision LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {r}.note('power(int, int)'); RETURN pg_catalog.power($1::float8, $2::float8); END $f$""")
        c.execute(f"SET search_path = {r}, pg_catalog")
        try:
            # one transaction: the worker (woken by retry_failed) cannot take the row first
            with c.transaction():
                assert c.execute(f"SELECT doppler.retry_failed('{t}')").fetchone()[0] == 1
                claimed, filled, failed, _ = c.execute("SELECT * FROM doppler._fill_batch(%s::oid, NULL::int)", (oid,)).fetchone()
                assert (claimed, failed) == (1, 1)
        finally:
            c.execute("RESET search_path")
        assert failure(c, t, "1")[2] == 1  # retried: attempts reset, failed once more
    assert_contained(admin, r, before)


def test_attack_operator_in_public_schema_reaches_worker(cluster, admin):
    """A role allowed to CREATE in public (a common grant) plants =(regclass, regclass) there: the
    worker's search_path includes public, so its statements must not resolve operators through it."""
    r = "tb_pub"
    before = hostile(admin, cluster, r)
    admin.execute(f"GRANT CREATE ON SCHEMA public TO {r}")
    try:
        with cluster.connect(user=r) as c:
            t = make_failing_table(c, r)
            c.execute(REQ_OPERATOR.replace("@r", r))
            c.execute(f"CREATE OPERATOR public.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = {r}.req)")
            c.execute(f"INSERT INTO {t} VALUES (3, %s)", (data(B),))

            def worker_passed():
                admin.execute("SELECT doppler.wake()")
                if admin.execute(f"SELECT count(*) FROM {r}.log WHERE cu <> %s", (r,)).fetchone()[0]:
                    return True  # escalated already: stop waiting
                return count_filled(c, t) == 2
            wait_for(worker_passed, 150, 0.5, "the worker fills row 3")
    finally:
        admin.execute("DROP OPERATOR IF EXISTS public.= (regclass, regclass)")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {r}")
    assert_contained(admin, r, before)


def test_attack_domain_check_on_key_in_sync_claim(cluster, admin):
    """The sync trigger claims the statement's rows by key, cast to the key's type: a domain with a
    CHECK function on the key must run it as the owner. Sync mode must work with such a key."""
    r = "tb_domkey"
    before = hostile(admin, cluster, r)
    t = f"{r}.t"
    with cluster.connect(user=r) as c:
        c.execute(f"""CREATE FUNCTION {r}.chk(integer) RETURNS boolean LANGUAGE plpgsql AS $f$
                      BEGIN RETURN {r}.note('domain check'); END $f$""")
        c.execute(f"CREATE DOMAIN {r}.dk AS integer CHECK ({r}.chk(VALUE))")
        c.execute(f"CREATE TABLE {t} (id {r}.dk PRIMARY KEY, img bytea, features real[])")
        # watched with its schema off the search_path, so that doppler records the key type
        # schema-qualified (with it on the path, see test_plain_owner_sync_with_domain_key)
        c.execute("SET search_path = pg_catalog")
        c.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 4, mode => 'sync')")
        c.execute("RESET search_path")
        c.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s)", (data(A), data(B)))
        assert count_filled(c, t) == 2  # filled in the statement
    assert_contained(admin, r, before, require=("domain check",))


def test_attack_objects_on_watched_table(cluster, admin):
    """Triggers, rules, RLS policies (forced), index expressions and domains with CHECK functions on
    columns changed after watch, all on a watched table that the worker, fill, a superuser's
    status/similar/duplicates go through: every one runs as the owner only."""
    r = "tb_objects"
    before = hostile(admin, cluster, r)
    t = f"{r}.t"
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
        c.execute(f"GRANT SELECT ON {t} TO PUBLIC")
        c.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'd_hash', dedup => true, batch_size => 4)")
        # trigger
        c.execute(f"""CREATE FUNCTION {r}.trg() RETURNS trigger LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {r}.note('trigger'); RETURN NEW; END $f$""")
        c.execute(f"CREATE TRIGGER hostile BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {r}.trg()")
        # rule
        c.execute(f"CREATE TABLE {r}.sink (x boolean)")
        c.execute(f"CREATE RULE hostile AS ON UPDATE TO {t} DO ALSO INSERT INTO {r}.sink VALUES ({r}.note('rule'))")
        # row-level security, forced on the owner too
        c.execute(f"""CREATE FUNCTION {r}.pol(integer) RETURNS boolean LANGUAGE plpgsql AS $f$
                      BEGIN RETURN {r}.note('policy'); END $f$""")
        c.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
        c.execute(f"ALTER TABLE {t} FORCE ROW LEVEL SECURITY")
        c.execute(f"CREATE POLICY hostile ON {t} USING ({r}.pol(id)) WITH CHECK (true)")
        # index expression over the model column (rewritten with every vector)
        c.execute(f"""CREATE FUNCTION {r}.ix(text) RETURNS text IMMUTABLE LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {r}.note('index expression'); RETURN $1; END $f$""")
        c.execute(f"CREATE INDEX hostile ON {t} ({r}.ix(features_model))")
        c.execute(f"INSERT INTO {t} (id, img) VALUES (1, %s), (2, %s), (3, %s)", (data(A), data(A), data(B)))
        wait_filled(c, t, 3, waker=admin)
        wait_for(lambda: c.execute(f"SELECT count(d_hash) FROM {t}").fetchone()[0] == 3, 60, 0.5, "hashes")
        c.execute(f"TRUNCATE {r}.log")  # from here on: only what doppler runs for others
        c.execute(f"INSERT INTO {t} (id, img) VALUES (4, %s)", (data(C),))
        wait_filled(c, t, 4, waker=admin)
    admin.execute(f"CALL doppler.fill('{t}')")
    admin.execute("SELECT * FROM doppler.status").fetchall()
    assert len(admin.execute(f"SELECT * FROM doppler.similar('{t}', (SELECT features::real[] FROM {t} WHERE id = 3), 3)").fetchall()) == 3
    assert (2, ["1", "2"]) in [(g[0], sorted(g[1])) for g in admin.execute(f"SELECT size, row_keys FROM doppler.duplicates('{t}')").fetchall()]
    assert_contained(admin, r, before, require=("trigger", "rule", "policy"))
    # column types changed after watch to domains with CHECK functions: not types doppler fills,
    # so the watch ends (a WARNING) instead of running the domains' code for others
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE DOMAIN {r}.vd AS real[] CHECK (VALUE IS NULL OR {r}.note('vector domain'))")
        warnings = []
        c.add_notice_handler(lambda d: warnings.append(str(d.message_primary)))
        c.execute(f"ALTER TABLE {t} ALTER COLUMN features TYPE {r}.vd")
        assert [w for w in warnings if f"doppler no longer watches {t}" in w], warnings
    assert admin.execute("SELECT count(*) FROM doppler.watched WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0
    assert_contained(admin, r, before)


def test_search_refuses_a_reader_that_row_level_security_limits(cluster, admin):
    """similar/duplicates scan as the owner; a reader whose rows row-level security limits would
    see rows hidden from it that way, so it is refused (42501); a reader the policy does not
    limit, and the owner, get their results."""
    fresh_role(admin, "tb_rls")
    fresh_role(admin, "tb_rls_reader")
    t = "tb_rls.t"
    with cluster.connect(user="tb_rls") as c:
        c.execute("GRANT USAGE ON SCHEMA tb_rls TO tb_rls_reader")
        c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
        c.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s)", (data(A), data(A)))
        c.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'd_hash', mode => 'manual')")
        c.execute(f"CALL doppler.fill('{t}')")  # (waits for rows the worker's pass holds)
        assert count_filled(c, t) == 2
        c.execute(f"GRANT SELECT ON {t} TO tb_rls_reader")
        q = f"SELECT * FROM doppler.similar('{t}', (SELECT features FROM {t} WHERE id = 1), 5)"
        with cluster.connect(user="tb_rls_reader") as reader:
            assert len(reader.execute(q).fetchall()) == 2  # no row-level security yet
            c.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
            c.execute(f"CREATE POLICY only_one ON {t} USING (id = 1)")
            assert reader.execute(f"SELECT count(*) FROM {t}").fetchone()[0] == 1
            for sql in [q, f"SELECT * FROM doppler.duplicates('{t}')"]:
                code, text = error_of(reader, sql)
                assert code == "42501" and "row-level security" in text, (sql, code, text)
        assert len(c.execute(q).fetchall()) == 2  # the owner is not limited by its policy
        assert [g[1] for g in c.execute(f"SELECT group_id, size FROM doppler.duplicates('{t}')").fetchall()] == [2]


# ---------------------------------------------------------------------------------------------
# adversarial: the worker as a target (found by the review of the first fix)


def test_attack_schema_owner_swaps_the_victims_table_under_the_worker(cluster, admin):
    """A role that owns the schema of a superuser's watched table renames that schema from its
    own batch (its cast runs in the worker, first by priority) and puts its own table under the
    old name: the worker must not then run the attacker's cast as the victim's owner."""
    r = "tb_swap"
    before = hostile(admin, cluster, r)
    admin.execute("DROP SCHEMA IF EXISTS tb_swapv CASCADE")
    admin.execute("DROP SCHEMA IF EXISTS tb_swapv_old CASCADE")
    admin.execute(f"CREATE SCHEMA tb_swapv AUTHORIZATION {r}")
    admin.execute(f"GRANT CREATE ON DATABASE doppler_it TO {r}")  # to make the look-alike schema
    admin.execute("CREATE TABLE tb_swapv.imgs (id int PRIMARY KEY, img bytea, features real[])")  # owned by postgres
    admin.execute("INSERT INTO tb_swapv.imgs VALUES (1, %s)", (data(B),))
    admin.execute("SELECT doppler.watch('tb_swapv.imgs', 'img', mode => 'manual')")
    with cluster.connect(user=r) as c:
        c.execute(f"""
            CREATE TYPE {r}.k AS ENUM ('a', 'b');
            CREATE FUNCTION {r}.kt({r}.k) RETURNS text LANGUAGE plpgsql AS $f$
            BEGIN
                PERFORM {r}.note('key cast');
                IF current_user OPERATOR(pg_catalog.=) '{r}' AND NOT EXISTS (
                       SELECT FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'tb_swapv_old') THEN
                    EXECUTE 'ALTER SCHEMA tb_swapv RENAME TO tb_swapv_old';
                    EXECUTE 'CREATE SCHEMA tb_swapv';
                    EXECUTE 'CREATE TABLE tb_swapv.imgs (id {r}.k PRIMARY KEY, img bytea, features real[], features_model text)';
                    EXECUTE 'INSERT INTO tb_swapv.imgs SELECT id, img FROM {r}.bait';
                END IF;
                RETURN pg_catalog.format('%s', $1);
            END $f$;
            CREATE CAST ({r}.k AS text) WITH FUNCTION {r}.kt({r}.k)""")
        c.execute(f"CREATE TABLE {r}.bait (id {r}.k PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{r}.bait', 'img', mode => 'manual', priority => 100)")
        c.execute(f"INSERT INTO {r}.bait VALUES ('a', %s)", (data(A),))
    # the worker fills the bait (and swaps), then the victim under its real name
    wait_filled(admin, f"{r}.bait", 1, waker=admin)
    assert admin.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'tb_swapv_old'").fetchone()[0] == 1
    wait_filled(admin, "tb_swapv_old.imgs", 1, waker=admin)
    assert admin.execute("SELECT count(features) FROM tb_swapv.imgs").fetchone()[0] == 0
    assert_contained(admin, r, before, require=("key cast",))


def test_attack_operator_in_public_reaches_a_superusers_fill(cluster, admin):
    """fill cannot pin its search_path (it commits): an exact operator a role plants in public
    must not run when a superuser calls fill with the default search_path."""
    r = "tb_pubop"
    before = hostile(admin, cluster, r)
    admin.execute(f"GRANT CREATE ON SCHEMA public TO {r}")
    try:
        with cluster.connect(user=r) as c:
            for op, left, right, body in [("/", "bigint", "double precision", "$1::float8 OPERATOR(pg_catalog./) $2"),
                                          ("*", "numeric", "bigint", "$1 OPERATOR(pg_catalog.*) $2::numeric"),
                                          (">", "double precision", "integer", "$1 OPERATOR(pg_catalog.>) $2::float8")]:
                fn = f"public.tb_pubop_{['div', 'mul', 'gt'][['/', '*', '>'].index(op)]}"
                ret = "boolean" if op == ">" else ("numeric" if left == "numeric" else "double precision")
                c.execute(f"""CREATE FUNCTION {fn}({left}, {right}) RETURNS {ret} LANGUAGE plpgsql AS $f$
                              BEGIN PERFORM {r}.note('operator {op}'); RETURN {body}; END $f$""")
                c.execute(f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})")
        admin.execute("DROP SCHEMA IF EXISTS tb_su CASCADE")
        admin.execute("CREATE SCHEMA tb_su")
        admin.execute("CREATE TABLE tb_su.t (id int PRIMARY KEY, img bytea, features real[])")
        admin.execute("SELECT doppler.watch('tb_su.t', 'img', mode => 'manual')")
        admin.execute("INSERT INTO tb_su.t VALUES (1, %s), (2, %s)", (data(A), data(B)))
        assert admin.execute("SHOW search_path").fetchone()[0] == '"$user", public'
        admin.execute("CALL doppler.fill('tb_su.t')")  # (nothing left to do when it returns)
        assert count_filled(admin, "tb_su.t") == 2
    finally:
        for fn in ["tb_pubop_div(bigint, double precision)", "tb_pubop_mul(numeric, bigint)",
                   "tb_pubop_gt(double precision, integer)"]:
            admin.execute(f"DROP FUNCTION IF EXISTS public.{fn} CASCADE")  # and its operator
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {r}")
    assert_contained(admin, r, before)


def test_partitions_of_another_owner_are_refused(cluster, admin):
    """A partition owned by another role would have its triggers run with the parent owner's
    rights: watch refuses such a table, and a batch refuses it when ownership changes later."""
    r = "tb_tenant"
    before = hostile(admin, cluster, r)
    admin.execute("DROP SCHEMA IF EXISTS tb_pt CASCADE")
    admin.execute("CREATE SCHEMA tb_pt")
    admin.execute(f"GRANT USAGE ON SCHEMA tb_pt TO {r}")
    admin.execute("CREATE TABLE tb_pt.parent (id int PRIMARY KEY, img bytea, features real[]) PARTITION BY RANGE (id)")
    admin.execute("CREATE TABLE tb_pt.c1 PARTITION OF tb_pt.parent FOR VALUES FROM (0) TO (100)")
    admin.execute(f"ALTER TABLE tb_pt.c1 OWNER TO {r}")
    code, text = error_of(admin, "SELECT doppler.watch('tb_pt.parent', 'img', mode => 'manual')")
    assert code == "42501" and "tb_pt.c1" in text and "another owner" in text, (code, text)
    # watched while one owner held everything; the partition is given away afterwards
    admin.execute("ALTER TABLE tb_pt.c1 OWNER TO postgres")
    admin.execute("SELECT doppler.watch('tb_pt.parent', 'img', mode => 'manual')")
    admin.execute(f"ALTER TABLE tb_pt.c1 OWNER TO {r}")
    with cluster.connect(user=r) as c:
        c.execute(f"""CREATE FUNCTION {r}.trg() RETURNS trigger LANGUAGE plpgsql AS $f$
                      BEGIN PERFORM {r}.note('partition trigger'); RETURN NEW; END $f$""")
        c.execute(f"CREATE TRIGGER hostile BEFORE UPDATE ON tb_pt.c1 FOR EACH ROW EXECUTE FUNCTION {r}.trg()")
    admin.execute("INSERT INTO tb_pt.parent VALUES (1, %s)", (data(A),))
    code, text = error_of(admin, "CALL doppler.fill('tb_pt.parent')")
    assert code == "42501" and "another owner" in text, (code, text)
    admin.execute("SELECT doppler.wake()")
    wait_for(lambda: "tb_pt.c1, a partition or child table of tb_pt.parent, has another owner" in cluster.log(),
             60, 0.5, "the worker's refusal in the log")
    assert admin.execute("SELECT count(features) FROM tb_pt.parent").fetchone()[0] == 0
    assert_contained(admin, r, before)


def test_worker_is_not_stalled_by_an_owner(cluster, admin):
    """An owner who holds its (high-priority) table locked, or whose trigger sleeps, cannot stop the
    worker from filling other owners' tables: the worker skips a locked table and cancels a batch
    after doppler.worker_batch_timeout. Advisory locks the owner's code takes do not stay with it."""
    for r in ("tb_locker", "tb_sleeper", "tb_patient"):
        fresh_role(admin, r)
    set_system(admin, cluster, worker_batch_timeout="3s")
    CANCELLED = ("doppler worker: error while filling tb_sleeper.t, batch rolled back:"
                 " canceling statement due to statement timeout")
    cancelled_before = cluster.log().count(CANCELLED)
    try:
        with cluster.connect(user="tb_locker") as lk, cluster.connect(user="tb_sleeper") as sl, \
                cluster.connect(user="tb_patient") as v:
            lk.execute("CREATE TABLE tb_locker.t (id int PRIMARY KEY, img bytea, features real[])")
            lk.execute("SELECT doppler.watch('tb_locker.t', 'img', priority => 100)")
            sl.execute("CREATE TABLE tb_sleeper.t (id int PRIMARY KEY, img bytea, features real[])")
            sl.execute("""CREATE FUNCTION tb_sleeper.slow() RETURNS trigger LANGUAGE plpgsql AS $f$
                          BEGIN PERFORM pg_catalog.pg_advisory_lock(424242); PERFORM pg_catalog.pg_sleep(600); RETURN NEW; END $f$""")
            sl.execute("CREATE TRIGGER slow BEFORE UPDATE ON tb_sleeper.t FOR EACH ROW EXECUTE FUNCTION tb_sleeper.slow()")
            sl.execute("SELECT doppler.watch('tb_sleeper.t', 'img', priority => 50)")
            sl.execute("INSERT INTO tb_sleeper.t VALUES (1, %s)", (data(A),))
            v.execute("CREATE TABLE tb_patient.t (id int PRIMARY KEY, img bytea, features real[])")
            v.execute("SELECT doppler.watch('tb_patient.t', 'img')")
            with lk.transaction():
                lk.execute("INSERT INTO tb_locker.t VALUES (1, %s)", (data(B),))
                lk.execute("LOCK TABLE tb_locker.t IN ACCESS EXCLUSIVE MODE")
                v.execute("INSERT INTO tb_patient.t VALUES (1, %s)", (data(C),))
                wait_filled(v, "tb_patient.t", 1, timeout=90, waker=admin)
            wait_for(lambda: cluster.log().count(CANCELLED) > cancelled_before, 60, 0.5, "the sleeping batch cancelled")
            assert count_filled(sl, "tb_sleeper.t") == 0
            sl.execute("DROP TRIGGER slow ON tb_sleeper.t")
            wait_filled(sl, "tb_sleeper.t", 1, timeout=90, waker=admin)
            # the cancelled batches took the advisory lock; none of them may have left it held
            worker = admin.execute("SELECT doppler._worker_pid()").fetchone()[0]
            held = admin.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s""",
                                 (worker,)).fetchone()[0]
            assert held == 0, "the worker still holds an advisory lock a table owner's trigger took"
    finally:
        set_system(admin, cluster, worker_batch_timeout=None)


def test_a_failing_count_does_not_break_status(cluster, admin):
    """An owner's policy that raises under doppler's pinned search_path must not make doppler.status
    fail for everyone: that table shows NULL counts (and a WARNING), the others their counts."""
    r = "tb_stdos"
    fresh_role(admin, r)
    fresh_role(admin, "tb_bystander")
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE TABLE {r}.t (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"INSERT INTO {r}.t VALUES (1, NULL)")
        c.execute(f"SELECT doppler.watch('{r}.t', 'img', mode => 'manual')")
        c.execute(f"""CREATE FUNCTION {r}.boom() RETURNS boolean LANGUAGE plpgsql AS $f$
                      BEGIN IF pg_catalog.current_setting('search_path') OPERATOR(pg_catalog.=) 'pg_catalog, pg_temp' THEN
                          RAISE EXCEPTION 'no status for you'; END IF; RETURN true; END $f$""")
        c.execute(f"ALTER TABLE {r}.t ENABLE ROW LEVEL SECURITY")
        c.execute(f"ALTER TABLE {r}.t FORCE ROW LEVEL SECURITY")
        c.execute(f"CREATE POLICY p ON {r}.t USING ({r}.boom())")
        c.execute(f"GRANT SELECT ON {r}.t TO PUBLIC")
        c.execute(f"CREATE TABLE {r}.ok (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"INSERT INTO {r}.ok VALUES (1, NULL), (2, NULL)")
        c.execute(f"SELECT doppler.watch('{r}.ok', 'img', mode => 'manual')")
        c.execute(f"GRANT SELECT ON {r}.ok TO PUBLIC")
    with cluster.connect(user="tb_bystander") as b:
        # the bystander may SELECT t, but row-level security is in force for it there: counted as
        # the owner, the counts would include rows its policies hide, so it sees none of t
        for conn, want in ((b, {f"{r}.ok": 2}), (admin, {f"{r}.t": None, f"{r}.ok": 2})):
            rows = dict(conn.execute(f"""SELECT table_name::text, total FROM doppler.status
                                         WHERE table_name::text LIKE '{r}.%'""").fetchall())
            assert rows == want, rows


# ---------------------------------------------------------------------------------------------
# adversarial: a hostile unrelated role against another owner's tables

SECRET_DIR = f"/nonexistent/tb_vic_secret_{uuid.uuid4().hex[:12]}"
SECRET = f"{SECRET_DIR}/private.png"
SECRET2 = f"{SECRET_DIR}/private2.png"


@pytest.fixture(scope="module")
def victim(cluster):
    """tb_vic (may read server files) owns tb_vic.t (paths, one failing on a secret path) and
    tb_vic.shared (bytea), which it lets tb_str_sel SELECT. tb_str has no rights on either;
    both strangers may look up names in schema tb_vic."""
    with cluster.connect() as admin:
        fresh_role(admin, "tb_vic", member_of=("pg_read_server_files",))
        fresh_role(admin, "tb_str")
        fresh_role(admin, "tb_str_sel")
        with cluster.connect(user="tb_vic") as v:
            v.execute("GRANT USAGE ON SCHEMA tb_vic TO tb_str, tb_str_sel")
            v.execute("CREATE TABLE tb_vic.t (id int PRIMARY KEY, f_img text, d_hash text, features real[])")
            v.execute("INSERT INTO tb_vic.t (id, f_img) VALUES (1, %s), (2, %s), (3, %s)", (A, B, SECRET))
            v.execute("SELECT doppler.watch('tb_vic.t', hash_column => 'd_hash', batch_size => 4, mode => 'manual')")
            # settled: rows 1 and 2 filled, row 3 given up (max_attempts 2), so that nothing of
            # tb_vic.t changes by itself while the strangers try their calls
            def settled():
                v.execute("CALL doppler.fill('tb_vic.t')")
                f = failure(v, "tb_vic.t", "3")
                return count_filled(v, "tb_vic.t") == 2 and f is not None and f[3] is None
            wait_for(settled, 90, 0.5, "victim filled, secret row given up")
            assert SECRET in failure(v, "tb_vic.t", "3")[5]
            v.execute("CREATE TABLE tb_vic.shared (id int PRIMARY KEY, img bytea, features real[])")
            v.execute("INSERT INTO tb_vic.shared VALUES (1, %s)", (data(C),))
            v.execute("SELECT doppler.watch('tb_vic.shared', 'img', batch_size => 4)")
            wait_filled(v, "tb_vic.shared", 1, waker=admin)
            v.execute("GRANT SELECT ON tb_vic.shared TO tb_str_sel")
        yield {
            "t": oid_of(admin, "tb_vic.t"),
            "shared": oid_of(admin, "tb_vic.shared"),
            "roles": {r: snapshot(admin, r) for r in ["tb_vic", "tb_str", "tb_str_sel"]},
        }


def victim_state(admin):
    """tb_vic.t's watch, failures, vectors, triggers and indexes (rows 10 and 11 left out: the worker may take them)."""
    return (
        admin.execute("SELECT * FROM doppler.watched WHERE relid::oid = 'tb_vic.t'::regclass::oid").fetchall(),
        admin.execute("""SELECT row_key, source, attempts, next_attempt FROM doppler.failures
                         WHERE relid::oid = 'tb_vic.t'::regclass::oid AND row_key NOT IN ('10', '11') ORDER BY row_key""").fetchall(),
        admin.execute("SELECT id, features IS NULL FROM tb_vic.t WHERE id < 10 ORDER BY id").fetchall(),
        admin.execute("""SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = 'tb_vic.t'::regclass::oid""").fetchone(),
        admin.execute("""SELECT count(*) FROM pg_catalog.pg_index WHERE indrelid = 'tb_vic.t'::regclass::oid""").fetchone(),
    )


def test_stranger_sees_no_other_owners_rows(cluster, admin, victim):
    """Issue 12.3: doppler.status/watched/batches show a role only the tables it owns or may SELECT;
    doppler.failures only those it owns."""
    problems = []
    views = [("doppler.status", "table_name"), ("doppler.watched", "relid"),
             ("doppler.batches", "relid"), ("doppler.failures", "relid")]
    with cluster.connect(user="tb_str") as s:
        for view, col in views:
            n = s.execute(f"SELECT count(*) FROM {view} WHERE {col}::oid IN (%s, %s)", (victim["t"], victim["shared"])).fetchone()[0]
            if n:
                problems.append(f"tb_str (no rights) sees {n} rows of tb_vic's tables in {view}")
            dump = s.execute(f"SELECT coalesce(string_agg(x::text, E'\\n'), '') FROM {view} x").fetchone()[0]
            if SECRET in dump or "tb_vic" in dump:
                problems.append(f"tb_str reads tb_vic's names or paths in {view}")
    with cluster.connect(user="tb_str_sel") as s:
        for view, col in views:
            n = s.execute(f"SELECT count(*) FROM {view} WHERE {col}::oid = %s", (victim["t"],)).fetchone()[0]
            if n:
                problems.append(f"tb_str_sel (no rights on tb_vic.t) sees {n} rows of it in {view}")
        for view, col in views[:2]:
            n = s.execute(f"SELECT count(*) FROM {view} WHERE {col}::oid = %s", (victim["shared"],)).fetchone()[0]
            if n != 1:
                problems.append(f"tb_str_sel (may SELECT tb_vic.shared) sees {n} rows of it in {view}, expected 1")
        done = s.execute("SELECT done FROM doppler.status WHERE table_name::oid = %s", (victim["shared"],)).fetchone()
        if done != (1,):
            problems.append(f"tb_str_sel's status of tb_vic.shared: {done}")
        if s.execute("SELECT count(*) FROM doppler.failures").fetchone()[0]:
            problems.append("tb_str_sel sees failure records of tables it does not own")
    with cluster.connect(user="tb_vic") as v:  # the owner still sees everything of its own
        for view, col in views:
            if not v.execute(f"SELECT count(*) FROM {view} WHERE {col}::oid = %s", (victim["t"],)).fetchone()[0]:
                problems.append(f"tb_vic does not see its own tb_vic.t in {view}")
    assert not problems, "\n".join(problems)


def test_stranger_cannot_use_internal_functions(cluster, admin, victim):
    """Issue 12.5: doppler._fill_rows is gone (any error, the victim's rows untouched); the other
    internal functions refuse another owner's table with 42501, leaking no path."""
    problems = []
    oid = victim["t"]
    # fresh rows of the victim's (manual: the worker takes them at its next nap at the earliest)
    with cluster.connect(user="tb_vic") as v:
        v.execute("DELETE FROM tb_vic.t WHERE id IN (10, 11)")
        v.execute("INSERT INTO tb_vic.t (id, f_img) VALUES (10, %s), (11, %s)", (C, SECRET2))
    before = victim_state(admin)
    with cluster.connect(user="tb_str") as s:
        notices = []
        s.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        pid = s.execute("SELECT pg_backend_pid()").fetchone()[0]
        for keys in (["10"], ["11"], ["10", "11", "1", "3"]):
            code, out = error_of(s, "SELECT doppler._fill_rows(%s::oid, %s::text[])", (oid, keys))
            if code is None:
                problems.append(f"tb_str's doppler._fill_rows(tb_vic.t, {keys}) succeeded: {out}")
            elif SECRET_DIR in out:
                problems.append(f"tb_str's doppler._fill_rows(tb_vic.t, {keys}) leaks the victim's path: {out}")
        calls = [
            ("_fill_batch(oid,integer)", "SELECT * FROM doppler._fill_batch(%s::oid, 4)"),
            ("_fill_wait(oid)", "SELECT doppler._fill_wait(%s::oid)"),
            ("_watch(oid,text,text,integer,integer,text,text,text,boolean,text,text)",
             "SELECT doppler._watch(%s::oid, 'f_img', 'features', 32, 0, 'async', 'raise', NULL, false, NULL, NULL)"),
            ("_unwatch(oid)", "SELECT doppler._unwatch(%s::oid)"),
            ("_retry_failed(oid)", "SELECT doppler._retry_failed(%s::oid)"),
            ("_create_index(oid,text)", "SELECT doppler._create_index(%s::oid, 'l2')"),
            ("_similar(oid,real[],integer,text)", "SELECT * FROM doppler._similar(%s::oid, array_fill(0::real, ARRAY[2048]), 5, 'l2')"),
            ("_similar(oid,real[],integer,text,text)",
             "SELECT * FROM doppler._similar(%s::oid, array_fill(0::real, ARRAY[2048]), 5, 'l2', NULL::text)"),
            ("_duplicates(oid,integer)", "SELECT * FROM doppler._duplicates(%s::oid, 4)"),
            ("_near_duplicates(oid,text,integer)", "SELECT * FROM doppler._near_duplicates(%s::oid, '0123456789abcdef', 4)"),
        ]
        for sig, sql in calls:
            name = sig.split("(")[0]
            if s.execute("SELECT to_regprocedure(%s) IS NULL", (f"doppler.{sig}",)).fetchone()[0]:
                # a renamed, dropped or re-signed function is a failure, never a silent skip: this
                # list must name every internal function that takes a table
                others = s.execute("""SELECT string_agg(p.oid::regprocedure::text, ', ') FROM pg_catalog.pg_proc p
                                      WHERE p.pronamespace = 'doppler'::regnamespace AND p.proname = %s""", (name,)).fetchone()[0]
                problems.append(f"doppler.{sig} does not exist" + (f" (now {others})" if others else "")
                                + ": update this test, so that the function it became is checked")
                continue
            code, out = error_of(s, sql, (oid,))
            if code != "42501":
                problems.append(f"tb_str's doppler.{name}(tb_vic.t): {code or 'succeeded'} (expected 42501): {out}")
            if code and SECRET_DIR in out:
                problems.append(f"tb_str's doppler.{name}(tb_vic.t) leaks the victim's path: {out}")
        if any(SECRET_DIR in n for n in notices):
            problems.append(f"notices to tb_str leak the victim's path: {notices}")
    n = admin.execute("SELECT count(*) FROM doppler.batches WHERE relid::oid = %s AND pid = %s", (oid, pid)).fetchone()[0]
    if n:
        problems.append(f"tb_str's backend ran {n} batches over tb_vic.t")
    after = victim_state(admin)
    # the worker may have filled rows 10 and 11 meanwhile (it does not record its batches under tb_str's pid)
    if after != before:
        problems.append(f"tb_vic.t changed: {before} -> {after}")
    for r, snap in victim["roles"].items():
        if snapshot(admin, r) != snap:
            problems.append(f"role {r} changed: {snap} -> {snapshot(admin, r)}")
    assert not problems, "\n".join(problems)


def test_stranger_cannot_use_public_functions_on_other_owners_tables(cluster, admin, victim):
    """The public wrappers refuse another owner's table (42501; fill without even SELECT may say the
    table is not watched, 42704) and never leak its paths; retry_failed() touches only the caller's."""
    problems = []
    before = victim_state(admin)
    with cluster.connect(user="tb_str") as s:
        notices = []
        s.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        calls = [
            ("watch", "SELECT doppler.watch('tb_vic.t')", {"42501"}),
            ("watch (mode change)", "SELECT doppler.watch('tb_vic.t', mode => 'sync')", {"42501"}),
            ("unwatch", "SELECT doppler.unwatch('tb_vic.t')", {"42501"}),
            ("retry_failed", "SELECT doppler.retry_failed('tb_vic.t')", {"42501"}),
            ("create_index", "SELECT doppler.create_index('tb_vic.t')", {"42501"}),
            ("fill", "CALL doppler.fill('tb_vic.t')", {"42501", "42704"}),
            ("similar(real[])", "SELECT * FROM doppler.similar('tb_vic.t', array_fill(0::real, ARRAY[2048]))", {"42501"}),
            ("similar(bytea)", "SELECT * FROM doppler.similar('tb_vic.t', %s::bytea)", {"42501"}),
            ("duplicates", "SELECT * FROM doppler.duplicates('tb_vic.t')", {"42501"}),
        ]
        for name, sql, want in calls:
            code, out = error_of(s, sql, (data(A),) if "%s" in sql else None)
            if code not in want:
                problems.append(f"tb_str's doppler.{name} on tb_vic.t: {code or 'succeeded'} (expected {sorted(want)}): {out}")
            if SECRET_DIR in str(out):
                problems.append(f"tb_str's doppler.{name} on tb_vic.t leaks the victim's path: {out}")
        code, out = error_of(s, "SELECT doppler.retry_failed()")
        if code is not None or out != [(0,)]:
            problems.append(f"tb_str's doppler.retry_failed() (none of its own): {code} {out}")
        if any(SECRET_DIR in n for n in notices):
            problems.append(f"notices to tb_str leak the victim's path: {notices}")
    with cluster.connect(user="tb_str_sel") as s:
        for name, sql in [("fill", "CALL doppler.fill('tb_vic.shared')"),
                          ("watch", "SELECT doppler.watch('tb_vic.shared', 'img')"),
                          ("unwatch", "SELECT doppler.unwatch('tb_vic.shared')"),
                          ("retry_failed", "SELECT doppler.retry_failed('tb_vic.shared')")]:
            code, out = error_of(s, sql)
            if code != "42501":
                problems.append(f"tb_str_sel's doppler.{name} on tb_vic.shared (it may SELECT): {code or 'succeeded'} (expected 42501): {out}")
        # reading is what SELECT allows
        code, out = error_of(s, "SELECT row_key FROM doppler.similar('tb_vic.shared', (SELECT features FROM tb_vic.shared WHERE id = 1), 1)")
        if code is not None or out != [("1",)]:
            problems.append(f"tb_str_sel's doppler.similar on tb_vic.shared (it may SELECT): {code} {out}")
    after = victim_state(admin)
    if after != before:
        problems.append(f"tb_vic.t changed: {before} -> {after}")
    assert admin.execute("SELECT count(*) FROM doppler.watched WHERE relid::oid = %s", (victim["shared"],)).fetchone()[0] == 1
    for r, snap in victim["roles"].items():
        if snapshot(admin, r) != snap:
            problems.append(f"role {r} changed: {snap} -> {snapshot(admin, r)}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# role matrix: a plain (non-superuser) owner


@pytest.fixture(scope="module")
def owners(cluster):
    with cluster.connect() as admin:
        fresh_role(admin, "tb_alice")
        fresh_role(admin, "tb_bob")
        fresh_role(admin, "tb_files", member_of=("pg_read_server_files",))
        admin.execute("GRANT USAGE ON SCHEMA tb_alice TO tb_bob")
    return ["tb_alice", "tb_bob", "tb_files"]


def close(a, b, tol=1e-4):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return a.shape == b.shape == (2048,) and np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_plain_owner_wakes_the_worker(cluster, admin, owners):
    """doppler.wake() (and the async trigger's wake at commit, which finds the worker the same way)
    must reach the worker for a plain role too, not only for roles that may see its pg_stat_activity row."""
    # (a fresh cluster's worker may still be starting)
    wait_for(lambda: admin.execute("SELECT doppler.wake()").fetchone()[0] == 1, 60, 0.2, "the worker to be up")
    with cluster.connect(user="tb_alice") as a:
        assert a.execute("SELECT doppler.wake()").fetchone()[0] == 1


@pytest.mark.parametrize("vtype", ["real[]", "vector(2048)"])
def test_plain_owner_async_worker_search_unwatch(cluster, admin, owners, vtype):
    if vtype != "real[]" and not cluster.has_pgvector():
        pytest.skip("pgvector ships with the PostgreSQL 18 build only")
    t = "tb_alice.async_" + ("real" if vtype == "real[]" else "vector")
    with cluster.connect(user="tb_alice") as a:
        a.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features {vtype})")
        a.execute(f"SELECT doppler.watch('{t}', 'img', batch_size => 2)")
        assert a.execute("SELECT mode FROM doppler.watched WHERE relid::oid = %s::regclass::oid", (t,)).fetchone() == ("async",)
        a.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s), (3, %s)", (data(A), data(B), data(C)))
        wait_filled(a, t, 3, waker=admin)
        for got, want in a.execute(f"SELECT features::real[], doppler.extract_features(img) FROM {t}").fetchall():
            assert close(got, want, 1e-5)
        total, done, pending, failed = a.execute(
            "SELECT total, done, pending, failed FROM doppler.status WHERE table_name::oid = %s::regclass::oid", (t,)).fetchone()
        assert (total, done, pending, failed) == (3, 3, 0, 0)
        assert a.execute("SELECT sum(filled) FROM doppler.batches WHERE relid::oid = %s::regclass::oid", (t,)).fetchone()[0] == 3
        assert a.execute("SELECT count(*) FROM doppler.watched WHERE relid::oid = %s::regclass::oid", (t,)).fetchone()[0] == 1
        if vtype != "real[]":
            assert a.execute(f"SELECT doppler.create_index('{t}')").fetchone()[0]
        rows = a.execute(f"SELECT row_key, distance FROM doppler.similar('{t}', (SELECT features::real[] FROM {t} WHERE id = 2), 3)").fetchall()
        assert len(rows) == 3 and rows[0][0] == "2" and rows[0][1] < 1e-2
        rows = a.execute(f"SELECT row_key FROM doppler.similar('{t}', %s::bytea, 1)", (data(C),)).fetchall()
        assert rows == [("3",)]
        assert a.execute(f"SELECT doppler.unwatch('{t}')").fetchone()[0] is True
        assert a.execute("SELECT count(*) FROM doppler.watched WHERE relid::oid = %s::regclass::oid", (t,)).fetchone()[0] == 0
        assert count_filled(a, t) == 3  # vectors stay


def test_plain_owner_sync_and_insert_only_writer(cluster, owners):
    t = "tb_alice.sync"
    with cluster.connect(user="tb_alice") as a:
        a.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[])")
        a.execute(f"SELECT doppler.watch('{t}', 'img', mode => 'sync', batch_size => 2)")
        a.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s), (3, %s)", (data(A), data(B), data(C)))
        assert count_filled(a, t) == 3  # in the statement
        a.execute(f"GRANT INSERT ON {t} TO tb_bob")
        with cluster.connect(user="tb_bob") as b:
            b.execute(f"INSERT INTO {t} VALUES (4, %s)", (data(B),))
        assert count_filled(a, t) == 4  # bob's statement filled it, as alice
        rows = a.execute(f"SELECT features, doppler.extract_features(img) FROM {t} WHERE id IN (2, 4)").fetchall()
        assert all(close(x, y, 1e-5) for x, y in rows)
        # on_error raise: a bad image fails the statement
        code, out = error_of(a, f"INSERT INTO {t} VALUES (5, %s)", (corrupt(),))
        assert code == "22P03", out
        # on_error defer: the row goes in, its failure is recorded
        a.execute(f"SELECT doppler.watch('{t}', 'img', mode => 'sync', on_error => 'defer', batch_size => 2)")
        a.execute(f"INSERT INTO {t} VALUES (5, %s), (6, %s)", (corrupt(), data(A)))
        assert count_filled(a, t) == 5
        f = failure(a, t, "5")
        assert f is not None and f[0] == "corrupt" and f[1] == "22P03", f


def test_plain_owner_sync_with_domain_key(cluster, owners):
    """Sync mode with a key of the owner's own type, watched with the owner's default search_path
    ("$user", public: the type's schema is on it)."""
    t = "tb_alice.sync_dk"
    with cluster.connect(user="tb_alice") as a:
        a.execute("CREATE DOMAIN tb_alice.dk AS integer CHECK (VALUE > 0)")
        a.execute(f"CREATE TABLE {t} (id tb_alice.dk PRIMARY KEY, img bytea, features real[])")
        a.execute(f"SELECT doppler.watch('{t}', 'img', mode => 'sync', batch_size => 2)")
        code, out = error_of(a, f"INSERT INTO {t} VALUES (1, %s), (2, %s)", (data(A), data(B)))
        assert code is None, f"sync INSERT into a table keyed by a domain: {code} {out}"
        assert count_filled(a, t) == 2


def test_plain_owner_manual_fill_failures_retry(cluster, admin, owners):
    t = "tb_alice.manual"
    with cluster.connect(user="tb_alice") as a:
        a.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, features real[])")
        a.execute(f"SELECT doppler.watch('{t}', 'img', mode => 'manual', batch_size => 2)")
        assert a.execute("SELECT mode FROM doppler.watched WHERE relid::oid = %s::regclass::oid", (t,)).fetchone() == ("manual",)
        a.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s), (3, %s)", (data(A), data(B), corrupt()))
        # nothing is left to do when fill returns but row 3, waiting for its retry
        a.execute(f"CALL doppler.fill('{t}')")
        assert count_filled(a, t) == 2
        f = failure(a, t, "3")
        assert f is not None and f[0] == "corrupt" and f[1] == "22P03" and "JPEG" in f[4], f
        assert a.execute("SELECT count(*) FROM doppler.batches WHERE relid::oid = %s::regclass::oid AND via = 'fill'",
                         (t,)).fetchone()[0] >= 1

        def given_up():
            a.execute(f"CALL doppler.fill('{t}')")
            f = failure(a, t, "3")
            return f[2] == 2 and f[3] is None
        wait_for(given_up, 60, 0.5, "failure given up")
        assert a.execute("SELECT failed FROM doppler.status WHERE table_name::oid = %s::regclass::oid", (t,)).fetchone()[0] == 1
        assert a.execute(f"SELECT doppler.retry_failed('{t}')").fetchone()[0] == 1
        assert a.execute("SELECT doppler.retry_failed()").fetchone()[0] >= 1  # all of alice's tables
        a.execute(f"UPDATE {t} SET img = %s WHERE id = 3", (data(C),))
        a.execute(f"CALL doppler.fill('{t}')")  # (the batch that fills row 3 deletes its record)
        assert count_filled(a, t) == 3
        assert failure(a, t, "3") is None


def test_plain_owner_dedup_and_duplicates(cluster, admin, owners):
    t = "tb_alice.dedup"
    with cluster.connect(user="tb_alice") as a:
        v = a.execute("SELECT doppler.extract_features(%s::bytea)", (data(B),)).fetchone()[0]
        assert len(v) == 2048
        a.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, img bytea, d_hash text, features real[])")
        a.execute(f"SELECT doppler.watch('{t}', 'img', hash_column => 'd_hash', dedup => true, mode => 'manual', batch_size => 8)")
        a.execute(f"INSERT INTO {t} VALUES (1, %s), (2, %s), (3, %s), (4, %s)", (data(A), data(A), data(A), data(B)))
        a.execute(f"CALL doppler.fill('{t}')")  # (nothing left to do when it returns)
        assert count_filled(a, t) == 4
        rows = dict(a.execute(f"SELECT id, features FROM {t}").fetchall())
        assert rows[1] == rows[2] == rows[3] and close(rows[4], v, 1e-5)
        hashes = dict(a.execute(f"SELECT id, d_hash FROM {t}").fetchall())
        assert all(hashes.values()) and hashes[1] == hashes[2] == hashes[3]
        assert a.execute("SELECT inferences_saved FROM doppler.status WHERE table_name::oid = %s::regclass::oid", (t,)).fetchone()[0] >= 1
        groups = a.execute(f"SELECT size, row_keys FROM doppler.duplicates('{t}')").fetchall()
        assert groups[0][0] == 3 and sorted(groups[0][1]) == ["1", "2", "3"]
        rows = a.execute(f"SELECT row_key FROM doppler.similar('{t}', %s::real[], 3)", (v,)).fetchall()
        assert rows[0] == ("4",)


def test_plain_owner_path_column_needs_file_privilege(cluster, admin, owners):
    with cluster.connect(user="tb_alice") as a:
        a.execute("CREATE TABLE tb_alice.paths (id int PRIMARY KEY, f_img text, features real[])")
        code, out = error_of(a, "SELECT doppler.watch('tb_alice.paths')")
        assert code == "42501" and "may not read server files" in out, out
    with cluster.connect(user="tb_files") as f:
        f.execute("CREATE TABLE tb_files.paths (id int PRIMARY KEY, f_img text, features real[])")
        f.execute("INSERT INTO tb_files.paths VALUES (1, %s), (2, %s)", (A, B))
        f.execute("SELECT doppler.watch('tb_files.paths')")
        wait_filled(f, "tb_files.paths", 2, waker=admin)


def test_plain_role_can_drop_tables(cluster, admin):
    """Issue 12.4: any role can DROP its tables, watched or not; a watched one is forgotten."""
    r = "tb_drop"
    fresh_role(admin, r)
    with cluster.connect(user=r) as c:
        c.execute(f"CREATE TABLE {r}.plain (id int PRIMARY KEY)")
        code, out = error_of(c, f"DROP TABLE {r}.plain")
        assert code is None, f"a plain role cannot drop its own unwatched table: {code} {out}"
        c.execute(f"CREATE TABLE {r}.w (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{r}.w', 'img', mode => 'manual')")
        c.execute(f"INSERT INTO {r}.w VALUES (1, %s), (2, %s)", (data(A), corrupt()))
        c.execute(f"CALL doppler.fill('{r}.w')")  # (and waits for rows the worker's pass holds)
        oid = oid_of(c, f"{r}.w")
        assert failure(c, f"{r}.w", "2") is not None
        code, out = error_of(c, f"DROP TABLE {r}.w")
        assert code is None, f"a plain role cannot drop its own watched table: {code} {out}"
        c.execute(f"CREATE TABLE {r}.w2 (id int PRIMARY KEY, img bytea, features real[])")
        c.execute(f"SELECT doppler.watch('{r}.w2', 'img', mode => 'manual')")
        oid2 = oid_of(c, f"{r}.w2")
        code, out = error_of(c, f"DROP SCHEMA {r} CASCADE")
        assert code is None, f"a plain role cannot drop its own schema: {code} {out}"
    for view in ["doppler.watched", "doppler.failures", "doppler.batches"]:
        n = admin.execute(f"SELECT count(*) FROM {view} WHERE relid::oid IN (%s, %s)", (oid, oid2)).fetchone()[0]
        assert n == 0, f"{view} still has {n} rows of dropped tables"
