"""lambda_max on a near-degenerate MLP spectrum: sparseopt's Lanczos vs PyHessian's power iteration, at equal accuracy.

Problem (built so the top two Hessian eigenvalues are within 1e-4 relative, by construction and verified exactly):
  * two identical tanh MLP towers (20 -> 32 -> 10 each, 2,004 parameters in total, no BatchNorm/Dropout) side by
    side, on fixed random data (512 x 20, 10 classes); loss = CE(tower A) + (1 + DELTA) * CE(tower B), DELTA = 5e-5.
    The Hessian is block-diagonal with blocks H_A and (1 + DELTA) H_A, so every eigenvalue of H_A appears twice,
    DELTA apart (relative): lambda_1 / lambda_2 - 1 = DELTA exactly. The rest of the spectrum is dense near the
    top too (lambda_3 / lambda_1 ~ 0.98), which is what makes a power iteration stop early.
  * reference: the exact Hessian (sparseopt's ``exact_hessian``, float64 copy of the model) + ``eigvalsh``.
  * both contenders run on the float32 model (PyHessian draws float32 random vectors, so it cannot run a float64
    model unpatched; float32 is also the usual setting). The float32/float64 difference is far below 1e-3.

Accuracy phase (untimed): relative error |lambda - lambda_ref| / lambda_ref over SEEDS random starts:
  * sparseopt ``lanczos(op, k=1, tol=0, max_iter=m)`` for m = 2, 3, ...: the smallest m reaching 1e-3 for every
    seed; its Hessian-vector products (HVPs) = m + 1 (lanczos computes one exact residual product at the end);
    and ``lanczos(op, k=1, tol=t)`` (its own stopping rule) for a few t;
  * PyHessian 0.1 ``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues()`` at its defaults
    (maxIter=100, tol=1e-3, top_n=1): its error and HVP count per seed; then one long run (tol=0) per seed with
    ``hessian_vector_product`` wrapped to record the Rayleigh quotient of every iterate: the smallest number of
    HVPs after which the estimate stays within 1e-3; and its own ``tol`` lowered (maxIter=5000) until every seed
    reaches 1e-3.
Timed phase (1 thread, warm-up, interleaved, medians; one timed call = one full measurement from the model:
HessianOperator + lanczos for sparseopt; hessian(...) construction (forward + create_graph backward) + eigenvalues()
for PyHessian, whose random start is seeded in the untimed prepare):
  pyhessian@1e-3  PyHessian with the smallest ``tol`` that reached 1e-3 on every seed (the baseline)
  pyhessian-fixed PyHessian with tol=0, maxIter = the smallest iteration count that reached 1e-3 on every seed
                  (an oracle budget: nobody knows it in advance)
  sparseopt-tol   lanczos(k=1, tol=t*) with the largest tested t that reached 1e-3 on every seed
  sparseopt-fixed lanczos(k=1, tol=0, max_iter=m*) (oracle budget, as above)
  pyhessian-default  PyHessian at its defaults (NOT at equal accuracy: context)

PyHessian is installed for this benchmark only: ``.venv/bin/pip install --no-deps pyhessian`` (never with its
dependencies, which would replace the CPU torch). It runs on torch 2.13 unpatched; the only wrapping is the
untimed HVP recorder of the accuracy phase (restored before timing).

Run:  .venv/bin/python benchmarks/bench_hessian.py [--reps 21] [--seeds 5]
Result: benchmarks/results/hessian.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, format_table, setup_torch, summarize, time_interleaved, write_json  # noqa: E402

from sparseopt.diagnostics import HessianOperator, lanczos  # noqa: E402
from sparseopt.diagnostics.hessian import exact_hessian  # noqa: E402

D_IN, HIDDEN, CLASSES, N = 20, 32, 10, 512
DELTA = 5e-5
TARGET = 1e-3
HVP_GOAL = 30


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(D_IN, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class TwinMLP(nn.Module):
    """Two identical towers; logits of A then B."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Tower()
        self.b = Tower()
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def twin_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[:, :CLASSES], y) + (1 + DELTA) * F.cross_entropy(out[:, CLASSES:], y)


def build_problem():
    torch.manual_seed(0)
    model = TwinMLP()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return model, x, y


def reference_spectrum(model, x, y) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    op = HessianOperator(m64, x.double(), y, twin_loss, physical_batch=N)
    h = exact_hessian(op)
    asym = float((h - h.T).abs().max() / h.abs().max())
    assert asym < 1e-10, asym
    return torch.linalg.eigvalsh(h).flip(0)


def rel(lam: float, ref: float) -> float:
    return abs(lam - ref) / abs(ref)


# ---- PyHessian helpers ---------------------------------------------------------------------------------------------
def pyhessian_run(model, x, y, seed: int, max_iter: int, tol: float):
    import pyhessian
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # torch's "backward(create_graph=True) makes a reference cycle" warning
        h = pyhessian.hessian(model, twin_loss, data=(x, y), cuda=False)
        vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
    for p in model.parameters():
        p.grad = None
    return vals[0]


class HVPRecorder:
    """Wraps pyhessian.hessian.hessian_vector_product: counts products and records v.Hv of every iterate."""

    def __init__(self) -> None:
        import pyhessian  # noqa: F401  (the package re-exports the class under the module's name)
        ph = sys.modules["pyhessian.hessian"]
        self.ph, self.orig = ph, ph.hessian_vector_product
        self.quotients: list[float] = []

    def __enter__(self):
        def wrapped(gradsH, params, v):
            hv = self.orig(gradsH, params, v)
            self.quotients.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
            return hv
        self.ph.hessian_vector_product = wrapped
        return self

    def __exit__(self, *exc):
        self.ph.hessian_vector_product = self.orig


def first_stable(errors: list[float], target: float) -> int | None:
    """1-based count after which every later error is <= target (None if the last one is not)."""
    n = None
    for i in range(len(errors) - 1, -1, -1):
        if errors[i] <= target:
            n = i + 1
        else:
            break
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--seeds", type=int, default=5, help="random starts in the accuracy phase")
    ap.add_argument("--long", type=int, default=1000, help="PyHessian iterations of the recorded long run")
    args = ap.parse_args(argv)
    setup_torch(1)
    seeds = list(range(args.seeds))
    if importlib.util.find_spec("pyhessian") is None:
        print("pyhessian is not installed: .venv/bin/pip install --no-deps pyhessian", file=sys.stderr)
        return {}

    model, x, y = build_problem()
    ev = reference_spectrum(model, x, y)
    l1, l2, l3 = (float(v) for v in ev[:3])
    gap = (l1 - l2) / l1
    print(f"TwinMLP 2x({D_IN}-{HIDDEN}-{CLASSES} tanh), {sum(p.numel() for p in model.parameters())} params, "
          f"{N} examples; torch {torch.__version__}, {torch.get_num_threads()} thread")
    print(f"exact spectrum (float64): lambda1={l1:.10g} lambda2={l2:.10g} (relative gap {gap:.3e}) "
          f"lambda3={l3:.6g} (lambda3/lambda1={l3 / l1:.4f})")

    # ---- accuracy phase: sparseopt ----
    so_model = copy.deepcopy(model)
    op = HessianOperator(so_model, x, y, twin_loss, physical_batch=N)
    sweep = []
    m_star = None
    for m in range(2, 61):
        errs = []
        for s in seeds:
            r = lanczos(op, k=1, tol=0.0, max_iter=m, seed=s)
            errs.append(rel(r.eigenvalues[0], l1))
        sweep.append({"max_iter": m, "matvecs": r.matvecs, "max_rel_err": max(errs), "rel_errs": errs})
        if max(errs) <= TARGET:
            m_star, so_fixed_hvps = m, r.matvecs
            break
    tol_runs = []
    for t in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
        runs = [lanczos(op, k=1, tol=t, seed=s) for s in seeds]
        tol_runs.append({"tol": t, "matvecs": [r.matvecs for r in runs],
                         "rel_errs": [rel(r.eigenvalues[0], l1) for r in runs]})
    ok_tols = [d for d in tol_runs if max(d["rel_errs"]) <= TARGET]
    so_tol = ok_tols[0] if ok_tols else None        # the largest (cheapest) tol that reaches the target
    print(f"\nsparseopt lanczos, fixed budget: smallest max_iter with rel. error <= {TARGET:g} on all {len(seeds)} "
          f"seeds: {m_star} -> {so_fixed_hvps} HVPs (incl. the residual product); worst error "
          f"{sweep[-1]['max_rel_err']:.2e}")
    for d in tol_runs:
        print(f"  lanczos tol={d['tol']:g}: HVPs {d['matvecs']}, worst rel. error {max(d['rel_errs']):.2e}")

    # ---- accuracy phase: PyHessian ----
    ph_model = copy.deepcopy(model)
    default_runs = []
    for s in seeds:
        with HVPRecorder() as rec:
            lam = pyhessian_run(ph_model, x, y, s, 100, 1e-3)
        default_runs.append({"seed": s, "hvps": len(rec.quotients), "eigenvalue": lam, "rel_err": rel(lam, l1)})
    print(f"\nPyHessian defaults (maxIter=100, tol=1e-3): HVPs {[d['hvps'] for d in default_runs]}, rel. errors "
          f"{[round(d['rel_err'], 4) for d in default_runs]} (median {statistics.median(d['rel_err'] for d in default_runs):.2%})")
    long_runs = []
    for s in seeds:
        with HVPRecorder() as rec:
            pyhessian_run(ph_model, x, y, s, args.long, 0.0)
        errs = [rel(q, l1) for q in rec.quotients]
        long_runs.append({"seed": s, "hvps_to_target": first_stable(errs, TARGET), "final_rel_err": errs[-1],
                          "err_at": {n: errs[n - 1] for n in (10, 30, 100, 300, 1000) if n <= len(errs)}})
    need = [d["hvps_to_target"] for d in long_runs]
    ph_fixed = max(need) if all(n is not None for n in need) else None
    print(f"PyHessian tol=0 long runs ({args.long} its): HVPs until the estimate stays within {TARGET:g}: {need}; "
          f"error after 30 HVPs: {[round(d['err_at'].get(30, float('nan')), 4) for d in long_runs]}")
    ph_tol_runs = []
    ph_tol = None
    for t in (1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        hv, errs = [], []
        for s in seeds:
            with HVPRecorder() as rec:
                lam = pyhessian_run(ph_model, x, y, s, 5000, t)
            hv.append(len(rec.quotients))
            errs.append(rel(lam, l1))
        ph_tol_runs.append({"tol": t, "hvps": hv, "rel_errs": errs})
        print(f"  PyHessian tol={t:g} (maxIter=5000): HVPs {hv}, worst rel. error {max(errs):.2e}")
        if max(errs) <= TARGET:
            ph_tol = t
            break

    # ---- timed phase ----
    def so_runner(**kw):
        def run():
            o = HessianOperator(so_model, x, y, twin_loss, physical_batch=N)
            return lanczos(o, k=1, seed=0, **kw)
        return run

    def ph_runner(max_iter, tol):
        return lambda: pyhessian_run(ph_model, x, y, 0, max_iter, tol)

    contenders = []
    if ph_tol is not None:
        contenders.append(Contender("pyhessian@1e-3", ph_runner(5000, ph_tol), note=f"tol={ph_tol:g}, maxIter=5000"))
    if ph_fixed is not None:
        contenders.append(Contender("pyhessian-fixed", ph_runner(ph_fixed, 0.0), note=f"tol=0, maxIter={ph_fixed}"))
    if so_tol is not None:
        contenders.append(Contender("sparseopt-tol", so_runner(tol=so_tol["tol"]), note=f"lanczos tol={so_tol['tol']:g}"))
    contenders.append(Contender("sparseopt-fixed", so_runner(tol=0.0, max_iter=m_star),
                                note=f"lanczos tol=0, max_iter={m_star}"))
    contenders.append(Contender("pyhessian-default", ph_runner(100, 1e-3), note="maxIter=100, tol=1e-3 (NOT 1e-3 accurate)"))
    baseline = contenders[0].name
    print(f"\ntiming {len(contenders)} contenders, {args.reps} reps, interleaved:", file=sys.stderr)
    times = time_interleaved(contenders, reps=args.reps, warmup=2)
    rows = summarize(times, baseline)
    for r, c in zip(rows, contenders):
        r["note"] = c.note
    print(f"\nTime per lambda_max measurement (ms; ratios against {baseline})")
    print(format_table(rows, baseline, unit="ms", scale=1e3))
    for r, c in zip(rows, contenders):
        print(f"  {c.name}: {c.note}")

    by = {r["name"]: r for r in rows}
    verdict = {"top_two_within_1e-4": gap <= 1e-4,
               f"lanczos_hvps_to_1e-3_le_{HVP_GOAL}": so_fixed_hvps <= HVP_GOAL,
               "lanczos_tol_run_hvps_le_30": (max(so_tol["matvecs"]) <= HVP_GOAL) if so_tol else False,
               "pyhessian_default_median_rel_err": statistics.median(d["rel_err"] for d in default_runs)}
    ratios = {}
    for so_name in ("sparseopt-tol", "sparseopt-fixed"):
        for ph_name in ("pyhessian@1e-3", "pyhessian-fixed"):
            if so_name in by and ph_name in by:
                a, b = times[so_name], times[ph_name]
                ratios[f"{so_name}/{ph_name}"] = {
                    "ratio_of_medians": statistics.median(a) / statistics.median(b),
                    "median_paired_ratio": statistics.median(p / q for p, q in zip(a, b))}
    print("\nsparseopt / PyHessian at equal accuracy (1e-3):")
    for k, v in ratios.items():
        print(f"  {k}: {v['ratio_of_medians']:.3f} (ratio of medians), {v['median_paired_ratio']:.3f} (paired)")
    print(f"verdict: {verdict}")

    payload = {
        "setting": {"model": f"TwinMLP 2x({D_IN}-{HIDDEN}-{CLASSES} tanh)", "examples": N, "delta": DELTA,
                    "loss": "CE(A) + (1+delta) CE(B)", "dtype_contenders": "float32",
                    "dtype_reference": "float64 exact Hessian", "target_rel_err": TARGET, "seeds": seeds,
                    "reps": args.reps},
        "reference": {"lambda1": l1, "lambda2": l2, "lambda3": l3, "rel_gap_12": gap, "top10": ev[:10].tolist()},
        "sparseopt": {"fixed_budget_sweep": sweep, "max_iter_star": m_star, "hvps_to_target": so_fixed_hvps,
                      "tol_runs": tol_runs, "tol_star": so_tol["tol"] if so_tol else None},
        "pyhessian": {"default_runs": default_runs, "long_runs": long_runs, "fixed_hvps_to_target": ph_fixed,
                      "tol_runs": ph_tol_runs, "tol_star": ph_tol},
        "rows": rows, "ratios_equal_accuracy": ratios, "verdict": verdict,
    }
    path = write_json("hessian", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
