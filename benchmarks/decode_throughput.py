"""Decode + augment throughput per CPU core: how many DataLoader workers feed a GPU.

Generates JPEGs with ImageNet's typical size (longer side 400-500 px, aspect ratio 3:4 to 4:3,
quality 90, smooth content with noise and edges; deterministic from ``--seed``) and times, in
one process on one thread, the CPU seconds each path spends per image from file to the uint8
``[3, S, S]`` tensor a worker hands to the loader (``time.process_time``, so other processes on
the machine do not count). The paths:

* ``pillow_centre_square``: the evaluation view (largest centred square, Pillow with ``draft``),
  which was also the training input before the crop moved to the workers;
* ``pillow_rrc``: the training view, I-JEPA's random resized crop from the whole image, Pillow
  (``draft`` where the crop allows it, i.e. where a 1/2, 1/4, 1/8 scale still holds S pixels),
  bilinear resize;
* ``pillow_rrc_no_draft``: the same without ``draft`` (what ``draft`` buys);
* ``pillow_rrc_bicubic``: the same with the bicubic filter (what the bilinear one buys);
* ``simplejpeg_rrc``: the training view with ``data.decoder=simplejpeg``;
* ``decode_only_pillow`` / ``decode_only_simplejpeg``: the full decode alone;
* ``torchvision_decode_jpeg``: ``torchvision.io.decode_jpeg`` + ``resized_crop``, only where
  torchvision imports (it is reported as unavailable, with the error, where it does not);
* every path again under each ``--interpreter NAME=PYTHON`` (e.g. a venv with pillow-simd),
  suffixed ``@NAME``.

Writes one JSON (``--out``): images/s per core per path (median of ``--passes`` passes after
one warm pass) and the cores that feed 3000 images/s (decode + crop only: collate, the copy to
the trainer and the GPU transfer come on top). Never asserts a speed.

    python benchmarks/decode_throughput.py --passes 5 \\
        --out docs/results/decode_throughput/cpu.json \\
        --interpreter pillow-simd=/tmp/simd-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hjepa.data.decode import RandomResizedCrop, decode_pillow, require_simplejpeg
from hjepa.data.image_folder import ImageFolder

TARGET_RATE = 3000  # images/s: ViT-S/16's goal on one H100 (issue 26)


def make_jpegs(folder: Path, count: int, seed: int, quality: int = 90) -> list[Path]:
    """``count`` JPEGs of ImageNet-like size and content under ``folder/train/c0`` (and one in
    ``val/c0``, so the train split holds them all)."""
    rng = np.random.default_rng(seed)
    paths = []
    for split in ("train", "val"):
        (folder / split / "c0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        longer = int(rng.integers(400, 501))
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))  # width / height
        w, h = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
        for _ in range(6):  # edges: flat rectangles
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
            pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        pixels += rng.normal(0, 20, pixels.shape)  # texture: ~110 KiB a file, as ImageNet's
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        path = folder / "train" / "c0" / f"{i:05d}.jpg"
        image.save(path, quality=quality)
        paths.append(path)
    Image.open(paths[0]).save(folder / "val" / "c0" / "0.jpg")
    return paths


def _no_draft(path: str, seed: int, size: int) -> np.ndarray:
    box_of, flip = RandomResizedCrop().draw(torch.Generator().manual_seed(seed))
    with Image.open(path) as img:
        x0, y0, w, h = box_of(*img.size)
        W, H = img.size
        box = (x0 * W, y0 * H, (x0 + w) * W, (y0 + h) * H)
        out = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out)


def _bicubic(path: str, seed: int, size: int) -> np.ndarray:
    box_of, flip = RandomResizedCrop().draw(torch.Generator().manual_seed(seed))
    return decode_pillow(path, "RGB", box_of, size, flip, Image.Resampling.BICUBIC)[0]


def _decode_only(name: str):
    """The full-size decode alone (no draft, no crop, no resize)."""
    if name == "simplejpeg":
        simplejpeg = require_simplejpeg()

        def run(path: str, seed: int, size: int) -> np.ndarray:
            with open(path, "rb") as f:
                return simplejpeg.decode_jpeg(f.read(), colorspace="RGB")

        return run

    def run_pillow(path: str, seed: int, size: int) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    return run_pillow


def _torchvision_path():
    """``torchvision.io.decode_jpeg`` + ``resized_crop``, or the one-line reason it is absent."""
    try:
        from torchvision.io import decode_jpeg, read_file
        from torchvision.transforms.v2.functional import resized_crop
    except Exception as exc:  # noqa: BLE001 (a CUDA build fails in many ways beside CPU torch)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def run(path: str, seed: int, size: int) -> torch.Tensor:
        image = decode_jpeg(read_file(path))
        box_of, _ = RandomResizedCrop().draw(torch.Generator().manual_seed(seed))
        x0, y0, w, h = box_of(image.shape[2], image.shape[1])
        H, W = image.shape[1:]
        box = (round(y0 * H), round(x0 * W), round(h * H), round(w * W))
        return resized_crop(image, *box, [size, size], antialias=True)

    return run


def paths_to_time(root: Path, size: int) -> tuple[dict, dict]:
    """``(name -> run(path, seed, size), name -> why it is unavailable)``."""
    crop = RandomResizedCrop()
    runs, missing = {}, {}
    for name in ("pillow", "simplejpeg"):
        try:
            folder = ImageFolder(root, "train", image_size=size, decoder=name, train_crop=crop)
        except ImportError as exc:
            missing[f"{name}_rrc"] = str(exc)
            continue
        runs[f"{name}_rrc"] = lambda p, s, _, ds=folder: ds.load(p, s)
        runs[f"decode_only_{name}"] = _decode_only(name)
        if name == "pillow":
            runs["pillow_centre_square"] = lambda p, s, _, ds=folder: ds.load(p)
            runs["pillow_rrc_no_draft"] = _no_draft
            runs["pillow_rrc_bicubic"] = _bicubic
    tv = _torchvision_path()
    if isinstance(tv, str):
        missing["torchvision_decode_jpeg"] = tv
    else:
        runs["torchvision_decode_jpeg"] = tv
    return runs, missing


def time_path(run, files: list[str], size: int, passes: int) -> dict:
    """CPU seconds per pass over ``files`` (image ``i`` cropped from seed ``i``), one warm pass
    first; images/s per core from the median pass."""
    seconds = []
    for p in range(passes + 1):
        start = time.process_time()
        for i, path in enumerate(files):
            run(path, i, size)
        if p:
            seconds.append(time.process_time() - start)
    rate = len(files) / statistics.median(seconds)
    return {
        "images_per_s_per_core": round(rate, 1),
        "cores_for_3000": math.ceil(TARGET_RATE / rate),
        "cpu_s_per_pass": [round(s, 3) for s in seconds],
    }


def measure(root: Path, size: int, passes: int) -> dict:
    files = [str(p) for p in sorted((root / "train" / "c0").glob("*.jpg"))]
    runs, missing = paths_to_time(root, size)
    import PIL

    out = {"pil": PIL.__version__, "paths": {}, "unavailable": missing}
    for name, run in runs.items():
        out["paths"][name] = time_path(run, files, size, passes)
    return out


def _other_interpreter(name: str, python: str, root: Path, args) -> dict:
    here = [python, __file__, "--files", str(root), "--size", str(args.size)]
    done = subprocess.run(
        [*here, "--passes", str(args.passes), "--inner"], capture_output=True, text=True
    )
    if done.returncode:
        return {"unavailable": {f"*@{name}": done.stderr.strip().splitlines()[-1]}}
    return json.loads(done.stdout)


def _describe_files(root: Path) -> dict:
    files = sorted((root / "train" / "c0").glob("*.jpg"))
    sizes = [Image.open(f).size for f in files]
    return {
        "count": len(files),
        "mean_kib": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1),
        "mean_width": round(float(np.mean([s[0] for s in sizes])), 1),
        "mean_height": round(float(np.mean([s[1] for s in sizes])), 1),
    }


def report(root: Path, args) -> dict:
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "image_size": args.size,
        "target_images_per_s": TARGET_RATE,
        "files": _describe_files(root),
        "threads": torch.get_num_threads(),
    }
    own = measure(root, args.size, args.passes)
    result.update(pil=own["pil"], paths=own["paths"], unavailable=own["unavailable"])
    for spec in args.interpreter:
        name, python = spec.split("=", 1)
        other = _other_interpreter(name, python, root, args)
        result[f"pil@{name}"] = other.get("pil")
        for path, numbers in other.get("paths", {}).items():
            result["paths"][f"{path}@{name}"] = numbers
        for path, why in other.get("unavailable", {}).items():
            result["unavailable"][f"{path}@{name}"] = why
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (printed too)")
    parser.add_argument("--count", type=int, default=300, help="JPEGs to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="output side (data.image_size)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per path")
    parser.add_argument(
        "--interpreter",
        action="append",
        default=[],
        help="NAME=PYTHON: also time every path under that interpreter (e.g. pillow-simd)",
    )
    parser.add_argument("--files", help="an existing folder from a previous run (no generation)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per core: one worker process decodes on one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.inner:
        print(json.dumps(measure(Path(args.files), args.size, args.passes)))
        return 0
    with tempfile.TemporaryDirectory(prefix="hjepa_decode_") as tmp:
        root = Path(args.files) if args.files else Path(tmp)
        if not args.files:
            make_jpegs(root, args.count, args.seed)
        result = report(root, args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
