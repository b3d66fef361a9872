-- doppler 0.10.0 -> 0.11.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.11.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.11.0'" to load this file. \quit

-- PDQ (README: PDQ): a watched table's PDQ hash and quality columns, filled with the vector.
ALTER TABLE @extschema@.watched
    ADD COLUMN pdq_column name,
    ADD COLUMN pdq_quality_column name CHECK (pdq_quality_column IS NULL OR pdq_column IS NOT NULL);

-- watch gains arguments: its old signature goes (_watch and worker_write gain forms with PDQ
-- columns; the old forms stay, for the library serving databases not updated yet, and for
-- doppler-worker 0.10.0)
DROP FUNCTION @extschema@.watch(regclass, name, name, int, int, text, text, name, boolean, text, name, text);

CREATE FUNCTION @extschema@."_watch"(
	"relid" oid, /* Option < pg_sys :: Oid > */
	"source_column" TEXT, /* & str */
	"vector_column" TEXT, /* & str */
	"batch_size" INT, /* i32 */
	"priority" INT, /* i32 */
	"mode" TEXT, /* & str */
	"on_error" TEXT, /* & str */
	"hash_column" TEXT, /* Option < & str > */
	"dedup" bool, /* bool */
	"model" TEXT, /* Option < & str > */
	"model_column" TEXT, /* Option < & str > */
	"pdq_column" TEXT, /* Option < & str > */
	"pdq_quality_column" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_watch_with_pdq_wrapper';

CREATE FUNCTION @extschema@."worker_write"(
	"worker" bigint, /* i64 */
	"sha256" TEXT, /* & str */
	"n" INT[], /* Vec < i32 > */
	"vectors" real[], /* Vec < f32 > */
	"hashes" TEXT[], /* Vec < Option < String > > */
	"failures" jsonb, /* JsonB */
	"pdq" TEXT[], /* Vec < Option < String > > */
	"pdq_quality" INT[] /* Vec < Option < i32 > > */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_write_pdq_wrapper';

CREATE FUNCTION @extschema@."_pdq"(
	"image" bytea /* & [u8] */
) RETURNS TABLE (
	"hash" TEXT,  /* String */
	"quality" INT  /* i32 */
)
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pdq_bytea_wrapper';

CREATE FUNCTION @extschema@."_pdq"(
	"path" TEXT /* & str */
) RETURNS TABLE (
	"hash" TEXT,  /* String */
	"quality" INT  /* i32 */
)
STRICT VOLATILE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pdq_path_wrapper';

CREATE FUNCTION @extschema@."_pdq_bits_hex"(
	"bits" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pdq_bits_hex_wrapper';

CREATE FUNCTION @extschema@."_pdq_dihedral"(
	"image" bytea /* & [u8] */
) RETURNS TEXT[] /* Vec < String > */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pdq_dihedral_bytea_wrapper';

CREATE FUNCTION @extschema@."_pdq_dihedral"(
	"path" TEXT /* & str */
) RETURNS TEXT[] /* Vec < String > */
STRICT VOLATILE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pdq_dihedral_path_wrapper';

CREATE FUNCTION @extschema@."_pdq_hex"(
	"hex" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pdq_hex_wrapper';

CREATE FUNCTION @extschema@."_pdq_matches"(
	"relid" oid, /* pg_sys :: Oid */
	"hashes" TEXT[], /* Vec < Option < String > > */
	"max_bits" INT, /* i32 */
	"min_quality" INT /* i32 */
) RETURNS TABLE (
	"row_key" TEXT,  /* String */
	"source" TEXT,  /* Option < String > */
	"hash" TEXT,  /* String */
	"quality" INT,  /* Option < i32 > */
	"listed" INT,  /* i32 */
	"distance" INT  /* i32 */
)
STRICT STABLE PARALLEL RESTRICTED
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pdq_matches_wrapper';

CREATE FUNCTION @extschema@."_pdq_near"(
	"relid" oid, /* pg_sys :: Oid */
	"hash" TEXT, /* & str */
	"max_bits" INT, /* i32 */
	"min_quality" INT /* i32 */
) RETURNS TABLE (
	"row_key" TEXT,  /* String */
	"source" TEXT,  /* Option < String > */
	"hash" TEXT,  /* String */
	"quality" INT,  /* Option < i32 > */
	"distance" INT  /* i32 */
)
STRICT STABLE PARALLEL RESTRICTED
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pdq_near_wrapper';

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

COMMENT ON FUNCTION @extschema@.create_index(regclass, text) IS
  'Build pgvector''s HNSW index for a watched table: USING hnsw ((col::halfvec(n)) halfvec_l2_ops) for vector(n) columns (a 2048-d vector is over pgvector''s 2000-dimension index limit; halfvec is not), or on the halfvec column itself. doppler.similar uses it. metric => ''hamming'': a GIN index over four 16-bit chunks of the hash column, for doppler.near_duplicates. metric => ''pdq'': a GIN index over sixteen 16-bit chunks of the PDQ column, for near_duplicates(tbl, pdq bit). As the table owner; CREATE INDEX blocks writes to the table while it builds. Returns the index name.';

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

CREATE OR REPLACE FUNCTION @extschema@._on_drop() RETURNS event_trigger
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

REVOKE ALL ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]) TO doppler_worker;
COMMENT ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb, text[], int[]) IS
  'For doppler-worker, in the claiming transaction: the features (flat, rows x dim), dHashes, PDQ hashes (64 hex digits) and qualities of rows n of the batch it holds (PDQ ones for tables with a PDQ column), and its failures ([{"n", "kind", "message", "retry_after_s"}]); refused unless sha256 is the model file''s recorded SHA-256. Rows neither written nor failed go back to the queue at commit. Returns the rows written.';
COMMENT ON FUNCTION @extschema@.worker_write(bigint, text, int[], real[], text[], jsonb) IS
  'doppler-worker 0.10.0''s form of worker_write, without PDQ hashes: refused for the rows of tables with a PDQ column.';
