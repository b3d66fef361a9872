-- doppler 0.7.0 -> 0.8.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.8.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.8.0'" to load this file. \quit

-- A table whose worker batch overruns doppler.worker_batch_timeout is backed off (README:
-- Security, between owners).
ALTER TABLE @extschema@.watched
    ADD COLUMN overruns int NOT NULL DEFAULT 0,
    ADD COLUMN backoff_until timestamptz;

-- Types in SQL bodies parsed when they run are named with their schema (the caller's
-- search_path must not choose them).
CREATE OR REPLACE FUNCTION @extschema@.similar(tbl regclass, query text, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql VOLATILE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::pg_catalog.oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::pg_catalog.text) s $$;
CREATE OR REPLACE FUNCTION @extschema@.similar(tbl regclass, query bytea, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::pg_catalog.oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::pg_catalog.text) s $$;
CREATE OR REPLACE FUNCTION @extschema@.similar(tbl regclass, query real[], k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT * FROM @extschema@._similar(tbl::pg_catalog.oid, query, k, metric, filter::pg_catalog.text) $$;
CREATE OR REPLACE FUNCTION @extschema@.duplicates(tbl regclass, max_bits int DEFAULT 4)
RETURNS TABLE (group_id int, size int, row_keys text[], hashes text[])
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._duplicates(tbl::pg_catalog.oid, max_bits) $$;
CREATE OR REPLACE FUNCTION @extschema@.near_duplicates(tbl regclass, hash text, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::pg_catalog.oid, hash, max_bits) $$;
CREATE OR REPLACE FUNCTION @extschema@.near_duplicates(tbl regclass, image bytea, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::pg_catalog.oid, @extschema@.dhash(image), max_bits) $$;

CREATE OR REPLACE PROCEDURE @extschema@.fill(tbl regclass, max_rows int DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    r pg_catalog.record;
    total pg_catalog.int8;
    done_before pg_catalog.int8;
    filled pg_catalog.int8 := 0;
    failed pg_catalog.int8 := 0;
    t0 pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    left_rows pg_catalog.int4;
BEGIN
    SELECT s.total, s.done INTO total, done_before FROM @extschema@.status s
     WHERE s.table_name::pg_catalog.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched by doppler', tbl USING ERRCODE = 'undefined_object',
              HINT = pg_catalog.format('Call doppler.watch(%L) first.', tbl);
    END IF;
    LOOP
        left_rows := @extschema@._fill_left(max_rows, filled, failed);
        EXIT WHEN left_rows OPERATOR(pg_catalog.=) 0;
        SELECT * INTO r FROM @extschema@._fill_batch(tbl::pg_catalog.oid, left_rows);
        IF r.claimed OPERATOR(pg_catalog.=) 0 THEN
            -- nothing to claim: wait for the rows others hold (the worker's batch, another fill),
            -- and go on while their holders leave rows to do. In a transaction of its own: the
            -- batch's ROW EXCLUSIVE lock on the table, and what it wrote (records it forgot, the
            -- stale scan's mark, rows of doppler's catalog that a holder's batch may write), are
            -- not held while it waits.
            COMMIT;
            EXIT WHEN NOT @extschema@._fill_wait(tbl::pg_catalog.oid);
            COMMIT;
            CONTINUE;
        END IF;
        filled := filled OPERATOR(pg_catalog.+) r.filled;
        failed := failed OPERATOR(pg_catalog.+) r.failed;
        COMMIT;
        RAISE NOTICE '%', @extschema@._fill_progress(tbl, total, done_before, filled, failed, t0, false);
    END LOOP;
    RAISE NOTICE '%', @extschema@._fill_progress(tbl, total, done_before, filled, failed, t0, true);
END $$;

-- doppler.status shows the worker's overruns and back-off.
CREATE OR REPLACE VIEW @extschema@.status AS
SELECT w.relid AS table_name,
       c.model,
       c.total,
       c.done,
       c.total - c.done - c.skipped - coalesce(f.failed, 0) - coalesce(f.skip_hash, 0) AS pending,
       coalesce(f.failed, 0) AS failed,
       coalesce(f.retrying, 0) AS retrying,
       c.stale,
       c.skipped + coalesce(f.skip_hash, 0) AS skipped,
       coalesce(b.inferences_saved, 0) AS inferences_saved,
       b.last_batch_at,
       b.recent_images_per_sec,
       @extschema@._worker_pid() AS worker_pid,
       c.exact,
       w.overruns AS worker_overruns,
       w.backoff_until AS worker_backoff_until
FROM @extschema@.watched w
JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) w.relid::pg_catalog.oid
CROSS JOIN LATERAL @extschema@._status(w.relid::pg_catalog.oid) c
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE next_attempt IS NULL AND error_class <> 'skip_hash') AS failed,
           count(*) FILTER (WHERE next_attempt IS NOT NULL) AS retrying,
           count(*) FILTER (WHERE error_class = 'skip_hash') AS skip_hash
    FROM @extschema@.failures x WHERE x.relid = w.relid) f ON true
LEFT JOIN LATERAL (
    SELECT max(finished_at) AS last_batch_at, sum(deduped) AS inferences_saved,
           round((sum(filled) FILTER (WHERE finished_at > now() - interval '5 minutes')
                  / nullif(sum(seconds) FILTER (WHERE finished_at > now() - interval '5 minutes'), 0))::numeric, 2)
             AS recent_images_per_sec
    FROM @extschema@.batches y WHERE y.relid = w.relid) b ON true
WHERE pg_catalog.pg_has_role(r.relowner, 'USAGE') OR pg_catalog.has_table_privilege(r.oid, 'SELECT');
COMMENT ON VIEW @extschema@.status IS
  'Per watched table: its model (name@version), rows in all, filled by that model (done), still to do (pending, including retrying and stale), given up (failed), waiting for a retry (retrying), with a vector of an older model, readable until re-embedded (stale), NULL source or skip hash (skipped), model runs saved by dedup (inferences_saved, over the kept batch log), last batch, images/s over the last 5 minutes, the worker''s pid, and whether the counts are exact (exact): tables over doppler.status_exact_rows rows get the planner''s row estimate, exact pending counts through the pending index, and done derived from both; counts are NULL for a table locked by someone, or whose reading would run its owner''s code in the reader''s session (row-level security forced on its owner). worker_overruns: the worker''s batches of the table in a row that overran doppler.worker_batch_timeout; worker_backoff_until: after an overrun, the worker leaves the table alone until then.';

-- Temporary tables are no longer watched (their end is not an event doppler sees): watches of
-- temporary tables, and of relations that are gone (a temporary table's session ended), end.
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN
        SELECT x.relid::pg_catalog.oid AS oid, c.oid IS NULL AS gone
        FROM @extschema@.watched x
        LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.relid::pg_catalog.oid
        WHERE c.oid IS NULL OR c.relpersistence OPERATOR(pg_catalog.=) 't'
    LOOP
        RAISE WARNING 'doppler no longer watches relation %: %', w.oid,
              CASE WHEN w.gone THEN 'it no longer exists' ELSE 'it is a temporary table' END;
        DELETE FROM @extschema@.watched WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) w.oid;
        DELETE FROM @extschema@.failures WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) w.oid;
        DELETE FROM @extschema@.batches WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) w.oid;
    END LOOP;
END $$;
