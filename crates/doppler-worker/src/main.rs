//! doppler-worker: fills doppler-watched tables from another host (a GPU node), with PostgreSQL
//! as the queue. It reuses doppler-core (the same reading, decoding, resizing, preprocessing and
//! model code as the server), so its vectors are the server's own.
//!
//! This file wires the pieces and decides the exit status: 0 for a clean end (a signal drained,
//! or `--once` done), 2 for a usage or configuration error found before any work (and a role
//! that may not be a worker), 1 for anything else fatal. A server that cannot be reached or
//! refuses the login is not fatal: the worker retries, as a Kubernetes worker should.

mod api;
mod args;
mod backoff;
mod batch;
mod conninfo;
mod health;
mod heartbeat;
mod log;
mod models;
mod pathmap;
mod settings;
mod shutdown;
mod skip;
mod worker;

use std::collections::HashMap;
use std::ffi::CStr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use args::{Args, Command};
use worker::{Exit, Plan, Server, Worker};

/// Exit status for usage and configuration errors.
const USAGE: u8 = 2;
/// Exit status for other fatal errors.
const FATAL: u8 = 1;

fn main() -> ExitCode {
    let argv: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let Ok(argv) = argv else {
        return usage("an argument is not valid UTF-8");
    };
    let env = |k: &str| std::env::var(k).ok();
    let a = match args::parse(&argv, &env) {
        Ok(Command::Run(a)) => a,
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("doppler-worker {}", worker::VERSION);
            return ExitCode::SUCCESS;
        }
        Err(m) => return usage(&m),
    };
    match start(*a) {
        Ok(code) => code,
        Err((code, m)) => {
            eprintln!("doppler-worker: {m}");
            log::error("exit").field("error", m).emit();
            ExitCode::from(code)
        }
    }
}

fn usage(m: &str) -> ExitCode {
    eprintln!("doppler-worker: {m}");
    ExitCode::from(USAGE)
}

/// Checks the configuration, then runs the worker.
fn start(a: Args) -> Result<ExitCode, (u8, String)> {
    let exists = |p: &str| std::path::Path::new(p).exists();
    let var = |k: &str| std::env::var(k).ok();
    let target = conninfo::resolve(
        &a.conninfo,
        &conninfo::Env {
            var: &var,
            exists: &exists,
            os_user: &os_user,
        },
    )
    .map_err(|m| (USAGE, format!("connection string: {m}")))?;
    let tls = target.connector().map_err(|m| (USAGE, m))?;
    if !a.model_dir.is_dir() {
        return Err((
            USAGE,
            format!(
                "model folder {} does not exist (--model-dir, $DOPPLER_MODEL_DIR)",
                a.model_dir.display()
            ),
        ));
    }
    if !std::path::Path::new(&a.ort_library).is_file() {
        return Err((
            USAGE,
            format!(
                "ONNX Runtime library {} does not exist (--ort-library, $ORT_DYLIB_PATH)",
                a.ort_library
            ),
        ));
    }
    // load ONNX Runtime now: a library that is not one fails here, before any work
    doppler_core::model::runtime(&a.ort_library).map_err(|e| (USAGE, e.message))?;

    let shutdown = shutdown::Shutdown::install()
        .map_err(|e| (FATAL, format!("cannot handle signals: {e}")))?;
    let health = Arc::new(health::Health::new(a.poll_interval));
    if a.health_port != 0 {
        health.serve(a.health_port).map_err(|e| {
            (
                FATAL,
                format!("cannot serve health checks on port {}: {e}", a.health_port),
            )
        })?;
    }
    let mut config = target.config();
    config.notice_callback(notice);
    let name = a.name.clone().unwrap_or_else(hostname);
    log::info("start")
        .field("version", worker::VERSION)
        .field("name", name.clone())
        .field("server", target.describe())
        .field("model_dir", a.model_dir.display().to_string())
        .field("ort_library", a.ort_library.clone())
        .field("provider", a.provider.as_str())
        .field("device", a.device)
        .field("intra_op_threads", a.intra_op_threads)
        .field("decode_threads", a.decode_threads)
        .field("batch", a.batch)
        .field("path_map", a.path_map.describe())
        .field("once", a.once)
        .field("health_port", a.health_port)
        .emit();
    let models = models::Models::new(models::Runtime {
        dir: a.model_dir.clone(),
        ort_library: a.ort_library.clone(),
        provider: a.provider.core(),
        device: a.device,
        intra_op_threads: a.intra_op_threads,
    });
    let plan = Plan {
        name,
        provider: a.provider,
        once: a.once,
        batch: a.batch,
        decode_threads: a.decode_threads,
        poll_interval: a.poll_interval,
        paths: a.path_map,
        caps: settings::Caps {
            file_roots: a.file_roots,
            networks: a.url_networks,
        },
    };
    let server = Server {
        config,
        tls,
        described: target.describe(),
    };
    let mut w = Worker::new(plan, server, models, shutdown, health);
    match w.run() {
        Exit::Clean => {
            log::info("exit").field("status", 0).emit();
            Ok(ExitCode::SUCCESS)
        }
        Exit::NotPermitted(m) => Err((USAGE, m)),
    }
}

/// The server's notices and warnings (a table passed over for want of a SHA-256, say) as log
/// lines, each distinct one at most every ten minutes (claims repeat them every few seconds).
fn notice(d: postgres::error::DbError) {
    static SEEN: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    let key = format!("{}{}", d.code().code(), d.message());
    if seen
        .get(&key)
        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(600))
    {
        return;
    }
    if seen.len() > 1000 {
        seen.clear();
    }
    seen.insert(key, now);
    let mut line = log::warning("server_notice")
        .field("severity", d.severity().to_string())
        .field("message", d.message().to_string())
        .field("sqlstate", d.code().code().to_string());
    if let Some(h) = d.hint() {
        line = line.field("hint", h.to_string());
    }
    line.emit();
}

/// The host's name (the default --name).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if r == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// The OS user's name (libpq's default user when $USER is not set, as in a container).
fn os_user() -> Option<String> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r fills pwd with pointers into buf, both ours and alive here
    let r = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if r != 0 || out.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name points to a NUL-terminated string in buf
    let name = unsafe { CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}
