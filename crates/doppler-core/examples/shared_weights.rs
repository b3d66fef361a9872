//! What N processes that each hold a session of the same model take together, by how the session
//! is made — the alternative to one inference service for CPU memory (`scripts/bench concurrency`):
//! `cargo run --release -p doppler-core --example shared_weights -- ORT_LIB MODEL.onnx MODEL.ort N`
//!
//! Modes, each in N child processes (as N backends would be):
//! * `file`: the session from the .onnx file, as doppler's backends make it: ORT reads the graph
//!   and its weights into each process.
//! * `mmap`: the ORT-format file mapped read-only and used in place
//!   (`session.use_ort_model_bytes_directly`, `session.use_ort_model_bytes_for_initializers`): the
//!   weights stay page-cache pages that every process shares.
//! * `mmap-noprepack`: the same, and `session.disable_prepacking`: no private, re-laid-out copy of
//!   the weights for the GEMM kernels.
//!
//! Each child loads its session, runs one 224×224 image three times (so its arenas are allocated)
//! and reports the best time (the first child's, measured before the others start, is printed); the parent then sums the children's PSS (`/proc/PID/smaps_rollup`:
//! a page shared by k processes counts 1/k in each) and their private memory (what one more process adds), and prints one JSON
//! object per mode.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

/// A field of `/proc/PID/smaps_rollup`, in MB.
fn rollup_mb(pid: u32, field: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / 1024.0
}

fn mapped(path: &str) -> &'static [u8] {
    let file = std::fs::File::open(path).expect("open the .ort file");
    let len = file.metadata().expect("stat").len() as usize;
    // SAFETY: a read-only shared mapping of a file nobody writes while the child lives; leaked, so
    // it outlives the session that reads its weights in place.
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap failed");
        std::slice::from_raw_parts(p.cast::<u8>(), len)
    }
}

fn child(mode: &str, lib: &str, path: &str) {
    let env = doppler_core::model::runtime(lib).expect("ONNX Runtime");
    let mut b = Session::builder(env)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
        .and_then(|b| Ok(b.with_intra_threads(1)?))
        .expect("builder");
    let mut session = match mode {
        "file" => b.commit_from_file(path).expect("session"),
        _ => {
            b = b
                .with_config_entry("session.use_ort_model_bytes_directly", "1")
                .expect("config");
            b = b
                .with_config_entry("session.use_ort_model_bytes_for_initializers", "1")
                .expect("config");
            if mode == "mmap-noprepack" {
                b = b
                    .with_config_entry("session.disable_prepacking", "1")
                    .expect("config");
            }
            b.commit_from_memory(mapped(path)).expect("session")
        }
    };
    let input = vec![0.5f32; 3 * 224 * 224];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        let x = TensorRef::from_array_view(([1usize, 3, 224, 224], &input[..])).expect("tensor");
        let out = session.run(ort::inputs![x]).expect("run");
        drop(out);
        best = best.min(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!("ready {best:.3}");
    std::io::stdout().flush().ok();
    // hold the session until the parent closes stdin
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2], &args[3], &args[4]);
    }
    let [_, lib, onnx, ort_file, n] = &args[..] else {
        eprintln!("usage: shared_weights ORT_LIB MODEL.onnx MODEL.ort N");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    let me = std::env::current_exe().expect("exe");
    for (mode, path) in [
        ("file", onnx),
        ("mmap", ort_file),
        ("mmap-noprepack", ort_file),
    ] {
        let spawn = || {
            Command::new(&me)
                .args(["--child", mode, lib, path])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        let ready = |k: &mut std::process::Child| -> f64 {
            let mut line = String::new();
            BufReader::new(k.stdout.as_mut().expect("stdout"))
                .read_line(&mut line)
                .expect("ready");
            line.trim()
                .trim_start_matches("ready ")
                .parse()
                .expect("ready line")
        };
        // the first process alone: its time per image is a session's own, not 32 sharing 2 cores
        let mut first = spawn();
        let ms = ready(&mut first);
        let mut kids = vec![first];
        kids.extend((1..n).map(|_| spawn()));
        for k in kids.iter_mut().skip(1) {
            ready(k);
        }
        let total: f64 = kids.iter().map(|k| rollup_mb(k.id(), "Pss:")).sum();
        // what each process has to itself: what one more process adds
        let private: f64 = kids
            .iter()
            .map(|k| rollup_mb(k.id(), "Private_Clean:") + rollup_mb(k.id(), "Private_Dirty:"))
            .sum();
        println!(
            "{{\"mode\": \"{mode}\", \"processes\": {n}, \"pss_mb\": {total:.1}, \"per_process_mb\": {:.1}, \"private_mb\": {:.1}, \"ms_per_image\": {ms:.2}}}",
            total / n as f64,
            private / n as f64
        );
        for mut k in kids {
            drop(k.stdin.take());
            let _ = k.wait();
        }
    }
}
