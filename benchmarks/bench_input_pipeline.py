"""Input pipeline rates: ImageNet-style decoding per worker, and CIFAR batch augmentation on the CPU vs the device.

1. Per-image cost in one process (no DataLoader): JPEG decode + RandomResizedCrop(224) + flip, ending in a
   uint8 tensor (what the workers do now) vs a float32 tensor normalised in the worker (what they did before,
   kept here as the baseline ``to_normalized_tensor``).
2. ``DatasetLoader`` throughput over an ImageNet-layout folder of generated JPEGs (``--images``, 500x375, quality
   90), for each worker count in ``--workers``: images/s in total and per worker, timing ``--epochs`` full epochs
   after one warm-up epoch (persistent workers, so worker start-up is not timed), batches delivered to the
   device (pinned + ``non_blocking`` + normalised there on a GPU).
3. CIFAR-shaped ``random_crop_flip`` + ``Normalize`` of a 128-image uint8 batch: on the CPU vs on the device
   (the same random draws), when a GPU is present.

Run:  .venv/bin/python benchmarks/bench_input_pipeline.py [--images 256] [--workers 0,1,2] [--epochs 2]
Result: benchmarks/results/input_pipeline.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, setup_torch, summarize, time_interleaved, write_json  # noqa: E402

from sparseopt.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    build_datasets,
    random_crop_flip,
    random_resized_crop_box,
)
from sparseopt.data.image_transforms import to_uint8_tensor  # noqa: E402
from sparseopt.data.seeding import torch_generator  # noqa: E402


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """The workers' former output: float32, normalised in the worker (the baseline of part 1)."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def write_jpegs(root: Path, n: int, classes: int = 4) -> None:
    """Photo-like JPEGs (smooth colour gradients plus texture): decode cost close to real ImageNet files."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            c = i % classes
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.stack([(xx * rng.uniform(0.2, 0.5) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256
                             for _ in range(3)], -1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """TrainTransform(224)'s PIL part (RandomResizedCrop + flip), shared by both contenders."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
    out = img.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def per_image_costs(root: Path, reps: int) -> list[dict]:
    paths = sorted((root / "train").rglob("*.JPEG"))[:32]

    def decode(to_tensor):
        def run():
            for i, path in enumerate(paths):
                with Image.open(path) as img:
                    to_tensor(crop(img.convert("RGB"), np.random.default_rng(i)))
        return run

    contenders = [Contender("uint8 (now)", decode(to_uint8_tensor)),
                  Contender("float32 normalised (before)", decode(to_normalized_tensor))]
    times = time_interleaved(contenders, reps=reps)
    rows = summarize(times, "uint8 (now)")
    for r in rows:
        r["images_per_s"] = len(paths) / r["median_s"]
    return rows


def loader_rates(root: Path, workers: list[int], epochs: int, device: torch.device) -> list[dict]:
    rows = []
    for w in workers:
        bundle = build_datasets("imagenet", str(root), batch_size=64, num_workers=w, seed=0,
                                **({"prefetch_factor": 4} if w else {}))
        loader = bundle.train.to(device)
        for _ in loader:  # warm-up epoch: workers start and stay (persistent)
            pass
        t0 = time.perf_counter()
        n = 0
        for _ in range(epochs):
            for x, _y in loader:
                n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        rows.append({"workers": w, "images_per_s": rate, "images_per_s_per_worker": rate / max(w, 1),
                     "batch_dtype": str(x.dtype), "batch_device": str(x.device)})
        print(f"  workers={w}: {rate:.1f} img/s ({rate / max(w, 1):.1f} per worker; batches {x.dtype} on "
              f"{x.device})", file=sys.stderr, flush=True)
        del loader, bundle
    return rows


def cifar_augment(device: torch.device, reps: int) -> list[dict]:
    batch = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    normalize = Normalize((0.5,) * 3, (0.25,) * 3)
    on_device = batch.to(device)

    def run(x):
        def step():
            for b in range(20):
                out = normalize(random_crop_flip(x, 4, generator=torch_generator(0, 1, 0, b)))
            if out.device.type == "cuda":
                torch.cuda.synchronize()
        return step

    contenders = [Contender("cpu", run(batch))]
    if device.type == "cuda":
        contenders.append(Contender(str(device), run(on_device)))
        cpu_out = random_crop_flip(batch, 4, generator=torch_generator(0, 1, 0, 0))
        dev_out = random_crop_flip(on_device, 4, generator=torch_generator(0, 1, 0, 0))
        assert torch.equal(cpu_out, dev_out.cpu()), "device crops differ from CPU crops"
    rows = summarize(time_interleaved(contenders, reps=reps), "cpu")
    for r in rows:
        r["images_per_s"] = 20 * 128 / r["median_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    setup_torch(threads=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.images)
        print("1. per-image decode + crop in one process", file=sys.stderr)
        per_image = per_image_costs(root, args.reps)
        print("2. DatasetLoader throughput", file=sys.stderr)
        loaders = loader_rates(root, [int(w) for w in args.workers.split(",")], args.epochs, device)
    print("3. CIFAR batch augmentation", file=sys.stderr)
    cifar = cifar_augment(device, args.reps)
    print("\nper image, one process (decode + RandomResizedCrop 224 + flip):")
    for r in per_image:
        print(f"  {r['name']:<28} {r['images_per_s']:8.1f} img/s   x{r['median_paired_ratio']:.3f} time vs uint8")
    print(f"\nDatasetLoader, {args.images} JPEGs 500x375, batch 64, device {device}:")
    for r in loaders:
        print(f"  workers {r['workers']}: {r['images_per_s']:8.1f} img/s total, {r['images_per_s_per_worker']:8.1f} "
              "per worker")
    print("\nCIFAR crop+flip+normalise, batch 128:")
    for r in cifar:
        print(f"  {r['name']:<8} {r['images_per_s']:12.0f} img/s")
    path = write_json("input_pipeline", {"settings": vars(args), "device": str(device), "per_image": per_image,
                                         "loader": loaders, "cifar_augment": cifar,
                                         "per_image_median_s": {r["name"]: statistics.median(r["times_s"])
                                                                for r in per_image}})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
