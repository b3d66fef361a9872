-- Hand-written SQL run at the end of CREATE EXTENSION doppler (after the generated functions).

-- A model run costs milliseconds to seconds: tell the planner, so it evaluates as few as it can.
ALTER FUNCTION @extschema@.extract_features(text, text) COST 10000;
ALTER FUNCTION @extschema@.extract_features(bytea, text) COST 10000;

COMMENT ON FUNCTION @extschema@.extract_features(text, text) IS
  'Features of the image file at an absolute server path or an allowed http(s) URL (superusers and pg_read_server_files / doppler_url_reader members only), computed by a registered model (default doppler.default_model, i.e. the seed''s ResNet50 in doppler.model_path) with its preprocessing.';
COMMENT ON FUNCTION @extschema@.extract_features(bytea, text) IS
  'Features of image bytes (JPEG, PNG, GIF, WebP, BMP, TIFF), computed by a registered model (default doppler.default_model).';
COMMENT ON FUNCTION @extschema@.session_info() IS
  'The ONNX Runtime sessions that serve this connection, most recently used first: model, file, execution provider, input size, dimensions, threads, sessions created so far, and where model runs happen (inference: service, the server''s inference service, or backend, this connection''s own sessions).';
COMMENT ON FUNCTION @extschema@.service_status() IS
  'doppler''s inference service (doppler in shared_preload_libraries): its process, start time, starts, and the requests, images, model runs, largest run and failed requests it has served, and the requests queued and running now. No row without the service.';

-- The model registry. Registering names a file the server loads: only roles that may write
-- doppler.models (its owner, a superuser) can; anyone may read it and use its models.
CREATE FUNCTION @extschema@.register_model(name text, onnx_path text, dim int, input_size int DEFAULT 224,
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
COMMENT ON FUNCTION @extschema@.register_model(text, text, int, int, float8, float8[], float8[], text, text, text) IS
  'Register (or replace) a feature extractor: an ONNX file (one float32 input [N,3,H,W], one float32 output [N,dim] or [N,dim,1,1]) and its preprocessing: resize to input_size with PIL''s bilinear (or lanczos) filter, then ((v / divisor) - mean) / std per RGB channel (ImageNet: divisor 255 with mean/std; a scale/offset model such as (x - 127) / 128: divisor 1, mean 127, std 128). The model is loaded once to check it. A new version re-embeds the tables that use it. Returns name@version.';

-- The model a watched table uses (NULL when the table is not watched).
CREATE FUNCTION @extschema@._table_model(tbl regclass) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE
RETURN (SELECT w.model FROM @extschema@.watched w WHERE w.relid = tbl);

-- Watching tables. Ownership and column checks happen in the Rust functions, with the
-- caller's rights; these wrappers give the SQL signatures.
CREATE FUNCTION @extschema@.watch(tbl regclass, path_column name DEFAULT 'f_img', vector_column name DEFAULT 'features',
                                  batch_size int DEFAULT 32, priority int DEFAULT 0,
                                  mode text DEFAULT 'async', on_error text DEFAULT 'raise',
                                  hash_column name DEFAULT NULL, dedup boolean DEFAULT false,
                                  model text DEFAULT NULL, model_column name DEFAULT NULL,
                                  workers text DEFAULT 'server',
                                  pdq_column name DEFAULT NULL, pdq_quality_column name DEFAULT NULL)
RETURNS text LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN @extschema@._watch_workers(tbl::oid, coalesce(workers, 'server'),
        @extschema@._watch(tbl::oid, coalesce(path_column, 'f_img')::text, coalesce(vector_column, 'features')::text,
                           coalesce(batch_size, 32), coalesce(priority, 0), coalesce(mode, 'async'), coalesce(on_error, 'raise'),
                           hash_column::text, coalesce(dedup, false), model, model_column::text,
                           pdq_column::text, pdq_quality_column::text));
END $$;
COMMENT ON FUNCTION @extschema@.watch(regclass, name, name, int, int, text, text, name, boolean, text, name, text, name, name) IS
  'Watch a table: doppler fills vector_column (real[], vector(n) or halfvec(n)) from path_column (text: server paths or URLs; bytea: image bytes) for every row whose vector is NULL or was made by another model. model: a doppler.models entry (default doppler.default_model); model_column (default <vector_column>_model, added as text when missing) records name@version per row, so watching again with another model (or registering a new version) re-embeds the rows in the background, old vectors readable until replaced. mode: async (triggers wake the worker), sync (features computed in the writing statement; on_error raise or defer), manual (worker and fill only). workers: who fills it in the background: server (the server''s worker, the default), external (doppler-worker processes on other hosts, members of doppler_worker) or any. hash_column: a text column the worker fills with each image''s dHash; dedup: rows whose hash already has features get a copy, rows with a skip hash (doppler.skip_hashes) are skipped. pdq_column: a bit(256) column filled with each image''s PDQ hash (Meta''s reference, doppler.pdq), pdq_quality_column an integer column with its quality, both from the same decode as the vector. The caller must own the table; it needs a primary key. Calling it again changes the settings and replaces the triggers.';

-- Trigger functions (installed by watch; see src/triggers.rs).
-- BEFORE UPDATE OF the source, per row, when it changed: the vector, model tag and hash of the
-- old image become NULL (C, src/triggers.rs; the columns come from doppler.watched).
CREATE FUNCTION @extschema@._clear_stale() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'doppler_clear_stale';

CREATE FUNCTION @extschema@._wake_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @extschema@._wake_at_commit();
    RETURN NULL;
END $$;

-- The sync trigger is C (src/triggers.rs): it reads the statement's transition table as the
-- table owner and fills those rows; no SQL-callable function fills rows of a given table.
CREATE FUNCTION @extschema@._sync_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'doppler_sync_trigger';

CREATE FUNCTION @extschema@.unwatch(tbl regclass) RETURNS boolean
LANGUAGE sql VOLATILE STRICT PARALLEL UNSAFE
RETURN @extschema@._unwatch(tbl::oid);
COMMENT ON FUNCTION @extschema@.unwatch(regclass) IS
  'Stop watching a table. Its vectors stay; its failure records and batch log are removed.';

CREATE FUNCTION @extschema@.retry_failed(tbl regclass DEFAULT NULL) RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
RETURN @extschema@._retry_failed(tbl::oid);
COMMENT ON FUNCTION @extschema@.retry_failed(regclass) IS
  'Make failed rows due now, with their attempts reset (all of the caller''s tables when tbl is NULL), and rows marked held without a failure record to do again; wakes the worker. Returns how many failure records.';

COMMENT ON FUNCTION @extschema@.wake() IS
  'Wake this database''s doppler worker now instead of at its next nap. Returns how many workers were woken.';

-- Reverse image search and near-duplicates (Rust in src/api/search.rs).
CREATE FUNCTION @extschema@.similar(tbl regclass, query text, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql VOLATILE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::pg_catalog.oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::pg_catalog.text) s $$;
CREATE FUNCTION @extschema@.similar(tbl regclass, query bytea, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::pg_catalog.oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::pg_catalog.text) s $$;
CREATE FUNCTION @extschema@.similar(tbl regclass, query real[], k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT * FROM @extschema@._similar(tbl::pg_catalog.oid, query, k, metric, filter::pg_catalog.text) $$;
COMMENT ON FUNCTION @extschema@.similar(regclass, text, int, text, jsonb) IS
  'The k rows of a watched table nearest to the image at this server path (features by the table''s model; euclidean distance as the seed, or metric => ''cosine''; rows whose vector is from an older model are left out until re-embedded), optionally only rows whose columns equal filter''s values (filter => ''{"site": "example.org"}''). Exact scan on real[] columns; pgvector operators and its HNSW index (doppler.create_index) on vector/halfvec columns, with pgvector 0.8''s iterative scan so that filtered-out rows do not cost results.';
COMMENT ON FUNCTION @extschema@.similar(regclass, bytea, int, text, jsonb) IS 'The k rows nearest to these image bytes; see similar(regclass, text, ...).';
COMMENT ON FUNCTION @extschema@.similar(regclass, real[], int, text, jsonb) IS 'The k rows nearest to this feature vector; see similar(regclass, text, ...).';

CREATE FUNCTION @extschema@.create_index(tbl regclass, metric text DEFAULT 'l2') RETURNS text
LANGUAGE sql VOLATILE STRICT PARALLEL UNSAFE
RETURN @extschema@._create_index(tbl::oid, metric);
COMMENT ON FUNCTION @extschema@.create_index(regclass, text) IS
  'Build pgvector''s HNSW index for a watched table: USING hnsw ((col::halfvec(n)) halfvec_l2_ops) for vector(n) columns (a 2048-d vector is over pgvector''s 2000-dimension index limit; halfvec is not), or on the halfvec column itself. doppler.similar uses it. metric => ''hamming'': a GIN index over four 16-bit chunks of the hash column, for doppler.near_duplicates. metric => ''pdq'': a GIN index over sixteen 16-bit chunks of the PDQ column, for near_duplicates(tbl, pdq bit). As the table owner; CREATE INDEX blocks writes to the table while it builds. Returns the index name.';

CREATE FUNCTION @extschema@.duplicates(tbl regclass, max_bits int DEFAULT 4)
RETURNS TABLE (group_id int, size int, row_keys text[], hashes text[])
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._duplicates(tbl::pg_catalog.oid, max_bits) $$;
COMMENT ON FUNCTION @extschema@.duplicates(regclass, int) IS
  'Groups of rows whose dHashes are within max_bits of each other, most-posted first (the seed''s most re-posted images). Skip hashes are left out. Exact, by multi-index hashing in memory.';

CREATE FUNCTION @extschema@.near_duplicates(tbl regclass, hash text, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::pg_catalog.oid, hash, max_bits) $$;
CREATE FUNCTION @extschema@.near_duplicates(tbl regclass, image bytea, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::pg_catalog.oid, @extschema@.dhash(image), max_bits) $$;
COMMENT ON FUNCTION @extschema@.near_duplicates(regclass, text, int) IS
  'The rows whose dHash is within max_bits of this one (16 hex digits), nearest first; skip hashes are left out. Exact; served by the index of doppler.create_index(tbl, ''hamming'') up to max_bits 11, else a scan.';
COMMENT ON FUNCTION @extschema@.near_duplicates(regclass, bytea, int) IS
  'The rows whose dHash is within max_bits of these image bytes'' dHash; see near_duplicates(regclass, text, int).';

-- PDQ, Meta's perceptual hash (Rust in src/api/pdq.rs), as PostgreSQL's bit(256): bit i is the
-- i-th bit of the reference's 64 hex digits, read left to right, so that ('x' || hex)::bit(256)
-- and pdq_from_hex(hex) read a ThreatExchange or HMA list as it is.
CREATE FUNCTION @extschema@.pdq_from_hex(hex text) RETURNS bit(256)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN ('x' OPERATOR(pg_catalog.||) @extschema@._pdq_hex(hex))::pg_catalog.bit(256);
COMMENT ON FUNCTION @extschema@.pdq_from_hex(text) IS
  'A PDQ hash from its 64 hex digits (as the reference, ThreatExchange and HMA write it; either case) as bit(256); 22P02 for any other text.';
CREATE FUNCTION @extschema@.pdq_to_hex(hash bit) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN @extschema@._pdq_bits_hex(hash::pg_catalog.text);
COMMENT ON FUNCTION @extschema@.pdq_to_hex(bit) IS
  'A PDQ hash (256 bits) as the reference writes it: 64 lowercase hex digits; 22026 for another length.';
CREATE FUNCTION @extschema@.pdq(path text, OUT hash bit(256), OUT quality int)
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
AS $$ SELECT ('x' OPERATOR(pg_catalog.||) p.hash)::pg_catalog.bit(256), p.quality FROM @extschema@._pdq(path) p $$;
CREATE FUNCTION @extschema@.pdq(image bytea, OUT hash bit(256), OUT quality int)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' OPERATOR(pg_catalog.||) p.hash)::pg_catalog.bit(256), p.quality FROM @extschema@._pdq(image) p $$;
COMMENT ON FUNCTION @extschema@.pdq(text) IS
  'Meta''s PDQ hash (256 bits) and its quality (0 to 100) of the image at this server path or URL, as the reference computes them from the image''s pixels (the same as pdqhash.compute(numpy.asarray(PIL.Image.open(path).convert(''RGB'')))). The reference matches hashes within 31 bits, of quality 50 or more.';
COMMENT ON FUNCTION @extschema@.pdq(bytea) IS
  'Meta''s PDQ hash and quality of these image bytes; see pdq(text).';
CREATE FUNCTION @extschema@.pdq_dihedral(path text) RETURNS bit(256)[]
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
AS $$ SELECT pg_catalog.array_agg(('x' OPERATOR(pg_catalog.||) h.h)::pg_catalog.bit(256) ORDER BY h.n)
      FROM pg_catalog.unnest(@extschema@._pdq_dihedral(path)) WITH ORDINALITY h(h, n) $$;
CREATE FUNCTION @extschema@.pdq_dihedral(image bytea) RETURNS bit(256)[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pg_catalog.array_agg(('x' OPERATOR(pg_catalog.||) h.h)::pg_catalog.bit(256) ORDER BY h.n)
      FROM pg_catalog.unnest(@extschema@._pdq_dihedral(image)) WITH ORDINALITY h(h, n) $$;
COMMENT ON FUNCTION @extschema@.pdq_dihedral(text) IS
  'The PDQ hashes of the image''s eight rotations and mirror images, in the reference''s order: original, rotated 90, 180, 270, flipped X, flipped Y, flipped along the diagonal (+1) and the antidiagonal (-1). doppler.pdq_matches(tbl, doppler.pdq_dihedral(path)) finds flipped and rotated copies.';
COMMENT ON FUNCTION @extschema@.pdq_dihedral(bytea) IS
  'The PDQ hashes of these image bytes'' eight rotations and mirror images; see pdq_dihedral(text).';
CREATE FUNCTION @extschema@.hamming(a bit, b bit) RETURNS int
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.bit_count(a OPERATOR(pg_catalog.#) b)::pg_catalog.int4;
COMMENT ON FUNCTION @extschema@.hamming(bit, bit) IS 'Bits that differ between two PDQ hashes (or any two bit strings of one length; 22026 for two lengths).';

CREATE FUNCTION @extschema@.near_duplicates(tbl regclass, pdq bit, max_bits int DEFAULT 31, min_quality int DEFAULT 50)
RETURNS TABLE (row_key text, source text, pdq bit(256), quality int, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT n.row_key, n.source, ('x' OPERATOR(pg_catalog.||) n.hash)::pg_catalog.bit(256), n.quality, n.distance
      FROM @extschema@._pdq_near(tbl::pg_catalog.oid, @extschema@.pdq_to_hex(pdq), max_bits, min_quality) n $$;
COMMENT ON FUNCTION @extschema@.near_duplicates(regclass, bit, int, int) IS
  'The rows whose PDQ hash is within max_bits (default 31, the reference''s threshold) of this one, nearest first, leaving out rows of quality under min_quality (default 50, the reference''s floor; with a quality column). Exact; served by the index of doppler.create_index(tbl, ''pdq'') up to max_bits 47, else a scan.';
CREATE FUNCTION @extschema@.pdq_matches(tbl regclass, hashes bit[], max_bits int DEFAULT 31, min_quality int DEFAULT 50)
RETURNS TABLE (row_key text, source text, pdq bit(256), quality int, listed int, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT m.row_key, m.source, ('x' OPERATOR(pg_catalog.||) m.hash)::pg_catalog.bit(256), m.quality, m.listed, m.distance
      FROM @extschema@._pdq_matches(tbl::pg_catalog.oid,
               ARRAY(SELECT @extschema@.pdq_to_hex(h.h) FROM pg_catalog.unnest(hashes) WITH ORDINALITY h(h, n) ORDER BY h.n),
               max_bits, min_quality) m $$;
COMMENT ON FUNCTION @extschema@.pdq_matches(regclass, bit[], int, int) IS
  'Every row within max_bits (default 31) of any hash of the list, with listed: the position of that hash in the array (a row near several listed hashes comes once for each), leaving out rows of quality under min_quality (default 50; with a quality column): where did these known images appear? Exact: one scan of the table against the list''s multi-index in memory. With doppler.pdq_dihedral(image) as the list: the image''s flipped and rotated copies.';
CREATE FUNCTION @extschema@.pdq_list_matches(tbl regclass, list regclass, list_column name DEFAULT 'pdq',
                                             max_bits int DEFAULT 31, min_quality int DEFAULT 50)
RETURNS TABLE (row_key text, source text, pdq bit(256), quality int, listed bit(256), distance int)
LANGUAGE plpgsql STABLE STRICT PARALLEL RESTRICTED SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hashes bit(256)[];
    t regtype;
BEGIN
    SELECT a.atttypid::pg_catalog.regtype INTO t FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) list AND a.attname OPERATOR(pg_catalog.=) list_column
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
    IF t IS NULL THEN
        RAISE EXCEPTION 'column % of % does not exist', pg_catalog.quote_ident(list_column), list
              USING ERRCODE = 'undefined_column';
    END IF;
    -- read as the caller (SELECT on the list is the caller's): hex text as ThreatExchange and
    -- HMA export it, or bits
    IF t OPERATOR(pg_catalog.=) ANY ('{pg_catalog.text,pg_catalog.varchar,pg_catalog.bpchar}'::pg_catalog.regtype[]) THEN
        EXECUTE pg_catalog.format('SELECT pg_catalog.array_agg(@extschema@.pdq_from_hex(l.%I::pg_catalog.text)) FROM %s l WHERE l.%I IS NOT NULL',
                                  list_column, list, list_column) INTO hashes;
    ELSIF t OPERATOR(pg_catalog.=) ANY ('{pg_catalog.bit,pg_catalog.varbit}'::pg_catalog.regtype[]) THEN
        EXECUTE pg_catalog.format('SELECT pg_catalog.array_agg(l.%I::pg_catalog.varbit::pg_catalog.bit(256)) FROM %s l WHERE l.%I IS NOT NULL AND pg_catalog.length(l.%I) OPERATOR(pg_catalog.=) 256',
                                  list_column, list, list_column, list_column) INTO hashes;
    ELSE
        RAISE EXCEPTION 'column % of % is %, not PDQ hashes', pg_catalog.quote_ident(list_column), list, t
              USING ERRCODE = 'datatype_mismatch', HINT = 'A list holds PDQ hashes as 64 hex digits (text) or bit(256).';
    END IF;
    RETURN QUERY
        SELECT m.row_key, m.source, m.pdq, m.quality, hashes[m.listed], m.distance
        FROM @extschema@.pdq_matches(tbl, coalesce(hashes, '{}'), max_bits, min_quality) m;
END $$;
COMMENT ON FUNCTION @extschema@.pdq_list_matches(regclass, regclass, name, int, int) IS
  'Every row of tbl within max_bits (default 31) of any hash in column list_column of table list (64 hex digits as text, as ThreatExchange and HMA export them, or bit(256)), with listed: that hash; see pdq_matches(regclass, bit[], int, int). The list is read with the caller''s rights.';

COMMENT ON FUNCTION @extschema@.dhash(text) IS 'imagehash''s dHash (hash_size 8) of the image file at this server path, as 16 hex digits; equal to str(imagehash.dhash(PIL.Image.open(path))).';
COMMENT ON FUNCTION @extschema@.dhash(bytea) IS 'imagehash''s dHash (hash_size 8) of these image bytes, as 16 hex digits.';
COMMENT ON FUNCTION @extschema@.hamming(text, text) IS 'Bits that differ between two dHashes (16 hex digits each).';

-- Row counts: doppler._status (src/api/status.rs) counts as the table's owner, for callers who
-- own the table or may SELECT it without row-level security. The view shows those tables only.
CREATE VIEW @extschema@.status AS
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

-- Foreground fill: one committed batch after another, with a NOTICE per batch.
-- A procedure with SET search_path cannot COMMIT, so this one runs under its caller's path and
-- names every object and operator with its schema (a role that may create objects in a schema
-- on the caller's path must not get its operators run); the arithmetic of the progress notice
-- lives in a function with a pinned path.
CREATE FUNCTION @extschema@._fill_progress(tbl regclass, total bigint, done_before bigint, filled bigint,
                                           failed bigint, t0 timestamptz, finished boolean)
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    secs float8 := extract(epoch FROM clock_timestamp() - t0);
    rate float8 := filled / nullif(secs, 0);
    todo bigint := greatest(total - done_before - filled - failed, 0);
BEGIN
    IF finished THEN
        RETURN format('doppler.fill %s: finished, %s filled, %s failed in %s s', tbl, filled, failed,
                      round(secs::numeric, 1));
    END IF;
    RETURN format('doppler.fill %s: %s / %s done (%s %%), %s failed, %s images/s, ETA %s',
                  tbl, done_before + filled, total, round(100.0 * (done_before + filled) / nullif(total, 0), 1),
                  failed, round(rate::numeric, 2),
                  CASE WHEN rate > 0 THEN make_interval(secs => round(todo / rate)) END);
END $$;

-- How many rows the next batch of fill may take: NULL (no limit), or what max_rows leaves.
CREATE FUNCTION @extschema@._fill_left(max_rows int, filled bigint, failed bigint) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN max_rows IS NULL THEN NULL ELSE greatest(max_rows - filled - failed, 0)::int END;

CREATE PROCEDURE @extschema@.fill(tbl regclass, max_rows int DEFAULT NULL)
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
COMMENT ON PROCEDURE @extschema@.fill(regclass, int) IS
  'Fill the vector column of a watched table in the foreground, committing each batch; NOTICE per batch with progress, images/s and ETA. Rows that others hold (the worker''s batch, another fill) are waited for, so it returns when no row is left to do but those waiting for a retry or given up. CALL it outside a transaction block.';

-- Forget a dropped table, and end the watch of a table that lost a column doppler works with
-- (its source, vector, hash, PDQ, model or key column), with a WARNING instead of a failing batch on
-- every pass. Any role that can drop a table or column fires this, and only the extension owner
-- may write doppler's catalog: SECURITY DEFINER, over what the event reports (oids, names); the
-- table's own code is never run.
CREATE FUNCTION @extschema@._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gone oid[];
    w record;
BEGIN
    SELECT pg_catalog.array_agg(d.objid) INTO gone FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
       AND d.objsubid OPERATOR(pg_catalog.=) 0;
    FOR w IN
        SELECT DISTINCT x.relid, d.address_names[3] AS col
        FROM pg_catalog.pg_event_trigger_dropped_objects() d
        JOIN @extschema@.watched x ON x.relid::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid
        WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
          AND d.objsubid OPERATOR(pg_catalog.>) 0
          AND d.address_names[3]::pg_catalog.name OPERATOR(pg_catalog.=) ANY (
                x.key_columns OPERATOR(pg_catalog.||)
                ARRAY[x.source_column, x.vector_column, x.hash_column, x.model_column,
                      x.pdq_column, x.pdq_quality_column]::pg_catalog.name[])
    LOOP
        RAISE WARNING 'doppler no longer watches %: its column % was dropped', w.relid, pg_catalog.quote_ident(w.col)
              USING HINT = 'Call doppler.watch() again with the columns it should use.';
        gone := pg_catalog.array_append(gone, w.relid::pg_catalog.oid);
    END LOOP;
    IF gone IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM @extschema@.watched WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (gone);
    DELETE FROM @extschema@.failures WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (gone);
    DELETE FROM @extschema@.batches WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (gone);
END $$;
REVOKE ALL ON FUNCTION @extschema@._on_drop() FROM PUBLIC;

-- TRUNCATE of a watched table (the doppler_truncate trigger): its failure records name rows that
-- are gone, and would hold back new rows with the same keys. SECURITY DEFINER over TG_RELID alone:
-- attached to any other table, it forgets that table's failure records, nothing else.
CREATE FUNCTION @extschema@._on_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM @extschema@.failures WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) TG_RELID;
    RETURN NULL;
END $$;
CREATE EVENT TRIGGER doppler_forget_dropped_tables ON sql_drop EXECUTE FUNCTION @extschema@._on_drop();

-- Follow RENAME COLUMN. doppler.watched names its columns (names survive pg_dump and restore,
-- attribute numbers do not), so a rename of a column a watch uses (ALTER TABLE ... RENAME COLUMN,
-- also on a parent or inheritance parent; ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE of a typed
-- table's type) is written into the watch, in the renaming transaction. C (src/triggers.rs): the
-- old and new names come from the statement's parse tree, the table from the event (its oid);
-- doppler's catalog is written as the extension owner.
CREATE FUNCTION @extschema@._on_rename() RETURNS event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'doppler_on_rename';
REVOKE ALL ON FUNCTION @extschema@._on_rename() FROM PUBLIC;
CREATE EVENT TRIGGER doppler_follow_renames ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'ALTER TYPE')
    EXECUTE FUNCTION @extschema@._on_rename();

-- Fetching URLs from inside the server is a privilege: superusers, and members of this role
-- (when doppler.allow_urls is on). Roles are cluster-wide: created once, kept by DROP EXTENSION.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'doppler_url_reader') THEN
        CREATE ROLE doppler_url_reader NOLOGIN;
    END IF;
END $$;
COMMENT ON ROLE doppler_url_reader IS 'Members may fetch image URLs with doppler (when doppler.allow_urls is on).';

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
REVOKE ALL ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_heartbeat(bigint, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_unregister(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.worker_backlog(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.worker_register(text, int, text, text), @extschema@.worker_claim(bigint, int, oid[]),
      @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb),
      @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]), @extschema@.worker_heartbeat(bigint, jsonb),
      @extschema@.worker_unregister(bigint), @extschema@.worker_backlog(bigint) TO doppler_worker;
REVOKE ALL ON FUNCTION @extschema@._model_sha256(text) FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.worker_register(text, int, text, text) IS
  'For doppler-worker (members of doppler_worker): registers a worker process; returns its id and the server''s settings it works under (image limits, URL policy, heartbeat interval, lease).';
COMMENT ON FUNCTION @extschema@.worker_claim(bigint, int, oid[]) IS
  'For doppler-worker, in a transaction block: a batch of one table whose owner allowed external workers (up to max_rows; tables in skip passed over), locked until the transaction ends (its idle_in_transaction_session_timeout lowered to doppler.worker_lease): each row''s number, the table, the model (file name, SHA-256, preprocessing, dim) and its source (path or URL) or image bytes.';
COMMENT ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]) IS
  'For doppler-worker, in the claiming transaction: the features (flat, rows x dim), dHashes, PDQ hashes (64 hex digits) and qualities of rows n of the batch it holds (PDQ ones for tables with a PDQ column), and its failures ([{"n", "kind", "message", "retry_after_s"}]); refused unless sha256 is the model file''s recorded SHA-256. Rows neither written nor failed go back to the queue at commit. Returns the rows written.';
COMMENT ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb) IS
  'doppler-worker 0.10.0''s form of worker_write, without PDQ hashes: refused for the rows of tables with a PDQ column.';
COMMENT ON FUNCTION @extschema@.worker_heartbeat(bigint, jsonb) IS
  'For doppler-worker: what it holds now (holding_table, holding_rows), its totals (rows_done, rows_failed), rate and last_error; shown by doppler.workers.';
COMMENT ON FUNCTION @extschema@.worker_unregister(bigint) IS 'For doppler-worker: forgets a worker that stops cleanly.';
COMMENT ON FUNCTION @extschema@.worker_backlog(bigint) IS
  'Rows waiting for external workers, over the tables that allow them (up to cap per table, plus failed rows due for a retry): the query for an autoscaler such as KEDA''s postgresql trigger.';

-- Privileges (README, Security). Changes go through the functions, which check table
-- ownership first. Each role sees the watches, batches and status of the tables it owns or may
-- SELECT, and the failure records (they name paths) of the tables it owns.
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;
GRANT SELECT ON @extschema@.models, @extschema@.watched, @extschema@.status, @extschema@.batches,
                @extschema@.failures TO PUBLIC;
ALTER TABLE @extschema@.watched ENABLE ROW LEVEL SECURITY;
ALTER TABLE @extschema@.batches ENABLE ROW LEVEL SECURITY;
ALTER TABLE @extschema@.failures ENABLE ROW LEVEL SECURITY;
CREATE POLICY watched_of_readable_tables ON @extschema@.watched FOR SELECT
    USING (pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c
                                   WHERE c.oid OPERATOR(pg_catalog.=) relid::pg_catalog.oid), 'USAGE')
           OR pg_catalog.has_table_privilege(relid::pg_catalog.oid, 'SELECT'));
CREATE POLICY batches_of_readable_tables ON @extschema@.batches FOR SELECT
    USING (pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c
                                   WHERE c.oid OPERATOR(pg_catalog.=) relid::pg_catalog.oid), 'USAGE')
           OR pg_catalog.has_table_privilege(relid::pg_catalog.oid, 'SELECT'));
CREATE POLICY failures_of_own_tables ON @extschema@.failures FOR SELECT
    USING (pg_catalog.pg_has_role((SELECT c.relowner FROM pg_catalog.pg_class c
                                   WHERE c.oid OPERATOR(pg_catalog.=) relid::pg_catalog.oid), 'USAGE'));
-- Internal functions: those the public wrappers need check the caller's rights inside
-- (_watch, _unwatch, _retry_failed, _fill_batch, _fill_wait, _create_index: ownership; _similar,
-- _duplicates, _near_duplicates, _pdq_near, _pdq_matches, _counts, _status: SELECT); the rest are
-- not for PUBLIC.
REVOKE ALL ON FUNCTION @extschema@._check_model(text) FROM PUBLIC;

