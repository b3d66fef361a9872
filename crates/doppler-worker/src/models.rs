//! The models a worker runs: the claim names one (jsonb: file, SHA-256, preprocessing, dim); the
//! worker runs its own copy, `--model-dir` / the registered file's base name, only when that
//! copy's SHA-256 is the one doppler.models records, so a vector tagged `name@version` means the
//! same weights on every host. Sessions are loaded like the server's (`src/session.rs`): the
//! process's ONNX Runtime, the input size, the dim checked against doppler.models; at most two
//! are kept, most recently used first. A file's SHA-256 is computed once per (size, mtime, inode).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use doppler_core::{model, Filter, Model, Preprocess, Provider, SessionConfig};
use serde::Deserialize;

/// Sessions kept at once (each holds its weights and threads).
pub const MAX_LOADED: usize = 2;
/// Largest input size accepted from a claim (an input slot is 3 × size² floats).
const MAX_INPUT_SIZE: u32 = 8192;
/// Largest dim accepted from a claim.
const MAX_DIM: usize = 1 << 20;

/// A model as `doppler.worker_claim` describes it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    pub tag: String,
    /// The registered file's base name.
    pub file: String,
    pub sha256: Option<String>,
    pub input_size: u32,
    pub resize: String,
    pub divisor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub dim: usize,
    /// Whether the table wants each image's dHash.
    pub want_hash: bool,
    /// Whether the table wants each image's PDQ hash and quality (servers before 0.11.0 do not
    /// say: no).
    #[serde(default)]
    pub want_pdq: bool,
}

impl ModelSpec {
    pub fn parse(json: &str) -> Result<ModelSpec, ModelError> {
        let spec: ModelSpec = serde_json::from_str(json)
            .map_err(|e| ModelError::Spec(format!("the claim's model cannot be read: {e}")))?;
        spec.preprocess()?;
        spec.file_name()?;
        if spec.dim == 0 || spec.dim > MAX_DIM {
            return Err(ModelError::Spec(format!(
                "the claim's model {} has dim {}",
                spec.tag, spec.dim
            )));
        }
        Ok(spec)
    }

    /// The preprocessing the server applies for this model.
    pub fn preprocess(&self) -> Result<Preprocess, ModelError> {
        let filter = match self.resize.as_str() {
            "bilinear" => Filter::Bilinear,
            "lanczos" => Filter::Lanczos,
            other => {
                return Err(ModelError::Spec(format!(
                    "the claim's model {} has resize \"{other}\" (bilinear or lanczos)",
                    self.tag
                )))
            }
        };
        let finite = std::iter::once(self.divisor)
            .chain(self.mean)
            .chain(self.std)
            .all(f32::is_finite);
        if !(1..=MAX_INPUT_SIZE).contains(&self.input_size) || !finite {
            return Err(ModelError::Spec(format!(
                "the claim's model {} has input size {} or preprocessing numbers that are not finite",
                self.tag, self.input_size
            )));
        }
        Ok(Preprocess {
            size: self.input_size,
            filter,
            divisor: self.divisor,
            mean: self.mean,
            std: self.std,
        })
    }

    /// The file's base name (never a path: the worker reads only from its model folder).
    fn file_name(&self) -> Result<&str, ModelError> {
        match Path::new(&self.file).file_name().and_then(|f| f.to_str()) {
            Some(f) if !f.is_empty() => Ok(f),
            _ => Err(ModelError::Spec(format!(
                "the claim's model {} names no file (\"{}\")",
                self.tag, self.file
            ))),
        }
    }
}

/// Why a claimed table's model cannot run here.
#[derive(Debug)]
pub enum ModelError {
    /// The claim's model description is unusable.
    Spec(String),
    /// The file is not in the model folder (or cannot be read).
    Missing { path: String, detail: String },
    /// The file is not the registered one.
    Mismatch {
        path: String,
        actual: String,
        recorded: Option<String>,
        tag: String,
    },
    /// ONNX Runtime cannot load it (or does not fit doppler).
    Load(doppler_core::Error),
    /// Its output has another dimension than doppler.models says.
    Dim {
        path: String,
        dim: usize,
        expected: usize,
        tag: String,
    },
    /// The file changed while it was loaded.
    Changed { path: String },
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelError::Spec(m) => f.write_str(m),
            ModelError::Missing { path, detail } => write!(f, "model file {path} {detail}"),
            ModelError::Mismatch {
                path,
                actual,
                recorded,
                tag,
            } => write!(
                f,
                "model file {path} has SHA-256 {actual}, doppler.models records {} for {tag}",
                recorded.as_deref().unwrap_or("none")
            ),
            ModelError::Load(e) => match &e.hint {
                Some(h) => write!(f, "{} ({h})", e.message),
                None => f.write_str(&e.message),
            },
            ModelError::Dim {
                path,
                dim,
                expected,
                tag,
            } => write!(
                f,
                "model file {path} produces {dim}-dimensional features, but doppler.models says {expected} for {tag}"
            ),
            ModelError::Changed { path } => {
                write!(f, "model file {path} changed while it was loaded")
            }
        }
    }
}

/// What identifies a file's contents cheaply: a replaced or rewritten file differs in one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            len: m.len(),
            modified: m.modified().ok(),
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// A loaded session.
pub struct Loaded {
    pub tag: String,
    pub sha256: String,
    pub path: String,
    file: FileId,
    input_size: u32,
    pub model: Model,
}

/// How sessions are made.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub dir: PathBuf,
    pub ort_library: String,
    pub provider: Provider,
    pub device: i32,
    pub intra_op_threads: usize,
}

/// The worker's sessions and file digests.
pub struct Models {
    runtime: Runtime,
    digests: HashMap<PathBuf, (FileId, String)>,
    /// Most recently used first; at most [`MAX_LOADED`].
    loaded: Vec<Loaded>,
}

/// What [`Models::get`] did.
pub enum Got<'a> {
    /// A session already loaded.
    Cached(&'a mut Loaded),
    /// A session loaded now.
    Loaded(&'a mut Loaded),
}

impl Models {
    pub fn new(runtime: Runtime) -> Models {
        Models {
            runtime,
            digests: HashMap::new(),
            loaded: Vec::new(),
        }
    }

    /// The session of `spec`, when the model folder's file is the registered one (checked on
    /// every call: a file replaced under a loaded session is hashed and loaded again).
    pub fn get(&mut self, spec: &ModelSpec) -> Result<Got<'_>, ModelError> {
        let path = self.runtime.dir.join(spec.file_name()?);
        let shown = path.display().to_string();
        let file = stat(&path)?;
        let sha256 = self.digest(&path, file)?;
        if spec.sha256.as_deref().map(str::to_ascii_lowercase) != Some(sha256.clone()) {
            return Err(ModelError::Mismatch {
                path: shown,
                actual: sha256,
                recorded: spec.sha256.clone(),
                tag: spec.tag.clone(),
            });
        }
        let hit = self.loaded.iter().position(|l| {
            l.tag == spec.tag
                && l.sha256 == sha256
                && l.file == file
                && l.input_size == spec.input_size
        });
        if let Some(i) = hit {
            let l = self.loaded.remove(i);
            self.loaded.insert(0, l);
            return Ok(Got::Cached(&mut self.loaded[0]));
        }
        // an older file of the same model is of no more use; make room before loading (a
        // session holds its weights and threads)
        self.loaded.retain(|l| l.tag != spec.tag);
        self.loaded.truncate(MAX_LOADED - 1);
        let env = model::runtime(&self.runtime.ort_library).map_err(ModelError::Load)?;
        let config = SessionConfig {
            model_path: shown.clone(),
            intra_op_threads: self.runtime.intra_op_threads.max(1),
            spinning: false,
            provider: self.runtime.provider,
            device_id: self.runtime.device,
        };
        let mut m = Model::load(env, &config).map_err(ModelError::Load)?;
        m.set_input_size(spec.input_size)
            .map_err(ModelError::Load)?;
        if m.dim != spec.dim {
            return Err(ModelError::Dim {
                path: shown,
                dim: m.dim,
                expected: spec.dim,
                tag: spec.tag.clone(),
            });
        }
        // the file hashed is the file loaded
        if stat(&path)? != file {
            self.digests.remove(&path);
            return Err(ModelError::Changed { path: shown });
        }
        self.loaded.insert(
            0,
            Loaded {
                tag: spec.tag.clone(),
                sha256,
                path: shown,
                file,
                input_size: spec.input_size,
                model: m,
            },
        );
        Ok(Got::Loaded(&mut self.loaded[0]))
    }

    /// Drops the session of `tag` (after a failure inside it).
    pub fn forget(&mut self, tag: &str) {
        self.loaded.retain(|l| l.tag != tag);
    }

    /// The SHA-256 of `path`, cached by its [`FileId`].
    fn digest(&mut self, path: &Path, file: FileId) -> Result<String, ModelError> {
        if let Some((id, sha)) = self.digests.get(path) {
            if *id == file {
                return Ok(sha.clone());
            }
        }
        let shown = path.display().to_string();
        let sha = doppler_core::digest::sha256_file(&shown).map_err(|e| ModelError::Missing {
            path: shown.clone(),
            detail: format!("cannot be read: {}", e.message),
        })?;
        // (a few models at most; the map never grows past a handful)
        if self.digests.len() >= 16 {
            self.digests.clear();
        }
        self.digests.insert(path.to_path_buf(), (file, sha.clone()));
        Ok(sha)
    }
}

fn stat(path: &Path) -> Result<FileId, ModelError> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(FileId::of(&m)),
        Ok(_) => Err(ModelError::Missing {
            path: shown,
            detail: "is not a regular file".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ModelError::Missing {
            path: shown,
            detail: "does not exist (copy the registered model file into --model-dir)".into(),
        }),
        Err(e) => Err(ModelError::Missing {
            path: shown,
            detail: format!("cannot be read: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{"name": "efficientnet_lite0", "version": "1", "tag": "efficientnet_lite0@1",
        "file": "efficientnet-lite0.onnx", "sha256": "SHA", "input_size": 224, "resize": "bilinear",
        "divisor": 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dim": 1280,
        "want_hash": true}"#;

    fn spec_with(sha: &str, file: &str) -> String {
        SPEC.replace("\"SHA\"", sha)
            .replace("efficientnet-lite0.onnx", file)
    }

    #[test]
    fn parses_the_claims_model() {
        let s = ModelSpec::parse(&spec_with("null", "efficientnet-lite0.onnx")).unwrap();
        assert_eq!(s.tag, "efficientnet_lite0@1");
        assert_eq!(s.sha256, None);
        assert!(s.want_hash);
        let p = s.preprocess().unwrap();
        assert_eq!(p.size, 224);
        assert_eq!(p.filter, Filter::Bilinear);
        assert_eq!(p.mean, [0.485, 0.456, 0.406]);
    }

    #[test]
    fn bad_models_are_errors() {
        for bad in [
            "{}".to_string(),
            SPEC.replace("\"bilinear\"", "\"nearest\""),
            SPEC.replace("\"input_size\": 224", "\"input_size\": 0"),
            SPEC.replace("\"input_size\": 224", "\"input_size\": 100000"),
            SPEC.replace("\"dim\": 1280", "\"dim\": 0"),
            SPEC.replace("[0.485, 0.456, 0.406]", "[0.485, 0.456]"),
            spec_with("\"x\"", ""),
            spec_with("\"x\"", ".."),
        ] {
            assert!(ModelSpec::parse(&bad).is_err(), "{bad}");
        }
        // a path in file: only its base name counts
        let s = ModelSpec::parse(&spec_with("\"x\"", "$sharedir/doppler/m.onnx")).unwrap();
        assert_eq!(s.file_name().unwrap(), "m.onnx");
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("doppler-worker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn models(dir: &Path) -> Models {
        Models::new(Runtime {
            dir: dir.to_path_buf(),
            ort_library: "/nonexistent/libonnxruntime.so".into(),
            provider: Provider::Cpu,
            device: 0,
            intra_op_threads: 1,
        })
    }

    #[test]
    fn a_missing_or_different_file_is_refused_before_loading() {
        let dir = tmpdir("models");
        let mut m = models(&dir);
        let spec = ModelSpec::parse(&spec_with("\"abc\"", "m.onnx")).unwrap();
        match m.get(&spec) {
            Err(ModelError::Missing { path, .. }) => assert!(path.ends_with("m.onnx")),
            other => panic!("{:?}", other.err()),
        }
        std::fs::write(dir.join("m.onnx"), b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let e = m.get(&spec).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "model file {} has SHA-256 {abc}, doppler.models records abc for efficientnet_lite0@1",
                dir.join("m.onnx").display()
            )
        );
        // none recorded
        let none = ModelSpec::parse(&spec_with("null", "m.onnx")).unwrap();
        assert!(m
            .get(&none)
            .err()
            .unwrap()
            .to_string()
            .contains("records none"));
        // the right digest (any case) gets as far as loading ONNX Runtime
        let right =
            ModelSpec::parse(&spec_with(&format!("\"{}\"", abc.to_uppercase()), "m.onnx")).unwrap();
        assert!(matches!(m.get(&right), Err(ModelError::Load(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
