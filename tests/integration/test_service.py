"""The inference service: one set of model sessions for the whole server, in a background worker
that batches the callers' images (src/service.rs). The suite's cluster runs it (doppler is in
shared_preload_libraries and doppler.inference defaults to service), so every other test goes
through it too; these tests are about the service itself: one session for all connections,
batching across callers, cancel and termination while waiting, a killed service, a model changed
while requests are in flight, and the fallback without shared_preload_libraries.

The service is paused with SIGSTOP (the tests run as root, like the server's owner) to hold
callers in its queue for as long as a test needs, and resumed with SIGCONT."""
import contextlib
import os
import re
import signal
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import MODELS, Cluster, fixture_paths, wait_for

PHOTOS = [p for p in fixture_paths() if p.endswith((".jpg", ".png")) and "large_" not in p][:8]
EFFNET = os.path.join(MODELS, "efficientnet-lite0.onnx")
RESNET = os.path.join(MODELS, "resnet50-seeded.onnx")
Q = "SELECT doppler.extract_features(%s::text, %s)"


def service(conn):
    row = conn.execute("SELECT pid, starts, requests, images, runs, largest_run, failed, queued, running"
                       " FROM doppler.service_status()").fetchone()
    return dict(zip(["pid", "starts", "requests", "images", "runs", "largest_run", "failed", "queued", "running"], row))


def references(db, photos, model=None):
    """The vectors of a session in this backend (doppler.inference = backend)."""
    db.execute("SET doppler.inference = backend")
    try:
        assert db.execute("SELECT DISTINCT inference FROM doppler.session_info()").fetchone()[0] == "backend"
        return {p: np.array(db.execute(Q, (p, model)).fetchone()[0]) for p in photos}
    finally:
        db.execute("RESET doppler.inference")


def close(got, want):
    # a batched run and a run of one image (and 1 vs all intra-op threads) may round differently
    return got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4)


def maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@contextlib.contextmanager
def paused(conn):
    """The service stopped (SIGSTOP) for the block: callers queue and wait."""
    pid = service(conn)["pid"]
    assert pid, "the inference service is running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class Caller:
    """A connection that runs one statement in a thread."""

    def __init__(self, cluster, sql, args=()):
        self.conn = cluster.connect()
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(sql, args))
        self.thread.start()

    def _run(self, sql, args):
        try:
            self.result = self.conn.execute(sql, args).fetchone()[0]
        except Exception as e:  # noqa: BLE001 - asserted by the test
            self.error = e

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the caller still waits"
        return self

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.close()


def waiting_in_service(db, pids):
    """Every one of `pids` waits on the service (wait event Extension/Extension)."""
    rows = db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
                      " AND wait_event_type = 'Extension' AND wait_event = 'Extension'", (list(pids),)).fetchone()[0]
    return rows == len(pids)


def test_one_session_serves_every_connection(cluster, db):
    """Connections that extract features load no model and no ONNX Runtime: the service holds the
    one session, and its vectors are the backend session's."""
    want = references(db, PHOTOS[:1])[PHOTOS[0]]
    s = service(db)
    assert s["pid"] and s["starts"] >= 1
    assert db.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'doppler inference service'"
                      " AND datname IS NULL").fetchone()[0] == 1
    db.execute(Q, (PHOTOS[0], None))  # the service's session of it exists from now on
    created = db.execute("SELECT sessions_created FROM doppler.session_info() LIMIT 1").fetchone()[0]
    conns = [cluster.connect() for _ in range(4)]
    try:
        for c in conns:
            assert close(np.array(c.execute(Q, (PHOTOS[0], None)).fetchone()[0]), want)
            info = c.execute("SELECT model, execution_provider, dimensions, sessions_created, inference"
                             " FROM doppler.session_info() LIMIT 1").fetchone()
            assert info == ("resnet50", "CPU", 2048, created, "service"), info
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert "libonnxruntime" not in maps(pid), "a backend loaded ONNX Runtime"
        assert "libonnxruntime" in maps(s["pid"])
        after = service(db)
        assert after["requests"] - s["requests"] >= 4 and after["pid"] == s["pid"]
    finally:
        for c in conns:
            c.close()


def test_concurrent_callers_share_model_runs(cluster, db):
    """16 callers at once: each gets its own image's vector, in fewer model runs than images."""
    want = references(db, PHOTOS)
    before = service(db)
    conns = [cluster.connect() for _ in range(16)]
    barrier = threading.Barrier(len(conns))
    got = {}

    def call(i):
        barrier.wait()
        got[i] = np.array(conns[i].execute(Q, (PHOTOS[i % len(PHOTOS)], None)).fetchone()[0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(conns))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(len(conns)):
            assert close(got[i], want[PHOTOS[i % len(PHOTOS)]]), f"caller {i} got another image's vector"
    finally:
        for c in conns:
            c.close()
    after = service(db)
    images = after["images"] - before["images"]
    runs = after["runs"] - before["runs"]
    assert images >= 16 and runs < images, (runs, images)
    assert after["largest_run"] >= 2 and after["failed"] == before["failed"]


def test_cancel_and_timeout_while_waiting_free_the_request(cluster, db):
    """A caller cancelled (or timed out) while its request waits in the queue gets 57014 at once,
    its request is taken back, and its next call is served."""
    want = references(db, PHOTOS[:1])[PHOTOS[0]]
    b = None
    with paused(db):
        b = Caller(cluster, Q, (PHOTOS[0], None))
        wait_for(lambda: waiting_in_service(db, [b.pid]) and service(db)["queued"] == 1, 60, 0.05, "the request queued")
        db.execute("SELECT pg_cancel_backend(%s)", (b.pid,))
        b.join(30)
        assert isinstance(b.error, psycopg.errors.QueryCanceled), b.error
        wait_for(lambda: service(db)["queued"] == 0, 10, 0.05, "the request taken back")
        # statement_timeout is a cancel too
        b.conn.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            b.conn.execute(Q, (PHOTOS[0], None))
        b.conn.execute("RESET statement_timeout")
        assert service(db)["queued"] == 0
    try:
        assert close(np.array(b.conn.execute(Q, (PHOTOS[0], None)).fetchone()[0]), want)
    finally:
        b.close()


def test_cancel_while_running_and_the_service_goes_on(cluster, db):
    """A caller cancelled while the service runs its images: the caller returns at once; the
    service finishes the run, frees the abandoned request and serves the next callers."""
    db.execute("CREATE TABLE svc_sync (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('svc_sync', mode => 'sync', batch_size => 64)")
    before = service(db)
    b = Caller(cluster, "INSERT INTO svc_sync SELECT i, (%s::text[])[1 + i %% %s] FROM generate_series(1, 64) i"
               " RETURNING 1", (PHOTOS, len(PHOTOS)))
    try:
        wait_for(lambda: service(db)["running"] >= 1, 120, 0.01, "a run of the insert's images")
        with paused(db):
            db.execute("SELECT pg_cancel_backend(%s)", (b.pid,))
            b.join(30)
            assert isinstance(b.error, psycopg.errors.QueryCanceled), b.error
        wait_for(lambda: (lambda s: s["running"] == 0 and s["queued"] == 0)(service(db)), 60, 0.05,
                 "the abandoned request freed")
        assert db.execute("SELECT count(*) FROM svc_sync").fetchone()[0] == 0  # rolled back
        want = references(db, PHOTOS[:1])[PHOTOS[0]]
        assert close(np.array(b.conn.execute(Q, (PHOTOS[0], None)).fetchone()[0]), want)
        assert service(db)["failed"] == before["failed"]
    finally:
        b.close()
        db.execute("SELECT doppler.unwatch('svc_sync')")
        db.execute("DROP TABLE svc_sync")


def test_a_terminated_caller_frees_its_request(cluster, db):
    """pg_terminate_backend on a caller whose request waits: the exit takes the request back even
    though the service does not run, and the next connection (likely on the same PGPROC) is served."""
    want = references(db, PHOTOS[:1])[PHOTOS[0]]
    with paused(db):
        c = Caller(cluster, Q, (PHOTOS[0], None))
        wait_for(lambda: waiting_in_service(db, [c.pid]) and service(db)["queued"] == 1, 60, 0.05, "the request queued")
        db.execute("SELECT pg_terminate_backend(%s)", (c.pid,))
        c.join(30)
        assert c.error is not None
        wait_for(lambda: service(db)["queued"] == 0, 30, 0.05, "the request taken back at exit")
    with cluster.connect() as n:
        assert close(np.array(n.execute(Q, (PHOTOS[0], None)).fetchone()[0]), want)


def test_a_terminated_service_is_restarted_and_its_queue_served(cluster, db):
    """The service terminated while callers wait: the postmaster starts it again and the new one
    serves the queued requests; the callers only see a slower answer."""
    want = references(db, PHOTOS[:3])
    old = service(db)
    callers = []
    try:
        with paused(db) as pid:
            callers = [Caller(cluster, Q, (p, None)) for p in PHOTOS[:3]]
            wait_for(lambda: waiting_in_service(db, [c.pid for c in callers]) and service(db)["queued"] == 3,
                     60, 0.05, "three requests queued")
            os.kill(pid, signal.SIGTERM)  # delivered at SIGCONT
        for c, p in zip(callers, PHOTOS[:3]):
            c.join(120)
            assert c.error is None, c.error
            assert close(np.array(c.result), want[p])
        new = service(db)
        assert new["pid"] != old["pid"] and new["starts"] == old["starts"] + 1
        assert "doppler inference service stopping" in cluster.log()
    finally:
        for c in callers:
            c.close()


def test_a_killed_service_restarts_the_server_and_comes_back(cluster):
    """SIGKILL of the service (a process in shared memory) makes the postmaster reset the server,
    as for any backend; afterwards a new service serves again."""
    with cluster.connect() as c:
        old = service(c)
        want = references(c, PHOTOS[:1])[PHOTOS[0]]
    os.kill(old["pid"], signal.SIGKILL)

    def served():
        try:
            with cluster.connect(retries=1) as c:
                s = service(c)
                if not s["pid"] or s["pid"] == old["pid"]:
                    return None
                return [np.array(c.execute(Q, (PHOTOS[0], None)).fetchone()[0])]
        except psycopg.OperationalError:
            return None
    assert close(wait_for(served, 120, 0.5, "a new service")[0], want)


def test_a_model_changed_mid_flight_never_shares_a_run(cluster, db):
    """Requests for a model's old and new version wait together; each is run by its own version's
    session (the new one has another file and dimension), never in one run."""
    db.execute("DELETE FROM doppler.models WHERE name = 'svc_m'")
    db.execute("SELECT doppler.register_model('svc_m', %s, dim => 2048)", (RESNET,))
    old_want = references(db, PHOTOS[:2], "svc_m")
    before = service(db)
    olds, news = [], []
    try:
        with paused(db):
            olds = [Caller(cluster, Q, (p, "svc_m")) for p in PHOTOS[:2]]
            wait_for(lambda: service(db)["queued"] == 2, 60, 0.05, "two requests of version 1")
            # what register_model would write (it checks the file in the service, which is stopped)
            db.execute("UPDATE doppler.models SET onnx_path = %s, dim = 1280, divisor = 1, mean = '{127,127,127}',"
                       " std = '{128,128,128}', version = '2' WHERE name = 'svc_m'", (EFFNET,))
            news = [Caller(cluster, Q, (p, "svc_m")) for p in PHOTOS[:2]]
            wait_for(lambda: service(db)["queued"] == 4, 60, 0.05, "two requests of version 2")
        for c in olds + news:
            c.join(120)
            assert c.error is None, c.error
        for c, p in zip(olds, PHOTOS[:2]):
            assert close(np.array(c.result), old_want[p])
        new_want = references(db, PHOTOS[:2], "svc_m")
        for c, p in zip(news, PHOTOS[:2]):
            assert len(c.result) == 1280 and close(np.array(c.result), new_want[p])
        after = service(db)
        assert after["runs"] - before["runs"] >= 2  # a run per version
        assert after["failed"] == before["failed"]
    finally:
        for c in olds + news:
            c.close()
        db.execute("DELETE FROM doppler.models WHERE name = 'svc_m'")


def test_without_shared_preload_libraries_backends_run_their_own_sessions(db):
    """No preload, no service: extract_features works as before, in the backend, and
    session_info() says so; service_status() has no row."""
    want = references(db, PHOTOS[:1])[PHOTOS[0]]
    c = Cluster(worker_db="", extra_conf="shared_preload_libraries = ''\n", name="nopreload")
    try:
        with c.connect() as conn:
            assert conn.execute("SELECT count(*) FROM doppler.service_status()").fetchone()[0] == 0
            assert conn.execute("SELECT inference, sessions_created FROM doppler.session_info()").fetchone() == ("backend", 0)
            got = np.array(conn.execute(Q, (PHOTOS[0], None)).fetchone()[0])
            assert close(got, want)
            assert conn.execute("SELECT inference, sessions_created, model FROM doppler.session_info()").fetchone() \
                == ("backend", 1, "resnet50")
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert "libonnxruntime" in maps(pid)
    finally:
        c.destroy()


def test_drop_database_does_not_wait_for_the_service(cluster, db):
    """DROP DATABASE waits until every process has absorbed a ProcSignalBarrier: the service, idle on
    its latch, must take part (it once did not, and DROP DATABASE waited for ever)."""
    db.execute(Q, (PHOTOS[0], None))  # the service has run
    with cluster.connect("postgres") as pg:
        pg.execute("CREATE DATABASE svc_drop")
        pg.execute("SET statement_timeout = '30s'")
        pg.execute("DROP DATABASE svc_drop")


def test_session_info_shows_only_this_databases_models(cluster, db, noworker):
    """The service serves every database: a plain role elsewhere does not see which model files
    another database uses; a superuser does."""
    private = os.path.join(cluster.files, "svc-private-effnet.onnx")
    with open(EFFNET, "rb") as src, open(private, "wb") as dst:
        dst.write(src.read())
    os.chmod(private, 0o644)
    db.execute("DELETE FROM doppler.models WHERE name = 'svc_private'")
    db.execute("SELECT doppler.register_model('svc_private', %s, dim => 1280, divisor => 1,"
               " mean => '{127,127,127}', std => '{128,128,128}')", (private,))
    try:
        db.execute(Q, (PHOTOS[0], "svc_private"))
        mine = [r[0] for r in db.execute("SELECT model_path FROM doppler.session_info()").fetchall()]
        assert private in mine
        db.execute("DROP ROLE IF EXISTS svc_reader")
        db.execute("CREATE ROLE svc_reader LOGIN")
        with noworker() as other:
            assert private in [r[0] for r in other.execute("SELECT model_path FROM doppler.session_info()").fetchall()]
        with cluster.connect("doppler_noworker", user="svc_reader") as other:
            rows = other.execute("SELECT model, model_path, inference FROM doppler.session_info()").fetchall()
            assert all(r[1] != private and r[0] != "svc_private" for r in rows), rows
            assert rows[0][2] == "service"
    finally:
        db.execute("DELETE FROM doppler.models WHERE name = 'svc_private'")
        db.execute("DROP ROLE IF EXISTS svc_reader")


def test_no_background_worker_slot_for_the_service_means_backend_sessions():
    """max_worker_processes = 0: the service cannot start (the postmaster logs it). Callers do not
    wait for a service that never started: they run their own sessions."""
    c = Cluster(worker_db="", extra_conf="max_worker_processes = 0\n", name="noservice")
    try:
        with c.connect() as conn:
            assert service(conn)["starts"] == 0 and service(conn)["pid"] is None
            t0 = time.time()
            assert len(conn.execute(Q, (PHOTOS[0], None)).fetchone()[0]) == 2048
            assert time.time() - t0 < 20
            assert conn.execute("SELECT inference, sessions_created FROM doppler.session_info()").fetchone() == ("backend", 1)
    finally:
        c.destroy()


def test_a_cancel_sent_to_the_service_is_ignored(cluster, db):
    """pg_cancel_backend on the service: there is no statement to cancel, and it goes on serving
    as the same process (an ERROR outside a transaction would have ended it)."""
    want = references(db, PHOTOS[:1])[PHOTOS[0]]
    before = service(db)
    # the service's own line (a backend's fallback WARNING, test_models', says "runs on the CPU"
    # too), counted from here: only a line written after the cancel shows it was not raised there
    fallback = re.compile(r'doppler inference service: model "[^"]*" runs on the CPU')
    lines_before = len(fallback.findall(cluster.log()))
    assert db.execute("SELECT pg_cancel_backend(%s)", (before["pid"],)).fetchone()[0]
    # a new session with execution_provider = auto makes the service log a line (CUDA is not
    # there), and a log line is where a pending cancel would be raised
    db.execute("SET doppler.execution_provider = 'auto'")
    try:
        for _ in range(3):
            assert close(np.array(db.execute(Q, (PHOTOS[0], None)).fetchone()[0]), want)
    finally:
        db.execute("RESET doppler.execution_provider")
    # (written by the service before it answered the first call)
    assert len(fallback.findall(cluster.log())) > lines_before, "the service logged no fallback line after the cancel"
    after = service(db)
    assert (after["pid"], after["starts"]) == (before["pid"], before["starts"])


def test_entries_and_versions_of_one_file_share_a_session(cluster, db):
    """Two names (or versions) of one file are one session in the service: the version only tags
    the vectors, and a name that alternates with another does not reload the model."""
    db.execute("DELETE FROM doppler.models WHERE name = 'svc_same'")
    db.execute("SELECT doppler.register_model('svc_same', %s, dim => 2048, version => '7')", (RESNET,))
    try:
        db.execute(Q, (PHOTOS[0], None))  # resnet50: doppler.model_path, the same file
        created = db.execute("SELECT sessions_created FROM doppler.session_info() LIMIT 1").fetchone()[0]
        for _ in range(3):
            a = np.array(db.execute(Q, (PHOTOS[0], "svc_same")).fetchone()[0])
            b = np.array(db.execute(Q, (PHOTOS[0], None)).fetchone()[0])
            assert close(a, b)
        assert db.execute("SELECT sessions_created FROM doppler.session_info() LIMIT 1").fetchone()[0] == created
    finally:
        db.execute("DELETE FROM doppler.models WHERE name = 'svc_same'")
