//! The command line: `doppler-worker [OPTIONS] [CONNINFO]`. Parsed by hand (a dozen options,
//! `--opt value` or `--opt=value`), from the arguments and an environment lookup, so tests can
//! feed both. Anything wrong here is a usage error (exit 2) with a one-line message.

use std::path::PathBuf;
use std::time::Duration;

use doppler_core::Provider;

use crate::pathmap::{PathMap, Rule};

pub const USAGE: &str = "\
Usage: doppler-worker [OPTIONS] [CONNINFO]

Fills doppler-watched tables from this host, with PostgreSQL as the queue.

CONNINFO is a libpq connection string (\"host=db user=w dbname=app\") or URL
(postgresql://w@db/app?sslmode=verify-full); default $DOPPLER_WORKER_CONNINFO.
Missing pieces come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
PGSSLROOTCERT, PGAPPNAME and PGCONNECT_TIMEOUT. The role must be a member of doppler_worker.

Options:
  --once                   fill what is pending, then exit
  --model-dir DIR          model files, by the base name of doppler.models' file
                           (default $DOPPLER_MODEL_DIR or /var/lib/doppler/models)
  --provider cpu|cuda|auto execution provider (default cpu)
  --device N               CUDA device (default 0)
  --intra-op-threads N     ONNX Runtime threads per model run (default 1)
  --decode-threads N       threads that read, decode and resize (default: all cores)
  --batch N                rows per claim, 1..1000 (default 32)
  --ort-library PATH       absolute path of libonnxruntime.so (default $ORT_DYLIB_PATH
                           or /usr/lib/doppler/libonnxruntime.so)
  --path-map FROM=TO       read the server's path FROM/x at TO/x (repeatable; longest FROM wins)
  --file-root DIR          read image files only inside DIR (repeatable; default: the --path-map
                           targets, else the server's doppler.file_roots); the server can only narrow it
  --url-allowed-network CIDR
                           a private network URLs may reach when the server allows it too
                           (repeatable; default none: public addresses only)
  --poll-interval SECONDS  wait between empty claims (default 2; backs off to 10x when idle)
  --health-port PORT       serve GET /healthz and /readyz on this port (default 0: off)
  --name NAME              this worker's name in doppler.workers (default: the hostname)
  --help, --version
";

pub const DEFAULT_MODEL_DIR: &str = "/var/lib/doppler/models";
pub const DEFAULT_ORT_LIBRARY: &str = "/usr/lib/doppler/libonnxruntime.so";
pub const MAX_BATCH: i32 = 1000;

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Args>),
    Help,
    Version,
}

/// The execution provider, as asked for (and as registered: the word the user gave).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderArg {
    Cpu,
    Cuda,
    Auto,
}

impl ProviderArg {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderArg::Cpu => "cpu",
            ProviderArg::Cuda => "cuda",
            ProviderArg::Auto => "auto",
        }
    }

    pub fn core(self) -> Provider {
        match self {
            ProviderArg::Cpu => Provider::Cpu,
            ProviderArg::Cuda => Provider::Cuda,
            ProviderArg::Auto => Provider::Auto,
        }
    }
}

#[derive(Debug)]
pub struct Args {
    /// The connection string: the argument, else `$DOPPLER_WORKER_CONNINFO`, else empty (all
    /// from the environment and defaults).
    pub conninfo: String,
    pub once: bool,
    pub model_dir: PathBuf,
    pub provider: ProviderArg,
    pub device: i32,
    pub intra_op_threads: usize,
    pub decode_threads: usize,
    pub batch: i32,
    pub ort_library: String,
    pub path_map: PathMap,
    /// `--file-root`: folders of this host the worker reads images in, whatever the server
    /// says (empty: the `--path-map` targets, else the server's file_roots).
    pub file_roots: Vec<String>,
    /// `--url-allowed-network`: private networks the worker may fetch from when the server
    /// allows them too (empty: public addresses only, whatever the server allows).
    pub url_networks: Vec<String>,
    pub poll_interval: Duration,
    pub health_port: u16,
    /// `--name`; None: the hostname.
    pub name: Option<String>,
}

/// Parses `argv` (without the program name); `env` looks up environment variables.
pub fn parse(argv: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut a = Args {
        conninfo: String::new(),
        once: false,
        model_dir: PathBuf::from(
            nonempty("DOPPLER_MODEL_DIR").unwrap_or_else(|| DEFAULT_MODEL_DIR.into()),
        ),
        provider: ProviderArg::Cpu,
        device: 0,
        intra_op_threads: 1,
        decode_threads: cores.max(1),
        batch: 32,
        ort_library: nonempty("ORT_DYLIB_PATH").unwrap_or_else(|| DEFAULT_ORT_LIBRARY.into()),
        path_map: PathMap::default(),
        file_roots: Vec::new(),
        url_networks: Vec::new(),
        poll_interval: Duration::from_secs(2),
        health_port: 0,
        name: None,
    };
    let mut positional: Vec<String> = Vec::new();
    let mut rules = Vec::new();
    let mut it = argv.iter();
    let mut options_done = false;
    while let Some(arg) = it.next() {
        if arg == "--" && !options_done {
            options_done = true;
            continue;
        }
        // (a connection string never starts with a dash)
        if options_done || !arg.starts_with('-') || arg == "-" {
            positional.push(arg.clone());
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let flag = |inline: &Option<String>| match inline {
            Some(_) => Err(format!("option {name} takes no value")),
            None => Ok(()),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("option {name} needs a value")),
            }
        };
        match name {
            "--help" | "-h" => {
                flag(&inline)?;
                return Ok(Command::Help);
            }
            "--version" | "-V" => {
                flag(&inline)?;
                return Ok(Command::Version);
            }
            "--once" => {
                flag(&inline)?;
                a.once = true;
            }
            "--model-dir" => a.model_dir = PathBuf::from(nonempty_value(name, value()?)?),
            "--provider" => {
                a.provider = match value()?.to_ascii_lowercase().as_str() {
                    "cpu" => ProviderArg::Cpu,
                    "cuda" => ProviderArg::Cuda,
                    "auto" => ProviderArg::Auto,
                    other => {
                        return Err(format!(
                            "--provider \"{other}\" is not one of cpu, cuda, auto"
                        ))
                    }
                }
            }
            "--device" => a.device = number(name, &value()?, 0, i32::MAX as u64)? as i32,
            "--intra-op-threads" => a.intra_op_threads = number(name, &value()?, 1, 1024)? as usize,
            "--decode-threads" => a.decode_threads = number(name, &value()?, 1, 1024)? as usize,
            "--batch" => a.batch = number(name, &value()?, 1, MAX_BATCH as u64)? as i32,
            "--ort-library" => a.ort_library = value()?,
            "--path-map" => rules.push(Rule::parse(&value()?)?),
            "--file-root" => {
                let v = value()?;
                if !v.starts_with('/') || v.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "{name} \"{v}\" must be an absolute folder without .."
                    ));
                }
                a.file_roots.push(v);
            }
            "--url-allowed-network" => {
                for n in value()?.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if doppler_core::fetch::Net::parse(n).is_none() {
                        return Err(format!("{name} \"{n}\" is not a network (CIDR)"));
                    }
                    a.url_networks.push(n.to_string());
                }
            }
            "--poll-interval" => {
                let v = value()?;
                let secs: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name} \"{v}\" is not a number of seconds"))?;
                if !(0.01..=3600.0).contains(&secs) {
                    return Err(format!("{name} must be between 0.01 and 3600 seconds"));
                }
                a.poll_interval = Duration::from_secs_f64(secs);
            }
            "--health-port" => a.health_port = number(name, &value()?, 0, 65535)? as u16,
            "--name" => a.name = Some(nonempty_value(name, value()?)?),
            _ => return Err(format!("unknown option {name} (see --help)")),
        }
    }
    match positional.len() {
        0 => a.conninfo = env("DOPPLER_WORKER_CONNINFO").unwrap_or_default(),
        1 => a.conninfo = positional.remove(0),
        _ => {
            return Err(format!(
                "unexpected argument \"{}\": give one connection string (quote it)",
                positional[1]
            ))
        }
    }
    if !a.ort_library.starts_with('/') {
        return Err(format!(
            "--ort-library \"{}\" must be an absolute path",
            a.ort_library
        ));
    }
    a.path_map = PathMap::new(rules);
    Ok(Command::Run(Box::new(a)))
}

fn nonempty_value(name: &str, v: String) -> Result<String, String> {
    if v.trim().is_empty() {
        return Err(format!("option {name} needs a value"));
    }
    Ok(v)
}

fn number(name: &str, v: &str, min: u64, max: u64) -> Result<u64, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{name} \"{v}\" is not a whole number from {min} to {max}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Args, String> {
        let argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match parse(&argv, &lookup)? {
            Command::Run(a) => Ok(*a),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let a = run(&[], &[]).unwrap();
        assert_eq!(a.conninfo, "");
        assert!(!a.once);
        assert_eq!(a.model_dir, PathBuf::from(DEFAULT_MODEL_DIR));
        assert_eq!(a.provider, ProviderArg::Cpu);
        assert_eq!((a.device, a.intra_op_threads, a.batch), (0, 1, 32));
        assert!(a.decode_threads >= 1);
        assert_eq!(a.ort_library, DEFAULT_ORT_LIBRARY);
        assert!(a.path_map.describe().is_empty());
        assert_eq!(a.poll_interval, Duration::from_secs(2));
        assert_eq!(a.health_port, 0);
        assert_eq!(a.name, None);
    }

    #[test]
    fn environment_defaults() {
        let a = run(
            &[],
            &[
                ("DOPPLER_MODEL_DIR", "/models"),
                ("ORT_DYLIB_PATH", "/opt/ort/libonnxruntime.so"),
                ("DOPPLER_WORKER_CONNINFO", "host=db"),
            ],
        )
        .unwrap();
        assert_eq!(a.model_dir, PathBuf::from("/models"));
        assert_eq!(a.ort_library, "/opt/ort/libonnxruntime.so");
        assert_eq!(a.conninfo, "host=db");
        // the argument wins over the environment
        let a = run(&["host=other"], &[("DOPPLER_WORKER_CONNINFO", "host=db")]).unwrap();
        assert_eq!(a.conninfo, "host=other");
    }

    #[test]
    fn every_option() {
        let a = run(
            &[
                "--once",
                "--model-dir=/m",
                "--provider",
                "CUDA",
                "--device",
                "1",
                "--intra-op-threads",
                "4",
                "--decode-threads=8",
                "--batch",
                "1000",
                "--ort-library",
                "/lib/ort.so",
                "--path-map",
                "/srv=/mnt",
                "--path-map=/srv/a=/a",
                "--poll-interval",
                "0.5",
                "--health-port",
                "8080",
                "--name",
                "gpu-1",
                "postgresql://w@db/app",
            ],
            &[],
        )
        .unwrap();
        assert!(a.once);
        assert_eq!(a.model_dir, PathBuf::from("/m"));
        assert_eq!(a.provider, ProviderArg::Cuda);
        assert_eq!(
            (a.device, a.intra_op_threads, a.decode_threads, a.batch),
            (1, 4, 8, 1000)
        );
        assert_eq!(a.ort_library, "/lib/ort.so");
        assert_eq!(a.path_map.map("/srv/a/x.jpg"), "/a/x.jpg");
        assert_eq!(a.path_map.map("/srv/b/x.jpg"), "/mnt/b/x.jpg");
        assert_eq!(a.poll_interval, Duration::from_millis(500));
        assert_eq!(a.health_port, 8080);
        assert_eq!(a.name.as_deref(), Some("gpu-1"));
        assert_eq!(a.conninfo, "postgresql://w@db/app");
    }

    #[test]
    fn double_dash_ends_options() {
        let a = run(&["--", "--weird conninfo"], &[]).unwrap();
        assert_eq!(a.conninfo, "--weird conninfo");
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["--frobnicate"][..],
            &["--batch", "0"],
            &["--batch", "1001"],
            &["--batch"],
            &["--batch", "many"],
            &["--provider", "tpu"],
            &["--device", "-1"],
            &["--intra-op-threads", "0"],
            &["--decode-threads", "0"],
            &["--ort-library", "libonnxruntime.so"],
            &["--path-map", "/a"],
            &["--path-map", "a=/b"],
            &["--poll-interval", "0"],
            &["--poll-interval", "nan"],
            &["--health-port", "70000"],
            &["--once=yes"],
            &["--name", ""],
            &["host=a", "host=b"],
            &["-x"],
        ] {
            assert!(run(bad, &[]).is_err(), "{bad:?}");
        }
        let e = run(&["--frobnicate"], &[]).unwrap_err();
        assert!(e.contains("--frobnicate"), "{e}");
        assert!(!e.contains('\n'));
        // a relative ORT_DYLIB_PATH is refused too
        assert!(run(&[], &[("ORT_DYLIB_PATH", "ort.so")]).is_err());
    }

    #[test]
    fn help_and_version() {
        let none = |_: &str| None;
        assert!(matches!(
            parse(&["--batch".into(), "3".into(), "--help".into()], &none),
            Ok(Command::Help)
        ));
        assert!(matches!(
            parse(&["--version".into()], &none),
            Ok(Command::Version)
        ));
    }
}
