-- Hand-written SQL run at the end of CREATE EXTENSION doppler (after the generated functions).

-- A model run costs milliseconds to seconds: tell the planner, so it evaluates as few as it can.
ALTER FUNCTION @extschema@.extract_features(text) COST 10000;
ALTER FUNCTION @extschema@.extract_features(bytea) COST 10000;

COMMENT ON FUNCTION @extschema@.extract_features(text) IS
  'Features of the image file at an absolute server path (superusers and pg_read_server_files members only), computed by the model in doppler.model_path with the seed''s ResNet50 preprocessing.';
COMMENT ON FUNCTION @extschema@.extract_features(bytea) IS
  'Features of image bytes (JPEG, PNG, GIF, WebP, BMP, TIFF), computed by the model in doppler.model_path.';
COMMENT ON FUNCTION @extschema@.session_info() IS
  'This backend''s ONNX Runtime session: model, execution provider, input size, dimensions, threads, sessions created.';

-- Watching tables. Ownership and column checks happen in the Rust functions, with the
-- caller's rights; these wrappers give the SQL signatures.
CREATE FUNCTION @extschema@.watch(tbl regclass, path_column name DEFAULT 'f_img', vector_column name DEFAULT 'features',
                                  batch_size int DEFAULT 32, priority int DEFAULT 0,
                                  mode text DEFAULT 'async', on_error text DEFAULT 'raise')
RETURNS text LANGUAGE sql VOLATILE STRICT PARALLEL UNSAFE
RETURN @extschema@._watch(tbl::oid, path_column::text, vector_column::text, batch_size, priority, mode, on_error);
COMMENT ON FUNCTION @extschema@.watch(regclass, name, name, int, int, text, text) IS
  'Watch a table: doppler fills vector_column (real[], vector(n) or halfvec(n)) from path_column (text: server paths; bytea: image bytes) for every row whose vector is NULL. mode: async (triggers wake the worker), sync (features computed in the writing statement; on_error raise or defer), manual (worker and fill only). The caller must own the table; it needs a primary key. Calling it again changes the settings and replaces the triggers.';

-- Trigger functions (installed by watch; see src/triggers.rs).
CREATE FUNCTION @extschema@._clear_stale() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- the source changed: the old vector is stale; any column type takes a NULL this way
    NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], NULL));
    RETURN NEW;
END $$;

CREATE FUNCTION @extschema@._wake_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @extschema@._wake_at_commit();
    RETURN NULL;
END $$;

CREATE FUNCTION @extschema@._sync_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE keys text[];
BEGIN
    -- TG_ARGV: key expression over alias n, source column, vector column
    EXECUTE format('SELECT array_agg(%s) FROM new_rows n WHERE n.%I IS NOT NULL AND n.%I IS NULL',
                   TG_ARGV[0], TG_ARGV[1], TG_ARGV[2]) INTO keys;
    IF keys IS NOT NULL THEN
        PERFORM @extschema@._fill_rows(TG_RELID, keys);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION @extschema@.unwatch(tbl regclass) RETURNS boolean
LANGUAGE sql VOLATILE STRICT PARALLEL UNSAFE
RETURN @extschema@._unwatch(tbl::oid);
COMMENT ON FUNCTION @extschema@.unwatch(regclass) IS
  'Stop watching a table. Its vectors stay; its failure records and batch log are removed.';

CREATE FUNCTION @extschema@.retry_failed(tbl regclass DEFAULT NULL) RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
RETURN @extschema@._retry_failed(tbl::oid);
COMMENT ON FUNCTION @extschema@.retry_failed(regclass) IS
  'Make failed rows due now, with their attempts reset (all of the caller''s tables when tbl is NULL); wakes the worker. Returns how many rows.';

COMMENT ON FUNCTION @extschema@.wake() IS
  'Wake this database''s doppler worker now instead of at its next nap. Returns how many workers were woken.';

-- Row counts of one watched table (a full scan: the status view is for people, not hot paths).
CREATE FUNCTION @extschema@._counts(tbl regclass, OUT total bigint, OUT done bigint, OUT skipped bigint)
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE w @extschema@.watched;
BEGIN
    SELECT * INTO w FROM @extschema@.watched WHERE relid = tbl;
    IF NOT FOUND THEN RETURN; END IF;
    EXECUTE format('SELECT count(*), count(%1$I), count(*) FILTER (WHERE %1$I IS NULL AND %2$I IS NULL) FROM %3$s',
                   w.vector_column, w.source_column, tbl)
       INTO total, done, skipped;
END $$;

CREATE VIEW @extschema@.status AS
SELECT w.relid AS table_name,
       c.total,
       c.done,
       c.total - c.done - c.skipped - coalesce(f.failed, 0) AS pending,
       coalesce(f.failed, 0) AS failed,
       coalesce(f.retrying, 0) AS retrying,
       c.skipped,
       b.last_batch_at,
       b.recent_images_per_sec,
       (SELECT min(a.pid) FROM pg_catalog.pg_stat_activity a
         WHERE a.backend_type = 'doppler worker' AND a.datname = pg_catalog.current_database()) AS worker_pid
FROM @extschema@.watched w
CROSS JOIN LATERAL @extschema@._counts(w.relid) c
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE next_attempt IS NULL) AS failed,
           count(*) FILTER (WHERE next_attempt IS NOT NULL) AS retrying
    FROM @extschema@.failures x WHERE x.relid = w.relid) f ON true
LEFT JOIN LATERAL (
    SELECT max(finished_at) AS last_batch_at,
           round((sum(filled) FILTER (WHERE finished_at > now() - interval '5 minutes')
                  / nullif(sum(seconds) FILTER (WHERE finished_at > now() - interval '5 minutes'), 0))::numeric, 2)
             AS recent_images_per_sec
    FROM @extschema@.batches y WHERE y.relid = w.relid) b ON true;
COMMENT ON VIEW @extschema@.status IS
  'Per watched table: rows in all, filled (done), still to do (pending, including retrying), given up (failed), waiting for a retry (retrying), NULL source (skipped), last batch, images/s over the last 5 minutes, the worker''s pid.';

-- Foreground fill: one committed batch after another, with a NOTICE per batch.
-- (No SET search_path: a procedure with one cannot COMMIT; every name below is qualified.)
CREATE PROCEDURE @extschema@.fill(tbl regclass, max_rows int DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    total bigint;
    done_before bigint;
    filled bigint := 0;
    failed bigint := 0;
    t0 timestamptz := clock_timestamp();
    secs float8;
    rate float8;
    todo bigint;
BEGIN
    SELECT s.total, s.done INTO total, done_before FROM @extschema@.status s WHERE s.table_name = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched by doppler', tbl USING ERRCODE = 'undefined_object',
              HINT = 'Call doppler.watch(' || quote_literal(tbl::text) || ') first.';
    END IF;
    LOOP
        EXIT WHEN max_rows IS NOT NULL AND filled + failed >= max_rows;
        SELECT * INTO r FROM @extschema@._fill_batch(tbl::oid, CASE WHEN max_rows IS NULL THEN NULL ELSE (max_rows - filled - failed)::int END);
        EXIT WHEN r.claimed = 0;
        filled := filled + r.filled;
        failed := failed + r.failed;
        COMMIT;
        secs := extract(epoch FROM clock_timestamp() - t0);
        rate := filled / nullif(secs, 0);
        todo := greatest(total - done_before - filled - failed, 0);
        RAISE NOTICE 'doppler.fill %: % / % done (% %%), % failed, % images/s, ETA %',
            tbl, done_before + filled, total,
            round(100.0 * (done_before + filled) / nullif(total, 0), 1),
            failed, round(rate::numeric, 2),
            CASE WHEN rate > 0 THEN make_interval(secs => round(todo / rate)) END;
    END LOOP;
    RAISE NOTICE 'doppler.fill %: finished, % filled, % failed in % s', tbl, filled, failed, round(extract(epoch FROM clock_timestamp() - t0)::numeric, 1);
END $$;
COMMENT ON PROCEDURE @extschema@.fill(regclass, int) IS
  'Fill the vector column of a watched table in the foreground, committing each batch; NOTICE per batch with progress, images/s and ETA. CALL it outside a transaction block.';

-- Forget a dropped table.
CREATE FUNCTION @extschema@._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE o record;
BEGIN
    FOR o IN SELECT objid FROM pg_event_trigger_dropped_objects() WHERE classid = 'pg_class'::regclass AND objsubid = 0 LOOP
        DELETE FROM @extschema@.watched WHERE relid = o.objid;
        DELETE FROM @extschema@.failures WHERE relid = o.objid;
        DELETE FROM @extschema@.batches WHERE relid = o.objid;
    END LOOP;
END $$;
CREATE EVENT TRIGGER doppler_forget_dropped_tables ON sql_drop EXECUTE FUNCTION @extschema@._on_drop();

-- Privileges: anyone may read the catalog and status; changes go through the functions, which
-- check table ownership.
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;
GRANT SELECT ON @extschema@.watched, @extschema@.status, @extschema@.batches TO PUBLIC;
-- Failure records name paths: each role sees those of the tables it owns.
GRANT SELECT ON @extschema@.failures TO PUBLIC;
ALTER TABLE @extschema@.failures ENABLE ROW LEVEL SECURITY;
CREATE POLICY failures_of_own_tables ON @extschema@.failures FOR SELECT
    USING (pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = relid), 'USAGE'));

