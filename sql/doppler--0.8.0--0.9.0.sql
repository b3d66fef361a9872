-- doppler 0.8.0 -> 0.9.0, run by ALTER EXTENSION doppler UPDATE (README: Upgrading).
-- Every change to doppler's SQL objects between the two releases; a fresh CREATE EXTENSION of
-- 0.9.0 and 0.1.0 + the update scripts give the same catalog (tests/integration/test_upgrade.py).
\echo Use "ALTER EXTENSION doppler UPDATE TO '0.9.0'" to load this file. \quit

-- Images from the web (README: Images from the web): where a batch's time on the network went.
ALTER TABLE @extschema@.batches
    ADD COLUMN fetch_s float8,
    ADD COLUMN fetched_bytes bigint,
    ADD COLUMN released int;
COMMENT ON COLUMN @extschema@.batches.read_s IS 'Seconds the decode threads spent reading files (summed over threads; before 0.9.0 also fetching URLs).';
COMMENT ON COLUMN @extschema@.batches.fetch_s IS 'Seconds the requests of the batch''s image URLs took, summed (they overlap each other, and the decoding and inference of other rows; requests made ahead, during an earlier batch, count here).';
COMMENT ON COLUMN @extschema@.batches.fetched_bytes IS 'Bytes of the image URLs the batch took.';
COMMENT ON COLUMN @extschema@.batches.released IS 'Rows left pending because their image was still on the network when the rest of the batch was done (their request goes on; a later batch claims them again and takes the answer).';
COMMENT ON COLUMN @extschema@.failures.attempts IS 'Attempts that failed. A web server''s request to wait (error_class retry_later: HTTP 429 or 503 with Retry-After, or a host doppler paused after it did not answer) is retried at next_attempt and not counted.';
