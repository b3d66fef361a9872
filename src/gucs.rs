//! Every doppler setting, defined in one place. Settings that choose files the server reads or
//! loads (the model, the ONNX Runtime library) or that size server resources (threads, limits)
//! are superuser-only (`PGC_SUSET`): a plain role cannot point a backend at another library.

use std::ffi::CString;

use doppler_core::{Limits, Provider, SessionConfig};
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `doppler.model_path`: the ONNX feature extractor used by `extract_features`.
pub static MODEL_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `doppler.onnxruntime_library`: absolute path of `libonnxruntime.so` (1.31 or later).
pub static ONNXRUNTIME_LIBRARY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
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
        c"doppler.onnxruntime_library",
        c"Absolute path of the ONNX Runtime shared library (libonnxruntime.so, 1.31 or later).",
        c"Loaded once per backend process, at the first extraction. Point it at a GPU build (onnxruntime-gpu) to use CUDA.",
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

fn string(s: &GucSetting<Option<CString>>) -> String {
    s.get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn onnxruntime_library() -> String {
    string(&ONNXRUNTIME_LIBRARY)
}

pub fn session_config() -> SessionConfig {
    SessionConfig {
        model_path: string(&MODEL_PATH),
        intra_op_threads: INTRA_OP_THREADS.get().max(1) as usize,
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
    }
}

pub fn max_image_bytes() -> u64 {
    MAX_IMAGE_BYTES.get() as u64
}
