"""External fill workers (issue 30): `doppler-worker` processes and the server's SQL API for them
(doppler.worker_register / worker_claim / worker_write / worker_heartbeat / worker_unregister /
worker_backlog, the doppler.workers view, doppler.status.external_claimed), in a real cluster.

What is proven here:
* exactly once: three worker processes fill 2 000 rows, every row written once (a trigger counts
  the writes of the vector column), by batches of more than one worker;
* bit for bit: a worker's ResNet-50 vectors and dHashes are extract_features' and dhash's;
* the lease: a worker killed (SIGKILL) mid-batch loses its rows at once, one stopped (SIGSTOP: a
  network cut looks the same to the server) within doppler.worker_lease (5 s, its least), and
  the other worker's fill of them is the only write;
* a worker whose connection is terminated reconnects, one whose registration is gone registers
  again; one told SIGTERM finishes its batch, unregisters and exits 0 (told twice: gives the
  batch back at once); --once exits 0 when nothing is left;
* the server refuses what a hostile worker writes (rows it does not hold, twice, wrong lengths,
  not a dHash, another model file, no batch), and a vector of an image that changed while the
  worker held its row does not survive;
* rights: only members of doppler_worker, only under their own worker id, only tables whose owner
  allowed external workers, no privilege on the tables themselves, no source the table owner may
  not read; a hostile owner's table (code that raises or sleeps) does not stop the workers
  filling everyone else's;
* a model file whose SHA-256 is not the registered one is refused: nothing written;
* visible: doppler.workers, doppler.status.external_claimed, worker_backlog, JSON log lines.

One cluster for the module (its server.log is kept as /tmp/doppler-it-<pg>-workers.log), whose own
background worker serves the test database: every table here is watched with
workers => 'external', which it must leave alone (the rows it would fill are the workers' to
fill; the tests that wait for rows to stay pending see it not filling them), except one in a
database no background worker serves. Tables belong to a plain LOGIN owner (pg_read_server_files
for paths, doppler_url_reader for URLs); workers log in as plain members of doppler_worker. The
worker processes' stdout (JSON lines) and stderr are files in the cluster's directory (kept in
/tmp/doppler-it-<pg>-workers/); every process a test starts is killed when the test ends, and its
tables dropped. Slow and hanging images come from scripts/imageweb.py over loopback hosts.

The binary: $DOPPLER_WORKER_BIN (scripts/test builds it), else target/debug/doppler-worker.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import DB, FIXTURES, MODELS, ORT, PG, Cluster, set_system, stays, wait_for
from test_trust import error_of, fresh_role

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from imageweb import ImageWeb  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BIN = os.environ.get("DOPPLER_WORKER_BIN") or os.path.join(ROOT, "target", "debug", "doppler-worker")

NOWORKER = "doppler_noworker_ext"  # a database no background worker serves
OWNER = "tw_owner"        # owns the tables (LOGIN, pg_read_server_files, doppler_url_reader)
WROLE = "tw_worker"       # the workers' role (LOGIN, member of doppler_worker)
WROLE2 = "tw_worker2"     # another workers' role
OUTSIDER = "tw_outsider"  # LOGIN, not a member of doppler_worker
HOSTILE = "tw_hostile"    # a table owner whose tables fight the workers
MODEL = "tiny_w"          # $DOPPLER_MODELS/tiny.onnx, 16 dimensions
DIM = 16
IMAGES = ["portrait_300x500.png", "landscape_640x480.jpg", "palette_300x200.png", "gray_200x300.jpg",
          "rgba_256x256.png", "gif_160x120.gif", "cmyk_200x200.jpg", "bitmap_123x77.bmp"]
PATHS = [os.path.join(FIXTURES, n) for n in IMAGES]
LEASE_S = 5  # doppler.worker_lease's lowest value
LOGS = f"/tmp/doppler-it-{PG}-workers"  # the worker processes' logs, kept


# ---------------------------------------------------------------------------------------------
# the cluster, the roles, the web


class Web(ImageWeb):
    """ImageWeb with one more route: /first-hangs/<name>: the first request for this exact path
    (with its query) hangs until release() and is then answered with the file; every later one
    is answered at once. A worker that claims such rows holds them as long as the test wants,
    and the worker that takes them over after it gets its images at once."""

    async def _route(self, path):
        parts = path.split("?", 1)[0].lstrip("/").split("/")
        if parts[0] == "first-hangs" and len(parts) == 2:
            if self.path_requests(path) <= 1 and not self._closed:
                await self._released.wait()
            return self._file(parts[1])
        return await super()._route(path)


@pytest.fixture(scope="module")
def wc():
    """The module's cluster: tiny model registered (in the test database and one no background
    worker serves), the roles created, URLs from 127.0.0.0/24 allowed (ALTER SYSTEM: the
    workers' sessions read the URL policy they fetch under). Destroyed at the end."""
    assert os.access(BIN, os.X_OK), f"no doppler-worker binary at {BIN} (cargo build -p doppler-worker)"
    shutil.rmtree(LOGS, ignore_errors=True)
    c = Cluster(name="workers")
    try:
        with c.connect() as admin:
            fresh_role(admin, OWNER, member_of=("pg_read_server_files", "doppler_url_reader"))
            for r in (WROLE, WROLE2):
                admin.execute(f"CREATE ROLE {r} LOGIN IN ROLE doppler_worker")
            admin.execute(f"CREATE ROLE {OUTSIDER} LOGIN")
            fresh_role(admin, HOSTILE)
            set_system(admin, None, allow_urls="on", url_allowed_networks="127.0.0.0/24", url_timeout="60s")
        with c.connect("postgres") as pg:
            pg.execute(f"CREATE DATABASE {NOWORKER}")
        with c.connect(NOWORKER) as nw:
            nw.execute("CREATE EXTENSION doppler")
            nw.execute(f"CREATE SCHEMA {OWNER} AUTHORIZATION {OWNER}")
        for db in (DB, NOWORKER):
            with c.connect(db) as admin:
                admin.execute("SELECT doppler.register_model(%s, %s, dim => %s)",
                              (MODEL, os.path.join(MODELS, "tiny.onnx"), DIM))
        yield c
    finally:
        c.destroy()


@pytest.fixture(scope="module")
def web():
    root = tempfile.mkdtemp(prefix="doppler-workers-")
    for name in IMAGES:
        shutil.copy(os.path.join(FIXTURES, name), os.path.join(root, name))
    w = Web(root, hosts=8)
    yield w
    w.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_web(web):
    web.release()
    web.reset()
    yield web
    web.release()


@pytest.fixture
def admin(wc):
    with wc.connect() as conn:
        yield conn


@pytest.fixture
def owner(wc, admin):
    """The owner's connection; every table of its schema is dropped when the test ends."""
    with wc.connect(user=OWNER) as conn:
        yield conn
    # (no session of a worker's role left to hold a lock the DROP waits for)
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename IN (%s, %s)", (WROLE, WROLE2))
    for db in (DB, NOWORKER):
        with wc.connect(db) as a:
            a.execute("SET lock_timeout = '20s'")
            for (t,) in a.execute("SELECT format('%%I.%%I', schemaname, tablename) FROM pg_tables "
                                  "WHERE schemaname IN (%s, %s)", (OWNER, HOSTILE)).fetchall():
                a.execute(f"DROP TABLE IF EXISTS {t} CASCADE")


@pytest.fixture
def spawn(wc, owner):
    """Starts doppler-worker processes (spawn(name, ...) -> Worker); kills them all at the end
    (before the owner fixture drops the tables)."""
    started = []

    def start(name, **kw):
        w = Worker(wc, name, **kw)
        started.append(w)
        return w
    yield start
    for w in started:
        w.kill()


# ---------------------------------------------------------------------------------------------
# worker processes


class Worker:
    """A doppler-worker process against the module's cluster (a Unix socket in its directory)."""
    count = 0

    def __init__(self, cluster, name, user=WROLE, db=DB, model_dir=MODELS, batch=32, once=False, extra=()):
        Worker.count += 1
        self.name, self.user = name, user
        base = os.path.join(cluster.dir, f"worker-{Worker.count}-{name}")
        self.out_path, self.err_path = base + ".out", base + ".err"
        self.args = [BIN, "--model-dir", model_dir, "--ort-library", ORT, "--provider", "cpu",
                     "--intra-op-threads", "1", "--decode-threads", "1", "--batch", str(batch),
                     "--poll-interval", "0.2", "--name", name, *(["--once"] if once else []),
                     # (the image server is on loopback: this host allows it, as the server does)
                     "--url-allowed-network", "127.0.0.0/24", *extra,
                     f"host={cluster.dir} dbname={db} user={user}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.startswith("DOPPLER_WORKER")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = subprocess.Popen(self.args, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        self.pid = self.p.pid
        self.started = time.time()

    def signal(self, sig):
        os.kill(self.pid, sig)

    def alive(self):
        return self.p.poll() is None

    def wait(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} still runs {timeout}s later; its log:\n{self.text()}")

    def kill(self):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(30)
        # (kept for a look after the cluster is gone)
        os.makedirs(LOGS, exist_ok=True)
        for path in (self.out_path, self.err_path):
            shutil.copy(path, LOGS)

    def raw_lines(self):
        with open(self.out_path, errors="replace") as f:
            return [line for line in f.read().split("\n") if line.strip()]

    def lines(self):
        """stdout's JSON lines, parsed (the last may be half written)."""
        out = []
        for line in self.raw_lines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def text(self):
        return "\n".join(self.raw_lines()[-40:]) + "\n--- stderr:\n" + self.stderr()[-4000:]


def registered(admin, w):
    """doppler.workers' row of process w (as a dict), or None."""
    cur = admin.execute("SELECT * FROM doppler.workers WHERE pid = %s ORDER BY id DESC LIMIT 1", (w.pid,))
    row = cur.fetchone()
    return dict(zip([d.name for d in cur.description], row)) if row else None


def wait_registered(admin, w, timeout=60):
    def ok():
        assert w.alive(), f"worker {w.name} exited with {w.p.returncode}:\n{w.text()}"
        r = registered(admin, w)
        return r if r and r["alive"] else None
    return wait_for(ok, timeout, 0.1, f"worker {w.name} registered")


def wait_holding(admin, w, table, timeout=60):
    """Waits until w's heartbeat says it holds rows of `table`; returns its doppler.workers row."""
    def ok():
        assert w.alive(), f"worker {w.name} exited with {w.p.returncode}:\n{w.text()}"
        r = registered(admin, w)
        return r if r and r["holding_rows"] > 0 and r["holding"] == table_name(admin, table) else None
    return wait_for(ok, timeout, 0.1, f"worker {w.name} holding rows of {table} (doppler.workers)")


def wait_fetching(web, w, urls, timeout=60):
    """Waits until worker w has claimed the rows of `urls` and requested each (holding them
    while the answers are slow or hang): told by the web server, not by the worker."""
    def ok():
        assert w.alive(), f"worker {w.name} exited with {w.p.returncode}:\n{w.text()}"
        return all(web.path_requests(path_of(u)) >= 1 for u in urls)
    wait_for(ok, timeout, 0.05, f"worker {w.name} requesting every URL")


def table_name(conn, table):
    return conn.execute("SELECT %s::regclass::text", (table,)).fetchone()[0]


def backends(admin, w, query=None):
    """Server processes of worker w's sessions (its role's doppler-worker sessions that began
    after it started), those running `query` (a LIKE pattern) when given."""
    return {r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND application_name = 'doppler-worker'"
        " AND backend_start >= to_timestamp(%s) AND query LIKE %s",
        (w.user, w.started - 0.5, query or "%")).fetchall()}


# ---------------------------------------------------------------------------------------------
# tables


WRITES = f"""
CREATE TABLE IF NOT EXISTS {OWNER}.writes (tbl text, id int, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION {OWNER}.count_write() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO {OWNER}.writes (tbl, id) VALUES (TG_TABLE_NAME, NEW.id);
    RETURN NULL;
END $f$"""


def make_table(owner, name, source="bytea", hash_column=False, mode="async", model=MODEL, workers="external",
               batch_size=32, schema=OWNER, priority=0):
    """{schema}.name (id, f_img <source>, features real[] [, hash text]) watched by `model` for
    `workers`, and (in the owner's schema) an AFTER UPDATE trigger that records every write of a
    vector in {OWNER}.writes."""
    t = f"{schema}.{name}"
    owner.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, f_img {source}, features real[]"
                  + (", hash text" if hash_column else "") + ")")
    if schema == OWNER:
        owner.execute(WRITES)
        owner.execute(f"""CREATE TRIGGER count_write AFTER UPDATE OF features ON {t} FOR EACH ROW
                          WHEN (NEW.features IS NOT NULL) EXECUTE FUNCTION {OWNER}.count_write()""")
    owner.execute("SELECT doppler.watch(%s::regclass, model => %s::text, mode => %s::text, batch_size => %s::int,"
                  " hash_column => %s::name, workers => %s::text, priority => %s::int)",
                  (t, model, mode, batch_size, "hash" if hash_column else None, workers, priority))
    return t


def insert(conn, t, values, first=1, source="bytea"):
    conn.execute(f"INSERT INTO {t} (id, f_img) SELECT * FROM unnest(%s::int[], %s::{source}[])",
                 (list(range(first, first + len(values))), list(values)))


def writes(conn, t):
    """{id: how many times a vector was written} for table t."""
    name = t.split(".")[-1]
    return dict(conn.execute(f"SELECT id, count(*) FROM {OWNER}.writes WHERE tbl = %s GROUP BY id", (name,)).fetchall())


def filled(conn, t):
    return conn.execute(f"SELECT count(features) FROM {t}").fetchone()[0]


def wait_filled(conn, t, n, timeout=120, workers=()):
    def ok():
        for w in workers:
            assert w.alive(), f"worker {w.name} exited with {w.p.returncode}:\n{w.text()}"
        return filled(conn, t) >= n
    wait_for(ok, timeout, 0.1, f"{n} rows of {t} filled")


def pngs(n, seed=0, size=24):
    """n different small PNGs (random pixels)."""
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def read(path):
    with open(path, "rb") as f:
        return f.read()


def external_batches(admin, t):
    return admin.execute("SELECT pid, claimed, filled, failed FROM doppler.batches WHERE relid = %s::regclass"
                         " AND via = 'external'", (t,)).fetchall()


def external_claimed(conn, t):
    return conn.execute("SELECT external_claimed FROM doppler.status WHERE table_name = %s::regclass", (t,)).fetchone()[0]


def sql_register(conn, host="sql-worker"):
    return conn.execute("SELECT id FROM doppler.worker_register(%s, %s, 'cpu', 'test')", (host, os.getpid())).fetchone()[0]


def sql_claim(conn, wid, max_rows=32):
    cur = conn.execute("SELECT n, tbl, model, source, image FROM doppler.worker_claim(%s, %s)", (wid, max_rows))
    return [dict(zip(["n", "tbl", "model", "source", "image"], r)) for r in cur.fetchall()]


def sql_write(conn, wid, sha, n, vectors, hashes=None, failures=None):
    return conn.execute("SELECT doppler.worker_write(%s, %s, %s::int[], %s::real[], %s::text[], %s::jsonb)",
                        (wid, sha, list(n), [float(x) for x in vectors], list(hashes or []),
                         json.dumps(failures or []))).fetchone()[0]


def path_of(url):
    return url[url.index("/", len("http://")):]


def first_hangs(web, n, tag):
    return [f"http://{web.hosts[i % len(web.hosts)]}:{web.port}/first-hangs/{IMAGES[i % len(IMAGES)]}?{tag}={i}"
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 1. exactly once, by several workers


def test_three_workers_fill_2000_rows_exactly_once(wc, admin, owner, spawn):
    """Three worker processes (--batch 32), all registered before the rows come: 2 000 bytea rows
    of the tiny model are all filled, each written exactly once (the write-count trigger), by
    batches via 'external' of at least two of the workers (their connections' pids in
    doppler.batches, their rows_done in doppler.workers), the server's own worker none."""
    n = 2000
    t = make_table(owner, "many")
    # (polling often, and batches of 16: the tiny model fills ~1 000 rows/s, and a worker idle
    # for a while polls less often, so that the first one awake could take them all)
    workers = [spawn(f"many{i}", batch=16, extra=("--poll-interval", "0.05")) for i in range(3)]
    for w in workers:
        wait_registered(admin, w)
    images = pngs(n)
    t0 = time.time()
    insert(owner, t, images)
    wait_filled(owner, t, n, timeout=150, workers=workers)
    took = time.time() - t0
    counts = writes(owner, t)
    b = external_batches(admin, t)
    pids = {x[0] for x in b}
    print(f"{n} rows by 3 workers in {took:.1f} s: {len(b)} batches from {len(pids)} connections")
    assert len(counts) == n and set(counts.values()) == {1}, \
        f"rows written more than once: {[(k, v) for k, v in counts.items() if v != 1][:10]}"
    assert sum(x[2] for x in b) == n and sum(x[3] for x in b) == 0, b
    assert all(x[1] <= 32 for x in b), "a batch larger than --batch 32"
    assert len(pids) >= 2, f"all batches from one connection: {pids}"
    assert admin.execute("SELECT count(*) FROM doppler.batches WHERE relid = %s::regclass AND via <> 'external'",
                         (t,)).fetchone()[0] == 0, "the server's worker filled rows of a workers => 'external' table"
    # (rows_done comes with the heartbeat each batch asks for)
    done = wait_for(lambda: (lambda d: d if sum(d) == n else None)(
        [(registered(admin, w) or {}).get("rows_done", 0) for w in workers]), 30, 0.2, "rows_done adding up")
    print("rows_done:", done)
    assert sum(1 for d in done if d > 0) >= 2, done
    # every row's vector is the model's for its image (a sample: the server computes it again)
    bad = owner.execute(f"SELECT id FROM {t} WHERE id %% 97 = 0 AND features IS DISTINCT FROM "
                        "doppler.extract_features(f_img, %s)", (MODEL,)).fetchall()
    assert bad == [], f"rows whose vector is not extract_features': {bad}"


# ---------------------------------------------------------------------------------------------
# 2. bit for bit


def test_resnet50_vectors_and_dhashes_are_bit_for_bit_the_servers(wc, admin, owner, spawn):
    """8 fixture images (PNG, JPEG, CMYK, GIF, BMP, palette, gray, RGBA) by path, the built-in
    resnet50 model, a hash column: the worker's vectors equal doppler.extract_features(f_img)
    (float4 by float4) and its hashes doppler.dhash(f_img)."""
    t = make_table(owner, "bitwise", source="text", hash_column=True, model="resnet50")
    insert(owner, t, PATHS, source="text")
    w = spawn("bitwise")
    wait_filled(owner, t, len(PATHS), timeout=120, workers=[w])
    rows = owner.execute(f"""SELECT id, f_img, features = doppler.extract_features(f_img, 'resnet50'),
                                    hash, doppler.dhash(f_img), cardinality(features)
                             FROM {t} ORDER BY id""").fetchall()
    assert [r[5] for r in rows] == [2048] * len(PATHS), rows
    assert all(r[2] for r in rows), f"vectors that differ from extract_features: {[r[1] for r in rows if not r[2]]}"
    assert all(r[3] == r[4] for r in rows), [(r[1], r[3], r[4]) for r in rows if r[3] != r[4]]
    assert set(writes(owner, t).values()) == {1}
    assert owner.execute("SELECT count(*) FROM doppler.failures WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------
# 3. the lease: killed, stopped


def test_a_killed_worker_loses_its_rows_at_once(wc, admin, owner, spawn, fresh_web):
    """A worker holding a batch (its URLs hang) is killed with SIGKILL: the server sees its
    connection close, the rows are free at once, and a second worker (already polling, finding
    them locked until then) fills them within a few seconds: each written once."""
    web = fresh_web
    t = make_table(owner, "killed", source="text")
    urls = first_hangs(web, 4, "killed")
    insert(owner, t, urls, source="text")
    a = spawn("killed-a")
    wait_fetching(web, a, urls)
    mine = backends(admin, a)
    assert len(mine) == 2, mine  # (work and control)
    b = spawn("killed-b")
    wait_registered(admin, b)
    # b claims (and finds the rows locked)
    wait_for(lambda: backends(admin, b, "%worker_claim%") - mine, 30, 0.02, "the second worker claiming")
    assert filled(owner, t) == 0
    a.signal(signal.SIGKILL)
    killed = time.time()
    a.p.wait(10)
    # a's server processes end as soon as they read the closed socket
    wait_for(lambda: not (mine & backends(admin, a)), 5, 0.02, "the killed worker's server processes gone")
    print(f"the killed worker's server processes ended {time.time() - killed:.2f} s after the kill")
    wait_filled(owner, t, len(urls), timeout=30, workers=[b])
    took = time.time() - killed
    print(f"rows of a killed worker filled by another {took:.2f} s after the kill")
    assert took < 10, f"the killed worker's rows were filled {took:.1f} s after the kill"
    assert writes(owner, t) == {i: 1 for i in range(1, 5)}
    assert all(web.path_requests(path_of(u)) == 2 for u in urls)


def test_a_stopped_worker_loses_its_rows_after_the_lease(wc, admin, owner, spawn, fresh_web):
    """doppler.worker_lease = 5s (the least it takes): a worker holding a batch is stopped with
    SIGSTOP (to the server, a cut network: an idle connection, open). The server ends its
    connection when the lease runs out, and a second worker fills the rows within lease + a few
    seconds. Then the stopped one is let go on (its images answered now): it finds its
    connection gone, and writes nothing: every row written once."""
    web = fresh_web
    set_system(admin, None, worker_lease=f"{LEASE_S}s")
    try:
        t = make_table(owner, "stopped", source="text")
        urls = first_hangs(web, 4, "stopped")
        insert(owner, t, urls, source="text")
        a = spawn("stopped-a")
        wait_fetching(web, a, urls)
        b = spawn("stopped-b")
        wait_registered(admin, b)
        a.signal(signal.SIGSTOP)
        stopped = time.time()
        wait_filled(owner, t, len(urls), timeout=LEASE_S + 30, workers=[b])
        took = time.time() - stopped
        print(f"rows of a stopped worker filled by another {took:.2f} s after the stop (lease {LEASE_S} s)")
        # (the lease runs from the claim, a moment before the stop)
        assert LEASE_S - 2 <= took < LEASE_S + 8, f"filled {took:.1f} s after the stop, lease {LEASE_S} s"
        assert "idle-in-transaction timeout" in wc.log()
        # the stopped worker goes on: its requests are answered now, it computes the vectors,
        # and its write finds the connection gone
        seen = len(a.lines())
        web.release()
        a.signal(signal.SIGCONT)
        # the end of its batch: written ("batch"), or refused ("write_failed", "commit_failed")
        ends = ("batch", "write_failed", "commit_failed")
        wait_for(lambda: any(x.get("event") in ends for x in a.lines()[seen:]), 30, 0.1, "the resumed batch's end")
        print("resumed worker:", a.lines()[seen:])
        assert writes(owner, t) == {i: 1 for i in range(1, 5)}, "a row was written twice"
        assert owner.execute(f"SELECT count(*) FROM {t} WHERE features_model IS NULL").fetchone()[0] == 0
    finally:
        set_system(admin, None, worker_lease=None)


# ---------------------------------------------------------------------------------------------
# 4. the connection terminated


def test_a_worker_reconnects_after_pg_terminate_backend(wc, admin, owner, spawn):
    """pg_terminate_backend of the worker's work connection (its session that is not the control
    connection of doppler.workers.backend_pid), and then of its control connection: the process
    goes on, connects again (a new server process), and rows inserted afterwards are filled."""
    t = make_table(owner, "terminated")
    imgs = pngs(30, seed=4)
    w = spawn("terminated")
    wait_registered(admin, w)
    insert(owner, t, imgs[:10])
    wait_filled(owner, t, 10, workers=[w])
    ctl = registered(admin, w)["backend_pid"]
    before = backends(admin, w)
    work = before - {ctl}
    assert len(work) == 1, f"the worker's sessions: {before}, control {ctl}"
    assert admin.execute("SELECT pg_terminate_backend(%s)", (work.pop(),)).fetchone()[0]
    insert(owner, t, imgs[10:20], first=11)
    wait_filled(owner, t, 20, timeout=60, workers=[w])
    after = backends(admin, w)
    assert after - before, f"no new session after the work connection was terminated: {before} -> {after}"

    # the control connection too: the heartbeat the next claim sends fails, the worker connects
    # again, and its heartbeats come from a new server process
    ctl = registered(admin, w)["backend_pid"]
    assert admin.execute("SELECT pg_terminate_backend(%s)", (ctl,)).fetchone()[0]
    insert(owner, t, imgs[20:], first=21)
    wait_filled(owner, t, 30, timeout=60, workers=[w])
    wait_for(lambda: (lambda r: r and r["alive"] and r["backend_pid"] != ctl)(registered(admin, w)),
             60, 0.2, "the worker's heartbeat from a new control connection")
    assert w.alive()
    assert set(writes(owner, t).values()) == {1} and len(writes(owner, t)) == 30


def test_a_worker_whose_registration_is_gone_registers_again(wc, admin, owner, spawn):
    """The worker's row in doppler.external_workers disappears (what worker_register's prune
    does to a worker whose heartbeat stopped for a day: one SIGSTOPped that long, say): its next
    call is told its id is not registered (42704, what the binary takes for "register again"),
    and it registers again and goes on filling."""
    with wc.connect(user=WROLE) as s:
        code, msg = error_of(s, "SELECT doppler.worker_heartbeat(%s, '{}')", (10 ** 12,))
        assert code == "42704" and msg.startswith(f"worker {10 ** 12} is not registered"), (code, msg)
    t = make_table(owner, "forgotten")
    imgs = pngs(10, seed=5)
    w = spawn("forgotten")
    first = wait_registered(admin, w)["id"]
    admin.execute("DELETE FROM doppler.external_workers WHERE id = %s", (first,))
    insert(owner, t, imgs)
    wait_filled(owner, t, 10, timeout=30, workers=[w])
    r = wait_registered(admin, w)
    assert r["id"] != first, r


# ---------------------------------------------------------------------------------------------
# 5. the server refuses what is not the batch's answer


def test_a_source_changed_while_held_does_not_keep_the_stale_vector(wc, admin, owner, spawn):
    """A worker session (SQL, as a worker role) claims 4 path rows; the owner changes row 1's
    source meanwhile (its UPDATE waits for the row lock); the worker writes vectors for all 4 and
    commits. The stale-clearing trigger then clears row 1's vector: the row is pending again, its
    next claim names the new source, and a worker process fills it with the new image's vector."""
    t = make_table(owner, "changed", source="text")
    insert(owner, t, PATHS[:4], source="text")
    with wc.connect(user=WROLE) as w:
        wid = sql_register(w)
        w.execute("BEGIN")
        rows = sql_claim(w, wid)
        assert sorted(r["source"] for r in rows) == sorted(PATHS[:4])
        model = rows[0]["model"]
        assert model["dim"] == DIM and len(model["sha256"]) == 64

        def update():
            with wc.connect(user=OWNER) as o:
                o.execute(f"UPDATE {t} SET f_img = %s WHERE id = 1", (PATHS[5],))
        th = threading.Thread(target=update, daemon=True)
        th.start()
        # the owner's UPDATE waits on the worker's row lock
        wait_for(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                                       "AND wait_event_type = 'Lock'", (OWNER,)).fetchone()[0] == 1,
                 30, 0.05, "the owner's UPDATE waiting for the row lock")
        n = [r["n"] for r in rows]
        assert sql_write(w, wid, model["sha256"], n, [0.5] * (DIM * len(n))) == 4
        w.execute("COMMIT")
        th.join(30)
        assert not th.is_alive()
        got = dict(owner.execute(f"SELECT id, features FROM {t}").fetchall())
        assert got[1] is None, f"the vector of row 1's old image survived its new source: {got[1]}"
        assert all(got[i] == [0.5] * DIM for i in (2, 3, 4)), got
        # pending again, with the new source
        w.execute("BEGIN")
        again = sql_claim(w, wid)
        w.execute("ROLLBACK")
        assert [r["source"] for r in again] == [PATHS[5]], again
        w.execute("SELECT doppler.worker_unregister(%s)", (wid,))
    p = spawn("changed")
    wait_filled(owner, t, 4, workers=[p])
    assert owner.execute(f"SELECT features = doppler.extract_features(%s, %s) FROM {t} WHERE id = 1",
                         (PATHS[5], MODEL)).fetchone()[0]


def test_worker_write_refuses_what_the_batch_does_not_hold(wc, owner):
    """A hostile worker (SQL, as a worker role): a claim outside a transaction block (25P01), a
    second claim in the same transaction (55000), and writes of a row not in the batch, a second
    answer for a row (in one call and in two), a vector of the wrong length, a hash that is not a
    dHash, another model file's SHA-256 (22023 each), a write with no batch held (55000, in a
    transaction and outside one): all refused, nothing written; then a right write is taken."""
    t = make_table(owner, "hostile_writes", source="text")
    insert(owner, t, PATHS[:3], source="text")
    with wc.connect(user=WROLE) as w:
        wid = sql_register(w)
        code, msg = error_of(w, "SELECT * FROM doppler.worker_claim(%s)", (wid,))
        assert code == "25P01", (code, msg)

        def attempt(write, *args, **kw):
            w.execute("BEGIN")
            rows = sql_claim(w, wid)
            assert len(rows) == 3, rows
            sha = rows[0]["model"]["sha256"]
            try:
                return write(sha, *args, **kw)
            finally:
                w.execute("ROLLBACK")

        def refused(sha, n, vectors, hashes=None, sha_override=None):
            try:
                sql_write(w, wid, sha_override or sha, n, vectors, hashes)
            except psycopg.Error as e:
                return e.sqlstate, str(e)
            return None, "written"

        v = [0.25] * DIM
        cases = {
            "a row not in the batch": ([4], v),
            "row 0": ([0], v),
            "a second answer in one call": ([1, 1], v + v),
            "a vector too short": ([1], v[:-1]),
            "a vector too long": ([1, 2], v + v + [0.0]),
            "not a dHash": ([1], v, ["zzzzzzzzzzzzzzzz"]),
            "a dHash too short": ([1], v, ["abc"]),
            "another model file": ([1], v, None, "0" * 64),
        }
        for what, args in cases.items():
            code, msg = attempt(refused, *args)
            assert code == "22023", f"{what}: {code} {msg}"

        # a second answer in a second call
        def twice(sha):
            sql_write(w, wid, sha, [1], v)
            return refused(sha, [1], v)
        code, msg = attempt(twice)
        assert code == "22023" and "answered already" in msg, (code, msg)

        # a second claim in the same transaction
        def claim_again(sha):
            return error_of(w, "SELECT * FROM doppler.worker_claim(%s)", (wid,))
        code, msg = attempt(claim_again)
        assert code == "55000", (code, msg)
        # no batch: in a transaction, outside one, and in the transaction after the claim's
        w.execute("BEGIN")
        code, msg = refused("0" * 64, [1], v)
        w.execute("ROLLBACK")
        assert code == "55000", (code, msg)
        code, msg = refused("0" * 64, [1], v)
        assert code == "55000", (code, msg)
        w.execute("BEGIN")
        sql_claim(w, wid)
        w.execute("COMMIT")
        w.execute("BEGIN")
        code, msg = refused("0" * 64, [1], v)
        w.execute("ROLLBACK")
        assert code == "55000", (code, msg)
        assert writes(owner, t) == {} and filled(owner, t) == 0

        # and the right answer is taken: one vector, one failure, one left for later
        w.execute("BEGIN")
        rows = sql_claim(w, wid)
        n = {r["source"]: r["n"] for r in rows}
        assert sql_write(w, wid, rows[0]["model"]["sha256"], [n[PATHS[0]]], v,
                         failures=[{"n": n[PATHS[1]], "kind": "decode", "message": "bad"}]) == 1
        w.execute("COMMIT")
        assert filled(owner, t) == 1 and writes(owner, t) == {1: 1}
        f = owner.execute("SELECT row_key, message FROM doppler.failures WHERE relid = %s::regclass",
                          (t,)).fetchall()
        assert len(f) == 1 and f[0][0] == "2" and "external worker" in f[0][1], f
        w.execute("BEGIN")
        left = [r["source"] for r in sql_claim(w, wid)]
        w.execute("ROLLBACK")
        assert PATHS[2] in left and PATHS[0] not in left, left


# ---------------------------------------------------------------------------------------------
# 6. rights


def test_only_doppler_worker_members_under_their_own_id(wc, admin, owner, spawn):
    """A role not in doppler_worker may not register (42501, EXECUTE revoked), and the binary run
    as one exits 2 saying so; a member may not read the owner's table (42501), nor use another
    role's worker id (42501)."""
    with wc.connect(user=OUTSIDER) as o:
        code, msg = error_of(o, "SELECT * FROM doppler.worker_register('h', 1, 'cpu', 'x')")
        assert code == "42501" and "permission denied for function worker_register" in msg, (code, msg)
        code, msg = error_of(o, "SELECT doppler.worker_backlog()")
        assert code == "42501", (code, msg)
        # the view: pg_monitor's and doppler_worker's
        code, msg = error_of(o, "SELECT count(*) FROM doppler.workers")
        assert code == "42501", (code, msg)
        admin.execute(f"GRANT pg_monitor TO {OUTSIDER}")
        try:
            code, msg = error_of(o, "SELECT count(*) FROM doppler.workers")
            assert code is None, (code, msg)
        finally:
            admin.execute(f"REVOKE pg_monitor FROM {OUTSIDER}")
    p = spawn("outsider", user=OUTSIDER, once=True)
    rc = p.wait(60)
    assert rc == 2, f"exit {rc}:\n{p.text()}"
    # (one line on stderr saying why: EXECUTE on worker_register is doppler_worker's only)
    err = p.stderr().strip()
    assert len(err.split("\n")) == 1 and ("doppler_worker" in err or "permission denied for function worker_register" in err), \
        p.text()
    assert [x["event"] for x in p.lines()][-2:] == ["register_refused", "exit"], p.text()

    t = make_table(owner, "rights")
    insert(owner, t, [read(PATHS[0])])
    with wc.connect(user=WROLE) as w, wc.connect(user=WROLE2) as w2:
        code, msg = error_of(w, f"SELECT * FROM {t}")
        assert code == "42501", (code, msg)
        wid, wid2 = sql_register(w), sql_register(w2)
        for sql in ("SELECT doppler.worker_heartbeat(%s, '{}')", "SELECT doppler.worker_unregister(%s)"):
            code, msg = error_of(w, sql, (wid2,))
            assert code == "42501" and "another role" in msg, (sql, code, msg)
        w.execute("BEGIN")
        code, msg = error_of(w, "SELECT * FROM doppler.worker_claim(%s)", (wid2,))
        w.execute("ROLLBACK")
        assert code == "42501", (code, msg)
        w.execute("BEGIN")
        code, msg = error_of(w, "SELECT doppler.worker_write(%s, %s, '{1}', %s::real[])", (wid2, "0" * 64, [0.0] * DIM))
        w.execute("ROLLBACK")
        assert code == "42501", (code, msg)
        # its own id works, and the worker sees the workers view
        w.execute("SELECT doppler.worker_heartbeat(%s, '{}')", (wid,))
        assert {r[0] for r in w.execute("SELECT id FROM doppler.workers").fetchall()} >= {wid, wid2}
        # the other role's id is still registered
        assert admin.execute("SELECT count(*) FROM doppler.workers WHERE id = %s", (wid2,)).fetchone()[0] == 1


def test_no_rows_of_a_table_watched_for_the_server_only(wc, owner):
    """A table watched with workers => 'server' (the default), in a database no background worker
    serves (its rows stay there to be claimed): a worker's claim gets none of its rows, and
    worker_backlog does not count them, until its owner allows external workers."""
    with wc.connect(NOWORKER, user=OWNER) as o, wc.connect(NOWORKER, user=WROLE) as w:
        ts = make_table(o, "server_only", workers="server")
        insert(o, ts, [read(PATHS[0]), read(PATHS[1])])
        wid = sql_register(w)
        w.execute("BEGIN")
        assert sql_claim(w, wid) == []
        w.execute("ROLLBACK")
        assert w.execute("SELECT doppler.worker_backlog()").fetchone()[0] == 0
        o.execute("SELECT doppler.watch(%s::regclass, model => %s::text, workers => 'external')", (ts, MODEL))
        w.execute("BEGIN")
        assert len(sql_claim(w, wid)) == 2
        w.execute("ROLLBACK")
        assert w.execute("SELECT doppler.worker_backlog()").fetchone()[0] == 2


def test_an_owner_that_may_no_longer_read_sources_gets_none_read_by_workers(wc, admin, owner, fresh_web):
    """An owner watched a text column for external workers while it had pg_read_server_files and
    doppler_url_reader, then lost both: the server's own worker refuses such rows (permission
    denied, fill/infer.rs); a worker's claim must not hand their paths or URLs out for a worker to
    read or fetch either (with its own rights, on its own host)."""
    web = fresh_web
    t = make_table(owner, "revoked", source="text")
    insert(owner, t, [PATHS[0], f"http://{web.hosts[0]}:{web.port}/{IMAGES[1]}?revoked"], source="text")
    admin.execute(f"REVOKE pg_read_server_files, doppler_url_reader FROM {OWNER}")
    try:
        with wc.connect(user=WROLE) as w:
            wid = sql_register(w)
            w.execute("BEGIN")
            rows = sql_claim(w, wid)
            w.execute("ROLLBACK")
        handed = [r["source"] for r in rows if r["source"]]
        assert handed == [], f"sources of an owner that may read none handed to a worker: {handed}"
    finally:
        admin.execute(f"GRANT pg_read_server_files, doppler_url_reader TO {OWNER}")


HOSTILE_CODE = f"""
CREATE OR REPLACE FUNCTION {HOSTILE}.boom() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN RAISE EXCEPTION 'hostile policy'; END $f$;
CREATE OR REPLACE FUNCTION {HOSTILE}.boom_trigger() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN RAISE EXCEPTION 'hostile trigger'; END $f$;
CREATE OR REPLACE FUNCTION {HOSTILE}.nap() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM pg_catalog.pg_sleep(3600); RETURN true; END $f$;
CREATE OR REPLACE FUNCTION {HOSTILE}.nap_trigger() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN PERFORM pg_catalog.pg_sleep(3600); RETURN NEW; END $f$;
CREATE OR REPLACE FUNCTION {HOSTILE}.fake_cancel() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled'; END $f$;
CREATE OR REPLACE FUNCTION {HOSTILE}.nap_swallowing() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    LOOP
        BEGIN PERFORM pg_catalog.pg_sleep(3600); EXCEPTION WHEN query_canceled THEN NULL; END;
    END LOOP;
END $f$"""


def hostile_table(h, name, how):
    """A hostile owner's external table of the highest priority with one pending row, made to
    fail (`how`: a forced row-level security policy or a BEFORE UPDATE trigger that raises or
    sleeps an hour)."""
    t = make_table(h, name, schema=HOSTILE, priority=2147483647)
    insert(h, t, [read(PATHS[2])])
    if how in ("policy", "sleeping policy", "fake cancel", "swallowing policy"):
        h.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
        h.execute(f"ALTER TABLE {t} FORCE ROW LEVEL SECURITY")
        fn = {"policy": "boom", "sleeping policy": "nap", "fake cancel": "fake_cancel",
              "swallowing policy": "nap_swallowing"}[how]
        h.execute(f"CREATE POLICY p ON {t} USING ({HOSTILE}.{fn}())")
    else:
        fn = "boom_trigger" if how == "trigger" else "nap_trigger"
        h.execute(f"CREATE TRIGGER t BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {HOSTILE}.{fn}()")
    return t


@pytest.mark.parametrize("how", ["policy", "trigger"])
def test_a_hostile_owner_that_raises_does_not_stop_the_workers(wc, admin, owner, spawn, how):
    """A hostile owner's external table (of the highest priority) whose forced RLS policy raises
    at the claim, or whose BEFORE UPDATE trigger raises at the write: a worker passes it over
    (a WARNING; the batch rolled back) and fills the other owner's table."""
    with wc.connect(user=HOSTILE) as h:
        h.execute(HOSTILE_CODE)
        ht = hostile_table(h, f"raises_{how}", how)
        t = make_table(owner, f"victim_{how}")
        insert(owner, t, pngs(8, seed=7))
        w = spawn(f"victim-{how}")
        wait_filled(owner, t, 8, timeout=60, workers=[w])
        assert admin.execute(f"SELECT count(features) FROM {ht}").fetchone()[0] == 0
        assert set(writes(owner, t).values()) == {1}
        # the worker met the hostile table first (its priority), and went past it
        if how == "policy":
            notes = [x for x in w.lines() if x.get("event") == "server_notice"]
            assert any(ht in x["message"] and "hostile policy" in x["message"] for x in notes), w.text()
        else:
            f = admin.execute("SELECT message FROM doppler.failures WHERE relid = %s::regclass", (ht,)).fetchall()
            print("the hostile row's failure:", f)
            assert f and "hostile trigger" in f[0][0], (f, w.text())


@pytest.mark.parametrize("how", ["sleeping policy", "sleeping trigger"])
def test_a_hostile_owner_that_sleeps_does_not_stop_the_workers(wc, admin, owner, spawn, how):
    """The same with a policy (at the claim) or a trigger (at the write) that sleeps for an
    hour: the other owner's table is filled all the same, within a bound of the order of the
    lease (doppler.worker_lease = 5s here; a batch that the owner's code keeps from ending is a
    stalled worker to everyone else), 30 s."""
    set_system(admin, None, worker_lease=f"{LEASE_S}s")
    try:
        with wc.connect(user=HOSTILE) as h:
            h.execute(HOSTILE_CODE)
            hostile_table(h, f"sleeps_{how.split()[1]}", how)
            t = make_table(owner, f"victim_sleep_{how.split()[1]}")
            insert(owner, t, pngs(8, seed=8))
            w = spawn(f"victim-sleep-{how.split()[1]}")
            try:
                wait_filled(owner, t, 8, timeout=30, workers=[w])
            finally:
                w.kill()  # (then its server process, which may sleep on: the owner fixture ends it)
    finally:
        set_system(admin, None, worker_lease=None)


def claim_as_worker(wc, user=WROLE):
    """One claim in a fresh worker connection (registered for it): (seconds, rows, tables,
    error SQLSTATE or None, notices)."""
    c = wc.connect(user=user)
    notes = []
    c.add_notice_handler(lambda d: notes.append(d.message_primary))
    wid = c.execute("SELECT id FROM doppler.worker_register('test', 1, 'cpu', 'x')").fetchone()[0]
    c.autocommit = False
    t0 = time.time()
    try:
        rows = c.execute("SELECT n, tbl FROM doppler.worker_claim(%s, 8)", (wid,)).fetchall()
        err = None
    except psycopg.OperationalError:
        rows, err = [], "connection lost"
    except psycopg.Error as e:
        rows, err = [], e.sqlstate
    took = time.time() - t0
    if not c.closed and err != "connection lost":
        c.rollback()
        c.autocommit = True
        c.execute("SELECT doppler.worker_unregister(%s)", (wid,))
    c.close()
    return took, len(rows), {r[1] for r in rows}, err, notes


@pytest.mark.parametrize("how", ["sleeping policy", "swallowing policy"])
def test_a_table_that_overran_is_passed_over_by_every_worker(wc, admin, owner, how):
    """A claim that the owner's code keeps past the limit (doppler.worker_lease, 5 s here; a
    policy that sleeps, or one that swallows the cancel) ends that table's turn (a WARNING,
    the claim goes on with the other table) or the connection (the cancel swallowed); then every
    other worker connection passes the table over at once (shared memory), for 10 minutes."""
    set_system(admin, None, worker_lease=f"{LEASE_S}s")
    try:
        with wc.connect(user=HOSTILE) as h:
            h.execute(HOSTILE_CODE)
            ht = hostile_table(h, f"overruns_{how.split()[0]}", how)
            t = make_table(owner, f"after_overrun_{how.split()[0]}")
            insert(owner, t, pngs(4, seed=11))
            took, n, tables, err, notes = claim_as_worker(wc)
            print(f"{how}: first claim {took:.1f} s, {n} rows of {tables}, error {err}, notices {notes}")
            assert took >= LEASE_S - 0.5
            if how == "sleeping policy":
                assert err is None and tables == {t}, (err, tables)
                assert any("overran" in m for m in notes), notes
            else:
                assert err is not None  # the connection ended a second after the cancel
            took, n, tables, err, notes = claim_as_worker(wc)
            print(f"{how}: next claim {took:.2f} s, {n} rows of {tables}, error {err}")
            assert err is None and tables == {t} and took < 2, (took, tables, err)
            assert admin.execute(f"SELECT count(features) FROM {ht}").fetchone()[0] == 0
    finally:
        set_system(admin, None, worker_lease=None)


def test_a_fake_cancel_is_the_tables_failure_not_the_claims(wc, admin, owner):
    """A policy that RAISEs query_canceled itself is that table's failure (a WARNING, passed
    over by the connection), not a cancel of the whole claim: the other owner's rows come."""
    with wc.connect(user=HOSTILE) as h:
        h.execute(HOSTILE_CODE)
        hostile_table(h, "fake_cancel", "fake cancel")
        t = make_table(owner, "after_fake_cancel")
        insert(owner, t, pngs(4, seed=12))
        took, n, tables, err, notes = claim_as_worker(wc)
        assert err is None and tables == {t}, (err, tables, notes)
        assert any("canceling statement due to user request" in m for m in notes), notes


# ---------------------------------------------------------------------------------------------
# 7. the model file's checksum


def other_tiny(dirname):
    """tiny.onnx with one weight changed: a model ONNX Runtime loads, of other bytes."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(os.path.join(MODELS, "tiny.onnx"))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size > 1:
            a = a.copy()
            a.flat[0] += 0.5
            init.CopyFrom(numpy_helper.from_array(a, init.name))
            break
    else:
        raise AssertionError("tiny.onnx has no float weights")
    onnx.save(m, os.path.join(dirname, "tiny.onnx"))


def test_a_model_file_of_another_checksum_is_refused(wc, admin, owner, spawn):
    """A worker whose --model-dir has a tiny.onnx of other bytes (other weights): it writes
    nothing (no vector, no failure record, no batch), doppler.workers.last_error names the
    SHA-256, the rows stay pending; a worker with the registered file then fills them."""
    bad = tempfile.mkdtemp(prefix="doppler-badmodels-")
    try:
        other_tiny(bad)
        t = make_table(owner, "checksum")
        insert(owner, t, pngs(6, seed=9))
        w = spawn("badmodel", model_dir=bad)
        r = wait_for(lambda: (lambda r: r if r and r["last_error"] and "SHA-256" in r["last_error"] else None)(
            registered(admin, w)), 60, 0.2, "last_error naming the SHA-256")
        print("last_error:", r["last_error"])
        assert w.alive()
        stays(lambda: filled(owner, t) == 0, 2, "no row filled")
        assert writes(owner, t) == {}
        assert admin.execute("SELECT count(*) FROM doppler.failures WHERE relid = %s::regclass", (t,)).fetchone()[0] == 0
        assert external_batches(admin, t) == []
        assert owner.execute("SELECT pending FROM doppler.status WHERE table_name = %s::regclass", (t,)).fetchone()[0] == 6
        w.kill()
        good = spawn("goodmodel")
        wait_filled(owner, t, 6, workers=[good])
    finally:
        shutil.rmtree(bad, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 8. SIGTERM


def test_sigterm_finishes_the_batch_in_hand_then_unregisters(wc, admin, owner, spawn, fresh_web):
    """A worker holding a batch of slow URLs (3 s each) gets SIGTERM: it writes the batch (the
    rows filled), unregisters (its doppler.workers row gone) and exits 0."""
    web = fresh_web
    t = make_table(owner, "drained", source="text")
    urls = [f"http://{web.hosts[i]}:{web.port}/slow/3/{IMAGES[i]}?drain={i}" for i in range(4)]
    insert(owner, t, urls, source="text")
    w = spawn("drained")
    wait_fetching(web, w, urls)
    w.signal(signal.SIGTERM)
    rc = w.wait(60)
    assert rc == 0, f"exit {rc}:\n{w.text()}"
    assert filled(owner, t) == 4, w.text()
    assert registered(admin, w) is None, "the worker did not unregister"
    assert set(writes(owner, t).values()) == {1}


def test_a_second_sigterm_gives_the_batch_back(wc, admin, owner, spawn, fresh_web):
    """A worker holding a batch whose URLs hang gets SIGTERM twice: it exits within seconds,
    having written nothing, and the rows are free (another claim takes them)."""
    web = fresh_web
    t = make_table(owner, "aborted", source="text")
    urls = first_hangs(web, 3, "abort")
    insert(owner, t, urls, source="text")
    w = spawn("aborted")
    wait_fetching(web, w, urls)
    w.signal(signal.SIGTERM)
    # (signals of one kind not yet read count once: the second after the first is seen)
    wait_for(lambda: any(x.get("event") == "signal" for x in w.lines()), 10, 0.02, "the first SIGTERM seen")
    w.signal(signal.SIGTERM)
    w.wait(15)
    assert writes(owner, t) == {} and filled(owner, t) == 0
    with wc.connect(user=WROLE) as s:
        wid = sql_register(s)
        s.execute("BEGIN")
        assert len(sql_claim(s, wid)) == 3
        s.execute("ROLLBACK")


# ---------------------------------------------------------------------------------------------
# 9. visible


def test_worker_backlog_counts_the_pending_rows(wc, owner, spawn):
    """worker_backlog() (as a worker's role, which may not read the tables) counts the rows of
    external tables to do: +7 when 7 rows come, at most `cap` per table, back when a worker has
    filled them."""
    t = make_table(owner, "backlog")
    with wc.connect(user=WROLE) as w:
        backlog = lambda cap=10 ** 6: w.execute("SELECT doppler.worker_backlog(%s)", (cap,)).fetchone()[0]  # noqa: E731
        assert backlog() == 0, "rows of other tests' tables pending"
        insert(owner, t, pngs(7, seed=11))
        assert owner.execute("SELECT pending FROM doppler.status WHERE table_name = %s::regclass", (t,)).fetchone()[0] == 7
        assert backlog() == 7
        assert backlog(2) == 2
        p = spawn("backlog")
        wait_filled(owner, t, 7, workers=[p])
        assert backlog() == 0


def test_what_a_worker_holds_and_has_done_is_visible(wc, admin, owner, spawn, fresh_web):
    """While a worker holds rows (their images hang), doppler.workers shows it alive, holding
    that table (5 rows, since a moment), with its host (its --name), pid, provider and role, to
    superusers and to doppler_worker members; doppler.status.external_claimed of the table is 5.
    After the fill: holding nothing, rows_done 5, external_claimed 0, and every stdout line is
    JSON, the batch's (event "batch") naming the table, its model and rows."""
    web = fresh_web
    t = make_table(owner, "visible", source="text")
    urls = first_hangs(web, 5, "visible")
    insert(owner, t, urls, source="text")
    p = spawn("visible-host")
    wait_fetching(web, p, urls)
    r = wait_holding(admin, p, t, timeout=15)
    assert r["alive"] and r["holding_rows"] == 5 and r["host"] == "visible-host" and r["role"] == WROLE, r
    assert r["provider"] == "cpu" and r["holding_since"] is not None and r["pid"] == p.pid, r
    assert external_claimed(owner, t) == 5
    oid = admin.execute("SELECT %s::regclass::oid", (t,)).fetchone()[0]  # (the worker's role may not look t up)
    with wc.connect(user=WROLE) as w:
        assert w.execute("SELECT pid, holding_rows FROM doppler.workers WHERE alive AND holding::oid = %s",
                         (oid,)).fetchall() == [(p.pid, 5)]
    web.release()
    wait_filled(owner, t, 5, workers=[p])
    r = wait_for(lambda: (lambda r: r if r["holding_rows"] == 0 and r["rows_done"] == 5 else None)(
        registered(admin, p)), 20, 0.2, "the heartbeat after the batch")
    assert r["holding"] is None and r["last_error"] is None, r
    assert external_claimed(owner, t) == 0
    parsed = [json.loads(line) for line in p.raw_lines()]  # every line is JSON
    batches = [x for x in parsed if x.get("event") == "batch"]
    assert batches and all(x["table"] == t for x in batches), batches
    assert sum(x["filled"] for x in batches) == 5 and batches[0]["model"] == f"{MODEL}@1", batches


# ---------------------------------------------------------------------------------------------
# 10. --once


def test_once_fills_what_is_pending_then_exits_0(wc, admin, owner, spawn):
    """--once: fills the 40 pending rows, exits 0, unregistered; run again with nothing
    pending, exits 0 at once having written nothing."""
    t = make_table(owner, "once")
    insert(owner, t, pngs(40, seed=10))
    w = spawn("once", once=True, batch=16)
    rc = w.wait(90)
    assert rc == 0, f"exit {rc}:\n{w.text()}"
    assert filled(owner, t) == 40 and set(writes(owner, t).values()) == {1}
    assert registered(admin, w) is None
    t0 = time.time()
    w2 = spawn("once-idle", once=True)
    rc = w2.wait(60)
    assert rc == 0, f"exit {rc}:\n{w2.text()}"
    print(f"--once with nothing pending: {time.time() - t0:.2f} s")
    assert len(writes(owner, t)) == 40
