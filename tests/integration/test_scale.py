"""Scale (issue 14, in part): claims cost the batch, not the table. In a database no worker serves,
so that only fill claims and the table's scan counters move only for it."""
import os
import random
import re

import psycopg
import pytest

from conftest import MODELS, fixture_paths

GOOD = [p for p in fixture_paths() if "large_" not in p]


def scans(c, table):
    c.execute("SELECT pg_stat_force_next_flush()")
    c.execute("SELECT pg_stat_clear_snapshot()")
    return c.execute("SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)).fetchone()


def test_claims_read_the_pending_index_not_the_table(noworker):
    """watch creates a partial index over the rows without a vector; once a claim has found no
    outdated vector for the model, fill reads only that index: a 20 000-row table is not scanned
    again. A new model version makes the claims look at the whole table again, and re-embed it."""
    with noworker() as c:
        c.execute("SELECT doppler.register_model('tiny_scale', %s, dim => 16)", (os.path.join(MODELS, "tiny.onnx"),))
        c.execute("CREATE TABLE sc (id int PRIMARY KEY, img text, features real[], features_model text)")
        c.execute("""INSERT INTO sc SELECT i, %s, array_fill(0.5::real, ARRAY[16]), 'tiny_scale@1'
                     FROM generate_series(1, 20000) i""", (GOOD[0],))
        c.execute("SELECT doppler.watch('sc', 'img', model => 'tiny_scale', batch_size => 8, mode => 'manual')")
        idx = c.execute("""SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                           WHERE i.indrelid = 'sc'::regclass
                             AND obj_description(i.indexrelid, 'pg_class') LIKE 'doppler:%'""").fetchall()
        assert len(idx) == 1 and ("WHERE ((features IS NULL) AND (img IS NOT NULL) AND "
                                  "((features_model IS NULL) OR (features_model <> '!failed'::text)))") in idx[0][0], idx
        c.execute("INSERT INTO sc (id, img) SELECT i, %s FROM generate_series(20001, 20003) i", (GOOD[1],))
        c.execute("ANALYZE sc")
        c.execute("CALL doppler.fill('sc')")  # the pending rows, then one scan that finds nothing outdated
        assert c.execute("SELECT count(*) FROM sc WHERE features IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT stale_scan FROM doppler.watched WHERE relid = 'sc'::regclass").fetchone()[0] == "tiny_scale@1"
        before = scans(c, "sc")
        c.execute("INSERT INTO sc (id, img) SELECT i, %s FROM generate_series(20004, 20020) i", (GOOD[2],))
        # fill's batch step (fill itself also counts the table once per CALL, for its progress)
        claimed = [c.execute("SELECT claimed FROM doppler._fill_batch('sc'::regclass::oid, 8)").fetchone()[0]
                   for _ in range(4)]
        assert claimed == [8, 8, 1, 0], claimed
        after = scans(c, "sc")
        assert c.execute("SELECT count(*) FROM sc WHERE features IS NULL").fetchone()[0] == 0
        assert after[0] == before[0], f"the table was scanned: {before} -> {after}"
        assert after[1] >= before[1] + 4, (before, after)
        # a new version of the model: every vector is outdated, and claims find them again
        c.execute("SELECT doppler.register_model('tiny_scale', %s, dim => 16, version => '2')",
                  (os.path.join(MODELS, "tiny.onnx"),))
        c.execute("CALL doppler.fill('sc', max_rows => 16)")
        assert c.execute("SELECT count(*) FROM sc WHERE features_model = 'tiny_scale@2'").fetchone()[0] == 16
        assert c.execute("SELECT stale_scan FROM doppler.watched WHERE relid = 'sc'::regclass").fetchone()[0] == "tiny_scale@1"
        # unwatch drops the index
        c.execute("SELECT doppler.unwatch('sc')")
        assert c.execute("""SELECT count(*) FROM pg_index i WHERE i.indrelid = 'sc'::regclass
                            AND obj_description(i.indexrelid, 'pg_class') LIKE 'doppler:%'""").fetchone()[0] == 0


def index_reads(c, index):
    c.execute("SELECT pg_stat_force_next_flush()")
    c.execute("SELECT pg_stat_clear_snapshot()")
    return c.execute("SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelid = %s::regclass",
                     (index,)).fetchone()[0]


def test_failed_rows_leave_the_pending_index(noworker):
    """A row that failed is held back (its model column says '!failed'): out of the pending
    index, so 2 000 given-up rows cost a claim nothing, and the table is not scanned. A changed
    image, a changed key or retry_failed brings a row back; a due record of a row that is gone is
    forgotten; status counts held rows as failed, exactly and estimated; unwatch clears the
    marks. As a plain owner of a bytea table."""
    n = 2000
    good = open(GOOD[0], "rb").read()
    with noworker() as c:
        plain_owner(c, "fl_owner")
        c.execute("SELECT doppler.register_model('tiny_fl', %s, dim => 16)", (os.path.join(MODELS, "tiny.onnx"),))
        c.execute("SET doppler.max_attempts = 1")  # given up at the first failure
        c.execute("SET ROLE fl_owner")
        c.execute("CREATE TABLE fl_owner.fl (id int PRIMARY KEY, img bytea, features real[], features_model text)")
        c.execute("INSERT INTO fl_owner.fl SELECT i, '\\x00010203'::bytea FROM generate_series(1, %s::int) i", (n,))
        c.execute("SELECT doppler.watch('fl_owner.fl', 'img', model => 'tiny_fl', batch_size => 64, mode => 'async')")
        c.execute("CALL doppler.fill('fl_owner.fl')")

        def counts():
            return c.execute("""SELECT (SELECT count(*) FROM fl_owner.fl WHERE features_model = '!failed'),
                                       (SELECT count(*) FROM fl_owner.fl WHERE features IS NOT NULL),
                                       (SELECT count(*) FROM doppler.failures WHERE relid = 'fl_owner.fl'::regclass),
                                       (SELECT count(*) FROM doppler.failures WHERE relid = 'fl_owner.fl'::regclass
                                                                                AND next_attempt IS NULL)""").fetchone()

        def status():
            return c.execute("""SELECT total, done, pending, failed, exact FROM doppler.status
                                WHERE table_name = 'fl_owner.fl'::regclass""").fetchone()
        assert counts() == (n, 0, n, n)
        assert status() == (n, 0, 0, n, True)
        assert c.execute("SELECT stale_scan FROM doppler.watched WHERE relid = 'fl_owner.fl'::regclass").fetchone()[0] == "tiny_fl@1"
        index = c.execute("""SELECT 'fl_owner.' || quote_ident(i.indexrelid::regclass::text) FROM pg_index i
                             WHERE i.indrelid = 'fl_owner.fl'::regclass
                             AND obj_description(i.indexrelid, 'pg_class') LIKE 'doppler:%'""").fetchone()[0]

        # new rows: claims read them, not the 2 000 failed ones, and never scan the table
        c.execute("INSERT INTO fl_owner.fl (id, img) SELECT i, %s FROM generate_series(%s::int, %s::int) i", (good, n + 1, n + 17))
        c.execute("VACUUM fl_owner.fl")  # (the entries the marking left dead: autovacuum's work)
        c.execute("RESET ROLE")
        reads, table = index_reads(c, index), scans(c, "fl_owner.fl")
        c.execute("SET ROLE fl_owner")
        claimed = [c.execute("SELECT claimed FROM doppler._fill_batch('fl_owner.fl'::regclass::oid, 8)").fetchone()[0]
                   for _ in range(4)]
        assert claimed == [8, 8, 1, 0], claimed
        c.execute("RESET ROLE")
        reads_after, table_after = index_reads(c, index), scans(c, "fl_owner.fl")
        c.execute("SET ROLE fl_owner")
        assert table_after[0] == table[0], f"the table was scanned: {table} -> {table_after}"
        # (17 rows, and the entries of the rows filled by the claim before, dead until vacuumed)
        assert reads_after - reads < 100, f"claims read {reads_after - reads} index entries for 17 rows"
        assert counts() == (n, 17, n, n)

        # a new image clears the mark (and the row is filled); a held row's new key clears it too
        c.execute("UPDATE fl_owner.fl SET img = %s WHERE id = 1", (good,))
        c.execute("UPDATE fl_owner.fl SET id = 100002 WHERE id = 2")
        assert c.execute("SELECT count(*) FROM fl_owner.fl WHERE id IN (1, 100002) AND features_model IS NULL").fetchone()[0] == 2
        c.execute("CALL doppler.fill('fl_owner.fl')")
        assert c.execute("SELECT features IS NOT NULL FROM fl_owner.fl WHERE id = 1").fetchone()[0]
        assert c.execute("SELECT features_model FROM fl_owner.fl WHERE id = 100002").fetchone()[0] == "!failed"
        # (records: 3 .. n, '100002', and '2', whose row is gone)
        assert counts() == (n - 1, 18, n, n)

        # retry_failed: every record due; the rows fail again (held again), the gone row's record goes
        assert c.execute("SELECT doppler.retry_failed('fl_owner.fl')").fetchone()[0] == n
        c.execute("CALL doppler.fill('fl_owner.fl')")
        assert counts() == (n - 1, 18, n - 1, n - 1)
        assert c.execute("""SELECT count(*) FROM doppler.failures WHERE relid = 'fl_owner.fl'::regclass
                            AND row_key = '2'""").fetchone()[0] == 0
        assert status() == (n + 17, 18, 0, n - 1, True)
        # estimated: the pending index and the failure records
        c.execute("ANALYZE fl_owner.fl")
        c.execute("SET doppler.status_exact_rows = 0")
        assert status() == (n + 17, 18, 0, n - 1, False)
        c.execute("RESET doppler.status_exact_rows")

        # a row that comes in with a mark but no record (a copy): watch brings it back, the
        # rows held with records stay held
        c.execute("INSERT INTO fl_owner.fl (id, img, features_model) VALUES (300000, %s, '!failed')", (good,))
        c.execute("SELECT doppler.watch('fl_owner.fl', 'img', model => 'tiny_fl', batch_size => 64, mode => 'async')")
        assert c.execute("SELECT features_model FROM fl_owner.fl WHERE id = 300000").fetchone()[0] is None
        assert counts() == (n - 1, 18, n - 1, n - 1)

        # a due record whose key no longer fits the key's type (as after ALTER COLUMN TYPE):
        # claims go on (the keys compared as text), and the record is forgotten
        c.execute("RESET ROLE")
        c.execute("""INSERT INTO doppler.failures (relid, row_key, source, error_class, sqlstate, message, next_attempt)
                     VALUES ('fl_owner.fl', 'not-an-int', NULL, 'decode', '22P03', 'x', now() - interval '1 minute')""")
        c.execute("SET ROLE fl_owner")
        c.execute("INSERT INTO fl_owner.fl (id, img) VALUES (300001, %s)", (good,))
        # (and the row watch brought back)
        assert c.execute("SELECT claimed FROM doppler._fill_batch('fl_owner.fl'::regclass::oid, 8)").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM fl_owner.fl WHERE id >= 300000 AND features IS NOT NULL").fetchone()[0] == 2
        assert c.execute("""SELECT count(*) FROM doppler.failures WHERE relid = 'fl_owner.fl'::regclass
                            AND row_key = 'not-an-int'""").fetchone()[0] == 0

        # unwatch: no row stays marked
        c.execute("SELECT doppler.unwatch('fl_owner.fl')")
        assert c.execute("SELECT count(*) FROM fl_owner.fl WHERE features_model = '!failed'").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------
# near-duplicates, status, filtered search: answers equal to brute force, as a plain owner

SKIP = {"NOHASH", "0000000000000000", "nan"}


def plain_owner(admin, role):
    """A LOGIN role with a schema of its own, nothing more (what a table owner has)."""
    if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        admin.execute(f"DROP OWNED BY {role} CASCADE")
        admin.execute(f"DROP ROLE {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")


def hash_rows(n, seed):
    """(id, hash) rows as reposts give them: originals, and near copies with 0-8 bits flipped;
    some in upper case, some skip hashes, NULLs and strings that are no hash at all."""
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        r = rng.random()
        if r < 0.02:
            h = rng.choice(["NOHASH", "0000000000000000", "nan", None, "+123456789abcdef", "zz", "0123456789abcdef0"])
        elif r < 0.45 and rows:
            base = int(rng.choice([x for _, x in rows[-200:] if valid(x)] or ["0" * 15 + "1"]), 16)
            for _ in range(rng.randrange(0, 9)):
                base ^= 1 << rng.randrange(64)
            h = f"{base:016x}"
        else:
            h = f"{rng.getrandbits(64):016x}"
        if h and rng.random() < 0.05:
            h = h.upper()
        rows.append((i, h))
    return rows


def valid(h):
    return h is not None and re.fullmatch(r"[0-9a-fA-F]{16}", h) is not None


def brute_near(rows, q, max_bits):
    out = []
    for i, h in rows:
        if valid(h) and h not in SKIP:
            d = bin(int(h, 16) ^ int(q, 16)).count("1")
            if d <= max_bits:
                out.append((d, str(i)))
    return sorted(out)


def brute_groups(rows, max_bits):
    ok = [(str(i), h) for i, h in rows if valid(h) and h not in SKIP]
    parent = list(range(len(ok)))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    bits = [int(h, 16) for _, h in ok]
    for a in range(len(ok)):
        for b in range(a + 1, len(ok)):
            if bin(bits[a] ^ bits[b]).count("1") <= max_bits:
                parent[root(a)] = root(b)
    groups = {}
    for a, (k, _) in enumerate(ok):
        groups.setdefault(root(a), set()).add(k)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def test_near_duplicates_equal_the_exact_answer(noworker, cluster):
    """near_duplicates (with and without the hamming index, within and beyond what the index
    serves) and duplicates give exactly the brute-force answer, for a plain owner and a reader;
    the index is used."""
    with noworker() as admin:
        plain_owner(admin, "nd_owner")
        plain_owner(admin, "nd_reader")
        admin.execute("SELECT doppler.register_model('tiny_nd', %s, dim => 16)", (os.path.join(MODELS, "tiny.onnx"),))
    rows = hash_rows(4000, 14)
    with cluster.connect("doppler_noworker", user="nd_owner") as c:
        c.execute("CREATE TABLE nd_owner.nd (id int PRIMARY KEY, img bytea, f real[], d_hash text)")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO nd_owner.nd (id, d_hash) VALUES (%s, %s)", rows)
        c.execute("""SELECT doppler.watch('nd_owner.nd', 'img', vector_column => 'f', hash_column => 'd_hash',
                                          model => 'tiny_nd', mode => 'manual')""")
        c.execute("ANALYZE nd_owner.nd")
        rng = random.Random(3)
        queries = [h for _, h in rng.sample(rows, 30) if valid(h) and h not in SKIP][:20] + \
                  [f"{rng.getrandbits(64):016x}" for _ in range(5)]

        def check(max_bits_list):
            for q in queries:
                for mb in max_bits_list:
                    got = c.execute("SELECT distance, row_key FROM doppler.near_duplicates('nd_owner.nd', %s, %s)",
                                    (q, mb)).fetchall()
                    assert got == brute_near(rows, q, mb), (q, mb)
        check([0, 4, 7])
        idx = c.execute("SELECT doppler.create_index('nd_owner.nd', 'hamming')").fetchone()[0]
        assert idx == "nd_owner.nd_doppler_dhash", idx
        assert c.execute("SELECT doppler.create_index('nd_owner.nd', 'hamming')").fetchone()[0] == idx
        c.execute("SET enable_seqscan = off")  # 4 000 rows: make the planner show its hand
        before = index_scans(c, idx)
        check([0, 1, 3, 4, 5, 8, 11, 12, 20])
        # up to max_bits 11 through the index (12 and 20 scan the table)
        assert index_scans(c, idx) == before + 7 * len(queries), "the hamming index was not used"
        c.execute("RESET enable_seqscan")
        # a hash in upper case, as a query
        q = queries[0].upper()
        got = c.execute("SELECT distance, row_key FROM doppler.near_duplicates('nd_owner.nd', %s, 4)", (q,)).fetchall()
        assert got == brute_near(rows, q, 4)
        # an image as the query: its dHash
        with open(GOOD[0], "rb") as f:
            img = f.read()
        h = c.execute("SELECT doppler.dhash(%s::bytea)", (img,)).fetchone()[0]
        c.execute("INSERT INTO nd_owner.nd (id, d_hash) VALUES (100000, %s)", (h,))
        assert ("100000", 0) in c.execute(
            "SELECT row_key, distance FROM doppler.near_duplicates('nd_owner.nd', %s::bytea, 2)", (img,)).fetchall()
        c.execute("DELETE FROM nd_owner.nd WHERE id = 100000")
        # skip hashes ask nothing; bad input is a clear error
        assert c.execute("SELECT count(*) FROM doppler.near_duplicates('nd_owner.nd', 'NOHASH', 64)").fetchone()[0] == 0
        for bad, code in [("near_duplicates('nd_owner.nd', 'xyz', 4)", "22023"),
                          ("near_duplicates('nd_owner.nd', '0123456789abcdef', -1)", "22023"),
                          ("duplicates('nd_owner.nd', -1)", "22023")]:
            with pytest.raises(psycopg.Error) as e:
                c.execute(f"SELECT * FROM doppler.{bad}")
            assert e.value.sqlstate == code, e.value
        # duplicates: the same groups as comparing every pair
        for mb in [0, 4, 9]:
            got = sorted(sorted(r[0]) for r in c.execute(
                "SELECT row_keys FROM doppler.duplicates('nd_owner.nd', %s)", (mb,)).fetchall())
            assert got == brute_groups(rows, mb), mb
    # a role that may not read the table is refused; one that may gets the same answer
    with cluster.connect("doppler_noworker", user="nd_reader") as r:
        with pytest.raises(psycopg.Error) as e:
            r.execute("SELECT * FROM doppler.near_duplicates('nd_owner.nd', %s, 4)", (queries[0],))
        assert e.value.sqlstate == "42501", e.value
    with noworker() as admin:
        admin.execute("GRANT USAGE ON SCHEMA nd_owner TO nd_reader")
        admin.execute("GRANT SELECT ON nd_owner.nd TO nd_reader")
    with cluster.connect("doppler_noworker", user="nd_reader") as r:
        got = r.execute("SELECT distance, row_key FROM doppler.near_duplicates('nd_owner.nd', %s, 6)",
                        (queries[1],)).fetchall()
        assert got == brute_near(rows, queries[1], 6)
        with pytest.raises(psycopg.Error) as e:
            r.execute("SELECT doppler.create_index('nd_owner.nd', 'hamming')")
        assert e.value.sqlstate == "42501", e.value


def index_scans(c, index):
    c.execute("SELECT pg_stat_force_next_flush()")
    c.execute("SELECT pg_stat_clear_snapshot()")
    return c.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelid = %s::regclass", (index,)).fetchone()[0]


def test_status_estimates_large_tables_without_a_scan(noworker, cluster):
    """Over doppler.status_exact_rows, status reads the planner's row estimate and counts the
    pending rows through the pending index, without scanning the table; its figures agree with
    the exact count; -1 asks for exact counts."""
    with noworker() as admin:
        plain_owner(admin, "st_owner")
        admin.execute("SELECT doppler.register_model('tiny_st', %s, dim => 16)", (os.path.join(MODELS, "tiny.onnx"),))
    with open(GOOD[0], "rb") as f:
        img = f.read()
    with cluster.connect("doppler_noworker", user="st_owner") as c:
        c.execute("CREATE TABLE st_owner.st (id int PRIMARY KEY, img bytea, f real[], f_model text)")
        c.execute("""INSERT INTO st_owner.st SELECT i, '\\x00'::bytea, array_fill(0.5::real, ARRAY[16]), 'tiny_st@1'
                     FROM generate_series(1, 6000) i""")
        c.execute("INSERT INTO st_owner.st (id, img) SELECT i, %s FROM generate_series(6001, 6010) i", (img,))
        c.execute("INSERT INTO st_owner.st (id) SELECT i FROM generate_series(6011, 6100) i")  # no source
        c.execute("""SELECT doppler.watch('st_owner.st', 'img', vector_column => 'f', model_column => 'f_model',
                                          model => 'tiny_st', mode => 'manual')""")
        c.execute("CALL doppler.fill('st_owner.st')")  # the 10 pending rows; then no outdated vector is left
        c.execute("INSERT INTO st_owner.st (id, img) SELECT i, %s FROM generate_series(6101, 6140) i", (img,))
        c.execute("ANALYZE st_owner.st")
        c.execute("SET doppler.status_exact_rows = 1000")
        cols = "total, done, pending, stale, skipped, exact"
        before = scans(c, "st_owner.st")
        est = c.execute(f"SELECT {cols} FROM doppler.status WHERE table_name = 'st_owner.st'::regclass").fetchone()
        assert scans(c, "st_owner.st")[0] == before[0], "status scanned the table"
        c.execute("SET doppler.status_exact_rows = -1")
        exact = c.execute(f"SELECT {cols} FROM doppler.status WHERE table_name = 'st_owner.st'::regclass").fetchone()
        assert exact == (6140, 6010, 40, 0, 90, True), exact
        total, done, pending, stale, skipped, is_exact = est
        assert not is_exact and pending == 40 and stale == 0, est
        assert abs(total - 6140) <= 61 and abs(skipped - 90) <= 30 and abs(done - 6010) <= 91, est
