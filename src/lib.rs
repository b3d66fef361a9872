//! doppler: image feature extraction inside PostgreSQL.
//!
//! This crate is the pgrx glue: GUCs ([`gucs`]), the error → SQLSTATE boundary ([`errors`]), the
//! per-backend session cache ([`session`]) and the SQL surface ([`api`]). The image pipeline
//! itself lives in the `doppler-core` crate, which does not know Postgres.

use pgrx::prelude::*;

pub mod api;
pub mod dirs;
pub mod errors;
pub mod fill;
pub mod gucs;
pub mod privileged;
pub mod service;
pub mod session;
pub mod sources;
pub mod triggers;
pub mod watch;
pub mod watched;
pub mod worker;
pub mod workers;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/schema.sql", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Settings and worker registration only. ONNX Runtime is loaded lazily, by the backend
    // (or worker) that first needs it: the postmaster forks everything after this.
    gucs::init();
    gucs::init_worker_gucs();
    // the service first: with too few background worker slots it is the one to keep
    service::register();
    worker::register();
    workers::register_shmem();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// Server settings for the test cluster. Environment variables do not reach a server
    /// started through `--runas`, so the locations of the ONNX Runtime library, the models and
    /// the fixtures are passed as settings (see scripts/env.sh for the defaults).
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        let deps = std::env::var("DOPPLER_DEPS").unwrap_or_else(|_| "/opt/doppler".into());
        let lib = std::env::var("DOPPLER_ORT_LIB")
            .unwrap_or_else(|_| format!("{deps}/lib/libonnxruntime.so.1.31.1"));
        let models = std::env::var("DOPPLER_MODELS").unwrap_or_else(|_| format!("{deps}/models"));
        let fixtures =
            std::env::var("DOPPLER_FIXTURES").unwrap_or_else(|_| format!("{deps}/fixtures"));
        [
            format!("doppler.onnxruntime_library = '{lib}'"),
            format!("doppler.model_path = '{models}/resnet50-seeded.onnx'"),
            "doppler.execution_provider = 'cpu'".to_string(),
            format!("doppler_test.models = '{models}'"),
            format!("doppler_test.fixtures = '{fixtures}'"),
        ]
        .into_iter()
        .map(|s| &*Box::leak(s.into_boxed_str()))
        .collect()
    }
}
