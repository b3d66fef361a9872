-- doppler 0.9.0 -> 0.10.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.10.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.10.0'" to load this file. \quit

-- More than one machine (README): external workers (doppler-worker).
-- The model file's SHA-256, recorded at registration: workers check their copy against it.
ALTER TABLE @extschema@.models ADD COLUMN sha256 text CHECK (sha256 ~ '^[0-9a-f]{64}$');
CREATE OR REPLACE FUNCTION @extschema@._models_merge() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE @extschema@.models m
       SET onnx_path = NEW.onnx_path, input_size = NEW.input_size, resize = NEW.resize, divisor = NEW.divisor,
           mean = NEW.mean, std = NEW.std, dim = NEW.dim, version = NEW.version,
           description = coalesce(NEW.description, m.description), registered_at = NEW.registered_at,
           sha256 = NEW.sha256
     WHERE m.name = NEW.name
       -- only the entry as CREATE EXTENSION made it: any other write of a built-in name is checked
       -- as before (a changed entry is changed by register_model, which checks its version)
       AND ((m.name = 'resnet50' AND m.onnx_path IS NULL AND m.version = '1' AND m.dim = 2048)
            OR (m.name = 'efficientnet_lite0' AND m.onnx_path = '$sharedir/doppler/efficientnet-lite0.onnx'
                AND m.version = '1' AND m.dim = 1280));
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;

-- Who fills a table in the background: the server's worker, external workers, or both.
ALTER TABLE @extschema@.watched
    ADD COLUMN workers text NOT NULL DEFAULT 'server' CHECK (workers IN ('server', 'external', 'any'));

-- External workers (doppler-worker processes on other hosts, 0.10.0): one row per registered
-- process, written only through doppler.worker_register / worker_heartbeat / worker_unregister;
-- shown by the doppler.workers view. Forgotten a day after their last heartbeat.
CREATE TABLE @extschema@.external_workers (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    role           oid NOT NULL,    -- the role that registered it (the only one that may use the id)
    host           text NOT NULL,
    pid            int NOT NULL,
    provider       text NOT NULL,
    version        text NOT NULL,
    backend_pid    int NOT NULL,    -- its control connection's server process
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    holding        regclass,        -- the table whose rows it holds now
    holding_rows   int NOT NULL DEFAULT 0,
    holding_since  timestamptz,
    rows_done      bigint NOT NULL DEFAULT 0,
    rows_failed    bigint NOT NULL DEFAULT 0,
    rate           real,            -- rows/s over its last minute
    last_error     text,
    last_error_at  timestamptz
);
COMMENT ON TABLE @extschema@.external_workers IS 'External doppler-worker processes, as they registered and last reported; read doppler.workers.';

CREATE FUNCTION @extschema@."_model_sha256"(
	"name" TEXT /* & str */
) RETURNS TEXT /* Option < String > */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_model_sha256_wrapper';

CREATE FUNCTION @extschema@."_watch_workers"(
	"relid" oid, /* pg_sys :: Oid */
	"workers" TEXT, /* & str */
	"described" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_watch_workers_wrapper';

CREATE FUNCTION @extschema@."worker_backlog"(
	"cap" bigint DEFAULT 1000000 /* i64 */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_backlog_wrapper';

CREATE FUNCTION @extschema@."worker_claim"(
	"worker" bigint, /* i64 */
	"max_rows" INT DEFAULT 32, /* i32 */
	"skip" oid[] DEFAULT '{}' /* Vec < pg_sys :: Oid > */
) RETURNS TABLE (
	"n" INT,  /* i32 */
	"tbl" TEXT,  /* String */
	"model" jsonb,  /* JsonB */
	"source" TEXT,  /* Option < String > */
	"image" bytea  /* :: std :: option :: Option < Vec < u8 > > */
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_claim_wrapper';

CREATE FUNCTION @extschema@."worker_heartbeat"(
	"worker" bigint, /* i64 */
	"state" jsonb /* JsonB */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_heartbeat_wrapper';

CREATE FUNCTION @extschema@."worker_register"(
	"host" TEXT, /* & str */
	"pid" INT, /* i32 */
	"provider" TEXT, /* & str */
	"version" TEXT /* & str */
) RETURNS TABLE (
	"id" bigint,  /* i64 */
	"settings" jsonb  /* JsonB */
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_register_wrapper';

CREATE FUNCTION @extschema@."worker_unregister"(
	"worker" bigint /* i64 */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_unregister_wrapper';

CREATE FUNCTION @extschema@."worker_write"(
	"worker" bigint, /* i64 */
	"sha256" TEXT, /* & str */
	"n" INT[], /* Vec < i32 > */
	"vectors" real[], /* Vec < f32 > */
	"hashes" TEXT[] DEFAULT '{}', /* Vec < Option < String > > */
	"failures" jsonb DEFAULT '[]' /* JsonB */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_write_wrapper';

CREATE OR REPLACE FUNCTION @extschema@.register_model(name text, onnx_path text, dim int, input_size int DEFAULT 224,
                                           divisor float8 DEFAULT 255,
                                           mean float8[] DEFAULT '{0.485,0.456,0.406}',
                                           std float8[] DEFAULT '{0.229,0.224,0.225}',
                                           resize text DEFAULT 'bilinear', version text DEFAULT '1',
                                           description text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE tag text;
BEGIN
    -- vectors are tagged name@version: another file or preprocessing needs another version
    IF EXISTS (SELECT FROM @extschema@.models m
               WHERE m.name = register_model.name AND m.version = register_model.version
                 AND (m.onnx_path IS DISTINCT FROM register_model.onnx_path
                      OR m.input_size <> register_model.input_size OR m.resize <> register_model.resize
                      OR m.divisor <> register_model.divisor::real OR m.mean <> register_model.mean::real[]
                      OR m.std <> register_model.std::real[] OR m.dim <> register_model.dim)) THEN
        RAISE EXCEPTION 'model "%" version % is registered with another file or preprocessing', name, version
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Register it with a new version => ''...'': the tables that use it are then re-embedded.';
    END IF;
    INSERT INTO @extschema@.models AS m (name, onnx_path, input_size, resize, divisor, mean, std, dim, version, description)
    VALUES (register_model.name, register_model.onnx_path, register_model.input_size, register_model.resize,
            register_model.divisor, register_model.mean, register_model.std, register_model.dim,
            register_model.version, register_model.description)
    ON CONFLICT ON CONSTRAINT models_pkey DO UPDATE
       SET onnx_path = EXCLUDED.onnx_path, input_size = EXCLUDED.input_size, resize = EXCLUDED.resize,
           divisor = EXCLUDED.divisor, mean = EXCLUDED.mean, std = EXCLUDED.std, dim = EXCLUDED.dim,
           version = EXCLUDED.version, description = coalesce(EXCLUDED.description, m.description),
           registered_at = now();
    -- load it now: a wrong file, shape or dim fails here, not in the worker
    tag := @extschema@._check_model(register_model.name);
    -- and record its file's SHA-256: external workers check their copy against it
    UPDATE @extschema@.models m SET sha256 = @extschema@._model_sha256(register_model.name)
     WHERE m.name = register_model.name;
    -- tables of this model re-embed when its version changed
    PERFORM @extschema@.wake();
    RETURN tag;
END $$;

DROP FUNCTION @extschema@.watch(regclass, name, name, int, int, text, text, name, boolean, text, name);
CREATE FUNCTION @extschema@.watch(tbl regclass, path_column name DEFAULT 'f_img', vector_column name DEFAULT 'features',
                                  batch_size int DEFAULT 32, priority int DEFAULT 0,
                                  mode text DEFAULT 'async', on_error text DEFAULT 'raise',
                                  hash_column name DEFAULT NULL, dedup boolean DEFAULT false,
                                  model text DEFAULT NULL, model_column name DEFAULT NULL,
                                  workers text DEFAULT 'server')
RETURNS text LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN @extschema@._watch_workers(tbl::oid, coalesce(workers, 'server'),
        @extschema@._watch(tbl::oid, coalesce(path_column, 'f_img')::text, coalesce(vector_column, 'features')::text,
                           coalesce(batch_size, 32), coalesce(priority, 0), coalesce(mode, 'async'), coalesce(on_error, 'raise'),
                           hash_column::text, coalesce(dedup, false), model, model_column::text));
END $$;
COMMENT ON FUNCTION @extschema@.watch(regclass, name, name, int, int, text, text, name, boolean, text, name, text) IS
  'Watch a table: doppler fills vector_column (real[], vector(n) or halfvec(n)) from path_column (text: server paths or URLs; bytea: image bytes) for every row whose vector is NULL or was made by another model. model: a doppler.models entry (default doppler.default_model); model_column (default <vector_column>_model, added as text when missing) records name@version per row, so watching again with another model (or registering a new version) re-embeds the rows in the background, old vectors readable until replaced. mode: async (triggers wake the worker), sync (features computed in the writing statement; on_error raise or defer), manual (worker and fill only). workers: who fills it in the background: server (the server''s worker, the default), external (doppler-worker processes on other hosts, members of doppler_worker) or any. hash_column: a text column the worker fills with each image''s dHash; dedup: rows whose hash already has features get a copy, rows with a skip hash (doppler.skip_hashes) are skipped. The caller must own the table; it needs a primary key. Calling it again changes the settings and replaces the triggers.';

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
       w.backoff_until AS worker_backoff_until,
       w.workers,
       (SELECT coalesce(sum(e.holding_rows), 0) FROM @extschema@.external_workers e
         WHERE e.holding OPERATOR(pg_catalog.=) w.relid
           AND e.heartbeat_at OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) '30 seconds'::pg_catalog.interval))
         AS external_claimed
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
  'Per watched table: its model (name@version), rows in all, filled by that model (done), still to do (pending, including retrying and stale), given up (failed), waiting for a retry (retrying), with a vector of an older model, readable until re-embedded (stale), NULL source or skip hash (skipped), model runs saved by dedup (inferences_saved, over the kept batch log), last batch, images/s over the last 5 minutes, the worker''s pid, and whether the counts are exact (exact): tables over doppler.status_exact_rows rows get the planner''s row estimate, exact pending counts through the pending index, and done derived from both; counts are NULL for a table locked by someone, or whose reading would run its owner''s code in the reader''s session (row-level security forced on its owner). worker_overruns: the worker''s batches of the table in a row that overran doppler.worker_batch_timeout; worker_backoff_until: after an overrun, the worker leaves the table alone until then. workers: who fills it in the background (server, external, any); external_claimed: rows external workers hold now, as their heartbeats report them.';

-- External workers (README: More than one machine): members of this role may claim rows of the
-- tables whose owners allowed external workers (watch(..., workers => 'external' | 'any')) and
-- write their features, through doppler.worker_* only; no privilege on any user table.
-- A role of that name made by someone else first (a CREATEROLE user, to hold it with ADMIN and
-- grant it to itself) is refused, not adopted. (Its members are kept: an install in another
-- database of the cluster made it, and the DBA granted them.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'doppler_worker') THEN
        CREATE ROLE doppler_worker NOLOGIN;
    ELSIF EXISTS (SELECT FROM pg_catalog.pg_roles r
                  WHERE r.rolname = 'doppler_worker'
                    AND (r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls
                         OR r.rolreplication
                         OR EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                                    JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) m.member
                                    WHERE m.roleid OPERATOR(pg_catalog.=) r.oid AND m.admin_option AND NOT a.rolsuper)
                         OR EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                                    WHERE m.member OPERATOR(pg_catalog.=) r.oid))) THEN
        RAISE EXCEPTION 'role doppler_worker exists and is not the plain NOLOGIN group doppler makes'
              USING ERRCODE = 'duplicate_object',
                    HINT = 'It can log in, has attributes, is a member of a role, or a role other than a superuser may administer it: drop it (or fix it) and install again.';
    END IF;
END $$;
COMMENT ON ROLE doppler_worker IS 'Members may run doppler-worker: claim rows of the tables whose owners allowed external workers and write their features (doppler.worker_claim, worker_write).';

CREATE VIEW @extschema@.workers AS
SELECT e.id, pg_catalog.pg_get_userbyid(e.role) AS role, e.host, e.pid, e.provider, e.version,
       e.started_at, e.heartbeat_at AS last_heartbeat,
       e.heartbeat_at OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) '30 seconds'::pg_catalog.interval) AS alive,
       e.holding, e.holding_rows, e.holding_since,
       e.rows_done, e.rows_failed, e.rate, e.last_error, e.last_error_at, e.backend_pid
FROM @extschema@.external_workers e;
COMMENT ON VIEW @extschema@.workers IS
  'External doppler-worker processes: host, pid, execution provider, version, when it started and last reported (alive: within 30 s; it reports every 10 s), the table and rows it holds now and since when, rows done and failed since it started, rows/s over its last minute, and its last error. Readable by pg_monitor and doppler_worker members.';
GRANT SELECT ON @extschema@.workers TO pg_monitor, doppler_worker;
REVOKE ALL ON @extschema@.external_workers FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_register(text, int, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_claim(bigint, int, oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_heartbeat(bigint, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_unregister(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_backlog(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.worker_register(text, int, text, text), @extschema@.worker_claim(bigint, int, oid[]),
      @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb), @extschema@.worker_heartbeat(bigint, jsonb),
      @extschema@.worker_unregister(bigint), @extschema@.worker_backlog(bigint) TO doppler_worker;
REVOKE ALL ON FUNCTION @extschema@._model_sha256(text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.worker_register(text, int, text, text) IS
  'For doppler-worker (members of doppler_worker): registers a worker process; returns its id and the server''s settings it works under (image limits, URL policy, heartbeat interval, lease).';
COMMENT ON FUNCTION @extschema@.worker_claim(bigint, int, oid[]) IS
  'For doppler-worker, in a transaction block: a batch of one table whose owner allowed external workers (up to max_rows; tables in skip passed over), locked until the transaction ends (its idle_in_transaction_session_timeout lowered to doppler.worker_lease): each row''s number, the table, the model (file name, SHA-256, preprocessing, dim) and its source (path or URL) or image bytes.';
COMMENT ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb) IS
  'For doppler-worker, in the claiming transaction: the features (flat, rows x dim) and dHashes of rows n of the batch it holds, and its failures ([{"n", "kind", "message", "retry_after_s"}]); refused unless sha256 is the model file''s recorded SHA-256. Rows neither written nor failed go back to the queue at commit. Returns the rows written.';
COMMENT ON FUNCTION @extschema@.worker_heartbeat(bigint, jsonb) IS
  'For doppler-worker: what it holds now (holding_table, holding_rows), its totals (rows_done, rows_failed), rate and last_error; shown by doppler.workers.';
COMMENT ON FUNCTION @extschema@.worker_unregister(bigint) IS 'For doppler-worker: forgets a worker that stops cleanly.';
COMMENT ON FUNCTION @extschema@.worker_backlog(bigint) IS
  'Rows waiting for external workers, over the tables that allow them (up to cap per table, plus failed rows due for a retry): the query for an autoscaler such as KEDA''s postgresql trigger.';
