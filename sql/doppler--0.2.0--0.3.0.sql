-- doppler 0.2.0 -> 0.3.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.3.0 and 0.1.0 + both update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.3.0'" to load this file. \quit

-- similar() takes a filter on other columns (jsonb: column -> value). Its 0.2.0 signatures are
-- replaced (kept, a call with four arguments would be ambiguous).
DROP FUNCTION @extschema@.similar(regclass, text, int, text);
DROP FUNCTION @extschema@.similar(regclass, bytea, int, text);
DROP FUNCTION @extschema@.similar(regclass, real[], int, text);
CREATE FUNCTION @extschema@."_similar"(
	"relid" oid,
	"query" real[],
	"k" INT,
	"metric" TEXT,
	"filter" TEXT
) RETURNS TABLE (
	"row_key" TEXT,
	"source" TEXT,
	"distance" double precision
)
STABLE PARALLEL RESTRICTED
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'similar_vector_filtered_wrapper';
CREATE FUNCTION @extschema@.similar(tbl regclass, query text, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql VOLATILE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::text) s $$;
CREATE FUNCTION @extschema@.similar(tbl regclass, query bytea, k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT s.* FROM (SELECT WHERE tbl IS NOT NULL AND query IS NOT NULL AND k IS NOT NULL AND metric IS NOT NULL) g,
      LATERAL @extschema@._similar(tbl::oid, @extschema@.extract_features(query, @extschema@._table_model(tbl)), k, metric, filter::text) s $$;
CREATE FUNCTION @extschema@.similar(tbl regclass, query real[], k int DEFAULT 12, metric text DEFAULT 'l2',
                                    filter jsonb DEFAULT NULL)
RETURNS TABLE (row_key text, source text, distance float8)
LANGUAGE sql STABLE PARALLEL RESTRICTED ROWS 12
AS $$ SELECT * FROM @extschema@._similar(tbl::oid, query, k, metric, filter::text) $$;
COMMENT ON FUNCTION @extschema@.similar(regclass, text, int, text, jsonb) IS
  'The k rows of a watched table nearest to the image at this server path (features by the table''s model; euclidean distance as the seed, or metric => ''cosine''; rows whose vector is from an older model are left out until re-embedded), optionally only rows whose columns equal filter''s values (filter => ''{"site": "example.org"}''). Exact scan on real[] columns; pgvector operators and its HNSW index (doppler.create_index) on vector/halfvec columns, with pgvector 0.8''s iterative scan so that filtered-out rows do not cost results.';
COMMENT ON FUNCTION @extschema@.similar(regclass, bytea, int, text, jsonb) IS 'The k rows nearest to these image bytes; see similar(regclass, text, ...).';
COMMENT ON FUNCTION @extschema@.similar(regclass, real[], int, text, jsonb) IS 'The k rows nearest to this feature vector; see similar(regclass, text, ...).';

-- doppler.create_index(tbl, 'hamming') builds the near-duplicate index.
COMMENT ON FUNCTION @extschema@.create_index(regclass, text) IS
  'Build pgvector''s HNSW index for a watched table: USING hnsw ((col::halfvec(n)) halfvec_l2_ops) for vector(n) columns (a 2048-d vector is over pgvector''s 2000-dimension index limit; halfvec is not), or on the halfvec column itself. doppler.similar uses it. metric => ''hamming'': a GIN index over four 16-bit chunks of the hash column, for doppler.near_duplicates. As the table owner; CREATE INDEX blocks writes to the table while it builds. Returns the index name.';

-- duplicates() pairs hashes by multi-index hashing (exact, no longer all pairs).
COMMENT ON FUNCTION @extschema@.duplicates(regclass, int) IS
  'Groups of rows whose dHashes are within max_bits of each other, most-posted first (the seed''s most re-posted images). Skip hashes are left out. Exact, by multi-index hashing in memory.';

-- Near-duplicates of one hash or image.
CREATE FUNCTION @extschema@."_near_duplicates"(
	"relid" oid,
	"hash" TEXT,
	"max_bits" INT
) RETURNS TABLE (
	"row_key" TEXT,
	"source" TEXT,
	"hash" TEXT,
	"distance" INT
)
STRICT STABLE PARALLEL RESTRICTED
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_near_duplicates_wrapper';
CREATE FUNCTION @extschema@.near_duplicates(tbl regclass, hash text, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::oid, hash, max_bits) $$;
CREATE FUNCTION @extschema@.near_duplicates(tbl regclass, image bytea, max_bits int DEFAULT 4)
RETURNS TABLE (row_key text, source text, hash text, distance int)
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
AS $$ SELECT * FROM @extschema@._near_duplicates(tbl::oid, @extschema@.dhash(image), max_bits) $$;
COMMENT ON FUNCTION @extschema@.near_duplicates(regclass, text, int) IS
  'The rows whose dHash is within max_bits of this one (16 hex digits), nearest first; skip hashes are left out. Exact; served by the index of doppler.create_index(tbl, ''hamming'') up to max_bits 11, else a scan.';
COMMENT ON FUNCTION @extschema@.near_duplicates(regclass, bytea, int) IS
  'The rows whose dHash is within max_bits of these image bytes'' dHash; see near_duplicates(regclass, text, int).';

-- status: estimates for large tables (doppler.status_exact_rows), and a column that says so.
CREATE FUNCTION @extschema@."_status"(
	"relid" oid
) RETURNS TABLE (
	"total" bigint,
	"done" bigint,
	"skipped" bigint,
	"stale" bigint,
	"model" TEXT,
	"exact" bool
)
STRICT STABLE PARALLEL RESTRICTED
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', '_status_wrapper';
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
       c.exact
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
  'Per watched table: its model (name@version), rows in all, filled by that model (done), still to do (pending, including retrying and stale), given up (failed), waiting for a retry (retrying), with a vector of an older model, readable until re-embedded (stale), NULL source or skip hash (skipped), model runs saved by dedup (inferences_saved, over the kept batch log), last batch, images/s over the last 5 minutes, the worker''s pid, and whether the counts are exact (exact): tables over doppler.status_exact_rows rows get the planner''s row estimate, exact pending counts through the pending index, and done derived from both.';
