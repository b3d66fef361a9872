#!/usr/bin/env python3
"""Export torchvision's ImageNet-pretrained ResNet50, with the final fc removed, to ONNX.

This is the seed's model (`models.resnet50(pretrained=True)`, `nn.Sequential(*children[:-1])`),
for users with `torch`, `torchvision`, `onnx` and internet access (the weights are downloaded
from torchvision's hub). It is not run in CI: tests use scripts/build_resnet50.py.

    pip install torch torchvision onnx
    python scripts/export_resnet50.py --out resnet50.onnx
    # postgresql.conf: doppler.model_path = '/abs/path/resnet50.onnx'

Output: input `input` [N,3,224,224] float32, output `features` [N,2048] float32, dynamic batch.
"""
import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()

    import torch
    from torch import nn
    from torchvision import models

    weights = models.ResNet50_Weights.IMAGENET1K_V1  # what pretrained=True meant in the seed
    body = nn.Sequential(*list(models.resnet50(weights=weights).children())[:-1])
    model = nn.Sequential(body, nn.Flatten(1)).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.onnx.export(
        model, x, a.out, input_names=["input"], output_names=["features"],
        dynamic_axes={"input": {0: "N"}, "features": {0: "N"}}, opset_version=a.opset,
    )
    import onnx
    onnx.checker.check_model(onnx.load(a.out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
