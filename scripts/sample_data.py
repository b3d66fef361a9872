#!/usr/bin/env python3
"""Real sample photos and the ImageNet class names, from PyPI wheels, without installing them.

    python scripts/sample_data.py photos DEST   # extract the photos into DEST, print their paths
    python scripts/sample_data.py classes       # print the 1000 ImageNet class names

- photos: the sample images bundled in scikit-image's wheel (skimage/data/), which are real photos
  (chelsea = a cat, coffee = a cup of coffee, astronaut, rocket, motorcycle_left/right, ...). The
  synthetic images (chessboards, color wheel, horse silhouette, logo, Shepp-Logan phantom) and the
  tiny ones (microaneurysms, 102x102) are skipped.
- classes: `_IMAGENET_CATEGORIES` of torchvision's wheel (torchvision/models/_meta.py), read as
  text with ast, never imported. Index i is ImageNet class i.

Pinned (wheels for CPython 3.11, manylinux x86_64; they only serve as zip files, so the host's
platform does not matter):
    scikit-image==0.26.0   torchvision==0.29.2

The wheels are fetched once with `python -m pip download --no-deps` into the cache dir,
${DOPPLER_DEPS:-/opt/doppler}/cache (override: DOPPLER_CACHE).
"""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

SKIMAGE = ("scikit-image", "0.26.0", "scikit_image-0.26.0-")
TORCHVISION = ("torchvision", "0.29.2", "torchvision-0.29.2-")
PIP_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]

# skimage/data images that are not photographs, or too small to be of use.
SYNTHETIC = {"chessboard_GRAY.png", "chessboard_RGB.png", "color.png", "horse.png", "logo.png",
             "phantom.png"}
MIN_SIDE = 128


def cache_dir() -> Path:
    d = Path(os.environ.get("DOPPLER_CACHE")
             or Path(os.environ.get("DOPPLER_DEPS", "/opt/doppler")) / "cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wheel(pkg) -> Path:
    name, version, prefix = pkg
    d = cache_dir()
    found = sorted(p for p in d.glob(prefix + "*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--disable-pip-version-check", *PIP_PLATFORM, "-d", str(d),
                        f"{name}=={version}"], check=True)
        found = sorted(p for p in d.glob(prefix + "*.whl"))
    if not found:
        raise RuntimeError(f"pip did not leave a {name} {version} wheel in {d}")
    return found[0]


def skimage_photos(dest_dir) -> list:
    """Extract skimage's sample photos (png/jpg) into dest_dir; returns their paths, sorted.

    Idempotent: files already there with the right size are left alone."""
    from PIL import Image

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(_wheel(SKIMAGE)) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            parent, _, base = info.filename.rpartition("/")
            if parent != "skimage/data" or not base.lower().endswith((".png", ".jpg", ".jpeg")):
                continue
            if base in SYNTHETIC:
                continue
            target = dest / base
            if not (target.is_file() and target.stat().st_size == info.file_size):
                tmp = target.with_name(target.name + ".part")
                tmp.write_bytes(z.read(info))
                with Image.open(tmp) as im:
                    small = min(im.size) < MIN_SIDE
                if small:
                    tmp.unlink()
                    continue
                os.replace(tmp, target)
            out.append(target)
    return out


def imagenet_classes() -> list:
    """The 1000 ImageNet-1k class names, in class-index order (torchvision's)."""
    cached = cache_dir() / "imagenet_classes.txt"
    if cached.is_file():
        names = cached.read_text(encoding="utf-8").splitlines()
        if len(names) == 1000:
            return names
    with zipfile.ZipFile(_wheel(TORCHVISION)) as z:
        src = z.read("torchvision/models/_meta.py").decode("utf-8")
    names = None
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_IMAGENET_CATEGORIES" for t in node.targets):
            names = ast.literal_eval(node.value)
    if not names or len(names) != 1000:
        raise RuntimeError("no 1000-entry _IMAGENET_CATEGORIES in torchvision/models/_meta.py")
    tmp = cached.with_name(cached.name + ".part")
    tmp.write_text("\n".join(names) + "\n", encoding="utf-8")
    os.replace(tmp, cached)
    return list(names)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "photos":
        for p in skimage_photos(argv[1]):
            print(p)
    elif argv == ["classes"]:
        for i, n in enumerate(imagenet_classes()):
            print(i, n)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
