"""Export sizes and CSR inference speed of a 95%-sparse MLP 4096-4096-4096-10 with BatchNorm.

The model is trained for 0 steps (sizes and speeds do not depend on the values): ``SparseTraining(density=0.05,
distribution="uniform", prune_first_layer=True)`` masks all three Linear weights. Reported:
  * file sizes: ``export_sparse`` (values + bit-packed masks) vs a dense safetensors file of ``bake(...)``;
  * inference (eval mode, no_grad) of the baked dense model vs ``csr_for_inference`` at batch 1 and 256, one
    thread (and ``--threads``), interleaved repetitions, medians and paired ratios.

Run:  .venv/bin/python benchmarks/bench_export.py [--reps 21] [--threads 1]
Result: benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, format_table, setup_torch, summarize, time_interleaved, write_json  # noqa: E402

import sparseopt as so  # noqa: E402
from sparseopt.execution import csr_for_inference  # noqa: E402
from sparseopt.export import bake, export_sparse  # noqa: E402

WIDTHS = (4096, 4096, 4096, 10)
DENSITY = 0.05


def bn_mlp(widths=WIDTHS) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=i == len(widths) - 2))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    setup_torch(args.threads)
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = so.SparseTraining(model, opt, density=DENSITY, distribution="uniform", prune_first_layer=True)
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        summary = export_sparse(Path(tmp) / "sparse.safetensors", sparse)
        save_file(bake(sparse), str(Path(tmp) / "dense.safetensors"))
        dense_file = (Path(tmp) / "dense.safetensors").stat().st_size
    print(f"export: {summary.file_bytes / 2**20:.2f} MiB (sparse, {summary.nnz:,} active of "
          f"{summary.sparse_numel:,}) vs {dense_file / 2**20:.2f} MiB dense safetensors "
          f"= {summary.file_bytes / dense_file:.3f}x")
    model.load_state_dict(bake(sparse))
    sparse.remove()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, converted = csr_for_inference(model)
    rows = {}
    for batch in (1, 256):
        x = torch.randn(batch, WIDTHS[0])

        def runner(m, x=x):
            def run():
                with torch.no_grad():
                    m(x)
            return run
        reps = args.reps * (5 if batch == 1 else 1)
        times = time_interleaved([Contender("dense", runner(model)), Contender("csr", runner(fast))],
                                 reps=reps, warmup=2, progress=False)
        rows[batch] = summarize(times, "dense")
        print(f"\ninference batch {batch} ({reps} reps, {torch.get_num_threads()} thread(s); ms)")
        print(format_table(rows[batch], "dense", unit="ms", scale=1e3))
    payload = {"setting": {"widths": WIDTHS, "density": DENSITY, "threads": args.threads, "reps": args.reps,
                           "converted": converted},
               "sizes": {"sparse_file_bytes": summary.file_bytes, "dense_file_bytes": dense_file,
                         "ratio": summary.file_bytes / dense_file},
               "inference": {str(b): r for b, r in rows.items()}}
    print(f"\nwrote {write_json(f'export_t{args.threads}', payload)}")
    return payload


if __name__ == "__main__":
    main()
