"""The model registry: doppler.models, register_model, extract_features(.., model), and a table
re-embedded in the background when its model (or the model's version) changes."""
import os

import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from PIL import Image

from conftest import MODELS, fixture_paths, wait_for

EFFNET = os.path.join(MODELS, "efficientnet-lite0.onnx")
PHOTOS = [p for p in fixture_paths() if "large_" not in p][:6]


# where doppler's packages (and scripts/bundle, for this from-source install) put the model
BUNDLED = "$sharedir/doppler/efficientnet-lite0.onnx"


def register_effnet(db, version="1"):
    """The bundled entry as CREATE EXTENSION makes it (version 1), or a new version of it."""
    return db.execute(
        "SELECT doppler.register_model('efficientnet_lite0', %s, dim => 1280, divisor => 1,"
        " mean => '{127,127,127}', std => '{128,128,128}', version => %s)",
        (BUNDLED, version),
    ).fetchone()[0]


def reference_effnet(path):
    """The same model in Python: PIL convert('RGB') -> bilinear 224x224 -> (x - 127) / 128."""
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    sess = ort.InferenceSession(EFFNET, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]


def model_status(db, table):
    row = db.execute(
        "SELECT model, total, done, pending, stale FROM doppler.status WHERE table_name = %s::regclass", (table,)
    ).fetchone()
    return dict(zip(["model", "total", "done", "pending", "stale"], row))


def test_bundled_model_is_registered_by_create_extension(db):
    """CREATE EXTENSION registers the model the packages bundle, named in the server's share
    directory; it works with no register_model() call and equals its Python reference."""
    row = db.execute("SELECT onnx_path, dim, version FROM doppler.models WHERE name = 'efficientnet_lite0'").fetchone()
    assert row == (BUNDLED, 1280, "1")
    with psycopg.connect(db.info.dsn, autocommit=True) as fresh:  # no session of it yet
        got = np.array(fresh.execute("SELECT doppler.extract_features(%s, 'efficientnet_lite0')", (PHOTOS[0],)).fetchone()[0])
        np.testing.assert_allclose(got, reference_effnet(PHOTOS[0]), atol=1e-3)
        sharedir = fresh.execute("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'").fetchone()[0]
        path = fresh.execute("SELECT model_path FROM doppler.session_info()").fetchone()[0]
        assert path == f"{sharedir}/doppler/efficientnet-lite0.onnx"
        # the seed's ResNet50 without a file says what to do
        fresh.execute("SET doppler.model_path = ''")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="has no file") as e:
            fresh.execute("SELECT doppler.extract_features(%s)", (PHOTOS[0],))
        assert "efficientnet_lite0" in e.value.diag.message_hint
        # and a table is not watched with it: the worker could never fill it
        fresh.execute("CREATE TABLE no_model_file (id int PRIMARY KEY, f_img text, features real[])")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="has no file"):
            fresh.execute("SELECT doppler.watch('no_model_file')")
        fresh.execute("DROP TABLE no_model_file")
        # only a leading $sharedir is the server's folder; a missing file names itself
        with pytest.raises(psycopg.errors.UndefinedFile, match=r"model file \".*/doppler/nope.onnx\" does not exist"):
            fresh.execute("SELECT doppler.register_model('nope', '$sharedir/doppler/nope.onnx', dim => 1280)")
        with pytest.raises(psycopg.errors.CheckViolation):
            fresh.execute("SELECT doppler.register_model('nope', 'doppler/$sharedir/x.onnx', dim => 1280)")


def test_built_in_entries_merge_only_while_untouched(db):
    """doppler.models' merge trigger: an insert of a built-in name (what pg_restore does after
    CREATE EXTENSION made the entry) updates the entry while it is as CREATE EXTENSION made it;
    once changed, the primary key stands as for any other name."""
    entry = "SELECT onnx_path, version FROM doppler.models WHERE name = 'efficientnet_lite0'"
    insert = ("INSERT INTO doppler.models (name, onnx_path, divisor, mean, std, dim, version)"
              " VALUES ('efficientnet_lite0', %s, 1, '{127,127,127}', '{128,128,128}', 1280, %s)")
    assert db.execute(entry).fetchone() == (BUNDLED, "1")
    db.execute(insert, (EFFNET, "5"))
    assert db.execute(entry).fetchone() == (EFFNET, "5")
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(insert, (EFFNET, "6"))
    # register_model changes a changed entry back (its ON CONFLICT path)
    assert register_effnet(db) == "efficientnet_lite0@1"
    assert db.execute(entry).fetchone() == (BUNDLED, "1")


def test_registered_model_matches_its_python_reference(db):
    assert register_effnet(db) == "efficientnet_lite0@1"
    models = dict(db.execute("SELECT name, dim FROM doppler.models").fetchall())
    assert models["resnet50"] == 2048 and models["efficientnet_lite0"] == 1280
    for path in PHOTOS[:3]:
        got = np.array(db.execute("SELECT doppler.extract_features(%s, 'efficientnet_lite0')", (path,)).fetchone()[0])
        want = reference_effnet(path)
        assert got.shape == (1280,)
        cos = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cos >= 0.99999 and np.abs(got - want).max() <= 1e-3, (path, cos, np.abs(got - want).max())
    # the default model is the seed's ResNet50; doppler.default_model chooses another per session
    assert len(db.execute("SELECT doppler.extract_features(%s)", (PHOTOS[0],)).fetchone()[0]) == 2048
    db.execute("SET doppler.default_model = 'efficientnet_lite0'")
    assert len(db.execute("SELECT doppler.extract_features(%s)", (PHOTOS[0],)).fetchone()[0]) == 1280
    db.execute("RESET doppler.default_model")


def test_registry_errors(db, cluster):
    with pytest.raises(psycopg.errors.UndefinedObject, match='model "nope" is not registered'):
        db.execute("SELECT doppler.extract_features(%s, 'nope')", (PHOTOS[0],))
    # a wrong dim is caught when registering, and nothing is registered
    with pytest.raises(psycopg.Error, match="produces 1280-dimensional features, but doppler.models says 512"):
        db.execute("SELECT doppler.register_model('bad_dim', %s, dim => 512)", (EFFNET,))
    with pytest.raises(psycopg.Error, match="takes 224×224 inputs, not 256×256"):
        db.execute("SELECT doppler.register_model('bad_size', %s, dim => 1280, input_size => 256)", (EFFNET,))
    with pytest.raises(psycopg.errors.UndefinedFile):
        db.execute("SELECT doppler.register_model('missing', '/no/such/model.onnx', dim => 10)")
    assert db.execute("SELECT count(*) FROM doppler.models WHERE name IN ('bad_dim', 'bad_size', 'missing')").fetchone()[0] == 0
    # registering names a file the server loads: not for plain roles
    db.execute("DROP ROLE IF EXISTS plain_user")
    db.execute("CREATE ROLE plain_user LOGIN")
    with psycopg.connect(host=cluster.dir, dbname=db.info.dbname, user="plain_user", autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT doppler.register_model('mine', '/tmp/x.onnx', dim => 10)")
        assert c.execute("SELECT count(*) FROM doppler.models").fetchone()[0] >= 1  # readable
    # a model in use cannot be removed
    register_effnet(db)
    db.execute("DROP TABLE IF EXISTS uses_effnet")
    db.execute("CREATE TABLE uses_effnet (id int PRIMARY KEY, f_img text, features real[])")
    db.execute("SELECT doppler.watch('uses_effnet', mode => 'manual', model => 'efficientnet_lite0')")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("DELETE FROM doppler.models WHERE name = 'efficientnet_lite0'")
    db.execute("DROP TABLE uses_effnet")


def test_changing_the_model_reembeds_in_the_background(db):
    register_effnet(db)
    db.execute("DROP TABLE IF EXISTS remodel")
    db.execute("CREATE TABLE remodel (id serial PRIMARY KEY, f_img text, features real[])")
    db.execute("INSERT INTO remodel (f_img) SELECT unnest(%s::text[])", (PHOTOS,))
    n = len(PHOTOS)
    msg = db.execute("SELECT doppler.watch('remodel', mode => 'manual')").fetchone()[0]
    assert "resnet50@1" in msg
    cols = [r[0] for r in db.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'remodel'::regclass AND attnum > 0 AND NOT attisdropped")]
    assert "features_model" in cols  # added by watch
    # (the worker fills manual tables too, but fill waits for the rows its pass holds: nothing is
    # left to do when fill returns)
    db.execute("CALL doppler.fill('remodel')")
    assert model_status(db, "remodel") == {"model": "resnet50@1", "total": n, "done": n, "pending": 0, "stale": 0}
    assert db.execute("SELECT count(*) FROM remodel WHERE features_model = 'resnet50@1'").fetchone()[0] == n

    # another model: the old vectors stay readable, counted stale, until replaced
    db.execute("SELECT doppler.watch('remodel', mode => 'manual', model => 'efficientnet_lite0')")
    s = model_status(db, "remodel")
    assert s == {"model": "efficientnet_lite0@1", "total": n, "done": 0, "pending": n, "stale": n}
    assert db.execute("SELECT count(*) FROM remodel WHERE cardinality(features) = 2048").fetchone()[0] == n
    # search uses the table's model and skips vectors of the old one
    assert db.execute("SELECT count(*) FROM doppler.similar('remodel', %s::text)", (PHOTOS[0],)).fetchone()[0] == 0
    db.execute("CALL doppler.fill('remodel')")  # (re-embeds every stale row, or waits for the worker's)
    assert model_status(db, "remodel") == {"model": "efficientnet_lite0@1", "total": n, "done": n, "pending": 0, "stale": 0}
    rows = db.execute("SELECT f_img, features, features_model FROM remodel ORDER BY id").fetchall()
    for path, vec, tag in rows:
        assert tag == "efficientnet_lite0@1" and len(vec) == 1280
    np.testing.assert_allclose(rows[0][1], reference_effnet(rows[0][0]), atol=1e-3)
    hits = db.execute("SELECT row_key, distance FROM doppler.similar('remodel', %s::text, k => 2)", (PHOTOS[0],)).fetchall()
    assert hits[0][0] == "1" and hits[0][1] < 1e-3

    # a new version of the model: the worker re-embeds the table by itself (async mode)
    db.execute("SELECT doppler.watch('remodel', model => 'efficientnet_lite0')")
    assert register_effnet(db, version="2") == "efficientnet_lite0@2"
    wait_for(lambda: model_status(db, "remodel")["done"] == n, timeout=120, what="re-embedded by the worker")
    assert db.execute("SELECT count(*) FROM remodel WHERE features_model = 'efficientnet_lite0@2'").fetchone()[0] == n
    db.execute("SELECT doppler.unwatch('remodel')")


def test_fixed_dimension_column_must_fit_the_model(db, cluster):
    if not cluster.has_pgvector():
        pytest.skip("pgvector is not installed for this server")
    register_effnet(db)
    db.execute("DROP TABLE IF EXISTS fixed_dims")
    db.execute("CREATE TABLE fixed_dims (id int PRIMARY KEY, f_img text, features vector(2048))")
    with pytest.raises(psycopg.errors.DatatypeMismatch, match='has 2048 dimensions, model "efficientnet_lite0" produces 1280'):
        db.execute("SELECT doppler.watch('fixed_dims', model => 'efficientnet_lite0')")
    db.execute("DROP TABLE fixed_dims")


def test_watch_again_keeps_the_model_and_versions_guard_changes(db):
    register_effnet(db)
    db.execute("DROP TABLE IF EXISTS keepmodel")
    db.execute("CREATE TABLE keepmodel (id serial PRIMARY KEY, f_img text, features real[])")
    db.execute("INSERT INTO keepmodel (f_img) SELECT unnest(%s::text[])", (PHOTOS[:2],))
    # a vector that was there before doppler: tagged as the table's model's, not re-embedded
    db.execute("UPDATE keepmodel SET features = array_fill(0.5::real, ARRAY[1280]) WHERE id = 1")
    db.execute("SELECT doppler.watch('keepmodel', mode => 'manual', model => 'efficientnet_lite0')")
    assert db.execute("SELECT features_model FROM keepmodel WHERE id = 1").fetchone()[0] == "efficientnet_lite0@1"
    assert model_status(db, "keepmodel") == {"model": "efficientnet_lite0@1", "total": 2, "done": 1, "pending": 1, "stale": 0}
    # watching again without a model keeps it (no re-embedding because batch_size changed)
    msg = db.execute("SELECT doppler.watch('keepmodel', mode => 'manual', batch_size => 8)").fetchone()[0]
    assert "efficientnet_lite0@1" in msg
    assert model_status(db, "keepmodel")["model"] == "efficientnet_lite0@1"
    # the same version with other preprocessing is refused: vectors are tagged name@version
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="registered with another file or preprocessing"):
        db.execute("SELECT doppler.register_model('efficientnet_lite0', %s, dim => 1280)", (EFFNET,))
    db.execute("SELECT doppler.unwatch('keepmodel')")
    db.execute("DROP TABLE keepmodel")


def test_cuda_falls_back_to_the_cpu_with_a_warning(db):
    """No CUDA here (the CPU build of ONNX Runtime): execution_provider = 'cuda' builds a session
    of its own, which says in a WARNING that it runs on the CPU, and gives the same features."""
    q = "SELECT doppler.extract_features(%s::text)"
    cpu = db.execute(q, (PHOTOS[0],)).fetchone()[0]
    created = db.execute("SELECT sessions_created FROM doppler.session_info() LIMIT 1").fetchone()[0]
    notices = []
    db.add_notice_handler(lambda n: notices.append((n.severity_nonlocalized, n.message_primary)))
    db.execute("SET doppler.execution_provider = 'cuda'")
    try:
        assert db.execute(q, (PHOTOS[0],)).fetchone()[0] == cpu
        row = db.execute("SELECT execution_provider, sessions_created FROM doppler.session_info() LIMIT 1").fetchone()
        assert row == ("CPU", created + 1), row
        assert any(sev == "WARNING" and "execution_provider is cuda but the model runs on the CPU" in m
                   for sev, m in notices), notices
    finally:
        db.execute("RESET doppler.execution_provider")
