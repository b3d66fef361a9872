//! The inference service: one background worker that holds the server's model sessions and runs
//! every model run of the backends (extract_features, similar, sync triggers, fill) and of the
//! fill workers, batching concurrent callers' images together.
//!
//! Where a tensor travels (ARCHITECTURE.md has the picture):
//! 1. The caller (a backend, a parallel worker or a fill worker) reads and decodes the image with
//!    its own rights and on its own CPU, as before, into an input slot.
//! 2. It creates a dynamic shared memory segment (DSM) holding a [`Header`], the model's key
//!    (name, file, version), room for an error message, its input slots and room for the vectors,
//!    and publishes the segment's handle in its own [`Slot`] of the service's shared memory: one
//!    slot per PGPROC, so a caller never looks for a free one. Then it sets the service's latch and
//!    waits on its own latch (cancel and statement_timeout work while it waits).
//! 3. The service takes every queued slot, waits `doppler.batch_window_ms` for more when callers
//!    are arriving together, groups the requests by model key (a model registered again or a new
//!    file is a new key: versions never share a run), runs runs of up to
//!    `doppler.inference_batch_size` images, writes the vectors (or the error) into each caller's
//!    segment, marks the slot done and sets the caller's latch.
//! 4. The caller copies the vectors out, frees its slot and detaches (which destroys the segment).
//!
//! A slot's state moves IDLE → QUEUED (caller) → RUNNING (service) → DONE or LOST (service) →
//! IDLE (caller), by atomic compare-and-swap only, so that a caller can give up at any point from an
//! error's unwinding or an exit callback, where no lock may be taken:
//! * cancelled or terminated while QUEUED: the caller takes the request back (QUEUED → IDLE);
//! * while RUNNING: it marks the slot ABANDONED, and the service, which holds its own mapping of
//!   the segment, frees the slot when the run ends (and sets the latch of whoever owns the PGPROC
//!   by then, in case it waits for the slot);
//! * a service that exits (SIGTERM, an error) finishes nothing; the next one, started by the
//!   postmaster after a second, queues RUNNING slots again and serves them (a transparent
//!   retry; the callers still hold their segments), up to [`MAX_RESTARTS_PER_REQUEST`] times:
//!   then the slot is LOST and its caller gets an error, so that a request that makes the
//!   service fail cannot do so for ever. An ERROR while reading a request (dsm_attach) is caught
//!   and loses that request only. A caller that sees no service for [`SERVICE_DOWN_GRACE`] gives
//!   up with SQLSTATE 55000; a service that never started (no background worker slot) is no
//!   service: callers run their own sessions.
//! * a process killed with SIGKILL makes the postmaster restart the whole server, which resets
//!   this memory.
//!
//! The service connects to no database and never runs SQL; what it loads is named by the
//! callers' model entries (`doppler.models`, which only its owner and superusers write, and
//! superuser-only settings), exactly as a backend would load them itself.
//! Without `shared_preload_libraries` there is no service and backends load their own sessions
//! (`doppler.session_info()` says which applies).

use std::ffi::CStr;
use std::mem::size_of;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use doppler_core::{model, Error, ErrorKind, Model, Provider, SessionConfig};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::gucs;

/// One model session (this backend's or the inference service's), described without creating any.
pub struct SessionInfo {
    pub model: String,
    pub model_path: String,
    pub provider: String,
    pub input_size: i32,
    pub dim: i32,
    pub threads: i32,
}

/// The `backend_type` of the service in `pg_stat_activity`.
pub const BACKEND_TYPE: &str = "doppler inference service";

/// How long a caller waits for a service that is not running (being restarted) before it gives up.
pub const SERVICE_DOWN_GRACE: Duration = Duration::from_secs(30);

/// Where a request is (module docs): a slot's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum State {
    /// No request.
    Idle = 0,
    /// The caller published a request.
    Queued = 1,
    /// The service took it.
    Running = 2,
    /// The service answered it.
    Done = 3,
    /// The caller gave up while it ran: the service frees the slot when the run ends.
    Abandoned = 4,
    /// The service restarted [`MAX_RESTARTS_PER_REQUEST`] times while running the request: the
    /// caller gets an error instead of a third try.
    Lost = 5,
}

/// A slot's [`State`], changed by atomic operations only. Nothing else writes it, so it never
/// holds another value.
#[repr(transparent)]
struct AtomicState(AtomicU32);

impl AtomicState {
    /// The state of a value only [`AtomicState`] writes; None for any other (a damaged slot,
    /// which callers leave alone: no panic on the paths that give a request back).
    fn of(v: u32) -> Option<State> {
        match v {
            0 => Some(State::Idle),
            1 => Some(State::Queued),
            2 => Some(State::Running),
            3 => Some(State::Done),
            4 => Some(State::Abandoned),
            5 => Some(State::Lost),
            _ => None,
        }
    }

    fn load(&self) -> Option<State> {
        Self::of(self.0.load(Ordering::Acquire))
    }

    fn store(&self, to: State) {
        self.0.store(to as u32, Ordering::Release)
    }

    /// `from` → `to` if the state is `from`; whether it was.
    fn cas(&self, from: State, to: State) -> bool {
        self.0
            .compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Service starts a RUNNING request survives before it is given up as [`State::Lost`].
const MAX_RESTARTS_PER_REQUEST: u32 = 2;

const MAGIC: u64 = 0x646f_7070_6c65_7231; // "doppler1"
/// Room for the error message and hint the service writes back.
const MESSAGE_ROOM: usize = 8192;
/// Sessions shown by `doppler.session_info()`.
const PUBLISHED: usize = 8;

/// A caller's request, one per PGPROC.
#[repr(C)]
struct Slot {
    state: AtomicState,
    handle: AtomicU32,
    request: AtomicU64,
    /// Services that started while this request was RUNNING (it is queued again each time).
    restarts: AtomicU32,
}

#[repr(C)]
struct PublishedSession {
    model: [u8; 128],
    path: [u8; 4096],
    provider: [u8; 8],
    input_size: i32,
    dim: i32,
    threads: i32,
}

/// The service's shared memory: its latch and counters, the sessions it holds, then the slots.
#[repr(C)]
struct Shared {
    nslots: u32,
    /// When the postmaster set this memory up (server start, crash restart).
    initialized_at: AtomicI64,
    service_pid: AtomicI32,
    service_latch: AtomicUsize,
    starts: AtomicU64,
    started_at: AtomicI64,
    next_request: AtomicU64,
    requests: AtomicU64,
    images: AtomicU64,
    runs: AtomicU64,
    largest_run: AtomicU64,
    failed: AtomicU64,
    sessions_created: AtomicU64,
    /// Odd while the service rewrites `sessions` (a seqlock).
    seq: AtomicU64,
    nsessions: AtomicU32,
    sessions: std::cell::UnsafeCell<[PublishedSession; PUBLISHED]>,
}

static mut SHARED: *mut Shared = null_mut();
static mut PREV_REQUEST_HOOK: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_STARTUP_HOOK: Option<unsafe extern "C-unwind" fn()> = None;

fn nslots() -> usize {
    // Regular backends, autovacuum, background workers and WAL senders have PGPROC numbers below
    // MaxBackends; auxiliary processes (above) never run a model.
    unsafe { pg_sys::MaxBackends.max(0) as usize }
}

fn shared_size() -> usize {
    size_of::<Shared>() + nslots() * size_of::<Slot>()
}

/// Requests the shared memory and registers the service. Only during shared_preload_libraries.
pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_hook);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_hook);
    }
    BackgroundWorkerBuilder::new("doppler inference service")
        .set_type(BACKEND_TYPE)
        .set_library("doppler")
        .set_function("doppler_service_main")
        // connected to no database (it shows in pg_stat_activity, runs no SQL); it serves hot
        // standbys too
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
unsafe extern "C-unwind" fn request_hook() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(shared_size());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_hook() {
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        // AddinShmemInitLock (lwlocknames: 21 in PostgreSQL 15 to 18), as pgrx's pg_shmem_init! takes it
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(
            c"doppler inference service".as_ptr(),
            shared_size(),
            &mut found,
        )
        .cast::<Shared>();
        if !found {
            std::ptr::write_bytes(p.cast::<u8>(), 0, shared_size());
            (*p).nslots = nslots() as u32;
            (*p).initialized_at
                .store(pg_sys::GetCurrentTimestamp(), Ordering::Relaxed);
        }
        SHARED = p;
        pg_sys::LWLockRelease(lock);
    }
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: set once by the startup hook in the postmaster, before any backend is forked; the
    // memory lives as long as the server.
    unsafe { SHARED.as_ref() }
}

fn slot(i: usize) -> &'static Slot {
    let s = shared().expect("service shared memory");
    assert!(i < s.nslots as usize);
    // SAFETY: the slots follow the header, nslots of them (see shared_size).
    unsafe { &*(SHARED.add(1).cast::<Slot>().add(i)) }
}

/// This process's PGPROC number, when it has a slot.
fn my_slot() -> Option<usize> {
    let s = shared()?;
    // SAFETY: MyProc and ProcGlobal are set for every process that can call doppler.
    let i = unsafe {
        if pg_sys::MyProc.is_null() || pg_sys::ProcGlobal.is_null() {
            return None;
        }
        pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs)
    };
    (i >= 0 && (i as usize) < s.nslots as usize).then_some(i as usize)
}

fn set_latch_of(procno: usize) {
    // SAFETY: procno < nslots <= the PGPROC array's length; a latch in shared memory may be set
    // by any process.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

// ---------------------------------------------------------------------------------------------
// What a backend asks

/// How this backend's model runs happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inference {
    /// In the server's inference service.
    Service,
    /// In a session of this backend: `doppler.inference = backend`, or no service (doppler is not
    /// in shared_preload_libraries).
    Backend,
}

impl Inference {
    pub fn as_str(self) -> &'static str {
        match self {
            Inference::Service => "service",
            Inference::Backend => "backend",
        }
    }
}

/// Whether `doppler.inference = service` and the service exists but has not started yet, in the
/// first [`SERVICE_DOWN_GRACE`] after the server (re)started: callers run the model themselves
/// meanwhile, in sessions they do not keep. A service that has not started by then never will (no
/// background worker slot): callers keep their own sessions.
pub fn not_started_yet() -> bool {
    gucs::INFERENCE.get() == gucs::InferenceMode::Service
        && shared().is_some_and(|s| {
            let since_us =
                unsafe { pg_sys::GetCurrentTimestamp() } - s.initialized_at.load(Ordering::Relaxed);
            s.starts.load(Ordering::Acquire) == 0
                && since_us < SERVICE_DOWN_GRACE.as_micros() as i64
        })
}

/// Where this backend's next model run goes.
pub fn inference() -> Inference {
    // a service that never started (no background worker slot left: max_worker_processes) is no
    // service: backends run their own sessions rather than wait for it
    let started = shared().is_some_and(|s| s.starts.load(Ordering::Acquire) > 0);
    if gucs::INFERENCE.get() == gucs::InferenceMode::Service && started && my_slot().is_some() {
        Inference::Service
    } else {
        Inference::Backend
    }
}

/// What identifies a session: runs of different keys never share a model run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: String,
    pub path: String,
    pub version: String,
    pub input_size: u32,
    pub dim: u32,
    pub provider: Provider,
    pub device_id: i32,
}

impl Key {
    /// Whether requests of `self` and `other` may share a model run: the same file, version, input
    /// size, dimension and provider (the name alone may differ: two entries of one file).
    fn shares_runs_with(&self, other: &Key) -> bool {
        (
            &self.path,
            &self.version,
            self.input_size,
            self.dim,
            self.provider,
            self.device_id,
        ) == (
            &other.path,
            &other.version,
            other.input_size,
            other.dim,
            other.provider,
            other.device_id,
        )
    }
}

/// The fixed part of a request segment.
#[repr(C)]
struct Header {
    magic: u64,
    request: u64,
    n: u32,
    input_size: u32,
    dim: u32,
    provider: u32,
    device_id: i32,
    name_len: u32,
    path_len: u32,
    version_len: u32,
    // written by the service
    failed: u32,
    /// The failure is the model's (loading, checking), not the images'.
    loading: u32,
    kind_len: u32,
    message_len: u32,
    hint_len: u32,
    run_images: u32,
    /// CUDA was asked for and the model runs on the CPU.
    cpu_fallback: u32,
}

impl Header {
    /// Where this request's parts lie (lengths summed in usize: no overflow).
    fn layout(&self) -> Layout {
        let key_len = self.name_len as usize + self.path_len as usize + self.version_len as usize;
        Layout::of(key_len, self.n as usize, self.input_size, self.dim)
    }
}

/// `len` bytes at `at` past `base`, as text.
///
/// # Safety
/// The bytes must lie inside one mapping.
unsafe fn read_str(base: *const u8, at: usize, len: u32) -> String {
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(base.add(at), len as usize) })
        .into_owned()
}

/// Writes `parts` one after another from `dst` (the key's name, path and version; an error's
/// kind, message and hint), the counterpart of [`read_str`].
///
/// # Safety
/// Their total length must fit inside the mapping from `dst`.
unsafe fn write_strs(dst: *mut u8, parts: &[&[u8]]) {
    let mut at = 0;
    for p in parts {
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.add(at), p.len()) };
        at += p.len();
    }
}

/// Byte offsets of a request segment's parts.
struct Layout {
    key: usize,
    message: usize,
    input: usize,
    output: usize,
    total: usize,
}

fn align(x: usize) -> usize {
    (x + 63) & !63
}

impl Layout {
    fn of(key_len: usize, n: usize, input_size: u32, dim: u32) -> Layout {
        let s = input_size as usize;
        let key = align(size_of::<Header>());
        let message = align(key + key_len);
        let input = align(message + MESSAGE_ROOM);
        let output = align(input + n * 3 * s * s * 4);
        let total = output + n * dim as usize * 4;
        Layout {
            key,
            message,
            input,
            output,
            total,
        }
    }
}

fn provider_code(p: Provider) -> u32 {
    match p {
        Provider::Cpu => 0,
        Provider::Cuda => 1,
        Provider::Auto => 2,
    }
}

/// The provider of a code [`provider_code`] wrote; None for any other (not a request).
fn provider_of(code: u32) -> Option<Provider> {
    match code {
        0 => Some(Provider::Cpu),
        1 => Some(Provider::Cuda),
        2 => Some(Provider::Auto),
        _ => None,
    }
}

/// Takes a request back when the caller stops waiting (an error's unwinding, or the exit
/// callback): atomics only.
fn abandon(slot: &Slot) {
    loop {
        let Some(s) = slot.state.load() else {
            return;
        };
        let next = match s {
            State::Queued | State::Done | State::Lost => State::Idle,
            State::Running => State::Abandoned,
            State::Idle | State::Abandoned => return,
        };
        if slot.state.cas(s, next) {
            return;
        }
    }
}

/// The caller's side of a request in flight: dropped before it is answered (an ERROR's
/// unwinding), it takes the request back.
struct Pending {
    slot: &'static Slot,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            abandon(self.slot);
        }
    }
}

static EXIT_HOOKED: AtomicU32 = AtomicU32::new(0);

#[pg_guard]
unsafe extern "C-unwind" fn caller_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // A FATAL (pg_terminate_backend, a lost client) ends the process without unwinding.
    if let Some(i) = my_slot() {
        abandon(slot(i));
    }
}

/// Waits on this process's latch for up to `timeout`, with cancel and termination checked.
fn wait_latch(timeout: Duration) {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

fn service_down() -> Error {
    Error::new(
        ErrorKind::ServiceUnavailable,
        format!(
            "doppler's inference service is not running (waited {} s)",
            SERVICE_DOWN_GRACE.as_secs()
        ),
    )
    .with_hint("The postmaster restarts it; the server log says why it stopped. A superuser can SET doppler.inference = backend to run models in the connection.")
}

/// Why a request was not answered with vectors.
pub struct Failed {
    pub error: Error,
    /// Not the images' fault: the model could not be loaded (or does not fit), or the service
    /// lost the request.
    pub loading: bool,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed {
            error,
            loading: false,
        }
    }
}

/// Runs `n` input slots of `key`'s model in the service (`n` = 0 only loads and checks the model)
/// and returns `n × dim` floats. Raises cancel and termination like any wait.
pub fn infer(key: &Key, batch: &[f32], n: usize) -> Result<Vec<f32>, Failed> {
    let s = shared().expect("inference() said service");
    let me = my_slot().expect("inference() said service");
    let slot = slot(me);
    if EXIT_HOOKED.swap(1, Ordering::Relaxed) == 0 {
        unsafe { pg_sys::before_shmem_exit(Some(caller_exit), pg_sys::Datum::from(0)) };
    }
    // The slot is ours; a request this process gave up may still be running: wait for the
    // service to free it.
    let mut waited = Instant::now();
    loop {
        match slot.state.load() {
            Some(State::Idle) => break,
            Some(State::Abandoned) => {}
            _ => abandon(slot),
        }
        if s.service_pid.load(Ordering::Acquire) == 0 && waited.elapsed() > SERVICE_DOWN_GRACE {
            // nobody will finish it: no service is running
            let _ = slot.state.cas(State::Abandoned, State::Idle);
            waited = Instant::now();
            continue;
        }
        wait_latch(Duration::from_millis(100));
    }
    let (name, path, version) = (
        key.name.as_bytes(),
        key.path.as_bytes(),
        key.version.as_bytes(),
    );
    let key_len = name.len() + path.len() + version.len();
    let layout = Layout::of(key_len, n, key.input_size, key.dim);
    let slot_len = 3 * (key.input_size as usize).pow(2);
    if batch.len() != n * slot_len {
        return Err(Error::new(ErrorKind::Internal, "input batch has the wrong length").into());
    }
    // SAFETY: a fresh segment of layout.total bytes; every write below is inside it. An out of
    // memory is an ERROR (this is the caller's process, in a transaction).
    let (seg, base) = unsafe {
        let seg = pg_sys::dsm_create(layout.total, 0);
        let base = pg_sys::dsm_segment_address(seg).cast::<u8>();
        let request = s.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        base.cast::<Header>().write(Header {
            magic: MAGIC,
            request,
            n: n as u32,
            input_size: key.input_size,
            dim: key.dim,
            provider: provider_code(key.provider),
            device_id: key.device_id,
            name_len: name.len() as u32,
            path_len: path.len() as u32,
            version_len: version.len() as u32,
            failed: 0,
            loading: 0,
            kind_len: 0,
            message_len: 0,
            hint_len: 0,
            run_images: 0,
            cpu_fallback: 0,
        });
        write_strs(base.add(layout.key), &[name, path, version]);
        std::ptr::copy_nonoverlapping(
            batch.as_ptr(),
            base.add(layout.input).cast::<f32>(),
            batch.len(),
        );
        slot.request.store(request, Ordering::Relaxed);
        slot.handle
            .store(pg_sys::dsm_segment_handle(seg), Ordering::Relaxed);
        slot.restarts.store(0, Ordering::Relaxed);
        (seg, base)
    };
    let mut pending = Pending {
        slot,
        answered: false,
    };
    slot.state.store(State::Queued);
    // the store above before the load of the service's latch (a service starting now either sees
    // QUEUED in its first scan, or has published its latch for us to set)
    std::sync::atomic::fence(Ordering::SeqCst);
    wake_service(s);
    let mut down_since: Option<Instant> = None;
    loop {
        match slot.state.load() {
            Some(State::Done) => break,
            Some(State::Lost) => {
                drop(pending);
                unsafe { pg_sys::dsm_detach(seg) };
                let e = Error::new(
                    ErrorKind::Inference,
                    "doppler's inference service could not run this request: it could not read it, or stopped while running it three times",
                )
                .with_hint("The server log says why; the request is not tried again.");
                // not the images' fault: raised, not recorded against rows
                return Err(Failed {
                    error: e,
                    loading: true,
                });
            }
            // insurance against a wake-up lost to a service that was starting
            Some(State::Queued) => wake_service(s),
            _ => {}
        }
        if s.service_pid.load(Ordering::Acquire) == 0 {
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() > SERVICE_DOWN_GRACE {
                drop(pending); // takes the request back
                unsafe { pg_sys::dsm_detach(seg) };
                return Err(service_down().into());
            }
        } else {
            down_since = None;
        }
        wait_latch(Duration::from_millis(1000));
    }
    // SAFETY: DONE: the service has written the answer and no longer touches the segment.
    let answer = unsafe {
        let h = &*base.cast::<Header>();
        if h.cpu_fallback != 0 {
            warn_fallback(key);
        }
        if h.failed != 0 {
            let m = base.add(layout.message);
            let kind = read_str(m, 0, h.kind_len);
            let message = read_str(m, h.kind_len as usize, h.message_len);
            let hint = read_str(m, (h.kind_len + h.message_len) as usize, h.hint_len);
            let mut e = Error::new(ErrorKind::from_name(&kind), message);
            if !hint.is_empty() {
                e.hint = Some(hint);
            }
            Err(Failed {
                error: e,
                loading: h.loading != 0,
            })
        } else {
            let out = std::slice::from_raw_parts(
                base.add(layout.output).cast::<f32>(),
                n * key.dim as usize,
            );
            Ok(out.to_vec())
        }
    };
    pending.answered = true;
    slot.state.store(State::Idle);
    unsafe { pg_sys::dsm_detach(seg) };
    answer
}

thread_local! {
    /// Model files this backend has warned about (execution_provider = cuda, run on the CPU).
    static WARNED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Warns once per model file and backend, as a backend's own session warns once when it loads.
fn warn_fallback(key: &Key) {
    let first = WARNED.with(|w| {
        let mut w = w.borrow_mut();
        let first = !w.contains(&key.path);
        if first {
            w.push(key.path.clone());
        }
        first
    });
    if first && key.provider == Provider::Cuda {
        warning!(
            "doppler: execution_provider is cuda but the model runs on the CPU (in the inference service; the server log says why)"
        );
    }
}

fn wake_service(s: &Shared) {
    let latch = s.service_latch.load(Ordering::Acquire) as *mut pg_sys::Latch;
    if !latch.is_null() {
        // SAFETY: the service's PGPROC latch, in shared memory.
        unsafe { pg_sys::SetLatch(latch) };
    }
}

// ---------------------------------------------------------------------------------------------
// What session_info and service_status show

fn cstr(b: &[u8]) -> String {
    CStr::from_bytes_until_nul(b)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The service's sessions, most recently used first, and how many it has created.
pub fn sessions() -> (Vec<SessionInfo>, i64) {
    let Some(s) = shared() else {
        return (Vec::new(), 0);
    };
    loop {
        let before = s.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            std::thread::yield_now();
            continue;
        }
        let n = (s.nsessions.load(Ordering::Acquire) as usize).min(PUBLISHED);
        // SAFETY: a racy read, checked against seq below.
        let table = unsafe { &*s.sessions.get() };
        let list: Vec<SessionInfo> = table[..n]
            .iter()
            .map(|p| SessionInfo {
                model: cstr(&p.model),
                model_path: cstr(&p.path),
                provider: cstr(&p.provider),
                input_size: p.input_size,
                dim: p.dim,
                threads: p.threads,
            })
            .collect();
        let created = s.sessions_created.load(Ordering::Relaxed) as i64;
        std::sync::atomic::fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) == before {
            return (list, created);
        }
    }
}

/// The service's sessions a caller of this database may see, with how many it created: those of
/// this database's models, under the names they have here (the service serves every database);
/// superusers see them all.
pub fn visible_sessions() -> (Vec<SessionInfo>, i64) {
    let (list, created) = sessions();
    let mine = this_databases_models();
    // SAFETY: a catalog lookup on the current user, in a transaction.
    let superuser = unsafe { pg_sys::superuser() };
    let list = list
        .into_iter()
        .filter_map(|mut s| {
            match mine.iter().find(|(_, path)| *path == s.model_path) {
                Some((name, _)) => s.model.clone_from(name),
                None if superuser => {}
                None => return None,
            }
            Some(s)
        })
        .collect();
    (list, created)
}

/// (name, resolved file) of each doppler.models entry of this database.
fn this_databases_models() -> Vec<(String, String)> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT m.name, m.onnx_path FROM doppler.models m",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let name = r.get::<String>(1)?.unwrap_or_default();
            let path = r
                .get::<String>(2)?
                .map(|p| crate::dirs::expand(&p))
                .unwrap_or_else(crate::gucs::model_path);
            out.push((name, path));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_default()
}

/// The service's state and counters (`doppler.service_status()`).
pub struct Status {
    pub pid: Option<i32>,
    pub started_at: Option<pg_sys::TimestampTz>,
    pub starts: i64,
    pub requests: i64,
    pub images: i64,
    pub runs: i64,
    pub largest_run: i64,
    pub failed: i64,
    /// Requests waiting to be taken, and being run, now.
    pub queued: i64,
    pub running: i64,
}

pub fn status() -> Option<Status> {
    let s = shared()?;
    let pid = s.service_pid.load(Ordering::Acquire);
    let at = s.started_at.load(Ordering::Relaxed);
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
    Some(Status {
        pid: (pid != 0).then_some(pid),
        started_at: (at != 0).then_some(at),
        starts: n(&s.starts),
        requests: n(&s.requests),
        images: n(&s.images),
        runs: n(&s.runs),
        largest_run: n(&s.largest_run),
        failed: n(&s.failed),
        queued: count_in(s, State::Queued),
        running: count_in(s, State::Running) + count_in(s, State::Abandoned),
    })
}

fn count_in(s: &Shared, state: State) -> i64 {
    (0..s.nslots as usize)
        .filter(|&i| slot(i).state.load() == Some(state))
        .count() as i64
}

// ---------------------------------------------------------------------------------------------
// The service

#[pg_guard]
unsafe extern "C-unwind" fn service_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    if let Some(s) = shared() {
        s.service_latch.store(0, Ordering::Release);
        s.service_pid.store(0, Ordering::Release);
    }
}

/// The service's entry point.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn doppler_service_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // A cancel has no statement to cancel here, and its ERROR (raised at the next log line's
    // interrupt check) would end the service: ignore it.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    // No database: shared catalogs only, so that it shows in pg_stat_activity; it runs no SQL.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let s = shared().expect("doppler's shared memory is set up with the service");
    // What an earlier service left: runs it did not finish are queued again (their callers
    // still wait and hold their segments), unless this request has already seen services stop
    // while running it (an ERROR it causes, e.g.); slots given up during them are free.
    for i in 0..s.nslots as usize {
        let slot = slot(i);
        if slot.state.load() == Some(State::Running) {
            let next =
                if slot.restarts.fetch_add(1, Ordering::AcqRel) + 1 > MAX_RESTARTS_PER_REQUEST {
                    State::Lost
                } else {
                    State::Queued
                };
            let _ = slot.state.cas(State::Running, next);
        }
        let _ = slot.state.cas(State::Abandoned, State::Idle);
    }
    s.seq.fetch_add(1, Ordering::AcqRel);
    s.nsessions.store(0, Ordering::Release);
    s.seq.fetch_add(1, Ordering::AcqRel);
    unsafe {
        pg_sys::on_shmem_exit(Some(service_exit), pg_sys::Datum::from(0));
        s.service_latch
            .store(pg_sys::MyLatch as usize, Ordering::Release);
        s.started_at
            .store(pg_sys::GetCurrentTimestamp(), Ordering::Relaxed);
        s.service_pid.store(pg_sys::MyProcPid, Ordering::Release);
    }
    s.starts.fetch_add(1, Ordering::Release);
    // the latch published before the first scan of the slots (see infer)
    std::sync::atomic::fence(Ordering::SeqCst);
    log!("doppler inference service started");
    let mut service = Service {
        sessions: Vec::new(),
        last_callers: 0,
    };
    // Wake every caller: those that wait for a slot to be freed, and those that counted the
    // seconds without a service.
    for i in 0..s.nslots as usize {
        if slot(i).state.load() != Some(State::Idle) {
            set_latch_of(i);
        }
    }
    loop {
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        absorb_barriers();
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let mut picked = take_queued(s);
        if picked.is_empty() {
            service_wait(None);
            continue;
        }
        // Dynamic batching: when callers arrive together, wait a little for the rest.
        let window = Duration::from_millis(gucs::BATCH_WINDOW_MS.get().max(0) as u64);
        let run_size = gucs::INFERENCE_BATCH_SIZE.get().max(1) as usize;
        if !window.is_zero() && (picked.len() > 1 || service.last_callers > 1) {
            let deadline = Instant::now() + window;
            while picked.len() < run_size {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                service_wait(Some(deadline - now));
                unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
                absorb_barriers();
                picked.extend(take_queued(s));
            }
        }
        service.last_callers = picked.len();
        service.serve(s, picked, run_size);
    }
    log!("doppler inference service stopping");
    // Exit code 1: the postmaster starts it again (0 would unregister it).
    unsafe { pg_sys::proc_exit(1) };
}

/// Takes part in ProcSignalBarriers (DROP DATABASE, ALTER DATABASE SET TABLESPACE wait for every
/// process to absorb one). The service does not run CHECK_FOR_INTERRUPTS: a cancel sent to it has
/// no statement to cancel, and an ERROR outside a transaction would end it.
fn absorb_barriers() {
    unsafe {
        if pg_sys::ProcSignalBarrierPending != 0 {
            pg_sys::ProcessProcSignalBarrier();
        }
    }
}

fn service_wait(timeout: Option<Duration>) {
    let (flags, ms) = match timeout {
        Some(t) => (
            pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH,
            t.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long,
        ),
        None => (pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH, -1),
    };
    unsafe { pg_sys::WaitLatch(pg_sys::MyLatch, flags as i32, ms, pg_sys::PG_WAIT_EXTENSION) };
}

/// The slots that are queued, now RUNNING.
fn take_queued(s: &Shared) -> Vec<usize> {
    (0..s.nslots as usize)
        .filter(|&i| slot(i).state.cas(State::Queued, State::Running))
        .collect()
}

/// A request the service has attached.
struct Request {
    procno: usize,
    seg: *mut pg_sys::dsm_segment,
    base: *mut u8,
    layout: Layout,
    key: Key,
    n: usize,
    error: Option<Error>,
    /// The error is the model's (it could not be loaded or does not fit).
    loading: bool,
}

impl Request {
    /// Attaches slot `procno`'s segment; None when the caller is gone (its slot is then freed).
    fn attach(procno: usize) -> Option<Request> {
        let slot = slot(procno);
        let (handle, request) = (
            slot.handle.load(Ordering::Relaxed),
            slot.request.load(Ordering::Relaxed),
        );
        // SAFETY: dsm_attach returns NULL when the segment no longer exists; the reads below are
        // bounds-checked against the mapping's length.
        unsafe {
            let seg = pg_sys::dsm_attach(handle);
            if seg.is_null() {
                lose(procno); // its caller is gone (or it never was a request)
                return None;
            }
            let base = pg_sys::dsm_segment_address(seg).cast::<u8>();
            let len = pg_sys::dsm_segment_map_length(seg);
            let fits = len >= size_of::<Header>() && {
                let h = &*base.cast::<Header>();
                h.magic == MAGIC
                    && h.request == request
                    && h.layout().total <= len
                    && provider_of(h.provider).is_some()
            };
            if !fits {
                pg_sys::dsm_detach(seg);
                lose(procno);
                return None;
            }
            let h = &*base.cast::<Header>();
            let layout = h.layout();
            let k = base.add(layout.key);
            let key = Key {
                name: read_str(k, 0, h.name_len),
                path: read_str(k, h.name_len as usize, h.path_len),
                version: read_str(k, h.name_len as usize + h.path_len as usize, h.version_len),
                input_size: h.input_size,
                dim: h.dim,
                provider: provider_of(h.provider).expect("checked above"),
                device_id: h.device_id,
            };
            Some(Request {
                procno,
                seg,
                base,
                layout,
                n: h.n as usize,
                key,
                error: None,
                loading: false,
            })
        }
    }

    fn image(&self, i: usize) -> &[f32] {
        let len = 3 * (self.key.input_size as usize).pow(2);
        // SAFETY: inside the mapping (checked in attach).
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(self.layout.input).cast::<f32>().add(i * len),
                len,
            )
        }
    }

    fn put_vector(&mut self, i: usize, v: &[f32]) {
        let dim = self.key.dim as usize;
        // SAFETY: inside the mapping (checked in attach).
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.as_ptr(),
                self.base.add(self.layout.output).cast::<f32>().add(i * dim),
                dim,
            );
        }
    }

    /// Writes the answer, marks the slot done and wakes the caller.
    fn answer(self, run_images: usize, cpu_fallback: bool) {
        // SAFETY: inside the mapping; the caller reads it only once the slot is DONE.
        unsafe {
            let h = &mut *self.base.cast::<Header>();
            h.run_images = run_images as u32;
            h.cpu_fallback = cpu_fallback as u32;
            if let Some(e) = &self.error {
                let kind = e.kind.as_str().as_bytes();
                let hint = e.hint.as_deref().unwrap_or("").as_bytes();
                let room = MESSAGE_ROOM - kind.len();
                let message = truncate(e.message.as_bytes(), room);
                let hint = truncate(hint, room - message.len());
                write_strs(self.base.add(self.layout.message), &[kind, message, hint]);
                h.kind_len = kind.len() as u32;
                h.message_len = message.len() as u32;
                h.hint_len = hint.len() as u32;
                h.failed = 1;
                h.loading = self.loading as u32;
            }
            pg_sys::dsm_detach(self.seg);
        }
        finish(self.procno);
    }
}

fn truncate(b: &[u8], room: usize) -> &[u8] {
    let mut n = b.len().min(room);
    while n > 0 && n < b.len() && (b[n] & 0xC0) == 0x80 {
        n -= 1; // not inside a UTF-8 sequence
    }
    &b[..n]
}

/// Attaches slot `procno`'s request. An ERROR on the way (dsm_attach out of memory, too many
/// segments) is that request's, not the service's: outside a transaction it would end the
/// service, and the next one would meet it again. The request is lost, its caller told.
fn attach_or_lose(procno: usize) -> Option<Request> {
    let handle = slot(procno).handle.load(Ordering::Relaxed);
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Request::attach(procno)))
        .catch_others(|e| {
            let msg = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    r.message().to_string()
                }
            };
            // what error recovery does outside a transaction; and a descriptor dsm_attach made
            // before it failed has no resource owner to release it
            unsafe {
                pg_sys::LWLockReleaseAll();
                let seg = pg_sys::dsm_find_mapping(handle);
                if !seg.is_null() {
                    pg_sys::dsm_detach(seg);
                }
            }
            warning!("doppler inference service: could not read a request: {msg}");
            lose(procno);
            None
        })
        .execute()
}

/// Ends a RUNNING request that cannot be run: LOST for a caller that waits (it gets an error),
/// IDLE for one that gave up; wakes whoever owns the slot now.
fn lose(procno: usize) {
    end(procno, State::Lost);
}

/// Ends a RUNNING request: DONE for a caller that waits, IDLE for one that gave up; wakes
/// whoever owns the slot now.
fn finish(procno: usize) {
    end(procno, State::Done);
}

/// RUNNING → `to`, or ABANDONED → IDLE; then wakes the slot's owner.
fn end(procno: usize, to: State) {
    let slot = slot(procno);
    if !slot.state.cas(State::Running, to) {
        let _ = slot.state.cas(State::Abandoned, State::Idle);
    }
    set_latch_of(procno);
}

/// A session the service holds, keyed by everything it depends on.
struct Held {
    key: Key,
    config: SessionConfig,
    file: Option<(u64, std::time::SystemTime)>,
    model: Model,
}

struct Service {
    /// Most recently used first.
    sessions: Vec<Held>,
    /// Requests in the last batch: more than one means callers are arriving together.
    last_callers: usize,
}

fn file_of(path: &str) -> Option<(u64, std::time::SystemTime)> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?)))
}

fn service_threads() -> usize {
    match gucs::SERVICE_INTRA_OP_THREADS.get() {
        n if n > 0 => n as usize,
        _ => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

impl Service {
    fn serve(&mut self, s: &Shared, picked: Vec<usize>, run_size: usize) {
        let mut requests: Vec<Request> = picked.into_iter().filter_map(attach_or_lose).collect();
        s.requests
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        while !requests.is_empty() {
            // one model key at a time: versions and files never share a run
            let key = requests[0].key.clone();
            let (mut group, rest): (Vec<Request>, Vec<Request>) = requests
                .into_iter()
                .partition(|r| r.key.shares_runs_with(&key));
            requests = rest;
            let mut run_images = 0;
            let mut cpu_fallback = false;
            match self.session(s, &key) {
                Err(e) => {
                    for r in &mut group {
                        r.loading = true;
                        r.error = Some(e.copy());
                    }
                }
                Ok(model) => {
                    cpu_fallback = key.provider != Provider::Cpu && model.provider == "CPU";
                    let work: Vec<(usize, usize)> = group
                        .iter()
                        .enumerate()
                        .flat_map(|(r, req)| (0..req.n).map(move |i| (r, i)))
                        .collect();
                    for run in work.chunks(run_size) {
                        // images of callers that gave up are not run
                        let run: Vec<(usize, usize)> = run
                            .iter()
                            .copied()
                            .filter(|&(r, _)| {
                                slot(group[r].procno).state.load() != Some(State::Abandoned)
                            })
                            .collect();
                        if run.is_empty() {
                            continue;
                        }
                        let mut tensor =
                            Vec::with_capacity(run.len() * 3 * (key.input_size as usize).pow(2));
                        for &(r, i) in &run {
                            tensor.extend_from_slice(group[r].image(i));
                        }
                        let out = doppler_core::error::catch_panic("running the model", || {
                            model.run(&tensor, run.len())
                        });
                        s.runs.fetch_add(1, Ordering::Relaxed);
                        s.images.fetch_add(run.len() as u64, Ordering::Relaxed);
                        s.largest_run.fetch_max(run.len() as u64, Ordering::Relaxed);
                        run_images = run_images.max(run.len());
                        let dim = model.dim;
                        match out {
                            Ok(out) => {
                                for (j, &(r, i)) in run.iter().enumerate() {
                                    group[r].put_vector(i, &out[j * dim..(j + 1) * dim]);
                                }
                            }
                            Err(e) if run.iter().any(|&(r, _)| r != run[0].0) => {
                                // one caller's images must not fail the others': each alone
                                for &(r, i) in &run {
                                    let alone = doppler_core::error::catch_panic(
                                        "running the model",
                                        || model.run(group[r].image(i), 1),
                                    );
                                    s.runs.fetch_add(1, Ordering::Relaxed);
                                    match alone {
                                        Ok(v) => group[r].put_vector(i, &v),
                                        Err(_) => group[r].error = Some(e.copy()),
                                    }
                                }
                            }
                            Err(e) => {
                                for &(r, _) in &run {
                                    group[r].error = Some(e.copy());
                                }
                            }
                        }
                    }
                }
            }
            for r in group {
                if r.error.is_some() {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                }
                r.answer(run_images, cpu_fallback);
            }
        }
    }

    /// The session for `key`, loaded if needed (never raises: the error goes to the callers).
    fn session(&mut self, s: &Shared, key: &Key) -> doppler_core::Result<&mut Model> {
        let config = SessionConfig {
            model_path: key.path.clone(),
            intra_op_threads: service_threads(),
            spinning: gucs::SERVICE_INTRA_OP_SPINNING.get(),
            provider: key.provider,
            device_id: key.device_id,
        };
        let file = file_of(&key.path);
        // the version only tags the vectors: two entries (or versions) of one file share a session
        let same =
            |h: &Held| h.config == config && h.file == file && h.key.input_size == key.input_size;
        if let Some(i) = self.sessions.iter().position(same) {
            let hit = self.sessions.remove(i);
            self.sessions.insert(0, hit);
            self.sessions[0].key.name.clone_from(&key.name);
        } else {
            // loaded before anything is evicted: a file that does not load costs no good session
            let model = doppler_core::error::catch_panic("loading the model", || {
                let env = model::runtime(&gucs::onnxruntime_library())?;
                let mut m = Model::load(env, &config)?;
                m.set_input_size(key.input_size)?;
                Ok(m)
            })?;
            if let Some(why) = &model.fallback {
                log!(
                    "doppler inference service: model \"{}\" runs on the CPU: {why}",
                    key.name
                );
            }
            s.sessions_created.fetch_add(1, Ordering::Relaxed);
            // the same file's older sessions (replaced file, other threads or spinning after a
            // reload) are of no more use
            self.sessions.retain(|h| {
                h.config.model_path != config.model_path || h.key.input_size != key.input_size
            });
            let keep = (gucs::SERVICE_MAX_SESSIONS.get().max(1) as usize).saturating_sub(1);
            self.sessions.truncate(keep);
            self.sessions.insert(
                0,
                Held {
                    key: key.clone(),
                    config,
                    file,
                    model,
                },
            );
        }
        self.publish(s);
        let model = &mut self.sessions[0].model;
        if model.dim != key.dim as usize {
            return Err(Error::new(
                ErrorKind::BadModel,
                format!(
                    "model \"{}\" ({}) produces {}-dimensional features, but doppler.models says {}",
                    key.name, key.path, model.dim, key.dim
                ),
            )
            .with_hint("Register the model again with the right dim."));
        }
        Ok(model)
    }

    fn publish(&self, s: &Shared) {
        let put = |dst: &mut [u8], src: &str| {
            let b = truncate(src.as_bytes(), dst.len() - 1);
            dst[..b.len()].copy_from_slice(b);
            dst[b.len()..].fill(0);
        };
        s.seq.fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        // SAFETY: only the service writes the published sessions; readers retry while seq is odd
        // or has moved.
        let table = unsafe { &mut *s.sessions.get() };
        for (p, h) in table.iter_mut().zip(&self.sessions) {
            put(&mut p.model, &h.key.name);
            put(&mut p.path, &h.key.path);
            put(&mut p.provider, h.model.provider);
            p.input_size = h.model.input_size as i32;
            p.dim = h.model.dim as i32;
            p.threads = h.config.intra_op_threads as i32;
        }
        s.nsessions
            .store(self.sessions.len().min(PUBLISHED) as u32, Ordering::Release);
        s.seq.fetch_add(1, Ordering::Release);
    }
}
