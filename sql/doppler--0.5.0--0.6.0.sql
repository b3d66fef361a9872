-- doppler 0.5.0 -> 0.6.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.6.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.6.0'" to load this file. \quit

-- The inference service (README: The inference service): session_info says where model runs
-- happen, and service_status shows the service.
DROP FUNCTION @extschema@.session_info();
CREATE FUNCTION @extschema@."session_info"() RETURNS TABLE (
	"model" TEXT,
	"model_path" TEXT,
	"execution_provider" TEXT,
	"input_size" INT,
	"dimensions" INT,
	"intra_op_threads" INT,
	"sessions_created" bigint,
	"inference" TEXT
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'session_info_wrapper';
COMMENT ON FUNCTION @extschema@.session_info() IS
  'The ONNX Runtime sessions that serve this connection, most recently used first: model, file, execution provider, input size, dimensions, threads, sessions created so far, and where model runs happen (inference: service, the server''s inference service, or backend, this connection''s own sessions).';

CREATE FUNCTION @extschema@."service_status"() RETURNS TABLE (
	"pid" INT,
	"started_at" timestamp with time zone,
	"starts" bigint,
	"requests" bigint,
	"images" bigint,
	"runs" bigint,
	"largest_run" bigint,
	"failed" bigint,
	"queued" bigint,
	"running" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'service_status_wrapper';
COMMENT ON FUNCTION @extschema@.service_status() IS
  'doppler''s inference service (doppler in shared_preload_libraries): its process, start time, starts, and the requests, images, model runs, largest run and failed requests it has served, and the requests queued and running now. No row without the service.';
