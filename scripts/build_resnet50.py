#!/usr/bin/env python3
"""Build ONNX feature-extractor graphs with seeded random weights, using only `onnx` + `numpy`.

* default: torchvision's ResNet-50 layout (conv1/bn1/relu/maxpool, layer1..layer4 of Bottleneck blocks
  [3, 4, 6, 3], global average pool) with the final fc removed. Batch norm is folded into the
  convolutions (as torch.onnx.export does in eval mode). Input `input` [N,3,224,224] float32,
  output `features` [N,2048]. Weights are random (He init, seeded): the features are not
  meaningful, but the arithmetic is the real ResNet-50's, which is what parity tests and
  benchmarks need. The real ImageNet weights come from scripts/export_resnet50.py.
* --tiny: a small conv net with the same input and a 16-d output, for fast model-switch tests.
* --wrong-shape: a model whose input is [N,1,28,28], for the "model does not fit" error test.
* --tiny-wide: as cheap as --tiny, with 2048 features (the scale benchmark).
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, arr, p):
        nm = self.name(p)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), nm))
        return nm

    def conv_bn(self, x, cin, cout, k, stride, pad, relu=True, gamma_scale=1.0):
        """Conv (no bias) + BatchNorm(eval) folded into one Conv with bias, optional ReLU."""
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        gamma = (1.0 + 0.1 * self.rng.standard_normal(cout)) * gamma_scale
        beta = 0.1 * self.rng.standard_normal(cout)
        mean = 0.05 * self.rng.standard_normal(cout)
        var = 1.0 + 0.1 * np.abs(self.rng.standard_normal(cout))
        scale = gamma / np.sqrt(var + 1e-5)
        wf = w * scale[:, None, None, None]
        bf = beta - mean * scale
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const(wf, "W"), self.const(bf, "B")], [y],
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if relu:
            r = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [r]))
            return r
        return y

    def bottleneck(self, x, cin, width, stride, downsample):
        out = self.conv_bn(x, cin, width, 1, 1, 0)
        out = self.conv_bn(out, width, width, 3, stride, 1)
        # Small last-BN gamma keeps activations bounded through 16 residual blocks.
        out = self.conv_bn(out, width, width * 4, 1, 1, 0, relu=False, gamma_scale=0.2)
        idt = self.conv_bn(x, cin, width * 4, 1, stride, 0, relu=False) if downsample else x
        s = self.name("add")
        self.nodes.append(helper.make_node("Add", [out, idt], [s]))
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    def head(self, x):
        g = self.name("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
        self.nodes.append(helper.make_node("Flatten", [g], ["features"], axis=1))


def resnet50(seed):
    b = Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2, 3)
    mp = b.name("maxpool")
    b.nodes.append(helper.make_node("MaxPool", [x], [mp], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = mp, 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            x = b.bottleneck(x, cin, width, stride if i == 0 else 1, downsample=(i == 0))
            cin = width * 4
    b.head(x)
    return b, 3, 224, 2048, "doppler-seeded-resnet50"


def tiny(seed):
    b = Builder(seed)
    x = b.conv_bn("input", 3, 8, 3, 2, 1)
    x = b.conv_bn(x, 8, 16, 3, 2, 1)
    b.head(x)
    return b, 3, 224, 16, "doppler-tiny"


def tiny_wide(seed):
    """tiny's cost with ResNet-50's output: 2048 features (for benchmarks of the database side)."""
    b = Builder(seed)
    x = b.conv_bn("input", 3, 8, 3, 2, 1)
    x = b.conv_bn(x, 8, 16, 3, 2, 1)
    x = b.conv_bn(x, 16, 2048, 1, 4, 0)
    b.head(x)
    return b, 3, 224, 2048, "doppler-tiny-wide"


def wrong_shape(seed):
    b = Builder(seed)
    x = b.conv_bn("input", 1, 8, 3, 1, 1)
    b.head(x)
    return b, 1, 28, 8, "doppler-wrong-shape"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20210222)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true")
    g.add_argument("--wrong-shape", action="store_true")
    g.add_argument("--tiny-wide", action="store_true")
    a = ap.parse_args()
    make = tiny if a.tiny else wrong_shape if a.wrong_shape else tiny_wide if a.tiny_wide else resnet50
    b, ch, size, dim, name = make(a.seed)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", ch, size, size])
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])
    graph = helper.make_graph(b.nodes, name, [inp], [out], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="doppler")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, a.out)
    print(f"wrote {a.out}: {name}, input [N,{ch},{size},{size}], output [N,{dim}]")


if __name__ == "__main__":
    main()
