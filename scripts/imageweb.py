"""A local image web server for doppler's URL benchmark and tests (stdlib only).

    with ImageWeb(root, hosts=8, latency=0.2) as web:
        url = web.url("a.jpg", 3)          # http://127.0.0.5:PORT/a.jpg (host number 3 % hosts)
        ... SET doppler.url_allowed_networks = web.networks ...
        web.stats()                        # requests, connections, in_flight, peak_per_host, ...

Serves the files of `root` by name (GET and HEAD, `/<name>`) on one port shared by `hosts` loopback addresses
127.0.0.{first} .. 127.0.0.{first + hosts - 1}: a minimal HTTP/1.1 server on asyncio (one event-loop thread, started
by the constructor, stopped by close()), keep-alive unless either side says `Connection: close`, Content-Length on
every answer, file bodies cached in memory, every answer after `latency` seconds (settable: `web.latency = 0.05`;
an asyncio sleep, so waiting requests cost no CPU and no thread). Routes for tests:

  /status/<code>/<name>        answers HTTP <code> with a small body;
  /retry/<n>/<secs>/<name>     the first <n> requests for this exact path: 429 with `Retry-After: <secs>`, then the
                               file; /retry503/... the same with 503; /retrydate/... 429 with Retry-After as an
                               HTTP-date (now + secs);
  /hang/<name>                 no answer until `web.release()` (which frees the requests hanging at that moment)
                               or `web.close()`; then 503, connection closed (counted in in_flight meanwhile);
  /slow/<secs>/<name>          sleeps <secs> (on top of `latency`), then serves.

Every answer counts in `stats()` and in `path_requests(path)`; `reset()` zeroes the counters. Hooks for subclasses
(called on the loop thread, with the host address the request came to): `_begin(host, path, agent)` when a request
has arrived, `_answered(host)` when its answer starts to be written (or it ends without one), `_end(host)` once the
answer is written.
"""
import asyncio
import collections
import email.utils
import os
import socket
import threading
import time

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}


class ImageWeb:
    def __init__(self, root, hosts=8, latency=0.0, first=2):
        self.root, self.latency = os.path.abspath(root), latency
        self._bodies = {}
        self.hosts = [f"127.0.0.{first + i}" for i in range(hosts)]
        self.networks = "127.0.0.0/24"
        self._lock, self._closed, self._open = threading.Lock(), False, {}  # _open: writer -> its task
        self._released = asyncio.Event()  # (bound to the loop on first use; swapped by release)
        for _ in range(20):  # a free port on the first address, then the same port on the others
            socks = [_listen(self.hosts[0], 0)]
            self.port = socks[0].getsockname()[1]
            try:
                for h in self.hosts[1:]:
                    socks.append(_listen(h, self.port))
                break
            except OSError:
                for s in socks:
                    s.close()
        else:
            raise OSError("no port free on all of " + ", ".join(self.hosts))
        self._in_flight = collections.Counter()
        self.reset()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imageweb", daemon=True)
        self._thread.start()
        self._servers = self._call(self._start(socks))

    def url(self, name, i=0):
        return f"http://{self.hosts[i % len(self.hosts)]}:{self.port}/{name}"

    # counters
    def reset(self):
        """Zeroes the counts (in_flight, a state, stays)."""
        with self._lock:
            self._requests, self._connections = 0, 0
            self._peak = {h: 0 for h in self.hosts}
            self._per_host = {h: 0 for h in self.hosts}
            self._paths = collections.Counter()
            self._agents = set()

    def stats(self):
        with self._lock:
            return dict(requests=self._requests, connections=self._connections,
                        in_flight=sum(self._in_flight.values()), peak_per_host=dict(self._peak),
                        max_peak_per_host=max(self._peak.values()), requests_per_host=dict(self._per_host),
                        user_agents=set(self._agents))

    def path_requests(self, path):
        with self._lock:
            return self._paths[path]

    def _body(self, name):
        """The file's bytes, read once (a real web server's cache: the benchmark measures doppler, not the disk or
        Python's file reading); None when there is no such file."""
        with self._lock:
            if name not in self._bodies:
                path = os.path.join(self.root, name)
                if not os.path.isfile(path):
                    return None
                with open(path, "rb") as f:
                    self._bodies[name] = f.read()
            return self._bodies[name]

    def _begin(self, host, path, agent):
        with self._lock:
            self._requests += 1
            self._per_host[host] += 1
            self._paths[path] += 1
            if agent is not None:
                self._agents.add(agent)
            self._in_flight[host] += 1
            self._peak[host] = max(self._peak[host], self._in_flight[host])

    def _answered(self, host):
        pass

    def _end(self, host):
        with self._lock:
            self._in_flight[host] -= 1

    # serving (on the loop thread)
    async def _start(self, socks):
        return [await asyncio.start_server(self._serve, sock=s) for s in socks]

    async def _serve(self, reader, writer):
        """One connection: requests one after the other until either side closes it."""
        host = writer.get_extra_info("sockname")[0]
        with self._lock:
            self._connections += 1
        self._open[writer] = asyncio.current_task()
        try:
            keep = True
            while keep and not self._closed:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                parts, headers = lines[0].split(), {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                    return self._write(writer, 400, b"bad request\n", False, {"Connection": "close"})
                method, path, version = parts
                await reader.readexactly(int(headers.get("content-length", 0)))  # (a GET's body, if any: unused)
                conn = headers.get("connection", "").lower()
                keep = "close" not in conn and (version != "HTTP/1.0" or "keep-alive" in conn)
                if method not in ("GET", "HEAD"):
                    return self._write(writer, 501, b"not implemented\n", False, {"Connection": "close"})
                keep = await self._request(writer, host, path, method == "HEAD", headers.get("user-agent"), keep)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError,
                asyncio.CancelledError):
            pass  # the client went away (a cancelled fill, a released hang), sent nonsense, or close() ended it
        finally:
            self._open.pop(writer, None)
            writer.close()

    async def _request(self, writer, host, path, head, agent, keep):
        """Answers one request; returns whether the connection stays open."""
        self._begin(host, path, agent)
        try:
            try:
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                code, body, headers = await self._route(path)
            finally:
                self._answered(host)
            if headers.get("Connection") == "close":
                keep = False
            elif not keep:
                headers["Connection"] = "close"
            self._write(writer, code, body, head, headers)
            await writer.drain()
            return keep
        finally:
            self._end(host)

    async def _route(self, path):
        """(code, body, headers) for this path."""
        parts = path.split("?", 1)[0].lstrip("/").split("/")
        kind = parts[0]
        if kind == "status" and len(parts) == 3:
            return int(parts[1]), b"status %s\n" % parts[1].encode(), {}
        if kind in ("retry", "retry503", "retrydate") and len(parts) == 4:
            n, secs = int(parts[1]), float(parts[2])
            if self.path_requests(path) <= n:
                after = (email.utils.formatdate(time.time() + secs, usegmt=True) if kind == "retrydate"
                         else parts[2])
                return (503 if kind == "retry503" else 429), b"retry later\n", {"Retry-After": after}
            return self._file(parts[3])
        if kind == "hang" and len(parts) == 2:
            if not self._closed:
                await self._released.wait()
            return 503, b"released\n", {"Connection": "close"}
        if kind == "slow" and len(parts) == 3:
            await asyncio.sleep(float(parts[1]))
            return self._file(parts[2])
        return self._file(parts[0] if len(parts) == 1 else "")

    def _file(self, name):
        body = self._body(os.path.basename(name)) if name else None
        if body is None:
            return 404, b"not found\n", {}
        return 200, body, {"Content-Type": "application/octet-stream"}

    @staticmethod
    def _write(writer, code, body, head, headers):
        lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}"] + [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head else body))

    # life
    def _call(self, coro):
        """Runs a coroutine on the loop thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _release(self):
        released, self._released = self._released, asyncio.Event()
        released.set()

    def release(self):
        """Lets the /hang/ requests waiting now answer (503, connection closed); later ones hang again."""
        if not self._closed:
            self._loop.call_soon_threadsafe(self._release)

    async def _shutdown(self):
        self._release()
        for s in self._servers:
            s.close()
        await asyncio.sleep(0.01)  # (the released hangs answer)
        tasks = list(self._open.values())
        for writer, task in list(self._open.items()):
            writer.close()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self):
        """Stops serving, answers hanging requests and closes the connections still open."""
        if self._closed:
            return
        self._closed = True
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _listen(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s
