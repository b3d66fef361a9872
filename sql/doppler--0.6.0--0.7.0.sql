-- doppler 0.6.0 -> 0.7.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.7.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.7.0'" to load this file. \quit

-- fill waits for the rows others hold (README: Filling a table), through _fill_wait.
CREATE FUNCTION @extschema@."_fill_wait"(
	"relid" oid
) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_fill_wait_wrapper';

CREATE OR REPLACE PROCEDURE @extschema@.fill(tbl regclass, max_rows int DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    total bigint;
    done_before bigint;
    filled bigint := 0;
    failed bigint := 0;
    t0 timestamptz := pg_catalog.clock_timestamp();
    left_rows int;
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
COMMENT ON PROCEDURE @extschema@.fill(regclass, int) IS
  'Fill the vector column of a watched table in the foreground, committing each batch; NOTICE per batch with progress, images/s and ETA. Rows that others hold (the worker''s batch, another fill) are waited for, so it returns when no row is left to do but those waiting for a retry or given up. CALL it outside a transaction block.';
