"""URL fetching (issue 29): concurrent in every path that fetches (CALL doppler.fill, the sync
trigger, the background worker), one HTTP client per process and policy with kept-alive
connections, polite to each host (doppler.url_max_in_flight, url_max_per_host, url_host_rate,
Retry-After, a paused unreachable host), errors per row, a slow host that delays only its own
rows, cancellable while requests are in flight, and the URL policy unchanged with pooled
connections.

The images come from scripts/imageweb.py: one port on 8 loopback addresses (127.0.0.2-9, its
"hosts"), which counts what doppler does to it (requests, connections, requests in flight per
host, User-Agents). Every URL a test uses is unique (a query string), so that no fetch can stand
for another's. Tables belong to plain roles in doppler_url_reader (and pg_read_server_files,
which watching a text column needs); their URL settings come from ALTER ROLE ... IN DATABASE (a
superuser's), the superuser-only ones a test changes from a superuser's SET in the session that
fills. Most tests run in a database no worker serves (only
fill and the sync trigger fill there), with the 16-dimension test model, so the time measured is
the fetching's.
"""
import collections
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse

import psycopg
import psycopg.sql
import pytest

from conftest import FIXTURES, MODELS, set_system, wait_for
from test_trust import error_of, fresh_role

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from imageweb import ImageWeb  # noqa: E402

NOWORKER = "doppler_noworker"
OWNER = "tf_fetch"      # owns the tables of the database no worker serves
WOWNER = "tf_fetch_w"   # owns the worker's table (the main test database)
MODEL = "tiny_fetch"
IMAGES = ["portrait_300x500.png", "landscape_640x480.jpg", "palette_300x200.png", "gray_200x300.jpg",
          "rgba_256x256.png", "gif_160x120.gif", "cmyk_200x200.jpg", "bitmap_123x77.bmp"]
URL_ROLES = ("doppler_url_reader", "pg_read_server_files")  # (watching a text column needs the latter)


class Web(ImageWeb):
    """ImageWeb that also counts each request from its arrival to the start of its answer, per
    host (peak_host) and over all hosts (peak_in_flight). ImageWeb counts a request out after its
    answer is written, and a client that has read the answer may send its next request before
    the server got that far: counted this way (ImageWeb's _answered hook), a request is in flight
    here only while the client is sure to be waiting for it, so a peak over a limit is the
    client's."""

    def __init__(self, *args, **kwargs):
        self._waiting = collections.Counter()
        super().__init__(*args, **kwargs)

    def reset(self):
        super().reset()
        with self._lock:
            self.peak_in_flight = 0
            self.peak_host = {h: 0 for h in self.hosts}

    def max_peak_host(self):
        with self._lock:
            return max(self.peak_host.values())

    def _begin(self, host, path, agent):
        super()._begin(host, path, agent)
        with self._lock:
            self._waiting[host] += 1
            self.peak_host[host] = max(self.peak_host[host], self._waiting[host])
            self.peak_in_flight = max(self.peak_in_flight, sum(self._waiting.values()))

    def _answered(self, host):
        with self._lock:
            self._waiting[host] -= 1


@pytest.fixture(scope="module")
def web():
    root = tempfile.mkdtemp(prefix="doppler-fetching-")
    for name in IMAGES:
        shutil.copy(os.path.join(FIXTURES, name), os.path.join(root, name))
        os.chmod(os.path.join(root, name), 0o644)
    os.chmod(root, 0o755)
    w = Web(root, hosts=8)
    w.sizes = {name: os.path.getsize(os.path.join(root, name)) for name in IMAGES}
    yield w
    w.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fetching(cluster, noworker, web):
    """The test model and the plain owner in the database no worker serves, with URLs allowed for
    the owner's sessions (its superuser-set role settings); returns a connection factory:
    fetching() is the owner's, fetching(su=True) a superuser's with the same URL settings SET."""
    with noworker() as admin:
        admin.execute("SELECT doppler.register_model(%s, %s, dim => 16)", (MODEL, os.path.join(MODELS, "tiny.onnx")))
        fresh_role(admin, OWNER, member_of=URL_ROLES)
        for k, v in url_settings(web).items():
            admin.execute(f"ALTER ROLE {OWNER} IN DATABASE {NOWORKER} SET doppler.{k} = {psycopg.sql.quote(v)}")

    def connect(su=False):
        if su:
            c = cluster.connect(NOWORKER)
            for k, v in url_settings(web).items():
                c.execute(f"SET doppler.{k} = {psycopg.sql.quote(v)}")
            return c
        c = cluster.connect(NOWORKER, user=OWNER)
        assert c.execute("SHOW doppler.allow_urls").fetchone()[0] == "on", "the role's settings did not apply"
        return c
    yield connect
    with noworker() as admin:
        admin.execute(f"DROP OWNED BY {OWNER} CASCADE")
        admin.execute(f"DROP ROLE {OWNER}")
        admin.execute("DELETE FROM doppler.models WHERE name = %s", (MODEL,))


def url_settings(web):
    return {"allow_urls": "on", "url_allowed_networks": web.networks, "url_timeout": "30s"}


@pytest.fixture
def fresh_web(web):
    """The server as a test finds it: no latency, counters zeroed, nothing hanging."""
    web.latency = 0.0
    web.release()
    wait_for(lambda: web.stats()["in_flight"] == 0, 30, 0.05, "no request in flight")
    web.reset()
    yield web
    web.latency = 0.0
    web.release()


# ---------------------------------------------------------------------------------------------
# helpers


def at(web, host, path):
    """A URL on host number `host` (modulo the hosts) of the server."""
    return f"http://{web.hosts[host % len(web.hosts)]}:{web.port}{path}"


def image_urls(web, n, tag, hosts=None):
    """n unique URLs of the test images, row i on host i % 8 (or on `hosts[i % len(hosts)]`)."""
    hosts = hosts or list(range(len(web.hosts)))
    return [at(web, hosts[i % len(hosts)], f"/{IMAGES[i % len(IMAGES)]}?{tag}={i}") for i in range(n)]


def request_path(url):
    """What the server counts a URL's requests under (its path and query)."""
    s = urllib.parse.urlsplit(url)
    return s.path + (f"?{s.query}" if s.query else "")


def body_bytes(web, urls):
    return sum(web.sizes[urllib.parse.urlsplit(u).path.rsplit("/", 1)[-1]] for u in urls)


def make_table(conn, name, urls=(), mode="manual", batch_size=32):
    """{OWNER}.name (id, f_img, features real[]) watched with the test model, rows 1.. = urls."""
    t = f"{OWNER}.{name}"
    conn.execute(f"DROP TABLE IF EXISTS {t}")
    conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, f_img text, features real[])")
    conn.execute("SELECT doppler.watch(%s::regclass, model => %s::text, batch_size => %s::int, mode => %s::text)",
                 (t, MODEL, batch_size, mode))
    if urls:
        insert(conn, t, urls)
    return t


def insert(conn, t, urls, first=1):
    """One INSERT statement of the rows first.. with these URLs."""
    conn.execute(f"INSERT INTO {t} (id, f_img) SELECT * FROM unnest(%s::int[], %s::text[])",
                 (list(range(first, first + len(urls))), list(urls)))


def filled_ids(conn, t):
    return {r[0] for r in conn.execute(f"SELECT id FROM {t} WHERE features IS NOT NULL").fetchall()}


def records(conn, t):
    """doppler.failures of table t by row: (error_class, sqlstate, attempts, next_attempt as
    epoch seconds or None, message)."""
    return {int(r[0]): r[1:] for r in conn.execute(
        """SELECT row_key, error_class, sqlstate, attempts, extract(epoch FROM next_attempt)::float8, message
           FROM doppler.failures WHERE relid = %s::regclass""", (t,)).fetchall()}


def batches(conn, t):
    cols = ["claimed", "filled", "failed", "released", "fetch_s", "fetched_bytes", "seconds", "started", "finished", "via"]
    return [dict(zip(cols, r)) for r in conn.execute(
        """SELECT claimed, filled, failed, released, fetch_s, fetched_bytes, seconds,
                  extract(epoch FROM finished_at)::float8 - seconds, extract(epoch FROM finished_at)::float8, via
           FROM doppler.batches WHERE relid = %s::regclass ORDER BY finished_at""", (t,)).fetchall()]


def db_now(conn):
    return conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]


def timed(conn, sql, params=None):
    t0 = time.time()
    conn.execute(sql, params)
    return time.time() - t0


def fill(conn, t):
    return timed(conn, f"CALL doppler.fill('{t}')")


def features(conn, url):
    return error_of(conn, "SELECT doppler.extract_features(%s::text, %s::text)", (url, MODEL))


def cancelled_within(cluster, conn, sql, web, what):
    """Runs `sql` in `conn` on a thread, cancels it (pg_cancel_backend) once the server has a
    request in flight, and returns (the error it ended with, seconds from the cancel to its end)."""
    pid = conn.info.backend_pid
    out = {}

    def run():
        try:
            conn.execute(sql)
            out["error"] = None
        except psycopg.Error as e:
            out["error"] = e
        out["ended"] = time.time()
    before = web.stats()["in_flight"]
    th = threading.Thread(target=run, daemon=True)
    th.start()
    wait_for(lambda: web.stats()["in_flight"] > before or "ended" in out, 30, 0.02, f"{what}: a request in flight")
    assert "ended" not in out, f"{what} ended before its request was answered: {out}"
    with cluster.connect(NOWORKER) as admin:
        cancelled = time.time()
        assert admin.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0]
    th.join(30)
    assert not th.is_alive(), f"{what} still runs 30 s after the cancel"
    return out["error"], out["ended"] - cancelled


# ---------------------------------------------------------------------------------------------
# concurrency, reuse, politeness


def test_fill_fetches_concurrently_over_kept_alive_connections(fetching, fresh_web):
    """64 URL rows over 8 hosts whose answers take 0.2 s each, filled by the plain owner's CALL
    doppler.fill (default settings): all filled, several requests to one host at once but never
    more than doppler.url_max_per_host (8), each URL requested once, far faster than one request
    after the other (12.8 s; a structural bound with a wide margin), and the batches' fetch_s adds
    up the requests' time. A second table filled in the same session reuses the connections the
    first opened (one client per process and policy, kept alive)."""
    web = fresh_web
    web.latency = 0.2
    n = 64
    with fetching() as c:
        urls = image_urls(web, n, "conc")
        t = make_table(c, "conc", urls)
        took = fill(c, t)
        st = web.stats()
        print(f"64 rows in {took:.2f} s; {st['requests']} requests, {st['connections']} connections, "
              f"peaks per host {web.peak_host}, at most {web.peak_in_flight} in flight")
        assert filled_ids(c, t) == set(range(1, n + 1))
        assert st["requests"] == n and all(web.path_requests(request_path(u)) == 1 for u in urls), st
        assert 1 < web.max_peak_host() <= 8, web.peak_host
        assert st["connections"] <= st["requests"], st
        assert took < 0.4 * n * 0.2, f"64 fetches of 0.2 s took {took:.2f} s: not concurrent"
        b = batches(c, t)
        assert sum(x["filled"] for x in b) == n and sum(x["released"] for x in b) == 0, b
        fetch_s, seconds = sum(x["fetch_s"] for x in b), sum(x["seconds"] for x in b)
        assert fetch_s >= 0.9 * n * web.latency, b  # each request took at least the latency
        assert fetch_s > 2 * seconds, f"requests' time {fetch_s:.2f} s not overlapped in {seconds:.2f} s of batches"
        assert sum(x["fetched_bytes"] for x in b) == body_bytes(web, urls), b

        # the same session again: the connections are kept alive and reused
        web.reset()
        urls2 = image_urls(web, n, "conc2")
        t2 = make_table(c, "conc2", urls2)
        fill(c, t2)
        st = web.stats()
        assert filled_ids(c, t2) == set(range(1, n + 1))
        assert st["requests"] == n and st["connections"] <= n / 4, \
            f"a second fill in the same session opened {st['connections']} connections for {st['requests']} requests"


def test_limits_per_host_in_flight_and_rate(fetching, fresh_web):
    """The superuser settings, SET in the session that fills: doppler.url_max_per_host = 2 keeps
    every host at 2 requests at once (and its 64 requests go over far fewer connections: kept
    alive), url_max_in_flight = 3 keeps all hosts together at 3, url_host_rate = 5 starts at most 5
    requests a second to one host (6 requests: at least 1 s)."""
    web = fresh_web
    with fetching() as owner, fetching(su=True) as su:
        web.latency = 0.2
        urls = image_urls(web, 64, "perhost")
        t = make_table(owner, "perhost", urls)
        su.execute("SET doppler.url_max_per_host = 2")
        fill(su, t)
        st = web.stats()
        print(f"max_per_host 2: {st['requests']} requests, {st['connections']} connections, peaks {web.peak_host}")
        assert filled_ids(owner, t) == set(range(1, 65))
        assert web.max_peak_host() == 2, web.peak_host
        # 16 connections would do (2 per host, kept alive), 64 is none reused; a few more than 16
        # is hyper's pool: a request whose turn comes before the last answer's connection is back
        # in the pool connects anew, and that connection is kept as well
        assert st["connections"] <= st["requests"] / 2, st
        su.execute("RESET doppler.url_max_per_host")

        web.latency = 0.1
        web.reset()
        urls = image_urls(web, 24, "inflight")
        t = make_table(owner, "inflight", urls)
        su.execute("SET doppler.url_max_in_flight = 3")
        took = fill(su, t)
        st = web.stats()
        assert filled_ids(owner, t) == set(range(1, 25))
        print(f"max_in_flight 3: {took:.2f} s, at most {web.peak_in_flight} in flight")
        assert 1 < web.peak_in_flight <= 3, (web.peak_in_flight, web.peak_host)
        assert took >= 0.9 * 24 / 3 * 0.1, took
        su.execute("RESET doppler.url_max_in_flight")

        web.latency = 0.0
        web.reset()
        urls = image_urls(web, 6, "rate", hosts=[0])
        t = make_table(owner, "rate", urls)
        su.execute("SET doppler.url_host_rate = 5")
        took = fill(su, t)
        assert filled_ids(owner, t) == set(range(1, 7))
        assert web.stats()["requests_per_host"][web.hosts[0]] == 6
        assert took >= 0.9, f"6 requests at 5 per second to one host took {took:.2f} s"
        su.execute("RESET doppler.url_host_rate")
        # and without the rate, the same 6 are not spaced
        web.reset()
        urls = image_urls(web, 6, "norate", hosts=[0])
        t = make_table(owner, "norate", urls)
        took = fill(su, t)
        assert filled_ids(owner, t) == set(range(1, 7)) and took < 0.9, took


def test_lookahead_fetches_the_next_batch_ahead(fetching, fresh_web):
    """batch_size 8 over 8 hosts (0.3 s answers): with lookahead (doppler.url_prefetch_bytes'
    default) the next batch's URLs are requested while a batch's own are, so more than a batch's
    8 requests are in flight at once; with url_prefetch_bytes = 0 never more than one batch's,
    and each URL is requested once either way."""
    web = fresh_web
    web.latency = 0.3
    with fetching() as owner, fetching(su=True) as su:
        urls = image_urls(web, 32, "ahead")
        t = make_table(owner, "ahead", urls, batch_size=8)
        ahead_took = fill(owner, t)
        ahead_peak, st = web.peak_in_flight, web.stats()
        assert filled_ids(owner, t) == set(range(1, 33))
        assert st["requests"] == 32, st

        web.reset()
        urls = image_urls(web, 32, "noahead")
        t = make_table(owner, "noahead", urls, batch_size=8)
        su.execute("SET doppler.url_prefetch_bytes = 0")
        off_took = fill(su, t)
        off_peak, st = web.peak_in_flight, web.stats()
        print(f"lookahead: {ahead_took:.2f} s, at most {ahead_peak} in flight; off: {off_took:.2f} s, {off_peak}")
        assert filled_ids(owner, t) == set(range(1, 33))
        assert st["requests"] == 32, st
        assert off_peak <= 8 and off_took >= 0.9 * 4 * 0.3, (off_peak, off_took)
        assert ahead_peak > 8, f"no lookahead: at most {ahead_peak} requests in flight with batches of 8"


# ---------------------------------------------------------------------------------------------
# Retry-After, paused hosts, errors per row


def test_retry_after_is_not_an_attempt(fetching, fresh_web):
    """429 or 503 with Retry-After (seconds or an HTTP-date): a retry_later record, attempts 0,
    next_attempt that far ahead, and not a step towards giving up: three 429s in a row
    (doppler.max_attempts is 2 here) still end with the row filled once the server serves it,
    and then no record is left. 429 without Retry-After is an ordinary failure (io, an attempt).
    Each on a host of its own (a host that asks to wait defers its other rows)."""
    web = fresh_web
    img = IMAGES[0]
    rows = {
        1: (at(web, 0, f"/retry/1/2/{img}"), 2),
        2: (at(web, 1, f"/retrydate/1/3/{img}"), 3),
        3: (at(web, 2, f"/retry503/1/2/{img}"), 2),
        4: (at(web, 3, f"/status/429/{img}"), None),
        5: (at(web, 4, f"/retry/3/1/{img}"), 1),
        6: (at(web, 5, f"/{img}?plain"), None),
    }
    with fetching() as c:
        t = make_table(c, "retry", [rows[i][0] for i in sorted(rows)])
        before = db_now(c)
        fill(c, t)
        after = db_now(c)
        rec = records(c, t)
        assert filled_ids(c, t) == {6}, rec
        for key, (url, secs) in rows.items():
            if secs is None:
                continue
            cls, state, attempts, next_at, msg = rec[key]
            assert cls == "retry_later" and attempts == 0, (url, rec[key])
            assert before + secs - 1.5 <= next_at <= after + secs + 1, \
                (url, f"next attempt {next_at - before:.2f} s after the fill began, Retry-After {secs}")
        cls, state, attempts, next_at, msg = rec[4]
        assert cls == "io" and state == "58030" and attempts == 1 and "429" in msg, rec[4]

        def settled():
            fill(c, t)
            r = records(c, t)
            for key in (1, 2, 3, 5):
                assert key not in r or (r[key][0] == "retry_later" and r[key][2] == 0), (key, r[key])
            return filled_ids(c, t) == {1, 2, 3, 5, 6} and 4 in r and r[4][3] is None
        wait_for(settled, 40, 0.3, "the retried rows filled, the 429 without Retry-After given up")
        rec = records(c, t)
        assert set(rec) == {4} and rec[4][0] == "io" and rec[4][2] == 2, rec
        assert web.path_requests(request_path(rows[5][0])) == 4  # three 429s, then the image
        assert web.path_requests(request_path(rows[1][0])) == 2


def test_a_host_that_asks_to_wait_defers_its_other_rows(fetching, fresh_web):
    """After a 429 with Retry-After from one host, that process sends that host nothing until
    then: a row of the same host in the next fill of the same session is deferred the same way
    (retry_later, attempts 0, the same next attempt) without a request, a row of another host is
    filled; once the wait is over both are."""
    web = fresh_web
    img = IMAGES[1]
    with fetching() as c:
        ta = make_table(c, "wait_a", [at(web, 0, f"/retry/1/4/{img}")])
        fill(c, ta)
        asked = records(c, ta)[1]
        assert asked[0] == "retry_later", asked
        same, other = at(web, 0, f"/{img}?wait=same"), at(web, 1, f"/{img}?wait=other")
        tb = make_table(c, "wait_b", [same, other])
        fill(c, tb)
        rec = records(c, tb)
        assert filled_ids(c, tb) == {2}, rec
        assert rec[1][0] == "retry_later" and rec[1][2] == 0 and abs(rec[1][3] - asked[3]) <= 1, (rec, asked)
        assert web.path_requests(request_path(same)) == 0, "a request to a host that asked to wait"

        def both():
            fill(c, ta)
            fill(c, tb)
            return filled_ids(c, ta) == {1} and filled_ids(c, tb) == {1, 2}
        wait_for(both, 30, 0.3, "both rows filled after the wait")
        assert records(c, ta) == {} and records(c, tb) == {}
        assert web.path_requests(request_path(same)) == 1


def test_an_unreachable_host_is_paused(fetching, fresh_web):
    """A host that refuses connections 3 times in a row is paused by that process (5 s at first):
    with one request at a time to it (url_max_per_host = 1), 3 of its 5 rows fail connecting (io,
    an attempt each), the other 2 fail without a request, as ordinary failures too (io, an
    attempt each, "did not answer"): a dead host's rows are given up as usual, not kept waiting
    for free."""
    import socket
    s = socket.socket()
    s.bind((fresh_web.hosts[0], 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    urls = [f"http://{fresh_web.hosts[0]}:{port}/x.png?i={i}" for i in range(5)]
    with fetching() as owner, fetching(su=True) as su:
        t = make_table(owner, "unreachable", urls)
        su.execute("SET doppler.url_max_per_host = 1")
        before = db_now(su)
        fill(su, t)
        after = db_now(su)
        rec = records(owner, t)
        assert sorted(r[0] for r in rec.values()) == ["io"] * 5, rec
        assert all(attempts == 1 and state == "58030" for _, state, attempts, _, _ in rec.values()), rec
        paused = [msg for _, _, _, _, msg in rec.values() if "did not answer 3 times in a row" in msg]
        assert len(paused) == 2, rec


def test_waiting_for_free_ends_after_a_day(fetching, fresh_web):
    """Retry-After waits are free for a day after a row's first attempt; after that each counts,
    and a host that keeps asking to wait has its rows given up after doppler.max_attempts (2
    here). The day is made to have passed by moving the record's first attempt back."""
    web = fresh_web
    url = at(web, 6, f"/retry/9/1/{IMAGES[0]}")
    with fetching() as owner, fetching(su=True) as su:
        t = make_table(owner, "forever", [url])
        fill(owner, t)
        assert records(owner, t)[1][:3] == ("retry_later", "58030", 0)
        su.execute("UPDATE doppler.failures SET first_attempt = now() - interval '2 days', next_attempt = now() "
                   "WHERE relid = %s::regclass", (t,))
        wait_for(lambda: fill(owner, t) is not None and records(owner, t)[1][2] == 1, 10, 0.3, "a counted wait")
        assert records(owner, t)[1][0] == "retry_later"
        su.execute("UPDATE doppler.failures SET next_attempt = now() WHERE relid = %s::regclass", (t,))
        wait_for(lambda: fill(owner, t) is not None and records(owner, t)[1][3] is None, 10, 0.3, "given up")
        assert records(owner, t)[1][2] == 2 and filled_ids(owner, t) == set()


def test_errors_stay_with_their_rows(fetching, fresh_web):
    """A 404 fails its own row only (not_found, 58P01), a 500 its own (io, 58030); the rows
    beside them, on the same hosts too, are filled."""
    web = fresh_web
    urls = image_urls(web, 14, "err")
    urls += [at(web, 0, f"/status/404/{IMAGES[0]}"), at(web, 1, f"/status/500/{IMAGES[0]}")]
    with fetching() as c:
        t = make_table(c, "errors", urls)
        fill(c, t)
        rec = records(c, t)
        assert filled_ids(c, t) == set(range(1, 15)), rec
        assert set(rec) == {15, 16}, rec
        assert rec[15][:3] == ("not_found", "58P01", 1) and "404" in rec[15][4], rec[15]
        assert rec[16][:3] == ("io", "58030", 1) and "500" in rec[16][4], rec[16]


# ---------------------------------------------------------------------------------------------
# a slow host, cancel


def test_a_slow_host_delays_only_its_own_rows(fetching, fresh_web):
    """3 rows on a host that answers after 5 s, 12 on fast hosts, one batch: the batch writes the
    12 within about a second (its first row in doppler.batches: 12 filled, 3 released, left
    pending), and the slow rows are filled by later batches from the same requests (each URL
    requested once) before the CALL returns."""
    web = fresh_web
    fast = image_urls(web, 12, "fast", hosts=list(range(1, 8)))
    slow = [at(web, 0, f"/slow/5/{IMAGES[i]}?slow={i}") for i in range(3)]
    with fetching() as c:
        t = make_table(c, "slowhost", fast + slow, batch_size=32)
        start = db_now(c)
        took = fill(c, t)
        b = batches(c, t)
        print(f"fill took {took:.2f} s in {len(b)} batches; first: {b[0]}")
        assert filled_ids(c, t) == set(range(1, 16)) and records(c, t) == {}
        first = b[0]
        assert first["claimed"] == 15 and first["filled"] == 12 and first["released"] == 3 and first["failed"] == 0, first
        assert first["finished"] - start < 3.0, f"the fast rows were written {first['finished'] - start:.2f} s into the fill"
        assert took >= 4.5  # (the slow rows came after their 5 s)
        assert sum(x["filled"] for x in b) == 15 and sum(x["failed"] for x in b) == 0, b
        assert all(web.path_requests(request_path(u)) == 1 for u in fast + slow)


def test_fill_and_extract_features_are_cancellable_while_requests_hang(cluster, fetching, fresh_web):
    """Requests that never answer: pg_cancel_backend ends a CALL doppler.fill and a SELECT
    doppler.extract_features(url) waiting on them with 57014 within about a second."""
    web = fresh_web
    try:
        with fetching() as c:
            t = make_table(c, "hang", [at(web, i, f"/hang/{IMAGES[0]}?i={i}") for i in range(4)])
        with fetching() as c:
            err, took = cancelled_within(cluster, c, f"CALL doppler.fill('{t}')", web, "fill")
            assert isinstance(err, psycopg.errors.QueryCanceled), err
            assert took < 1.5, f"fill ended {took:.2f} s after the cancel"
        with fetching() as c:
            sql = psycopg.sql.SQL("SELECT doppler.extract_features({}::text, {}::text)").format(
                psycopg.sql.Literal(at(web, 5, f"/hang/{IMAGES[1]}?single")), psycopg.sql.Literal(MODEL))
            err, took = cancelled_within(cluster, c, sql, web, "extract_features")
            assert isinstance(err, psycopg.errors.QueryCanceled), err
            assert took < 1.5, f"extract_features ended {took:.2f} s after the cancel"
    finally:
        web.release()


# ---------------------------------------------------------------------------------------------
# the URL policy with pooled connections, the User-Agent


class Redirect(http.server.BaseHTTPRequestHandler):
    """/to/<url-quoted target>: 302 there."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", urllib.parse.unquote(self.path[len("/to/"):]))
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_pooled_connections_never_reach_what_the_policy_now_refuses(fetching, fresh_web):
    """A superuser's session fetches from 127.0.0.3 twice (one kept-alive connection), then
    narrows doppler.url_allowed_networks: the same URL is refused (42501, private or reserved)
    and never reaches the server, though a connection to it is open in the process; so is a
    redirect to it (re-checked), while 127.0.0.2, still allowed, is fetched; with the networks
    empty nothing private is; url_allowed_hosts holds too."""
    web = fresh_web
    redirector = http.server.ThreadingHTTPServer((web.hosts[0], 0), Redirect)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    to = lambda target: f"http://{web.hosts[0]}:{redirector.server_address[1]}/to/{urllib.parse.quote(target, safe='')}"
    img = IMAGES[2]
    try:
        with fetching(su=True) as su:
            u3 = at(web, 1, f"/{img}?pool=1")
            assert features(su, u3)[0] is None
            assert features(su, u3)[0] is None
            st = web.stats()
            assert st["requests"] == 2 and st["connections"] == 1, f"not kept alive between statements: {st}"

            su.execute(f"SET doppler.url_allowed_networks = '{web.hosts[0]}/32'")
            code, msg = features(su, u3)
            assert code == "42501" and "private or reserved" in msg, (code, msg)
            assert web.path_requests(request_path(u3)) == 2, "a refused URL reached the server"
            u2 = at(web, 0, f"/{img}?pool=2")
            assert features(su, u2)[0] is None
            # redirects, each checked again: to the allowed host, and to the refused one
            assert features(su, to(at(web, 0, f"/{img}?pool=3")))[0] is None
            target = at(web, 1, f"/{img}?pool=4")
            code, msg = features(su, to(target))
            assert code == "42501" and f"address {web.hosts[1]}" in msg and "private or reserved" in msg, (code, msg)
            assert web.path_requests(request_path(target)) == 0, "a redirect reached a refused address"

            su.execute("SET doppler.url_allowed_networks = ''")
            for u in (u2, u3):
                code, msg = features(su, u)
                assert code == "42501" and "private or reserved" in msg, (u, code, msg)
            assert web.path_requests(request_path(u2)) == 1 and web.path_requests(request_path(u3)) == 2

            su.execute(f"SET doppler.url_allowed_networks = '{web.networks}'")
            su.execute("SET doppler.url_allowed_hosts = 'images.example.org'")
            code, msg = features(su, u3)
            assert code == "42501" and "url_allowed_hosts" in msg, (code, msg)
            su.execute("RESET doppler.url_allowed_hosts")
            assert features(su, u3)[0] is None
            assert web.path_requests(request_path(u3)) == 3
    finally:
        redirector.shutdown()
        redirector.server_close()


def test_the_user_agent_names_doppler_and_can_be_set(fetching, fresh_web):
    """Requests say User-Agent doppler/<version> (doppler.url_user_agent's default); a superuser
    sets another, a plain role may not."""
    web = fresh_web
    with fetching() as owner, fetching(su=True) as su:
        assert features(owner, at(web, 0, f"/{IMAGES[3]}?ua=1"))[0] is None
        agents = web.stats()["user_agents"]
        default = su.execute("SHOW doppler.url_user_agent").fetchone()[0]
        assert agents == {default} and default.startswith("doppler/"), (agents, default)
        code, _ = error_of(owner, "SET doppler.url_user_agent = 'sneaky/1'")
        assert code == "42501"
        su.execute("SET doppler.url_user_agent = 'newsroom-bot/1'")
        web.reset()
        assert features(su, at(web, 0, f"/{IMAGES[3]}?ua=2"))[0] is None
        assert web.stats()["user_agents"] == {"newsroom-bot/1"}


# ---------------------------------------------------------------------------------------------
# the sync trigger, doppler.batches


def test_sync_insert_fetches_its_rows_concurrently_and_waits_for_all(fetching, fresh_web):
    """A sync-mode table: one INSERT ... SELECT of 16 URL rows over 8 hosts (0.2 s answers) has
    every vector when it returns, with several requests to a host at once, in well under the
    3.2 s one after the other would take (beyond what the same INSERT takes without the latency);
    a row on a host that answers after 1 s is waited for, not released."""
    web = fresh_web
    with fetching() as c:
        t = make_table(c, "sync", mode="sync", batch_size=16)
        # the same statement without latency first: what the rest costs (and the model loaded)
        base = timed(c, f"INSERT INTO {t} (id, f_img) SELECT * FROM unnest(%s::int[], %s::text[])",
                     (list(range(101, 117)), image_urls(web, 16, "syncbase")))
        assert len(filled_ids(c, t)) == 16
        web.latency = 0.2
        web.reset()
        urls = image_urls(web, 16, "sync")
        took = timed(c, f"INSERT INTO {t} (id, f_img) SELECT * FROM unnest(%s::int[], %s::text[])",
                     (list(range(1, 17)), urls))
        st = web.stats()
        print(f"sync INSERT of 16: {took:.2f} s ({base:.2f} s without latency), peaks {web.peak_host}")
        assert filled_ids(c, t) >= set(range(1, 17))
        assert st["requests"] == 16 and web.max_peak_host() > 1, (st, web.peak_host)
        assert took - base < 0.5 * 16 * 0.2, f"16 fetches of 0.2 s took {took:.2f} s ({base:.2f} s without latency)"

        web.latency = 0.0
        rows = [at(web, 0, f"/slow/1/{IMAGES[0]}?sync"), at(web, 1, f"/{IMAGES[1]}?sync=a"), at(web, 2, f"/{IMAGES[2]}?sync=b")]
        took = timed(c, f"INSERT INTO {t} (id, f_img) SELECT * FROM unnest(%s::int[], %s::text[])", ([201, 202, 203], rows))
        assert filled_ids(c, t) >= {201, 202, 203} and took >= 0.9, took
        b = [x for x in batches(c, t) if x["via"] == "sync"]
        assert b and all(x["released"] == 0 for x in b), b
        assert records(c, t) == {}


def test_batches_record_fetch_time_and_bytes(fetching, fresh_web):
    """doppler.batches of a URL fill: fetch_s (the requests' time, at least their latency each),
    fetched_bytes (the images' bytes), released 0; the DEBUG1 line of each batch names the
    fetching."""
    web = fresh_web
    web.latency = 0.1
    urls = image_urls(web, 8, "log")
    with fetching() as c:
        t = make_table(c, "logged", urls)
        lines = []
        c.add_notice_handler(lambda d: lines.append(d.message_primary) if d.severity_nonlocalized == "DEBUG" else None)
        c.execute("SET client_min_messages = debug1")
        fill(c, t)
        c.execute("RESET client_min_messages")
        b = batches(c, t)
        assert len(b) == 1 and b[0]["filled"] == 8 and b[0]["released"] == 0, b
        assert b[0]["fetch_s"] >= 0.9 * 8 * 0.1, b
        assert b[0]["fetched_bytes"] == body_bytes(web, urls), b
        mine = [x for x in lines if x.startswith("doppler: batch of")]
        assert mine and all("fetch" in x for x in mine), lines


# ---------------------------------------------------------------------------------------------
# the background worker


def test_the_worker_fetches_concurrently_and_retries_after(cluster, web, fresh_web):
    """The worker (its settings from the server's configuration) fills a plain owner's async
    table of 24 URL rows over 8 hosts (0.2 s answers) with several requests to a host at once,
    under doppler's User-Agent, logging the fetching in doppler.batches; a row answered 429 with
    Retry-After 1 is filled by the worker after the wait (two requests, no record left)."""
    web = fresh_web
    with cluster.connect() as admin:
        wait_for(lambda: admin.execute("SELECT doppler._worker_pid()").fetchone()[0], 60, 0.2, "the worker")
        admin.execute("SELECT doppler.register_model(%s, %s, dim => 16)", (MODEL, os.path.join(MODELS, "tiny.onnx")))
        fresh_role(admin, WOWNER, member_of=URL_ROLES)
        set_system(admin, cluster, allow_urls="on", url_allowed_networks=web.networks, url_timeout="30s")
        try:
            with cluster.connect(user=WOWNER) as c:
                t = f"{WOWNER}.w"
                c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, f_img text, features real[])")
                c.execute("SELECT doppler.watch(%s::regclass, model => %s::text)", (t, MODEL))
                web.latency = 0.2
                urls = image_urls(web, 24, "worker")
                insert(c, t, urls)  # (wakes the worker at commit)
                wait_for(lambda: len(filled_ids(c, t)) == 24, 60, 0.2, "the worker's fill")
                st = web.stats()
                print(f"worker: {st['requests']} requests, {st['connections']} connections, peaks {web.peak_host}")
                assert st["requests"] == 24 and web.max_peak_host() > 1, (st, web.peak_host)
                assert st["user_agents"] and all(a.startswith("doppler/") for a in st["user_agents"]), st
                b = [x for x in batches(c, t) if x["via"] == "worker"]
                assert sum(x["fetch_s"] for x in b) >= 0.9 * 24 * 0.2, b
                assert sum(x["fetched_bytes"] for x in b) == body_bytes(web, urls), b

                web.latency = 0.0
                retry = at(web, 0, f"/retry/1/1/{IMAGES[4]}?worker")
                insert(c, t, [retry], first=25)

                def filled():
                    admin.execute("SELECT doppler.wake()")
                    return 25 in filled_ids(c, t)
                wait_for(filled, 30, 0.3, "the 429 row filled by the worker")
                assert web.path_requests(request_path(retry)) == 2
                assert records(c, t) == {}
        finally:
            set_system(admin, cluster, allow_urls=None, url_allowed_networks=None, url_timeout=None)
            admin.execute(f"DROP OWNED BY {WOWNER} CASCADE")
            admin.execute(f"DROP ROLE {WOWNER}")
            admin.execute("DELETE FROM doppler.models WHERE name = %s", (MODEL,))
