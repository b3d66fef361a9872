-- doppler's catalog: hand-written, run first by CREATE EXTENSION doppler (schema doppler).

-- Tables whose vector column doppler fills (doppler.watch / doppler.unwatch).
CREATE TABLE @extschema@.watched (
    relid          regclass PRIMARY KEY,
    source_column  name NOT NULL,
    source_kind    text NOT NULL CHECK (source_kind IN ('path', 'bytea')),
    vector_column  name NOT NULL,
    vector_kind    text NOT NULL CHECK (vector_kind IN ('real[]', 'vector', 'halfvec')),
    key_columns    name[] NOT NULL,
    key_type       text,            -- format_type() of a one-column primary key; NULL when composite
    mode           text NOT NULL DEFAULT 'async' CHECK (mode IN ('async', 'sync', 'manual')),
    on_error       text NOT NULL DEFAULT 'raise' CHECK (on_error IN ('raise', 'defer')),
    hash_column    name,            -- filled with the dHash of each image when NULL
    dedup          boolean NOT NULL DEFAULT false CHECK (NOT dedup OR hash_column IS NOT NULL),
    batch_size     int NOT NULL CHECK (batch_size BETWEEN 1 AND 4096),
    priority       int NOT NULL DEFAULT 0,
    watched_since  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE @extschema@.watched IS 'Tables whose vector column doppler fills; change it with doppler.watch() and doppler.unwatch().';

-- Rows whose image could not be turned into features. Retried with exponential backoff until
-- doppler.max_attempts; doppler.retry_failed() makes them due again.
CREATE TABLE @extschema@.failures (
    relid          regclass NOT NULL,
    row_key        text NOT NULL,
    source         text,
    error_class    text NOT NULL,
    sqlstate       text NOT NULL,
    message        text NOT NULL,
    attempts       int NOT NULL DEFAULT 1,
    first_attempt  timestamptz NOT NULL DEFAULT now(),
    last_attempt   timestamptz NOT NULL DEFAULT now(),
    next_attempt   timestamptz,
    PRIMARY KEY (relid, row_key)
);
COMMENT ON TABLE @extschema@.failures IS 'Rows whose image failed: why, how often, and when doppler tries again (next_attempt NULL: given up).';

-- One row per committed batch (worker or fill), for status and throughput; pruned by the worker.
CREATE TABLE @extschema@.batches (
    relid        regclass NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed      int NOT NULL,
    filled       int NOT NULL,
    failed       int NOT NULL,
    deduped      int NOT NULL DEFAULT 0,  -- model runs saved by dedup
    seconds      float8 NOT NULL,
    pid          int NOT NULL DEFAULT pg_backend_pid(),
    via          text NOT NULL
);
CREATE INDEX ON @extschema@.batches (relid, finished_at);

-- pg_dump keeps the user's configuration and failure history.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.watched', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.failures', '');
