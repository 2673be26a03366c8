"""Run every benchmark, each in its own process (so memory and thread state do not carry over), and print a summary.

    .venv/bin/python benchmarks/run_all.py            # full runs (about 3-4 minutes on the 2-core dev machine)
    .venv/bin/python benchmarks/run_all.py --quick    # fewer repetitions: a smoke test (~1.5 min), too noisy for verdicts

Results: benchmarks/results/<name>.json (git-ignored). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    # (script, result name, full args, quick args)
    ("bench_rigl_update.py", "rigl_update", [], ["--reps", "3"]),
    ("bench_sparseopt_overhead.py", "sparseopt_overhead", [], ["--reps", "11"]),
    ("bench_hessian.py", "hessian", [], ["--reps", "5", "--seeds", "3"]),
    ("bench_export.py", "export_t1", [], ["--reps", "3"]),
    ("bench_core_overhead.py", "core_overhead", [], ["--reps", "11"]),
    ("bench_sparse_linear.py", "sparse_linear_t1", ["--reps", "3"], ["--reps", "1", "--only", "e2e"]),
    ("bench_train_throughput.py", "train_throughput", ["--models", "resnet20", "--compile", ""],
     ["--models", "resnet20", "--compile", "", "--reps", "3", "--steps", "2"]),
    ("bench_input_pipeline.py", "input_pipeline", [], ["--images", "64", "--reps", "3"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (numbers are noisier)")
    args = ap.parse_args(argv)
    failed = []
    for script, _, full, quick in BENCHMARKS:
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n=== {script} {' '.join(cmd[2:])}".rstrip(), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {script}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(script)

    print("\n=== summary")
    for script, name, _, _ in BENCHMARKS:
        path = HERE / "results" / f"{name}.json"
        if script in failed or not path.exists():
            print(f"{name}: no result")
            continue
        data = json.loads(path.read_text())
        rows = data.get("rows") or data.get("rows_per_step")
        if not rows:  # several tables: the script printed them
            print(f"{name}: written to {path} (tables in its output above)")
            continue
        base = rows[0]["name"]
        cells = ", ".join(f"{r['name']} {r['median_s']:.4g}s ({r['ratio_of_medians']:.3f}x)" for r in rows)
        print(f"{name} [medians, ratio to {base}]: {cells}; verdict {data.get('verdict')}")
        for who, why in (data.get("failures") or {}).items():
            print(f"  {who}: not measured: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
