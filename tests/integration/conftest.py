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
import psycopg.sql
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
PG_CONFIG = {
    "pg15": "/usr/bin/pg_config",
    "pg18": os.environ.get("DOPPLER_PG18", f"{DEPS}/pgserver/pgserver/pginstall") + "/bin/pg_config",
}[PG]
DB = "doppler_it"
AS_ROOT = os.geteuid() == 0


def as_pg(cmd, **kw):
    """Runs a server program as the `postgres` OS user when we are root (Postgres refuses root)."""
    if AS_ROOT:
        cmd = ["sudo", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class Cluster:
    def __init__(self, worker_db=DB, extra_conf="", version=None, name="last"):
        """A cluster whose workers serve `worker_db` (a comma-separated list), with database DB and
        doppler in it (`version`: CREATE EXTENSION ... VERSION, default the newest)."""
        self.name = name
        self.started = time.time()
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
            if version:
                c.execute("CREATE EXTENSION doppler VERSION %s" % psycopg.sql.quote(version))
            else:
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
        shutil.copy(os.path.join(self.dir, "server.log"), f"/tmp/doppler-it-{PG}-{self.name}.log")
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


# Skips are expected only where listed (tests/integration/expected_skips.txt, per PostgreSQL
# major): a test that skips elsewhere (pgvector gone from a build, a helper missing) fails the run.
SKIPPED = []


def pytest_runtest_logreport(report):
    if report.skipped:
        SKIPPED.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at collection
        SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    import re
    with open(os.path.join(os.path.dirname(__file__), "expected_skips.txt")) as f:
        allowed = [re.compile(".*".join(map(re.escape, line.split()[1].split("*"))))  # only * is special
                   for line in f if line.strip() and not line.startswith("#") and line.split()[0] in (PG, "all")]
    unexpected = [n for n in SKIPPED if not any(a.fullmatch(n.split("/")[-1]) for a in allowed)]
    if unexpected:
        print(f"\n{len(unexpected)} tests skipped that tests/integration/expected_skips.txt does not expect on {PG}:")
        for n in unexpected:
            print(f"  {n}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def cluster():
    c = Cluster()
    yield c
    c.destroy()


@pytest.fixture(scope="session")
def noworker(cluster):
    """Connections to a database with doppler that no background worker serves: what fill and
    sync do there, nothing else does."""
    with cluster.connect("postgres") as c:
        c.execute("CREATE DATABASE doppler_noworker")
    with cluster.connect("doppler_noworker") as c:
        c.execute("CREATE EXTENSION doppler")
    return lambda: cluster.connect("doppler_noworker")


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


def worker(conn):
    """This database's doppler worker in pg_stat_activity: (pid, state_change, query,
    wait_event_type/wait_event), or None. Outside a transaction: inside one, pg_stat_activity is
    a snapshot that does not move."""
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "pg_stat_activity would be a snapshot"
    return conn.execute(
        "SELECT pid, state_change, query, wait_event_type || '/' || wait_event FROM pg_stat_activity"
        " WHERE backend_type = 'doppler worker' AND datname = current_database()").fetchone()


def worker_asleep(conn, timeout=60):
    """Waits until the worker sleeps on its latch after a pass (it reports 'doppler: idle' at the
    end of each pass, and every report moves state_change); returns its state_change then."""
    def asleep_once():
        w = worker(conn)
        return w and w[2] == "doppler: idle" and w[3] == "Extension/Extension" and w[1]

    def asleep():
        # and still so 300 ms later (a latch already set shows the wait event for a moment)
        t = asleep_once()
        if not t:
            return None
        time.sleep(0.3)
        return t if asleep_once() == t else None
    return wait_for(asleep, timeout, 0.05, "the worker asleep")


def worker_fresh_nap(conn):
    """Wakes the worker and waits until it sleeps again: its next nap (doppler.worker_naptime,
    30 s here) has just begun. Returns its state_change."""
    before = wait_for(lambda: worker(conn), 60, 0.05, "the worker")[1]
    conn.execute("SELECT doppler.wake()")
    return wait_for(lambda: (lambda t: t if t != before else None)(worker_asleep(conn)), 60, 0.05, "a fresh nap")


def stays(predicate, seconds, what):
    """A negative check: `predicate` holds for the whole window (polled every 50 ms). Only for
    events that would show within milliseconds (a woken worker reports at once)."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        assert predicate(), f"{what} changed within {seconds}s"
        time.sleep(0.05)


def set_system(conn, cluster=None, **settings):
    """ALTER SYSTEM SET each doppler.<name> = value (None: RESET), reload, and wait until this
    connection runs with them (a backend reloads at its next statement after the signal), and,
    given the cluster, until the worker has reloaded too (its log line)."""
    log = cluster.log() if cluster else ""
    reloads, starts = log.count("reloaded its settings"), log.count("doppler worker started in database")
    for k, v in settings.items():
        if v is None:
            conn.execute(f"ALTER SYSTEM RESET doppler.{k}")
        else:
            conn.execute(f"ALTER SYSTEM SET doppler.{k} = {psycopg.sql.quote(str(v))}")
    conn.execute("SELECT pg_reload_conf()")

    def applied():
        return all(conn.execute("SELECT coalesce(sourcefile LIKE '%%postgresql.auto.conf', false) = %s"
                                " FROM pg_settings WHERE name = %s", (v is not None, f"doppler.{k}")).fetchone()[0]
                   for k, v in settings.items())
    wait_for(applied, 30, 0.05, f"settings {sorted(settings)} reloaded")
    if cluster:
        # (a worker that starts after the reload reads the new settings as it starts)
        wait_for(lambda: (lambda log: log.count("reloaded its settings") > reloads
                          or log.count("doppler worker started in database") > starts)(cluster.log()),
                 30, 0.05, "the worker's reload")
