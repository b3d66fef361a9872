//! ONNX Runtime: the process-wide runtime (loaded from a shared library at first use) and model
//! sessions that turn a batch of input slots into feature vectors.
//!
//! Nothing here runs at library load: the runtime is loaded and sessions are created lazily, by the
//! caller's thread. Postgres forks its backends from the postmaster, so ORT must never be touched
//! before the fork; and ORT's thread pools must not receive Postgres' signals, so all signals are
//! blocked while ORT creates threads (those threads inherit the blocked mask).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::error::{Error, ErrorKind, Result};

static RUNTIME: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Runs `f` with every signal blocked on this thread, restoring the previous mask afterwards.
/// Threads created inside `f` inherit the fully blocked mask, so signals meant for the Postgres
/// backend (SIGINT for cancel, SIGTERM, SIGUSR1 latches) are never delivered to them.
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain libc calls on stack-allocated sigset_t values.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        match r {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// The ORT environment, loading the shared library from `library` on first use. The library can
/// be loaded once per process; asking for another path later is an error that says so.
pub fn runtime(library: &str) -> Result<&'static Environment> {
    if let Some((loaded, env)) = RUNTIME.get() {
        if Path::new(library) != loaded {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "ONNX Runtime is already loaded from \"{}\" in this process; it cannot switch to \"{library}\"",
                    loaded.display()
                ),
            )
            .with_hint("Reconnect (a new backend) to use another doppler.onnxruntime_library."));
        }
        return Ok(env);
    }
    let missing = |detail: String| {
        Error::new(ErrorKind::RuntimeMissing, format!("could not load the ONNX Runtime library \"{library}\": {detail}"))
            .with_hint("doppler's packages install ONNX Runtime at $libdir/doppler/libonnxruntime.so, the default; otherwise set doppler.onnxruntime_library to the absolute path of libonnxruntime.so (1.31 or later).")
    };
    if library.is_empty() {
        return Err(missing("doppler.onnxruntime_library is not set".into()));
    }
    if !Path::new(library).is_absolute() {
        return Err(missing("the path must be absolute".into()));
    }
    if !Path::new(library).is_file() {
        return Err(missing("no such file".into()));
    }
    let env = with_signals_blocked(|| -> Result<Environment> {
        let builder = ort::init_from(library).map_err(|e| missing(e.to_string()))?;
        builder
            .with_name("doppler")
            .with_telemetry(false)
            .build()
            .map_err(|e| missing(e.to_string()))
    })?;
    // Two threads cannot race here in a backend (single-threaded); if they did, the loser's env is dropped.
    let _ = RUNTIME.set((PathBuf::from(library), env));
    Ok(&RUNTIME.get().expect("runtime was just set").1)
}

/// Where a session runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// CPU only.
    Cpu,
    /// CUDA; if it cannot be registered, fall back to CPU with a warning.
    Cuda,
    /// Try CUDA, use CPU when it is not available (a log line says why).
    Auto,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Some(Provider::Cpu),
            "cuda" => Some(Provider::Cuda),
            "auto" => Some(Provider::Auto),
            _ => None,
        }
    }
}

/// Everything a session depends on: when any of it changes, the session is rebuilt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub model_path: String,
    pub intra_op_threads: usize,
    /// Whether ORT's intra-op threads spin while they wait for work. Spinning saves a wake-up per
    /// operator when the session has its cores to itself; when decode threads share the cores,
    /// spinning threads take the CPU time the decoders need.
    pub spinning: bool,
    pub provider: Provider,
    pub device_id: i32,
}

/// A loaded model, checked to be an image feature extractor: one float input [N,3,H,W] and a
/// float output [N,D] or [N,D,1,1].
pub struct Model {
    session: Session,
    pub config: SessionConfig,
    /// The input's height and width: the graph's, or 224 (see [`Model::set_input_size`]) when
    /// the graph leaves them dynamic.
    pub input_size: u32,
    /// Whether the graph accepts any input size.
    pub dynamic_size: bool,
    pub dim: usize,
    /// The execution provider actually in use: "CPU" or "CUDA".
    pub provider: &'static str,
    /// Why CUDA was not used, when it was asked for (`auto` or `cuda`) and is not in use.
    pub fallback: Option<String>,
}

impl Model {
    pub fn load(env: &Environment, config: &SessionConfig) -> Result<Model> {
        let path = config.model_path.as_str();
        if path.is_empty() {
            return Err(Error::new(ErrorKind::Config, "no model is configured")
                .with_hint("Set doppler.model_path to an ONNX feature extractor."));
        }
        match std::fs::metadata(path) {
            Err(e) => {
                let mut err = Error::io(&format!("model file \"{path}\""), &e);
                err.hint = Some("Check doppler.model_path.".into());
                return Err(err);
            }
            Ok(m) if m.is_dir() => {
                return Err(Error::new(
                    ErrorKind::IsDirectory,
                    format!("model file \"{path}\" is a directory"),
                ))
            }
            Ok(_) => {}
        }
        let (session, provider, fallback) = with_signals_blocked(|| match config.provider {
            Provider::Cpu => Ok((build(env, config, false)?, "CPU", None)),
            Provider::Cuda | Provider::Auto => match build(env, config, true) {
                Ok(s) => Ok((s, "CUDA", None)),
                Err(e) if e.kind == ErrorKind::Inference => {
                    Ok((build(env, config, false)?, "CPU", Some(e.message)))
                }
                Err(e) => Err(e),
            },
        })?;
        let (input_size, dim) = check_shapes(&session, path)?;
        Ok(Model {
            session,
            config: config.clone(),
            input_size: input_size.unwrap_or(224),
            dynamic_size: input_size.is_none(),
            dim,
            provider,
            fallback,
        })
    }

    /// Sets the input size a caller feeds: any size for a graph with dynamic height and width,
    /// else only the graph's own.
    pub fn set_input_size(&mut self, size: u32) -> Result<()> {
        if !self.dynamic_size && size != self.input_size {
            return Err(Error::new(
                ErrorKind::BadModel,
                format!(
                    "model \"{}\" takes {}×{} inputs, not {size}×{size}",
                    self.config.model_path, self.input_size, self.input_size
                ),
            ));
        }
        self.input_size = size;
        Ok(())
    }

    /// Runs `n` input slots (`n × 3 × size × size` floats, NCHW) and returns `n × dim` floats.
    pub fn run(&mut self, batch: &[f32], n: usize) -> Result<Vec<f32>> {
        let s = self.input_size as usize;
        if batch.len() != n * 3 * s * s {
            return Err(Error::new(
                ErrorKind::Internal,
                "input batch has the wrong length",
            ));
        }
        let fail = |e: ort::Error| {
            Error::new(
                ErrorKind::Inference,
                format!("ONNX Runtime failed to run the model: {e}"),
            )
        };
        let input = TensorRef::from_array_view(([n, 3, s, s], batch)).map_err(fail)?;
        // ORT may start threads during a run too: they must not take the backend's signals
        // (a SIGTERM or latch wake-up delivered to them would be lost).
        let session = &mut self.session;
        let outputs = with_signals_blocked(|| session.run(ort::inputs![input])).map_err(fail)?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(fail)?;
        let ok = match shape.len() {
            2 => shape[0] as usize == n && shape[1] as usize == self.dim,
            4 => {
                shape[0] as usize == n
                    && shape[1] as usize == self.dim
                    && shape[2] == 1
                    && shape[3] == 1
            }
            _ => false,
        };
        if !ok {
            return Err(Error::new(
                ErrorKind::BadModel,
                format!(
                    "model \"{}\" returned shape {:?}, expected [{n}, {}]",
                    self.config.model_path,
                    &shape[..],
                    self.dim
                ),
            ));
        }
        Ok(data.to_vec())
    }
}

fn build(env: &Environment, config: &SessionConfig, cuda: bool) -> Result<Session> {
    let path = &config.model_path;
    let bad = |e: String| {
        Error::new(
            ErrorKind::BadModel,
            format!("ONNX Runtime cannot load model \"{path}\": {e}"),
        )
    };
    let mut b = Session::builder(env)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
        .and_then(|b| Ok(b.with_intra_threads(config.intra_op_threads.max(1))?))
        .and_then(|b| Ok(b.with_inter_threads(1)?))
        .and_then(|b| Ok(b.with_intra_op_spinning(config.spinning)?))
        .map_err(|e| bad(e.to_string()))?;
    if cuda {
        let ep = ort::ep::CUDA::default()
            .with_device_id(config.device_id)
            .build()
            .error_on_failure();
        b = b.with_execution_providers([ep]).map_err(|e| {
            Error::new(
                ErrorKind::Inference,
                format!("the CUDA execution provider is not available: {e}"),
            )
        })?;
    }
    b.commit_from_file(path).map_err(|e| bad(e.to_string()))
}

/// The input size (None when dynamic) and the output dimension.
fn check_shapes(session: &Session, path: &str) -> Result<(Option<u32>, usize)> {
    let unfit = |what: String| {
        Error::new(ErrorKind::BadModel, format!("model \"{path}\" does not fit: {what}")).with_hint(
            "doppler needs an image feature extractor: one float32 input [N,3,H,W] (H = W) and a float32 output [N,D] or [N,D,1,1].",
        )
    };
    let inputs = session.inputs();
    if inputs.len() != 1 {
        return Err(unfit(format!("it has {} inputs, expected 1", inputs.len())));
    }
    let (size, dim);
    match inputs[0].dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 4 => {
            if shape[1] != 3 && shape[1] != -1 {
                return Err(unfit(format!(
                    "input shape {:?} has {} channels, expected 3",
                    &shape[..],
                    shape[1]
                )));
            }
            size = match (shape[2], shape[3]) {
                (-1, -1) => None,
                (h, w) if h == w && h > 0 => Some(h as u32),
                _ => return Err(unfit(format!("input shape {:?} is not square", &shape[..]))),
            };
        }
        other => {
            return Err(unfit(format!(
                "input is {other:?}, expected a float32 tensor [N,3,H,W]"
            )))
        }
    }
    match session.outputs().first().map(|o| o.dtype()) {
        Some(ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        }) if (shape.len() == 2 || (shape.len() == 4 && shape[2] == 1 && shape[3] == 1))
            && shape[1] > 0 =>
        {
            dim = shape[1] as usize;
        }
        Some(other) => {
            return Err(unfit(format!(
                "output is {other:?}, expected a float32 tensor [N,D] or [N,D,1,1]"
            )))
        }
        None => return Err(unfit("it has no outputs".into())),
    }
    Ok((size, dim))
}
