"""Scale (issue 14, in part): claims cost the batch, not the table. In a database no worker serves,
so that only fill claims and the table's scan counters move only for it."""
import os

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
        assert len(idx) == 1 and "WHERE ((features IS NULL) AND (img IS NOT NULL))" in idx[0][0], idx
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
