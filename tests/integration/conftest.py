"""A real PostgreSQL cluster with doppler in shared_preload_libraries, for the tests that need
the background worker, server restarts and several connections (which `cargo pgrx test`, one
rolled-back transaction per test, cannot give).

Run through scripts/test (steps it15 / it18), which installs the extension first:
    DOPPLER_IT_PG=pg18 pytest tests/integration
"""
import os
import shutil
import subprocess
import tempfile
import time

import psycopg
import pytest

DEPS = os.environ.get("DOPPLER_DEPS", "/opt/doppler")
ORT = os.environ.get("DOPPLER_ORT_LIB", f"{DEPS}/lib/libonnxruntime.so.1.31.1")
MODELS = os.environ.get("DOPPLER_MODELS", f"{DEPS}/models")
FIXTURES = os.environ.get("DOPPLER_FIXTURES", f"{DEPS}/fixtures")
PG = os.environ.get("DOPPLER_IT_PG", "pg18")
BINDIR = {
    "pg15": "/usr/lib/postgresql/15/bin",
    "pg18": os.environ.get("DOPPLER_PG18", f"{DEPS}/pgserver/pgserver/pginstall") + "/bin",
}[PG]
DB = "doppler_it"
AS_ROOT = os.geteuid() == 0


def as_pg(cmd, **kw):
    """Runs a server program as the `postgres` OS user when we are root (Postgres refuses root)."""
    if AS_ROOT:
        cmd = ["sudo", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class Cluster:
    def __init__(self, worker_db=DB, extra_conf=""):
        self.dir = tempfile.mkdtemp(prefix=f"doppler-it-{PG}-")
        os.chmod(self.dir, 0o755)
        if AS_ROOT:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.files = os.path.join(self.dir, "files")  # images the tests write, readable by the server
        os.makedirs(self.files)
        os.chmod(self.files, 0o777)
        as_pg([f"{BINDIR}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"""
listen_addresses = ''
unix_socket_directories = '{self.dir}'
shared_preload_libraries = 'doppler'
doppler.worker_databases = '{worker_db}'
doppler.worker_naptime = '30s'
doppler.worker_intra_op_threads = 1
doppler.onnxruntime_library = '{ORT}'
doppler.model_path = '{MODELS}/resnet50-seeded.onnx'
doppler.execution_provider = 'cpu'
doppler.retry_backoff = '1s'
doppler.max_attempts = 2
restart_after_crash = on
log_min_messages = info
{extra_conf}""")
        self.start()
        with self.connect("postgres") as c:
            c.execute(f"CREATE DATABASE {DB}")
        with self.connect() as c:
            c.execute("CREATE EXTENSION doppler")
            if self.has_pgvector():
                c.execute("CREATE EXTENSION vector")

    def start(self):
        as_pg([f"{BINDIR}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"), "-w", "start"])

    def stop(self, mode="fast"):
        as_pg([f"{BINDIR}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"])

    def connect(self, db=DB, retries=60, user="postgres"):
        for i in range(retries):
            try:
                return psycopg.connect(host=self.dir, dbname=db, user=user, autocommit=True)
            except psycopg.OperationalError:
                if i == retries - 1:
                    raise
                time.sleep(0.5)

    def has_pgvector(self):
        with self.connect("postgres") as c:
            return c.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0] > 0

    def log(self):
        with open(os.path.join(self.dir, "server.log")) as f:
            return f.read()

    def destroy(self):
        shutil.copy(os.path.join(self.dir, "server.log"), f"/tmp/doppler-it-{PG}-last.log")
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    c = Cluster()
    yield c
    c.destroy()


@pytest.fixture
def db(cluster):
    with cluster.connect() as conn:
        yield conn


def fixture_paths():
    with open(os.path.join(FIXTURES, "manifest.tsv")) as f:
        return [os.path.join(FIXTURES, line.split("\t")[0]) for line in f if line.strip()]


def wait_for(predicate, timeout=180, interval=0.3, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def status(conn, table):
    row = conn.execute(
        "SELECT total, done, pending, failed, retrying, skipped, worker_pid FROM doppler.status WHERE table_name = %s::regclass",
        (table,),
    ).fetchone()
    return dict(zip(["total", "done", "pending", "failed", "retrying", "skipped", "worker_pid"], row))
