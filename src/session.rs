//! Models and the per-backend session cache.
//!
//! A model is an entry of `doppler.models` ([`ModelSpec`]): an ONNX file and how it wants its
//! pixels. Each backend that extracts features keeps up to `doppler.max_sessions` ONNX Runtime
//! sessions, created on first use (never in `_PG_init`: the postmaster forks backends), reused
//! across calls and transactions, and dropped least-recently-used first. A session is keyed by
//! everything it depends on (the model file and its size and modification time, the registered
//! version, the thread count and spinning, `execution_provider`, `cuda_device_id`, the input size), so
//! changing a setting, the file or the version builds a new one.
//! A backend is single-threaded, so a thread-local is the cache.

use std::cell::{Cell, RefCell};

use doppler_core::{model, Error, ErrorKind, Filter, Model, Preprocess, SessionConfig};
use pgrx::prelude::*;

use crate::errors::{raise, raise_error, Code, OrRaise, SpiOrRaise};
use crate::gucs;
use crate::service::{self, SessionInfo};

/// A `doppler.models` entry, with its file resolved (`resnet50`'s is `doppler.model_path`;
/// `$sharedir` expanded, see [`crate::dirs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    pub path: String,
    pub input_size: u32,
    pub filter: Filter,
    pub divisor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub dim: usize,
}

impl ModelSpec {
    /// What a vector made by this model is tagged with: `name@version`.
    pub fn tag(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            size: self.input_size,
            filter: self.filter,
            divisor: self.divisor,
            mean: self.mean,
            std: self.std,
        }
    }
}

/// The registered model `name` (`doppler.default_model` when None). Raises 42704 when there is
/// no such model.
pub fn spec(name: Option<&str>) -> ModelSpec {
    let name = name.map(str::to_string).unwrap_or_else(gucs::default_model);
    let row = Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT onnx_path, input_size, resize, divisor, mean, std, dim, version
             FROM doppler.models WHERE name OPERATOR(pg_catalog.=) $1::pg_catalog.text",
            None,
            &[name.as_str().into()],
        )?;
        let Some(r) = rows.next() else {
            return Ok(None);
        };
        Ok::<_, pgrx::spi::Error>(Some((
            r.get::<String>(1)?,
            r.get::<i32>(2)?.unwrap_or(224),
            r.get::<String>(3)?.unwrap_or_default(),
            r.get::<f32>(4)?.unwrap_or(255.0),
            r.get::<Vec<f32>>(5)?.unwrap_or_default(),
            r.get::<Vec<f32>>(6)?.unwrap_or_default(),
            r.get::<i32>(7)?.unwrap_or(0),
            r.get::<String>(8)?.unwrap_or_default(),
        )))
    })
    .or_raise(|| "could not read doppler.models".into());
    let Some((path, size, resize, divisor, mean, std, dim, version)) = row else {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("model \"{name}\" is not registered"),
            "See SELECT name FROM doppler.models; register one with doppler.register_model().",
        )
    };
    let three =
        |v: &[f32]| -> [f32; 3] { std::array::from_fn(|i| v.get(i).copied().unwrap_or(1.0)) };
    ModelSpec {
        path: path
            .map(|p| crate::dirs::expand(&p))
            .unwrap_or_else(gucs::model_path),
        input_size: size as u32,
        filter: match resize.as_str() {
            "bilinear" => Filter::Bilinear,
            "lanczos" => Filter::Lanczos,
            // doppler.models' CHECK constraint allows no other word
            other => raise(
                Code::ERRCODE_DATA_CORRUPTED,
                format!("doppler.models has resize \"{other}\" for model \"{name}\""),
                "doppler.models' CHECK constraint allows bilinear or lanczos: was it altered?",
            ),
        },
        divisor,
        mean: three(&mean),
        std: three(&std),
        dim: dim as usize,
        version,
        name,
    }
}

/// What a session depends on: the settings, the input size, the registered version, and the file
/// itself (size and modification time), so a replaced file or a new version loads afresh.
type Key = (
    SessionConfig,
    u32,
    String,
    Option<(u64, std::time::SystemTime)>,
);

struct Cached {
    name: String,
    key: Key,
    model: Model,
}

fn key_of(spec: &ModelSpec) -> Key {
    let config = SessionConfig {
        model_path: spec.path.clone(),
        ..gucs::session_config()
    };
    let file = std::fs::metadata(&spec.path)
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?)));
    (config, spec.input_size, spec.version.clone(), file)
}

/// Drops this backend's sessions of `spec`'s file.
pub fn forget(spec: &ModelSpec) {
    forget_path(&spec.path);
}

fn forget_path(path: &str) {
    SESSIONS.with(|cell| {
        if let Ok(mut cache) = cell.try_borrow_mut() {
            cache.retain(|c| c.key.0.model_path != path);
        }
    });
}

/// Drops this backend's sessions of a file when it goes out of scope (also on an ERROR's unwinding).
struct Forget(String);

impl Drop for Forget {
    fn drop(&mut self) {
        forget_path(&self.0);
    }
}

thread_local! {
    /// Most recently used first.
    static SESSIONS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
    static SESSIONS_CREATED: Cell<i64> = const { Cell::new(0) };
}

/// What runs a caller's model runs: a session of this backend, or the server's inference service
/// ([`crate::service`]).
pub enum Runner<'a> {
    Local(&'a mut Model),
    Service(service::Key),
}

impl Runner<'_> {
    /// The model's output dimension.
    pub fn dim(&self) -> usize {
        match self {
            Runner::Local(m) => m.dim,
            Runner::Service(k) => k.dim as usize,
        }
    }

    /// Runs `n` input slots and returns `n × dim` floats. What is not the images' fault (the
    /// model cannot be loaded or does not fit, no ONNX Runtime, no service) is raised, as a
    /// backend's own session raises it when it loads.
    pub fn run(&mut self, batch: &[f32], n: usize) -> doppler_core::Result<Vec<f32>> {
        match self {
            Runner::Local(m) => m.run(batch, n),
            Runner::Service(key) => match service::infer(key, batch, n) {
                Ok(v) => Ok(v),
                Err(f)
                    if f.loading
                        || matches!(
                            f.error.kind,
                            ErrorKind::Config
                                | ErrorKind::BadModel
                                | ErrorKind::RuntimeMissing
                                | ErrorKind::ServiceUnavailable
                        ) =>
                {
                    raise_error(f.error)
                }
                Err(f) => Err(f.error),
            },
        }
    }

    /// Makes sure the model is loaded and fits (the service loads it without running it).
    pub fn check(&mut self) {
        if let Runner::Service(_) = self {
            self.run(&[], 0).or_raise();
        }
    }
}

/// Runs `f` with what runs `spec`'s model under the current settings (the inference service, or
/// this backend's session, loaded if needed) and the model's preprocessing. Errors (library
/// missing, model missing or unfit, or not what doppler.models says) are raised as Postgres ERRORs.
pub fn with_model<R>(spec: &ModelSpec, f: impl FnOnce(&mut Runner, &Preprocess) -> R) -> R {
    let pre = spec.preprocess();
    if service::inference() == service::Inference::Service {
        check_file(spec);
        let config = gucs::session_config();
        let mut runner = Runner::Service(service::Key {
            name: spec.name.clone(),
            path: spec.path.clone(),
            version: spec.version.clone(),
            input_size: spec.input_size,
            dim: spec.dim as u32,
            provider: config.provider,
            device_id: config.device_id,
        });
        return f(&mut runner, &pre);
    }
    // The server's service has not started yet (server start, crash restart): this call runs in
    // a session of its own that is not kept, so that the backend does not hold a model for its
    // whole life next to the service's.
    let _transient = service::not_started_yet().then(|| Forget(spec.path.clone()));
    let key = key_of(spec);
    SESSIONS.with(|cell| {
        // A model run of this backend's session is in progress further up this stack: the table
        // owner's code (a policy, trigger or cast of the table being filled) calls doppler again.
        let Ok(mut cache) = cell.try_borrow_mut() else {
            raise(
                Code::ERRCODE_OBJECT_IN_USE,
                "doppler cannot run a model from code that runs during one of its own model runs",
                "A policy, trigger, cast or index expression of the table being filled calls doppler; call it outside the table's own code, or with doppler.inference = service.",
            )
        };
        match cache.iter().position(|c| c.key == key) {
            Some(0) => {}
            Some(i) => {
                let hit = cache.remove(i);
                cache.insert(0, hit);
            }
            None => {
                // make room first: a session holds its weights and threads
                let keep = (gucs::MAX_SESSIONS.get().max(1) as usize).saturating_sub(1);
                cache.truncate(keep);
                let model = load(spec, &key.0);
                SESSIONS_CREATED.with(|c| c.set(c.get() + 1));
                // an older version or file of the same model is of no more use
                cache.retain(|c| c.key.0 != key.0 || c.key.1 != key.1);
                cache.insert(
                    0,
                    Cached {
                        name: spec.name.clone(),
                        key,
                        model,
                    },
                );
            }
        }
        cache[0].name.clone_from(&spec.name);
        let model = &mut cache[0].model;
        if model.dim != spec.dim {
            raise_error(
                Error::new(
                    ErrorKind::BadModel,
                    format!(
                        "model \"{}\" ({}) produces {}-dimensional features, but doppler.models says {}",
                        spec.name, spec.path, model.dim, spec.dim
                    ),
                )
                .with_hint("Register the model again with the right dim."),
            );
        }
        f(&mut Runner::Local(model), &pre)
    })
}

/// Raises when `spec` has no file to load: `resnet50` without `doppler.model_path`, or a file that
/// is not there (the bundled model in a build from source without scripts/bundle), with a hint
/// that says what to do. `watch` calls it too, so a table is not watched with a model the worker
/// could never load.
pub fn check_file(spec: &ModelSpec) {
    if spec.path.is_empty() {
        raise_error(
            Error::new(
                ErrorKind::Config,
                format!("model \"{}\" has no file: doppler.model_path is not set", spec.name),
            )
            .with_hint(
                "The seed's ResNet50 is not bundled: export it (scripts/export_resnet50.py) and set doppler.model_path to the .onnx file, \
                 or use the bundled EfficientNet-Lite0: model => 'efficientnet_lite0', or SET doppler.default_model = 'efficientnet_lite0'.",
            ),
        );
    }
    if let Err(e) = std::fs::metadata(&spec.path) {
        let mut err = Error::io(&format!("model file \"{}\"", spec.path), &e);
        err.hint = Some(
            if spec.path == crate::dirs::expand(crate::dirs::BUNDLED_MODEL) {
                format!(
                    "doppler's packages install this model at {}; a build from source has it after scripts/bundle (README: From source on your own server).",
                    crate::dirs::BUNDLED_MODEL
                )
            } else if spec.path == gucs::model_path() {
                "Check doppler.model_path.".to_string()
            } else {
                format!(
                    "Check the file of model \"{}\" (doppler.models), or register it again with doppler.register_model().",
                    spec.name
                )
            },
        );
        raise_error(err);
    }
}

fn load(spec: &ModelSpec, config: &SessionConfig) -> Model {
    check_file(spec);
    let env = model::runtime(&gucs::onnxruntime_library()).or_raise();
    let mut m = Model::load(env, config).or_raise();
    m.set_input_size(spec.input_size).or_raise();
    if let Some(why) = &m.fallback {
        match config.provider {
            doppler_core::Provider::Cuda => {
                warning!("doppler: execution_provider is cuda but the model runs on the CPU: {why}")
            }
            _ => log!("doppler: CUDA is not available, using the CPU: {why}"),
        }
    }
    m
}

/// Sessions this backend has created so far (for `doppler.session_info()`).
pub fn sessions_created() -> i64 {
    SESSIONS_CREATED.with(|c| c.get())
}

/// The cached sessions, most recently used first.
pub fn current() -> Vec<SessionInfo> {
    SESSIONS.with(|cell| {
        cell.borrow()
            .iter()
            .map(|c| SessionInfo {
                model: c.name.clone(),
                model_path: c.model.config.model_path.clone(),
                provider: c.model.provider.to_string(),
                input_size: c.model.input_size as i32,
                dim: c.model.dim as i32,
                threads: c.model.config.intra_op_threads as i32,
            })
            .collect()
    })
}

/// The features of one image: prepared on this backend's thread, one model run.
pub fn features_of(spec: &ModelSpec, bytes: &[u8], what: &str) -> Vec<f32> {
    with_model(spec, |runner, pre| {
        let mut slot = vec![0f32; pre.slot_len()];
        doppler_core::prepare(bytes, what, &gucs::limits(), pre, &mut slot).or_raise();
        runner.run(&slot, 1).or_raise()
    })
}
