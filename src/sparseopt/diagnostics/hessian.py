"""Hessian spectrum of the training loss for edge-of-stability plots (SPEC 6).

Why: sharpness (lambda_max of the loss Hessian) is compared with the optimizer's stability threshold (2/eta for GD);
for sparse nets the relevant operator is the Hessian restricted to active weights, P H P, and with SparseOpt the
preconditioned one, C H C with C = sqrt(diag factor) (masked).

Everything is matrix-free: exact Hessian-vector products by double backward (Pearlmutter) over a fixed data subset in
physical batches (loss = mean over the subset, each batch weighted by its size). The model is evaluated in train mode
by default (BatchNorm uses per-physical-batch statistics, like Cohen et al.). Nothing observable changes: module
modes, buffers (BatchNorm running stats), ``.grad``, parameters and the global RNG are restored after every product.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NotFiniteError(FloatingPointError):
    """A loss or Hessian-vector product was NaN/inf (typically a diverged model)."""


@dataclass
class EigenResult:
    """Eigenvalues (top: descending; smallest: ascending) with unit-vector residuals ||Hv - lambda v||."""

    eigenvalues: list[float]
    residuals: list[float]
    smallest: list[float] = field(default_factory=list)
    smallest_residuals: list[float] = field(default_factory=list)
    matvecs: int = 0
    iterations: int = 0
    seconds: float = 0.0
    status: str = "ok"          # "ok" or "not finite"
    converged: bool = True
    method: str = "lanczos"
    eigenvectors: torch.Tensor | None = None   # (k, dim) flat, only when asked for (power iteration: always)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("eigenvectors")
        return d


@dataclass
class TraceResult:
    """Hutchinson estimate of tr(H) (of the operator actually used: restricted / preconditioned) and its SE."""

    trace: float
    stderr: float
    samples: int
    matvecs: int
    seconds: float
    status: str = "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def stability_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    """Largest stable curvature on a quadratic (SPEC 6.2): 2/eta, (2+2b)/eta heavy ball, (2+2b)/((1+2b) eta) Nesterov."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if nesterov:
        return (2 + 2 * momentum) / ((1 + 2 * momentum) * lr)
    return (2 + 2 * momentum) / lr


# ---- side-effect guard -------------------------------------------------------------------------------------
def _dropouts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.modules.dropout._DropoutNd,)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and getattr(m, "p", 0) > 0]


@contextmanager
def _preserved(model: nn.Module, train_mode: bool | None, dropout: str) -> Iterator[None]:
    """Set the evaluation mode, then restore module modes, buffers and the global RNG whatever happens."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    try:
        if train_mode is not None:
            model.train(train_mode)
        if dropout == "disable":
            for _, m in _dropouts(model):
                m.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)


# ---- the operator ----------------------------------------------------------------------------------------------
class HessianOperator:
    """v -> S H S v on flat vectors over the chosen parameters (S = mask and/or sqrt preconditioner, else I).

    Args:
        model, x, y, loss_fn: loss_fn(model(x_batch), y_batch) must be batch-**mean** reduced; the subset loss is
            sum_b (n_b / N) loss_b. Keep (x, y) fixed between calls (Cohen et al.: the first 5000 examples).
        physical_batch: examples per forward pass (memory only, except that BatchNorm statistics are per batch).
        params: parameter names to differentiate (default: all with requires_grad).
        masks: ``{param name: bool mask}`` (e.g. ``SparseTraining.masks``).
        restrict: with masks, use P H P (training only moves active weights); False gives the unrestricted H.
        precondition: ``{param name: factor}`` (e.g. ``SparseTraining.factors()``): diagonal preconditioner D; the
            operator becomes D^1/2 P H P D^1/2 (factors are masked, other parameters get 1).
        train_mode: True (default, BatchNorm batch statistics), False (eval) or None (leave modes as they are).
        dropout: "error" (default) if a Dropout with p > 0 would be active, because the product is then random;
            "disable" evaluates Dropout layers in eval mode; "allow" proceeds with a warning.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn = F.cross_entropy,
        *,
        physical_batch: int = 1000,
        params: Sequence[str] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        restrict: bool = True,
        precondition: Mapping[str, torch.Tensor] | None = None,
        train_mode: bool | None = True,
        dropout: str = "error",
    ) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must be non-empty with equal length, got {len(x)} and {len(y)}")
        if physical_batch < 1:
            raise ValueError(f"physical_batch must be >= 1, got {physical_batch}")
        if dropout not in ("error", "disable", "allow"):
            raise ValueError(f"dropout must be 'error', 'disable' or 'allow', got {dropout!r}")
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.physical_batch, self.train_mode, self.dropout = physical_batch, train_mode, dropout
        self._graph: tuple[list[int], list[torch.Tensor]] | None = None  # (parameter versions, cached gradients)
        self._check_dropout()
        named = dict(model.named_parameters())
        names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; known: {sorted(named)}")
        if not names:
            raise ValueError("no parameters to differentiate (none requires grad)")
        self.names = names
        self.params = [named[n] for n in names]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.scale = self._build_scale(masks or {}, restrict, precondition)
        self.active_dim = self.dim if self.scale is None else int((self.scale != 0).sum())
        self.matvecs = 0

    def _check_dropout(self) -> None:
        drops = _dropouts(self.model)
        active = [n or "<model>" for n, m in drops
                  if (self.train_mode if self.train_mode is not None else m.training)]
        if active and self.dropout != "disable":
            msg = (f"dropout is active in {active} during Hessian-vector products: each product would use a new "
                   "random dropout mask, so H v is not deterministic and Lanczos/Hutchinson results are meaningless. "
                   "Pass dropout='disable' (evaluate Dropout layers in eval mode) or train_mode=False.")
            if self.dropout == "error":
                raise ValueError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _build_scale(self, masks, restrict, precondition) -> torch.Tensor | None:
        for what, given in (("masks", masks), ("precondition", precondition or {})):
            unknown = sorted(set(given) - set(self.names))
            if unknown:
                raise ValueError(f"{what} given for parameters not in the operator: {unknown}")
        if not (restrict and masks) and not precondition:
            return None
        parts = []
        for n, p in zip(self.names, self.params):
            s = torch.ones(p.shape, dtype=self.dtype, device=self.device)
            if n in masks and (restrict or precondition):
                m = masks[n].to(device=self.device)
                if m.shape != p.shape:
                    raise ValueError(f"mask for {n!r} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
                s = s * m.to(self.dtype)
            if precondition and n in precondition:
                c = precondition[n].to(device=self.device, dtype=self.dtype)
                if (c < 0).any():
                    raise ValueError(f"precondition factors of {n!r} must be non-negative")
                s = s * torch.sqrt(c).expand(p.shape)
            parts.append(s.reshape(-1))
        return torch.cat(parts)

    def support(self) -> torch.Tensor:
        """Flat bool vector of coordinates the operator acts on (all, or the active weights)."""
        if self.scale is None:
            return torch.ones(self.dim, dtype=torch.bool, device=self.device)
        return self.scale != 0

    def _batches(self):
        n = len(self.x)
        for start in range(0, n, self.physical_batch):
            xb, yb = self.x[start:start + self.physical_batch], self.y[start:start + self.physical_batch]
            yield xb, yb, len(xb) / n

    def _loss_grads(self, create_graph: bool, xb, yb, weight, buffers=None) -> list[torch.Tensor]:
        logits = self.model(xb) if buffers is None else torch.func.functional_call(self.model, buffers, (xb,))
        loss = self.loss_fn(logits, yb) * weight
        if not torch.isfinite(loss):
            raise NotFiniteError(f"loss is {float(loss.detach())}")
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True))

    def _cached_grads(self, xb, yb, weight) -> list[torch.Tensor]:
        versions = [p._version for p in self.params]
        if self._graph is None or self._graph[0] != versions:
            # private copies of the buffers: BatchNorm updates those, and the graph it saves stays valid when the
            # model's own buffers are restored after each product
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self._graph = (versions, self._loss_grads(True, xb, yb, weight, buffers))
        return self._graph[1]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view_as(p) for c, p in zip(torch.split(v, self.sizes), self.params)]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector (any float dtype; returned in the same dtype)."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {tuple(v.shape)}")
        out_dtype = v.dtype
        v = v.to(device=self.device, dtype=self.dtype)
        if self.scale is not None:
            v = v * self.scale
        vs = self._split(v)
        hv = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        single = len(self.x) <= self.physical_batch
        with _preserved(self.model, self.train_mode, self.dropout), torch.enable_grad():
            for xb, yb, w in self._batches():
                # One physical batch: build the gradient graph once and reuse it for every product (a forward
                # and a backward saved per product); it is rebuilt if any parameter changed in place since.
                grads = self._cached_grads(xb, yb, w) if single else self._loss_grads(True, xb, yb, w)
                dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
                if not dot.requires_grad:      # loss is affine in the parameters: H = 0
                    continue
                parts = torch.autograd.grad(dot, self.params, allow_unused=True, retain_graph=single)
                hv += torch.cat([(q if q is not None else torch.zeros_like(p)).reshape(-1)
                                 for q, p in zip(parts, self.params)])
        self.matvecs += 1
        if self.scale is not None:
            hv = hv * self.scale
        if not torch.isfinite(hv).all():
            raise NotFiniteError("Hessian-vector product is not finite")
        return hv.to(out_dtype)


def exact_hessian(op: HessianOperator) -> torch.Tensor:
    """The full operator matrix S H S, built row by row from double backward of each gradient entry (small models).

    Independent of the product code path (it differentiates gradient components, not g . v); for validation only:
    cost is dim backward passes per physical batch.
    """
    h = torch.zeros(op.dim, op.dim, dtype=op.dtype, device=op.device)
    with _preserved(op.model, op.train_mode, op.dropout), torch.enable_grad():
        for xb, yb, w in op._batches():
            grads = op._loss_grads(True, xb, yb, w)
            flat = torch.cat([g.reshape(-1) if g is not None else torch.zeros_like(p).reshape(-1)
                              for g, p in zip(grads, op.params)])
            for i in range(op.dim):
                if not flat[i].requires_grad:
                    continue
                row = torch.autograd.grad(flat[i], op.params, retain_graph=True, allow_unused=True)
                h[i] += torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1)
                                   for r, p in zip(row, op.params)])
    if op.scale is not None:
        h = op.scale[:, None] * h * op.scale[None, :]
    return h


# ---- eigenvalue solvers ------------------------------------------------------------------------------------------
def _random_start(op: HessianOperator, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device)
    return v * op.support()


def _residuals(op: HessianOperator, vecs: torch.Tensor, vals: Sequence[float]) -> list[float]:
    return [float(torch.linalg.vector_norm(op(v) - lam * v)) for v, lam in zip(vecs, vals)]


def lanczos(
    op: HessianOperator,
    k: int = 4,
    *,
    smallest: int = 0,
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    return_vectors: bool = False,
    v0: torch.Tensor | None = None,
) -> EigenResult:
    """Top-k (and optionally the ``smallest`` lowest) eigenvalues by Lanczos with full reorthogonalisation.

    ``v0`` warm-starts the iteration (e.g. the previous top eigenvector when tracking during training); a random
    start from ``seed`` otherwise.

    Stops when every wanted Ritz pair's residual estimate |beta_m s_mj| is below tol * max|ritz|, or at max_iter
    (default min(active dim, 300)). Residuals in the result are exact, ||H v - lambda v|| (one extra product each).
    A diverged model gives status "not finite" and NaN eigenvalues instead of an exception.
    """
    want = k + smallest
    if k < 1 or smallest < 0:
        raise ValueError(f"k must be >= 1 and smallest >= 0, got k={k}, smallest={smallest}")
    if want > op.active_dim:
        raise ValueError(f"asked for {want} eigenvalues but the operator has only {op.active_dim} active dimensions "
                         f"({op.dim} parameters)")
    t0, m0 = time.perf_counter(), op.matvecs
    max_iter = min(op.active_dim, max_iter if max_iter is not None else 300)
    max_iter = max(max_iter, want)
    gen = torch.Generator().manual_seed(seed)
    support = op.support()
    try:
        q = v0.to(device=op.device, dtype=torch.float64) * support if v0 is not None else None
        if q is None or float(torch.linalg.vector_norm(q)) == 0.0:
            q = _random_start(op, gen)
        q = q / torch.linalg.vector_norm(q)
        basis, alphas, betas = [], [], []
        converged = False
        while len(basis) < max_iter:
            basis.append(q)
            w = op(q.to(op.dtype)).to(torch.float64)
            alpha = float(w @ q)
            alphas.append(alpha)
            Q = torch.stack(basis)
            for _ in range(2):                                  # "twice is enough" full reorthogonalisation
                w = w - Q.T @ (Q @ w)
            beta = float(torch.linalg.vector_norm(w))
            m = len(basis)
            if m >= want:
                vals, vecs = _tridiag_eig(alphas, betas)
                scale = max(float(vals.abs().max()), 1e-30)
                idx = _wanted(m, k, smallest)
                if all(abs(beta * float(vecs[-1, j])) <= tol * scale for j in idx):
                    converged = True
                    break
            if m == max_iter:
                break
            if beta <= 1e-12 * max(1.0, abs(alpha)):            # invariant subspace: continue with a fresh direction
                w = _random_start(op, gen)
                for _ in range(2):
                    w = w - Q.T @ (Q @ w)
                beta_next = float(torch.linalg.vector_norm(w))
                if beta_next == 0.0:
                    converged = True
                    break
                betas.append(0.0)
                q = w / beta_next
            else:
                betas.append(beta)
                q = w / beta
            q = q * support
        m = len(basis)
        vals, vecs = _tridiag_eig(alphas, betas[:m - 1])
        if m == op.active_dim:
            converged = True
        idx = _wanted(m, k, smallest)
        ritz = torch.stack(basis).T @ vecs[:, idx]              # (dim, want)
        ritz = (ritz / torch.linalg.vector_norm(ritz, dim=0)).T
        lam = [float(vals[j]) for j in idx]
        res = _residuals(op, ritz, lam)
    except NotFiniteError:
        nan = [math.nan]
        return EigenResult(nan * k, nan * k, nan * smallest, nan * smallest, op.matvecs - m0, 0,
                           time.perf_counter() - t0, "not finite", False, "lanczos")
    return EigenResult(lam[:k], res[:k], lam[k:], res[k:], op.matvecs - m0, m, time.perf_counter() - t0, "ok",
                       converged, "lanczos", ritz[:k].to(op.dtype) if return_vectors else None)


def _tridiag_eig(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)                                 # ascending


def _wanted(m: int, k: int, smallest: int) -> list[int]:
    """Indices into ascending Ritz values: the top k (descending), then the lowest ``smallest`` (ascending)."""
    return [m - 1 - j for j in range(k)] + list(range(smallest))


def power_iteration(
    op: HessianOperator,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    v0: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    """Dominant eigenvalue (largest |lambda|) by power iteration: a cheap tracker, warm-startable with ``v0``.

    Pass the previous result's ``eigenvectors[0]`` as ``v0`` between training steps. Stops when the residual
    ||Hv - lambda v|| <= tol * |lambda|. Slow when |lambda_1| ~ |lambda_2|; use :func:`lanczos` for accuracy.
    """
    t0, m0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    v = (v0.to(torch.float64) * op.support()) if v0 is not None else _random_start(op, gen)
    if float(torch.linalg.vector_norm(v)) == 0.0:
        v = _random_start(op, gen)
    v = v / torch.linalg.vector_norm(v)
    lam, res, it = math.nan, math.nan, 0
    try:
        for it in range(1, iters + 1):
            hv = op(v.to(op.dtype)).to(torch.float64)
            lam = float(v @ hv)
            res = float(torch.linalg.vector_norm(hv - lam * v))
            if res <= tol * abs(lam):
                break
            norm = torch.linalg.vector_norm(hv)
            if norm == 0:
                break
            v = hv / norm
    except NotFiniteError:
        return EigenResult([math.nan], [math.nan], matvecs=op.matvecs - m0, iterations=it,
                           seconds=time.perf_counter() - t0, status="not finite", converged=False, method="power")
    return EigenResult([lam], [res], matvecs=op.matvecs - m0, iterations=it, seconds=time.perf_counter() - t0,
                       converged=res <= tol * abs(lam), method="power", eigenvectors=v.to(op.dtype)[None])


def hutchinson_trace(op: HessianOperator, samples: int = 100, *, seed: int = 0) -> TraceResult:
    """tr(operator) ~ mean of z^T H z over Rademacher z (on the operator's support), with its standard error."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a standard error, got {samples}")
    t0, m0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    support = op.support().to(torch.float64)
    vals = []
    try:
        for _ in range(samples):
            z = (torch.randint(0, 2, (op.dim,), generator=gen).to(torch.float64) * 2 - 1) * support
            vals.append(float(z @ op(z.to(op.dtype)).to(torch.float64)))
    except NotFiniteError:
        return TraceResult(math.nan, math.nan, len(vals), op.matvecs - m0, time.perf_counter() - t0, "not finite")
    t = torch.tensor(vals, dtype=torch.float64)
    return TraceResult(float(t.mean()), float(t.std() / math.sqrt(samples)), samples, op.matvecs - m0,
                       time.perf_counter() - t0)
