"""The BatchNorm gradient-ratio experiment (SPEC 7.1-7.3, paper 001 Fig. 2).

Why: SparseOpt rests on one measurable claim: behind BatchNorm, a neuron with sparsity s_i gets weight gradients
amplified by 1/sqrt(1 - s_i), while without normalisation the ratio stays near 1. This module measures it.

Model (fixed by the protocol): 784 -> 64 masked Linear -> norm ("batch" / "layer" / "none") -> ReLU -> Linear(64 -> 10),
nn.Linear's default init. Per seed the dense and every sparse model share the same initial weights; the sparse
ones use an exact-count random mask on the first layer. No training: gradients of the batch-mean cross-entropy wrt the
first-layer weight on ``batches`` minibatches, BatchNorm in train mode (batch statistics, gamma=1, beta=0).

Speed: all seeds, the dense model and every sparsity run as one batched matmul per chunk of minibatches (the
sparse models stacked along the hidden axis); the forward pass is shared by the three norms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from sparseopt.masks import nnz_for_density, random_mask

NORMS = ("batch", "layer", "none")
HIDDEN, CLASSES = 64, 10
EPS = 1e-5  # BatchNorm1d / LayerNorm default


def theory(norm: str, s: float) -> float:
    """Predicted R(s): 1/sqrt(1 - s) behind BatchNorm or LayerNorm (uniform sparsity), 1 without a norm."""
    return 1.0 if norm == "none" else 1.0 / math.sqrt(1.0 - s)


# ---- model pieces ---------------------------------------------------------------------------------------------------
def _init(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.Linear's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias), from a local generator."""
    def u(shape, fan):
        return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan)
    return u((HIDDEN, d), d), u((HIDDEN,), d), u((CLASSES, HIDDEN), HIDDEN), u((CLASSES,), HIDDEN)


def _normalize(h: torch.Tensor, norm: str) -> torch.Tensor:
    """h: (..., n, H). BatchNorm (train mode) normalises over the batch axis, LayerNorm over the feature axis."""
    if norm == "batch":
        mean, var = h.mean(-2, keepdim=True), h.var(-2, unbiased=False, keepdim=True)
    elif norm == "layer":
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    else:
        return h
    return (h - mean) / torch.sqrt(var + EPS)


def _check(sparsities: Iterable[float], norms: Iterable[str]) -> tuple[list[float], list[str]]:
    sparsities, norms = [float(s) for s in sparsities], list(norms)
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"sparsities must lie in [0, 1), got {bad}")
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; choose from {NORMS}")
    if not sparsities or not norms:
        raise ValueError("give at least one sparsity and one norm")
    return sparsities, norms


def _flatten(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(len(x), -1).to(torch.float32)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    return x, y.to(torch.long)


# ---- the batched engine ----------------------------------------------------------------------------------------
def _abs_grad_sums(
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, params: list[tuple[torch.Tensor, ...]], masks: torch.Tensor,
    norms: Sequence[str], chunk: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per norm: (dense, sparse) sums of |dL/dW1| over each sparse mask's active entries, shape (S, K, B, H).

    idx: (S, B, n) minibatch indices per seed; params: per seed (W1, b1, W2, b2); masks: (S, K, H, d) bool.
    """
    S, B, n = idx.shape
    K, d = masks.shape[1], masks.shape[-1]
    W1 = torch.stack([p[0] for p in params])                                   # (S, H, d)
    b1, W2, b2 = (torch.stack([p[i] for p in params]) for i in (1, 2, 3))
    weights = torch.cat([W1.unsqueeze(1), W1.unsqueeze(1) * masks], 1)          # (S, K+1, H, d): dense first
    weights_t = weights.reshape(S, (K + 1) * HIDDEN, d).transpose(1, 2)         # (S, d, (K+1)H)
    mask_f = masks.to(torch.float32)
    mask_t = mask_f.permute(0, 2, 3, 1)                                         # (S, H, d, K)
    out = {nm: (torch.empty(S, K, B, HIDDEN), torch.empty(S, K, B, HIDDEN)) for nm in norms}
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        bc = stop - start
        xc = x[idx[:, start:stop]]                                             # (S, bc, n, d)
        yc = y[idx[:, start:stop]]                                             # (S, bc, n)
        pre = torch.bmm(xc.reshape(S, bc * n, d), weights_t)                   # (S, bc*n, (K+1)H)
        pre = pre.view(S, bc, n, K + 1, HIDDEN).permute(0, 3, 1, 2, 4)         # (S, K+1, bc, n, H)
        pre = pre + b1[:, None, None, None, :]
        for nm in norms:
            h = pre.detach().requires_grad_(True)
            a = torch.relu(_normalize(h, nm))
            logits = torch.einsum("skbnh,sch->skbnc", a, W2) + b2[:, None, None, None, :]
            target = yc[:, None].expand(S, K + 1, bc, n)
            loss = F.cross_entropy(logits.reshape(-1, CLASSES), target.reshape(-1), reduction="sum") / n
            (dh,) = torch.autograd.grad(loss, h)                                # (S, K+1, bc, n, H)
            dh = dh.permute(0, 2, 1, 4, 3).reshape(S * bc, (K + 1) * HIDDEN, n)
            grads = torch.bmm(dh, xc.reshape(S * bc, n, d)).abs_()              # |G| per config, (S*bc, (K+1)H, d)
            grads = grads.view(S, bc, K + 1, HIDDEN, d)
            sparse = (grads[:, :, 1:] * mask_f[:, None]).sum(-1)               # (S, bc, K, H)
            dense = torch.matmul(grads[:, :, 0].permute(0, 2, 1, 3), mask_t)    # (S, H, bc, K)
            out[nm][0][:, :, start:stop] = dense.permute(0, 3, 2, 1)
            out[nm][1][:, :, start:stop] = sparse.permute(0, 2, 1, 3)
    return out


def _minibatches(n_data: int, batches: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    if batch_size > n_data:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_data} examples given")
    return torch.rand(batches, n_data, generator=gen).argsort(-1)[:, :batch_size]


def _per_seed_setup(x: torch.Tensor, seeds: Sequence[int], batches: int, batch_size: int, mask_fn):
    params, masks, idx = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        params.append(_init(x.shape[1], gen))
        masks.append(mask_fn(gen))
        idx.append(_minibatches(len(x), batches, batch_size, gen))
    return params, torch.stack(masks), torch.stack(idx)


def _sd(v: torch.Tensor) -> float:
    return float(v.std(unbiased=True)) if v.numel() > 1 else 0.0


# ---- public experiments ----------------------------------------------------------------------------------------
def gradient_ratio_experiment(
    x: torch.Tensor,
    y: torch.Tensor,
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99),
    norms: Sequence[str] = ("batch", "none", "layer"),
    seeds: Iterable[int] = range(10),
    batches: int = 100,
    batch_size: int = 64,
    chunk: int = 10,
) -> dict:
    """R(s) = mean_b mean_active |G_sparse| / mean_b mean_active |G_dense| per seed, then mean/sd over seeds.

    Returns ``{"rows": [{"norm", "s", "mean", "sd", "per_seed", "theory", "mean_of_batch_ratios"}, ...],
    "slopes": {norm: slope of log R vs log(1 - s)}, "seeds", "batches", "batch_size", "seconds"}``.
    ``mean_of_batch_ratios`` averages the per-batch ratio instead (SPEC 7.1 leaves the choice open).
    """
    t0 = time.perf_counter()
    sparsities, norms = _check(sparsities, norms)
    seeds = [int(s) for s in seeds]
    x, y = _flatten(x, y)
    shape = (HIDDEN, x.shape[1])
    numel = HIDDEN * x.shape[1]

    def masks_for(gen):
        return torch.stack([random_mask(shape, nnz_for_density(numel, 1 - s), gen) for s in sparsities])

    params, masks, idx = _per_seed_setup(x, seeds, batches, batch_size, masks_for)
    sums = _abs_grad_sums(x, y, idx, params, masks, norms, chunk)
    nnz = masks.sum((-1, -2)).to(torch.float32)                                 # (S, K)
    rows, slopes = [], {}
    for nm in norms:
        dense, sparse = (t.sum(-1) / nnz[..., None] for t in sums[nm])          # per-batch active means, (S, K, B)
        ratio = sparse.mean(-1) / dense.mean(-1)                                # (S, K)
        batch_ratio = (sparse / dense).mean(-1)
        for k, s in enumerate(sparsities):
            rows.append({"norm": nm, "s": s, "mean": float(ratio[:, k].mean()), "sd": _sd(ratio[:, k]),
                         "per_seed": ratio[:, k].tolist(), "theory": theory(nm, s),
                         "mean_of_batch_ratios": float(batch_ratio[:, k].mean())})
        slopes[nm] = _loglog_slope(sparsities, ratio.mean(0).tolist())
    return {"rows": rows, "slopes": slopes, "sparsities": sparsities, "norms": norms, "seeds": seeds,
            "batches": batches, "batch_size": batch_size, "seconds": time.perf_counter() - t0}


def per_neuron_ratio_experiment(
    x: torch.Tensor,
    y: torch.Tensor,
    s_range: tuple[float, float] = (0.5, 0.98),
    norms: Sequence[str] = ("batch", "none", "layer"),
    seeds: Iterable[int] = range(10),
    batches: int = 100,
    batch_size: int = 64,
    chunk: int = 10,
) -> dict:
    """Heterogeneous per-neuron sparsity s_i ~ U(s_range), exact fan-in per row; R_i against 1/sqrt(1 - s_i).

    R_i = sum_b mean_active |G_sparse[i]| / sum_b mean_active |G_dense[i]|. Per norm returns the arrays
    ``s_i``, ``R_i`` (seeds x 64), ``theory_i`` (1/sqrt(1-s_i) for BatchNorm, 1/sqrt(1-mean s_i) for LayerNorm, whose
    1/sigma is shared by all neurons, 1 without a norm), the Pearson correlation of R_i with 1/sqrt(1-s_i), and
    ``R_i * sqrt(1 - s_i)`` mean/sd (flat near 1 only behind BatchNorm: that flatness is what SparseOpt restores).
    """
    t0 = time.perf_counter()
    lo, hi = (float(v) for v in s_range)
    _check([lo, hi], norms)
    if lo > hi:
        raise ValueError(f"s_range must be (low, high) with low <= high, got {s_range}")
    seeds = [int(s) for s in seeds]
    x, y = _flatten(x, y)
    d = x.shape[1]

    def masks_for(gen):
        s_i = lo + (hi - lo) * torch.rand(HIDDEN, generator=gen)
        k_i = torch.clamp(torch.round((1 - s_i) * d), min=1).long()
        rank = torch.rand(HIDDEN, d, generator=gen).argsort(-1).argsort(-1)
        return (rank < k_i[:, None]).unsqueeze(0)                               # (1, H, d)

    params, masks, idx = _per_seed_setup(x, seeds, batches, batch_size, masks_for)
    sums = _abs_grad_sums(x, y, idx, params, masks, norms, chunk)
    s_i = 1 - masks[:, 0].sum(-1).to(torch.float64) / d                        # (S, H)
    amp = 1 / torch.sqrt(1 - s_i)
    out: dict = {"seeds": seeds, "s_range": (lo, hi), "norms": {}}
    for nm in norms:
        dense, sparse = sums[nm]
        r_i = (sparse[:, 0].sum(1) / dense[:, 0].sum(1)).to(torch.float64)     # (S, H)
        if nm == "batch":
            th = amp
        elif nm == "layer":
            th = (1 / torch.sqrt(1 - s_i.mean(1, keepdim=True))).expand_as(s_i)
        else:
            th = torch.ones_like(s_i)
        flat = r_i * torch.sqrt(1 - s_i)
        corr = torch.corrcoef(torch.stack([r_i.flatten(), amp.flatten()]))[0, 1]
        out["norms"][nm] = {"s_i": s_i.tolist(), "R_i": r_i.tolist(), "theory_i": th.tolist(),
                            "corr_with_amplification": float(corr),
                            "normalized_mean": float(flat.mean()), "normalized_sd": float(flat.std()),
                            "max_rel_error_vs_theory": float(((r_i - th).abs() / th).max())}
    out["seconds"] = time.perf_counter() - t0
    return out


def _loglog_slope(sparsities: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log R against log(1 - s): -0.5 behind BatchNorm, 0 without a norm."""
    pts = [(math.log(1 - s), math.log(v)) for s, v in zip(sparsities, values) if s > 0 and v > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else float("nan")


def format_table(result: dict) -> str:
    """Plain-text table of a :func:`gradient_ratio_experiment` result: one line per sparsity, one column per norm."""
    norms = result["norms"]
    by = {(r["norm"], r["s"]): r for r in result["rows"]}
    head = ["s", "1/sqrt(1-s)"] + [f"R {nm} (mean ± sd)" for nm in norms]
    lines = ["  ".join(f"{h:>20}" for h in head)]
    for s in result["sparsities"]:
        cells = [f"{s:.3f}", f"{1 / math.sqrt(1 - s):.3f}"]
        cells += [f"{by[(nm, s)]['mean']:.3f} ± {by[(nm, s)]['sd']:.3f}" for nm in norms]
        lines.append("  ".join(f"{c:>20}" for c in cells))
    lines.append("slope of log R vs log(1-s): " + ", ".join(f"{nm} {v:+.3f}" for nm, v in result["slopes"].items())
                 + f"   ({len(result['seeds'])} seeds x {result['batches']} batches of {result['batch_size']})")
    return "\n".join(lines)
