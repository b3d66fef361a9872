//! Every doppler setting, defined in one place. Settings that choose files the server reads or
//! loads (the model, the ONNX Runtime library) or that size server resources (threads, limits)
//! are superuser-only (`PGC_SUSET`): a plain role cannot point a backend at another library.

use std::ffi::CString;

use doppler_core::{Limits, Provider, SessionConfig};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `doppler.model_path`: the ONNX feature extractor used by `extract_features`.
pub static MODEL_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `doppler.default_model`: the doppler.models entry used when none is named.
pub static DEFAULT_MODEL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"resnet50"));
/// `doppler.max_sessions`: model sessions a backend keeps (least recently used dropped first).
pub static MAX_SESSIONS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// `doppler.onnxruntime_library`: absolute path of `libonnxruntime.so` (1.31 or later); by
/// default the library doppler's packages install in `$libdir/doppler/` ([`crate::dirs`]).
pub static ONNXRUNTIME_LIBRARY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(crate::dirs::BUNDLED_ORT));
/// `doppler.intra_op_threads`: ORT threads per backend session (each backend has its own).
pub static INTRA_OP_THREADS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// `doppler.execution_provider`: auto | cpu | cuda.
pub static EXECUTION_PROVIDER: GucSetting<ExecutionProvider> =
    GucSetting::<ExecutionProvider>::new(ExecutionProvider::Auto);
/// `doppler.cuda_device_id`: the GPU used by the CUDA provider.
pub static CUDA_DEVICE_ID: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `doppler.max_image_bytes`: largest image file or value accepted.
pub static MAX_IMAGE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024 * 1024);
/// `doppler.max_image_pixels`: largest width × height accepted, checked from the header.
pub static MAX_IMAGE_PIXELS: GucSetting<i32> = GucSetting::<i32>::new(100_000_000);
/// `doppler.max_image_dimension`: largest width or height accepted, checked from the header.
pub static MAX_IMAGE_DIMENSION: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// `doppler.worker_databases`: databases served by a background worker (one each).
pub static WORKER_DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `doppler.worker_naptime`: how long an idle worker sleeps (ms) unless woken.
pub static WORKER_NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `doppler.worker_batch_timeout`: longest a worker's batch may run (ms; 0: no limit).
pub static WORKER_BATCH_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(300_000);
/// `doppler.worker_lease`: how long an external worker may hold a claimed batch while its
/// connection is idle (ms): the claim sets the transaction's idle_in_transaction_session_timeout.
pub static WORKER_LEASE: GucSetting<i32> = GucSetting::<i32>::new(120_000);
/// `doppler.worker_intra_op_threads`: ORT threads of a worker's session (0: all cores).
pub static WORKER_INTRA_OP_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Whether this process is doppler's background worker (set first thing in its main; a parallel
/// query worker is a background worker too, but not this one).
pub static IN_DOPPLER_WORKER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn in_doppler_worker() -> bool {
    IN_DOPPLER_WORKER.load(std::sync::atomic::Ordering::Relaxed)
}

/// `doppler.decode_threads`: threads that read, decode and resize a batch's images (0: automatic,
/// [`decode_threads`]).
pub static DECODE_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `doppler.intra_op_spinning`: whether a backend session's ORT threads spin while they wait.
pub static INTRA_OP_SPINNING: GucSetting<bool> = GucSetting::<bool>::new(true);
/// `doppler.worker_intra_op_spinning`: the same for the worker's session.
pub static WORKER_INTRA_OP_SPINNING: GucSetting<bool> = GucSetting::<bool>::new(false);
/// `doppler.inference_batch_size`: images per model run (a claimed batch is split into runs).
pub static INFERENCE_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(8);
/// `doppler.jpeg_draft_size`: decode large JPEGs at a reduced DCT scale (0: off).
pub static JPEG_DRAFT_SIZE: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `doppler.max_attempts`: attempts per failing row before it is given up.
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(3);
/// `doppler.file_roots`: folders that server image files must resolve into; empty: anywhere.
pub static FILE_ROOTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `doppler.allow_urls`: whether http(s) sources may be fetched at all.
pub static ALLOW_URLS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// `doppler.url_allowed_hosts`: hosts that may be fetched; empty: any public host.
pub static URL_ALLOWED_HOSTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// `doppler.url_allowed_networks`: non-public networks that may be reached anyway (CIDR list).
pub static URL_ALLOWED_NETWORKS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
/// `doppler.url_timeout`: total time for one fetch (ms).
pub static URL_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `doppler.url_connect_timeout`: time to connect (ms).
pub static URL_CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(3_000);
/// `doppler.url_max_redirects`: redirects followed, each checked again.
pub static URL_MAX_REDIRECTS: GucSetting<i32> = GucSetting::<i32>::new(3);
/// `doppler.url_max_in_flight`: requests in flight at once per process, all hosts.
pub static URL_MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(32);
/// `doppler.url_max_per_host`: requests in flight at once per process to one host.
pub static URL_MAX_PER_HOST: GucSetting<i32> = GucSetting::<i32>::new(8);
/// `doppler.url_host_rate`: requests started per second to one host, per process (0: no limit).
pub static URL_HOST_RATE: GucSetting<f64> = GucSetting::<f64>::new(0.0);
/// `doppler.url_user_agent`: the User-Agent header of doppler's requests.
pub static URL_USER_AGENT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(USER_AGENT));
const USER_AGENT: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
    concat!("doppler/", env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
) {
    Ok(c) => c,
    Err(_) => panic!("the user agent has no NUL inside"),
};
/// `doppler.url_prefetch_bytes`: images fetched ahead of the batch that needs them (0: none).
pub static URL_PREFETCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 << 20);
/// `doppler.skip_hashes`: hashes that mean "no usable image" (dedup skips these rows).
pub static SKIP_HASHES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"NOHASH,0000000000000000,nan"));
/// `doppler.retry_backoff`: delay before the first retry (s); doubles with each attempt.
pub static RETRY_BACKOFF: GucSetting<i32> = GucSetting::<i32>::new(60);
/// `doppler.status_exact_rows`: tables up to this many rows (planner's estimate) are counted
/// exactly by `doppler.status`; larger ones get estimates. -1: always exact.
pub static STATUS_EXACT_ROWS: GucSetting<i32> = GucSetting::<i32>::new(100_000);

/// `doppler.inference`: where model runs happen.
pub static INFERENCE: GucSetting<InferenceMode> =
    GucSetting::<InferenceMode>::new(InferenceMode::Service);
/// `doppler.batch_window_ms`: how long the inference service waits for more callers' images.
pub static BATCH_WINDOW_MS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// `doppler.service_intra_op_threads`: ORT threads of the service's sessions (0: all cores).
pub static SERVICE_INTRA_OP_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `doppler.service_max_sessions`: sessions the inference service keeps (one per model in use).
pub static SERVICE_MAX_SESSIONS: GucSetting<i32> = GucSetting::<i32>::new(4);
/// `doppler.service_intra_op_spinning`: whether the service's ORT threads spin while they wait.
pub static SERVICE_INTRA_OP_SPINNING: GucSetting<bool> = GucSetting::<bool>::new(false);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum InferenceMode {
    /// The server's inference service (when doppler is in shared_preload_libraries).
    #[name = c"service"]
    Service,
    /// A session in each backend.
    #[name = c"backend"]
    Backend,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExecutionProvider {
    #[name = c"auto"]
    Auto,
    #[name = c"cpu"]
    Cpu,
    #[name = c"cuda"]
    Cuda,
}

pub fn init() {
    GucRegistry::define_string_guc(
        c"doppler.model_path",
        c"ONNX model used to extract image features.",
        c"An image feature extractor: one float32 input [N,3,H,W] and a float32 output [N,D] or [N,D,1,1]. The backend's session is rebuilt when this changes.",
        &MODEL_PATH,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.default_model",
        c"The doppler.models entry extract_features and watch use when no model is named.",
        c"Any role may choose among the registered models; registering one is a privilege.",
        &DEFAULT_MODEL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.max_sessions",
        c"Model sessions a backend keeps loaded (one per model in use).",
        c"A ResNet-50 session holds about 100 MB; the least recently used session is dropped first.",
        &MAX_SESSIONS,
        1,
        16,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.onnxruntime_library",
        c"Absolute path of the ONNX Runtime shared library (libonnxruntime.so, 1.31 or later).",
        c"Loaded once per backend process, at the first extraction. The default, $libdir/doppler/libonnxruntime.so, is the CPU build doppler's packages install; point it at a GPU build (onnxruntime-gpu) to use CUDA.",
        &ONNXRUNTIME_LIBRARY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.intra_op_threads",
        c"ONNX Runtime intra-op threads per backend session.",
        c"Every backend that extracts features has its own session and threads: keep this small.",
        &INTRA_OP_THREADS,
        1,
        256,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"doppler.execution_provider",
        c"Where models run: auto (CUDA when available, else CPU), cpu, or cuda.",
        c"auto and cuda fall back to the CPU when CUDA cannot be used; the server log (auto) or a WARNING (cuda) says why.",
        &EXECUTION_PROVIDER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.cuda_device_id",
        c"CUDA device used by the cuda execution provider.",
        c"",
        &CUDA_DEVICE_ID,
        0,
        1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.max_image_bytes",
        c"Largest image (file or bytea) accepted.",
        c"",
        &MAX_IMAGE_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"doppler.max_image_pixels",
        c"Largest width x height accepted; checked from the image header before decoding.",
        c"",
        &MAX_IMAGE_PIXELS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.max_image_dimension",
        c"Largest image width or height accepted; checked from the image header before decoding.",
        c"",
        &MAX_IMAGE_DIMENSION,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// Settings of the background worker and of batch filling.
pub fn init_worker_gucs() {
    // A server-start setting can only be defined while shared_preload_libraries loads.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"doppler.worker_databases",
            c"Comma-separated databases in which a doppler background worker fills watched tables.",
            c"One worker per database, started at server start when doppler is in shared_preload_libraries. A worker waits until CREATE EXTENSION doppler has run in its database.",
            &WORKER_DATABASES,
            GucContext::Postmaster,
            GucFlags::SUPERUSER_ONLY,
        );
    }
    init_service_gucs();
    init_source_gucs();
    GucRegistry::define_int_guc(
        c"doppler.worker_naptime",
        c"How long an idle doppler worker sleeps before looking for work again.",
        c"doppler.wake() and inserts into watched tables wake it earlier.",
        &WORKER_NAPTIME,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.worker_batch_timeout",
        c"Longest a background worker's batch may run before it is cancelled and rolled back; 0: no limit.",
        c"The worker runs table owners' code (triggers, casts, policies): a batch that sleeps or waits on a lock must not stall every other watched table. The worker goes on with the next table.",
        &WORKER_BATCH_TIMEOUT,
        0,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.worker_lease",
        c"Longest an external doppler-worker may keep a claimed batch while its connection is idle; then the server ends the connection and the rows go to other workers.",
        c"doppler.worker_claim sets idle_in_transaction_session_timeout to this for its transaction (when that is off or longer). A worker killed or cut off loses its rows within this bound; a killed worker whose host closes the connection loses them at once.",
        &WORKER_LEASE,
        5_000,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.worker_intra_op_threads",
        c"ONNX Runtime threads of a background worker's session; 0 uses every core.",
        c"",
        &WORKER_INTRA_OP_THREADS,
        0,
        256,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.decode_threads",
        c"Threads that read, decode and resize the images of a batch (worker, fill, triggers); 0: one per core in the worker, 2 in backends.",
        c"They prepare the next model run's images while the model runs over this one's; a batch never uses more threads than it has images.",
        &DECODE_THREADS,
        0,
        256,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"doppler.intra_op_spinning",
        c"Whether the ONNX Runtime threads of a backend session spin while they wait for work.",
        c"Spinning saves a wake-up per operator (a single image's latency, with more than one intra-op thread); in a batch it takes the CPU time the decode threads need.",
        &INTRA_OP_SPINNING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"doppler.worker_intra_op_spinning",
        c"Whether the ONNX Runtime threads of a background worker's session spin while they wait for work.",
        c"Off: the worker runs batches, where its decode threads need the cores that spinning threads would hold.",
        &WORKER_INTRA_OP_SPINNING,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.jpeg_draft_size",
        c"Decode JPEGs at a reduced DCT scale keeping both sides at least this many pixels (0: off, full decode).",
        c"Like PIL's Image.draft: large photos decode several times faster, but the features differ slightly from the seed's (see README, Parity); 448 (twice the model input) keeps them closest.",
        &JPEG_DRAFT_SIZE,
        0,
        65535,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.inference_batch_size",
        c"Images per model run; the rows of a batch (a table's batch_size, one transaction) are split into runs of this size.",
        c"While the model runs over one run's images, the decode threads prepare the next run's: smaller runs overlap more, larger runs keep a GPU busier.",
        &INFERENCE_BATCH_SIZE,
        1,
        4096,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.max_attempts",
        c"Attempts per failing row before doppler gives it up (doppler.retry_failed() makes it due again).",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.skip_hashes",
        c"Comma-separated hash values that mark rows without a usable image; with dedup they are skipped, not inferred.",
        c"The seed's skip list: NOHASH, 0000000000000000 (a flat image) and nan.",
        &SKIP_HASHES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.status_exact_rows",
        c"doppler.status counts tables up to this many rows exactly; larger ones from the planner's estimates and the pending index.",
        c"Exact counts scan the whole table. -1: always exact (SET doppler.status_exact_rows = -1 for one exact look).",
        &STATUS_EXACT_ROWS,
        -1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.retry_backoff",
        c"Delay before a failed row is tried again; it doubles with every attempt.",
        c"",
        &RETRY_BACKOFF,
        0,
        86_400 * 30,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
}

/// Settings of the inference service.
fn init_service_gucs() {
    GucRegistry::define_enum_guc(
        c"doppler.inference",
        c"Where models run: service (one set of sessions for the whole server, in doppler's inference service) or backend (a session in each connection).",
        c"service needs doppler in shared_preload_libraries; without it every connection runs its own session, as backend does. doppler.session_info() says which applies.",
        &INFERENCE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.batch_window_ms",
        c"How long the inference service waits for more callers' images before a model run, when callers arrive together; 0: never waits.",
        c"A lone caller never waits: the window opens only when the last run or the queue held several callers.",
        &BATCH_WINDOW_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.service_intra_op_threads",
        c"ONNX Runtime threads of the inference service's sessions; 0 uses every core.",
        c"",
        &SERVICE_INTRA_OP_THREADS,
        0,
        256,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.service_max_sessions",
        c"Model sessions the inference service keeps for the whole server (one per model, version and provider in use); the least recently used is dropped first.",
        c"Loading a model stalls every caller while it loads: keep this at least the number of models in use across databases.",
        &SERVICE_MAX_SESSIONS,
        1,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"doppler.service_intra_op_spinning",
        c"Whether the ONNX Runtime threads of the inference service's sessions spin while they wait for work.",
        c"Off: the callers decode their images on the same cores.",
        &SERVICE_INTRA_OP_SPINNING,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// Settings of the sources doppler reads: server files and URLs.
fn init_source_gucs() {
    GucRegistry::define_string_guc(
        c"doppler.file_roots",
        c"Comma-separated folders that image files must resolve into (after symlinks and ..); empty allows any file.",
        c"Applies to extract_features(path), dhash(path), similar(path), the worker, fill and triggers.",
        &FILE_ROOTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"doppler.allow_urls",
        c"Allow http(s) image sources (for superusers and members of doppler_url_reader).",
        c"",
        &ALLOW_URLS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.url_allowed_hosts",
        c"Comma-separated hosts that may be fetched (.example.com allows its subdomains); empty allows any public host.",
        c"",
        &URL_ALLOWED_HOSTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.url_allowed_networks",
        c"Comma-separated CIDR networks that may be reached although private or reserved (e.g. 10.0.5.0/24).",
        c"By default private, loopback, link-local, multicast, unspecified and reserved addresses are refused, checked after DNS.",
        &URL_ALLOWED_NETWORKS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.url_timeout",
        c"Total time allowed for fetching one image URL.",
        c"",
        &URL_TIMEOUT,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.url_connect_timeout",
        c"Time allowed to connect to an image URL's server.",
        c"",
        &URL_CONNECT_TIMEOUT,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"doppler.url_max_redirects",
        c"Redirects followed when fetching an image URL; each is checked like the first URL.",
        c"",
        &URL_MAX_REDIRECTS,
        0,
        20,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.url_max_in_flight",
        c"Image requests in flight at once in one process (a fill, a trigger's statement, the worker), all hosts together.",
        c"Requests wait on the network together, not one per decode thread; the bytes they hold are capped by doppler.max_image_bytes each. To keep a model busy, about its images per second times the hosts' latency (100 images/s at 200 ms: 20).",
        &URL_MAX_IN_FLIGHT,
        1,
        1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.url_max_per_host",
        c"Image requests in flight at once in one process to one host.",
        c"",
        &URL_MAX_PER_HOST,
        1,
        256,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"doppler.url_host_rate",
        c"Image requests started per second to one host, per process; 0 sets no limit.",
        c"",
        &URL_HOST_RATE,
        0.0,
        1e6,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"doppler.url_user_agent",
        c"The User-Agent header of doppler's image requests.",
        c"",
        &URL_USER_AGENT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"doppler.url_prefetch_bytes",
        c"Images fetched ahead of the batch that will need them, per process; 0 turns the lookahead off.",
        c"A fill or the worker asks for the next batch's URLs while the model runs over this one.",
        &URL_PREFETCH_BYTES,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
}

fn string(s: &GucSetting<Option<CString>>) -> String {
    s.get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `doppler.model_path`: the file of the `resnet50` entry of doppler.models (`$sharedir` and
/// `$libdir` expanded).
pub fn model_path() -> String {
    crate::dirs::expand(&string(&MODEL_PATH))
}

pub fn default_model() -> String {
    string(&DEFAULT_MODEL)
}

/// `doppler.onnxruntime_library`, with `$libdir` expanded.
pub fn onnxruntime_library() -> String {
    crate::dirs::expand(&string(&ONNXRUNTIME_LIBRARY))
}

/// Threads backends decode on when `doppler.decode_threads` is 0: a sync trigger or `fill` runs in
/// any connection, and a hundred connections each starting a thread per core would swamp the server.
const BACKEND_DECODE_THREADS: usize = 2;

/// `doppler.decode_threads`, 0 resolved: one per core in doppler's worker, 2 in backends.
pub fn decode_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    match DECODE_THREADS.get() {
        n if n > 0 => n as usize,
        _ if in_doppler_worker() => cores,
        _ => BACKEND_DECODE_THREADS.min(cores),
    }
}

/// The session settings of a backend; in doppler's background worker, its own thread count and
/// spinning (a parallel query worker is a backend here).
pub fn session_config() -> SessionConfig {
    let in_worker = in_doppler_worker();
    let threads = if in_worker {
        match WORKER_INTRA_OP_THREADS.get() {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n as usize,
        }
    } else {
        INTRA_OP_THREADS.get().max(1) as usize
    };
    SessionConfig {
        model_path: model_path(),
        intra_op_threads: threads,
        spinning: if in_worker {
            WORKER_INTRA_OP_SPINNING.get()
        } else {
            INTRA_OP_SPINNING.get()
        },
        provider: match EXECUTION_PROVIDER.get() {
            ExecutionProvider::Auto => Provider::Auto,
            ExecutionProvider::Cpu => Provider::Cpu,
            ExecutionProvider::Cuda => Provider::Cuda,
        },
        device_id: CUDA_DEVICE_ID.get(),
    }
}

pub fn limits() -> Limits {
    Limits {
        max_pixels: MAX_IMAGE_PIXELS.get() as u64,
        max_dimension: MAX_IMAGE_DIMENSION.get() as u32,
        jpeg_draft_size: JPEG_DRAFT_SIZE.get() as u32,
    }
}

pub fn max_image_bytes() -> u64 {
    MAX_IMAGE_BYTES.get() as u64
}

pub fn worker_databases() -> Vec<String> {
    list(&WORKER_DATABASES)
}

pub fn skip_hashes() -> Vec<String> {
    list(&SKIP_HASHES)
}

/// A comma-separated list setting, trimmed, without empty items.
fn list(s: &GucSetting<Option<CString>>) -> Vec<String> {
    string(s)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Where images may come from, per the settings.
pub fn source_policy() -> doppler_core::source::SourcePolicy {
    use doppler_core::fetch::{Net, UrlPolicy};
    let urls = ALLOW_URLS.get().then(|| UrlPolicy {
        allowed_hosts: list(&URL_ALLOWED_HOSTS),
        allowed_networks: list(&URL_ALLOWED_NETWORKS)
            .iter()
            .filter_map(|n| Net::parse(n))
            .collect(),
        connect_timeout: std::time::Duration::from_millis(URL_CONNECT_TIMEOUT.get() as u64),
        timeout: std::time::Duration::from_millis(URL_TIMEOUT.get() as u64),
        max_redirects: URL_MAX_REDIRECTS.get() as usize,
        max_bytes: max_image_bytes(),
        // (no control characters: a header value cannot hold them)
        user_agent: match string(&URL_USER_AGENT).replace(|c: char| c.is_control(), "") {
            ua if ua.trim().is_empty() => doppler_core::fetch::USER_AGENT.to_string(),
            ua => ua,
        },
        limits: doppler_core::fetch::FetchLimits {
            max_in_flight: URL_MAX_IN_FLIGHT.get() as usize,
            max_per_host: URL_MAX_PER_HOST.get() as usize,
            host_rate: URL_HOST_RATE.get(),
            prefetch_bytes: URL_PREFETCH_BYTES.get() as u64,
        },
    });
    doppler_core::source::SourcePolicy {
        max_bytes: max_image_bytes(),
        file_roots: list(&FILE_ROOTS),
        urls,
    }
}
