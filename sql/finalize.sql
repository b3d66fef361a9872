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
