//! The per-backend model cache. Each backend that extracts features holds at most one ONNX
//! Runtime session, created on first use (never in `_PG_init`: the postmaster forks backends),
//! reused across calls and transactions, and rebuilt when a setting it depends on changes
//! (`doppler.model_path`, `intra_op_threads`, `execution_provider`, `cuda_device_id`).
//! A backend is single-threaded, so a thread-local is the cache.

use std::cell::{Cell, RefCell};

use doppler_core::{model, Model, Preprocess};
use pgrx::prelude::*;

use crate::errors::OrRaise;
use crate::gucs;

thread_local! {
    static MODEL: RefCell<Option<Model>> = const { RefCell::new(None) };
    static SESSIONS_CREATED: Cell<i64> = const { Cell::new(0) };
}

/// Runs `f` with this backend's model for the current settings, loading it if needed.
/// Errors (library missing, model missing or unfit) are raised as Postgres ERRORs.
pub fn with_model<R>(f: impl FnOnce(&mut Model) -> R) -> R {
    let config = gucs::session_config();
    MODEL.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|m| &m.config) != Some(&config) {
            // drop the old session (and its threads) before building the new one
            *slot = None;
            let env = model::runtime(&gucs::onnxruntime_library()).or_raise();
            let m = Model::load(env, &config).or_raise();
            if let Some(why) = &m.fallback {
                match config.provider {
                    doppler_core::Provider::Cuda => {
                        warning!("doppler: execution_provider is cuda but the model runs on the CPU: {why}")
                    }
                    _ => log!("doppler: CUDA is not available, using the CPU: {why}"),
                }
            }
            SESSIONS_CREATED.with(|c| c.set(c.get() + 1));
            *slot = Some(m);
        }
        f(slot.as_mut().expect("model was just loaded"))
    })
}

/// The preprocessing of the configured model. ResNet50 (the seed's) uses ImageNet mean/std.
pub fn preprocess_for(model: &Model) -> Preprocess {
    Preprocess {
        size: model.input_size,
        ..Preprocess::IMAGENET
    }
}

/// Sessions this backend has created so far (for `doppler.session_info()`).
pub fn sessions_created() -> i64 {
    SESSIONS_CREATED.with(|c| c.get())
}

/// Describes the cached session without creating one.
pub fn current() -> Option<(String, &'static str, i32, i32, i32)> {
    MODEL.with(|cell| {
        cell.borrow().as_ref().map(|m| {
            (
                m.config.model_path.clone(),
                m.provider,
                m.input_size as i32,
                m.dim as i32,
                m.config.intra_op_threads as i32,
            )
        })
    })
}
