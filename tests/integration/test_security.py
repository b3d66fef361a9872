"""Safe inputs: file and URL privileges, limits, and a bad-input corpus that cannot crash anything.
Every case asserts its SQLSTATE and message, and that the backend keeps serving."""
import http.server
import os
import struct
import threading
import time
import zlib

import psycopg
import pytest

from conftest import fixture_paths, set_system, status, wait_for

GOOD = [p for p in fixture_paths() if "large_" not in p]
PNG = next(p for p in GOOD if p.endswith("portrait_300x500.png"))
JPG = next(p for p in GOOD if p.endswith("landscape_640x480.jpg"))
GIF_FRAMES = None


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(w, h):
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def gif_header(w, h):
    # logical screen w x h, one 1x1 frame
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b")


@pytest.fixture(scope="module")
def corpus(cluster):
    d = os.path.join(cluster.files, "corpus")
    root = os.path.join(d, "root")
    os.makedirs(root, exist_ok=True)
    jpg, png = open(JPG, "rb").read(), open(PNG, "rb").read()
    dht = jpg.index(b"\xff\xc4")
    bad_huffman = bytearray(jpg)
    bad_huffman[dht + 5:dht + 21] = b"\xff" * 16  # code counts summing far past 256: bogus table
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    from PIL import Image
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    files = {
        "truncated.jpg": jpg[: len(jpg) // 2],
        "bad_huffman.jpg": bytes(bad_huffman),
        "truncated.png": png[: len(png) // 2],
        "bad_crc.png": bytes(bad_crc),
        "empty.png": b"",
        "notes.txt": b"just text\n",
        "page.jpg": b"<!doctype html><html><body>404</body></html>",
        "bomb.png": png_header(60000, 60000),
        "bomb.gif": gif_header(60000, 60000),
        "header_30000.png": png_header(30000, 30000),
    }
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    frames[0].save(os.path.join(d, "animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    fifo = os.path.join(d, "pipe.jpg")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    with open(os.path.join(root, "inside.png"), "wb") as f:
        f.write(png)
    with open(os.path.join(d, "secret.png"), "wb") as f:
        f.write(png)
    if not os.path.exists(os.path.join(root, "escape.png")):
        os.symlink(os.path.join(d, "secret.png"), os.path.join(root, "escape.png"))
    for dirpath, dirnames, filenames in os.walk(d):
        os.chmod(dirpath, 0o755)
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if not os.path.islink(p):
                os.chmod(p, 0o644)
    return d


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/ok.png":
            self.reply(200, open(PNG, "rb").read(), [("Content-Type", "image/png")])
        elif self.path == "/html.jpg":
            self.reply(200, b"<html>not an image</html>", [("Content-Type", "image/jpeg")])
        elif self.path == "/broken.png":
            self.reply(500, b"oops")
        elif self.path == "/slow.png":
            time.sleep(4)
            self.reply(200, open(PNG, "rb").read())
        elif self.path == "/loop":
            self.reply(302, headers=[("Location", f"http://127.0.0.2:{port}/loop")])
        elif self.path == "/to-loopback":
            self.reply(302, headers=[("Location", f"http://127.0.0.1:{port}/ok.png")])
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\xff" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.reply(404, b"no")


@pytest.fixture(scope="module")
def web():
    srv = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{srv.server_address[1]}"
    srv.shutdown()


def error_of(db, sql, *args):
    try:
        db.execute(sql, args)
    except psycopg.Error as e:
        assert db.execute("SELECT 1").fetchone() == (1,)  # the backend keeps serving
        return e.sqlstate, str(e)
    return "ok", ""


def features(db, src):
    return error_of(db, "SELECT doppler.extract_features(%s::text)", src)


def test_file_corpus(db, corpus):
    db.execute("SET doppler.max_image_bytes = '8MB'")
    p = lambda n: os.path.join(corpus, n)
    cases = [
        ("truncated.jpg", "22P03", "JPEG"), ("bad_huffman.jpg", "22P03", "JPEG"),
        ("truncated.png", "22P03", "PNG"), ("bad_crc.png", "22P03", "PNG"),
        ("empty.png", "22P03", "is empty"), ("notes.txt", "22P03", "not an image"), ("page.jpg", "22P03", "not an image"),
        ("bomb.png", "54000", "60000x60000"), ("bomb.gif", "54000", "60000x60000"),
        ("header_30000.png", "54000", "900000000 pixels"),
        ("pipe.jpg", "42809", "not a regular file"), ("no_such.png", "58P01", "does not exist"),
    ]
    t0 = time.time()
    for name, code, text in cases:
        got = features(db, p(name))
        assert got[0] == code and text in got[1] and p(name) in got[1], (name, got)
    assert time.time() - t0 < 30, "the corpus must be refused quickly"
    assert features(db, corpus)[0] == "42809"
    assert features(db, "relative/x.png")[0] == "22023"
    v = db.execute("SELECT doppler.extract_features(%s::text)", (p("animated.gif"),)).fetchone()[0]
    assert len(v) == 2048  # first frame
    # file roots: symlinks and .. cannot lead out
    db.execute("SELECT set_config('doppler.file_roots', %s, false)", (os.path.join(corpus, "root"),))
    assert len(db.execute("SELECT doppler.extract_features(%s::text)", (p("root/inside.png"),)).fetchone()[0]) == 2048
    for escape in [p("root/escape.png"), p("root/../secret.png"), JPG]:
        code, msg = features(db, escape)
        assert code == "42501" and "outside doppler.file_roots" in msg, (escape, msg)
    db.execute("RESET doppler.file_roots")


def test_url_corpus(db, web):
    code, msg = features(db, f"{web}/ok.png")
    assert code == "42501" and "fetching URLs is off" in msg
    db.execute("SET doppler.allow_urls = on")
    code, msg = features(db, f"{web}/ok.png")
    assert code == "42501" and "private or reserved" in msg  # 127.0.0.2 is loopback
    db.execute("SET doppler.url_allowed_networks = '127.0.0.2/32'")
    db.execute("SET doppler.url_timeout = '1500ms'")
    assert len(db.execute("SELECT doppler.extract_features(%s::text)", (f"{web}/ok.png",)).fetchone()[0]) == 2048
    assert db.execute("SELECT doppler.dhash(%s::text)", (f"{web}/ok.png",)).fetchone()[0] == \
        db.execute("SELECT doppler.dhash(%s::text)", (PNG,)).fetchone()[0]
    db.execute("SET doppler.max_image_bytes = '1MB'")
    cases = [
        ("/missing.png", "58P01", "HTTP 404"), ("/broken.png", "58030", "HTTP 500"),
        ("/slow.png", "58030", "timed out"), ("/loop", "58030", "redirects"),
        ("/to-loopback", "42501", "127.0.0.1"), ("/huge", "54000", "over the limit"),
        ("/html.jpg", "22P03", "not an image"),
    ]
    for path, want, text in cases:
        code, msg = features(db, web + path)
        assert code == want and text in msg, (path, code, msg)
    for url, want in [("file:///etc/passwd", "0A000"), ("ftp://127.0.0.2/x.png", "0A000"),
                      ("http://169.254.169.254/latest/meta-data/", "42501"), ("http://[::ffff:127.0.0.1]/x.png", "42501")]:
        assert features(db, url)[0] == want, url
    db.execute("SET doppler.url_allowed_hosts = 'images.example.org'")
    code, msg = features(db, f"{web}/ok.png")
    assert code == "42501" and "url_allowed_hosts" in msg
    db.execute("RESET doppler.url_allowed_hosts")


def test_privileges(db, corpus, web):
    db.execute("CREATE ROLE sec_plain")
    db.execute("CREATE ROLE sec_files IN ROLE pg_read_server_files")
    db.execute("CREATE ROLE sec_urls IN ROLE doppler_url_reader")
    db.execute("SET doppler.allow_urls = on")
    db.execute("SET doppler.url_allowed_networks = '127.0.0.2/32'")
    for role, file_ok, url_ok in [("sec_plain", False, False), ("sec_files", True, False), ("sec_urls", False, True)]:
        db.execute(f"SET ROLE {role}")
        try:
            code, msg = features(db, PNG)
            assert (code == "ok") == file_ok and (file_ok or (code == "42501" and "permission denied" in msg)), (role, msg)
            code, msg = features(db, f"{web}/ok.png")
            assert (code == "ok") == url_ok and (url_ok or (code == "42501" and "permission denied" in msg)), (role, msg)
            # bytes already in the database need no privilege
            with open(PNG, "rb") as f:
                assert len(db.execute("SELECT doppler.extract_features(%s::bytea)", (f.read(),)).fetchone()[0]) == 2048
            code, msg = error_of(db, "SET doppler.allow_urls = on")
            assert code == "42501"
        finally:
            db.execute("RESET ROLE")


def test_worker_records_every_bad_input_and_fills_the_rest(db, cluster, corpus, web):
    set_system(db, cluster, allow_urls="on", url_allowed_networks="127.0.0.2/32", url_timeout="1500ms")
    try:
        check_worker_corpus(db, cluster, corpus, web)
    finally:
        set_system(db, cluster, allow_urls=None, url_allowed_networks=None, url_timeout=None)


def check_worker_corpus(db, cluster, corpus, web):
    bad = [os.path.join(corpus, n) for n in ["truncated.jpg", "bad_huffman.jpg", "bad_crc.png", "empty.png", "notes.txt",
                                             "bomb.png", "bomb.gif", "header_30000.png", "pipe.jpg", "no_such.png"]]
    bad += [corpus, web + "/missing.png", web + "/broken.png", web + "/slow.png", web + "/loop", web + "/to-loopback",
            web + "/huge", "file:///etc/passwd"]
    good = GOOD[:4] + [web + "/ok.png", os.path.join(corpus, "animated.gif")]
    db.execute("CREATE TABLE corpus (id serial PRIMARY KEY, f_img text, features real[])")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO corpus (f_img) VALUES (%s)", [(x,) for x in good + bad])
    db.execute("SELECT doppler.watch('corpus', batch_size => 8)")
    s = wait_for(lambda: (lambda s: s if s["pending"] == 0 else None)(status(db, "corpus")), 240, what="corpus settled")
    assert s["done"] == len(good) and s["failed"] == len(bad), s
    recorded = {r[0] for r in db.execute("SELECT source FROM doppler.failures WHERE relid = 'corpus'::regclass").fetchall()}
    assert recorded == set(bad)
    assert "terminated by signal" not in cluster.log()
