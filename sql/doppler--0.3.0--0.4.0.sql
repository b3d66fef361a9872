-- doppler 0.3.0 -> 0.4.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.4.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.4.0'" to load this file. \quit

-- Failed rows are held back: the worker marks them '!failed' in the model column, which takes
-- them out of the pending index, and claims find the ones due for a retry through this index.
-- (Rows given up before 0.4.0 are not marked: doppler.retry_failed() tries them again, and a
-- second failure marks them. doppler.watch() builds 0.3.0's pending index again, without them.)
CREATE INDEX failures_due ON @extschema@.failures (relid, next_attempt) WHERE next_attempt IS NOT NULL;

COMMENT ON FUNCTION @extschema@.retry_failed(regclass) IS
  'Make failed rows due now, with their attempts reset (all of the caller''s tables when tbl is NULL), and rows marked held without a failure record to do again; wakes the worker. Returns how many failure records.';
