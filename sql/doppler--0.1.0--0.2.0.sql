-- doppler 0.1.0 -> 0.2.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.2.0 and 0.1.0 + this script give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.2.0'" to load this file. \quit

-- Claims look for rows without a vector (or hash) through a partial index (created by
-- doppler.watch), and scan the table for vectors of another model only until one such scan
-- finds none for the current model tag, which is recorded here. (Tables watched under 0.1.0
-- get their index when watched again; until then their claims scan as before.)
ALTER TABLE @extschema@.watched ADD COLUMN stale_scan text;

-- The stale-clearing trigger is C and reads its columns from doppler.watched when it fires
-- (0.1.0's took them as trigger arguments, which a RENAME COLUMN left stale). The triggers
-- 0.1.0 created keep their arguments, which are ignored now.
CREATE OR REPLACE FUNCTION @extschema@._clear_stale() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'doppler_clear_stale';

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

-- 0.1.0 did not follow column renames: a watch may name a column its table no longer has. Say
-- which (the worker's batches of such a table fail until it is watched again).
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN
        SELECT x.relid, n FROM @extschema@.watched x,
             pg_catalog.unnest(x.key_columns OPERATOR(pg_catalog.||)
                               ARRAY[x.source_column, x.vector_column, x.hash_column, x.model_column]) n
        WHERE n IS NOT NULL
          AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) x.relid::pg_catalog.oid
                            AND a.attname OPERATOR(pg_catalog.=) n AND NOT a.attisdropped)
    LOOP
        RAISE WARNING 'doppler watches %, but it has no column % (renamed before doppler 0.2.0?)', w.relid, pg_catalog.quote_ident(w.n)
              USING HINT = 'Call doppler.watch() again with the columns it should use.';
    END LOOP;
END $$;
