"""One RigL mask update over ResNet-50's conv/fc weights: sparseopt vs the bare top-k baseline vs two packages.

Setting (the same for every contender):
  * the weights are sparseopt's ``ResNet50`` (architecture- and parameter-identical to torchvision's resnet50):
    53 sparse weights = every conv and the fc weight EXCEPT the 7x7 stem conv, which stays dense (sparseopt's
    default ``prune_first_layer=False``, as RigL/JaxPruner): 25,493,504 entries in sparse layers;
  * ERK at density 0.1 (90% sparsity) from ``sparseopt.layer_nnz`` (2,549,377 active weights; ERK makes
    layer1.0.conv1 fully dense), the SAME random initial masks for every contender (sparseopt's, seed 0);
  * drop fraction 0.3 (k = floor(0.3 * nnz) per layer), drop by |w| among active, grow by |grad| among not kept;
  * random dense gradients, SGD-momentum state present; every repetition starts from the same state again
    (restored untimed), so every contender does exactly one update from identical inputs each time.

Contenders:
  baseline       the bare selections the update needs: per layer the two ``torch.topk`` calls (k smallest |w|
                 over the nnz active entries; k largest |g| over all entries, kept ones at -inf) on precomputed
                 score tensors. Nothing else.
  sparseopt      ``SparseTraining(...)._update_masks()`` (topology RigL, no preconditioner), under no_grad as in
                 the optimizer pre-step hook: scores, drop/grow, weight and momentum zeroing, ITOP bookkeeping,
                 the cached per-step grad scales.
  sparseopt-topk     the same update with its selections forced to plain ``torch.topk``.
  sparseopt-torchops the same update with the native selection kernels off (its torch-op path).
  sparseopt+SO   the same with ``preconditioner=SparseOpt()`` (also recomputes the SparseOpt factors).
  sparsimony     ``sparsimony.dst.rigl.RigL.step()`` with a ConstantScheduler(0.3, delta_t=1) (every step is an
                 update) and a distribution that gives each layer sparseopt's nnz.
  rigl-torch     ``rigl_torch.RigL.RigLScheduler._rigl_step()`` at step 0 (cosine fraction = alpha = 0.3), with
                 sparseopt's masks loaded and per-layer S set to match. rigl-torch imports torchvision only for two
                 isinstance checks (torchvision.models.resnet.Bottleneck/BasicBlock, whose branch does the same as
                 the fallback branch); torchvision is not installed, so a stub module maps those names to
                 sparseopt's Bottleneck/BasicBlock before the import.

Before timing, one untimed pass per contender checks that all of them compute the same new masks as the baseline
selection (ties aside; see the "mask check" lines).

``--scaling`` also times baseline and sparseopt at width x2 (every channel count doubled: 4x the entries per
layer but the fc, 97,878,016 in all), interleaved with width x1, and prints the ratio of the times: linear in the weights
means a time ratio near 3.84x (the ratio of the entries).

Run:  .venv/bin/python benchmarks/bench_rigl_update.py [--reps 9] [--no-packages] [--no-profile] [--scaling]
Result: benchmarks/results/rigl_update.json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.util
import io
import math
import pstats
import statistics
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contender, format_table, setup_torch, summarize, time_interleaved, write_json  # noqa: E402

import sparseopt as so  # noqa: E402
from sparseopt import selection  # noqa: E402
from sparseopt.native import selection as native_selection  # noqa: E402
from sparseopt.models import resnet50  # noqa: E402
from sparseopt.models.resnet_cifar import BasicBlock  # noqa: E402
from sparseopt.models.resnet_imagenet import Bottleneck  # noqa: E402

DENSITY = 0.1
DROP_FRACTION = 0.3
GOAL = 0.5  # issue 13: the RigL update within half the bare torch.topk bound


# ---- shared state ---------------------------------------------------------------------------------------------
def resnet50_widened(factor: int) -> nn.Module:
    """ResNet-50 with every channel count (but the image's 3 and the 1000 classes) times ``factor``: the same 53
    sparse layers, each conv with ``factor``^2 times the entries, the fc ``factor`` times (x2: 97,878,016 in sparse
    layers), for the scaling check. Only the shapes matter (no forward pass): the new layers keep PyTorch's init."""
    model = resnet50()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                cin = child.in_channels if child.in_channels == 3 else child.in_channels * factor
                setattr(module, name, nn.Conv2d(cin, child.out_channels * factor, child.kernel_size, child.stride,
                                                child.padding, bias=False))
            elif isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.BatchNorm2d(child.num_features * factor))
            elif isinstance(child, nn.Linear):
                setattr(module, name, nn.Linear(child.in_features * factor, child.out_features))
    return model


class Reference:
    """The sparse set, initial masks, weights, gradients and momentum every contender starts from."""

    def __init__(self, seed: int = 0, width: int = 1) -> None:
        torch.manual_seed(seed)
        self.model = resnet50() if width == 1 else resnet50_widened(width)
        # sparseopt chooses the sparse set and draws the masks; reuse exactly those everywhere.
        shadow = copy.deepcopy(self.model)
        st = so.SparseTraining(shadow, torch.optim.SGD(shadow.parameters(), lr=0.1), density=DENSITY,
                               distribution="erk", topology=self.topology(), seed=seed)
        self.names = [p.name for p in st.params]
        self.masks = {n: m.clone() for n, m in st.masks.items()}
        self.nnz = dict(st.target_nnz)
        st.remove()
        params = dict(self.model.named_parameters())
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n in self.names:
                params[n].mul_(self.masks[n])
        self.weights = {n: params[n].detach().clone() for n in self.names}
        self.grads = {n: torch.randn(params[n].shape, generator=g) for n in self.names}
        self.momentum = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
        for n in self.names:
            self.momentum[n].mul_(self.masks[n])
        self.n_drop = {n: int(DROP_FRACTION * self.nnz[n]) for n in self.names}

    @staticmethod
    def topology():
        return so.RigL(update_every=100, drop_fraction=DROP_FRACTION, end_step=10_000)

    def fresh_model(self) -> nn.Module:
        m = copy.deepcopy(self.model)
        return m

    def fill_momentum(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        for n, p in model.named_parameters():
            opt.state[p]["momentum_buffer"] = self.momentum[n].clone()


# ---- a. baseline ----------------------------------------------------------------------------------------------
class Baseline:
    def __init__(self, ref: Reference) -> None:
        self.items = []
        self.expected = {}
        for n in ref.names:
            k = ref.n_drop[n]
            mask = ref.masks[n].reshape(-1)
            active = mask.nonzero().squeeze(1)
            drop_score = ref.weights[n].abs().reshape(-1)[active]  # only active entries compete for dropping
            dropped = active[torch.topk(drop_score, k, largest=False, sorted=False).indices]
            kept = mask.clone()
            kept[dropped] = False
            grow_score = torch.where(kept, torch.tensor(float("-inf")), ref.grads[n].abs().reshape(-1))
            grown = torch.topk(grow_score, k, sorted=False).indices
            new = kept.clone()
            new[grown] = True
            self.expected[n] = new.view_as(ref.masks[n])
            self.items.append((drop_score, grow_score, k))

    def run(self) -> None:
        for drop_score, grow_score, k in self.items:
            torch.topk(drop_score, k, largest=False, sorted=False)
            torch.topk(grow_score, k, sorted=False)


# ---- b. sparseopt -----------------------------------------------------------------------------------------------
class SparseoptUpdate:
    def __init__(self, ref: Reference, preconditioner=None) -> None:
        self.ref = ref
        self.model = ref.fresh_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.st = so.SparseTraining(self.model, self.opt, density=DENSITY, distribution="erk",
                                    topology=ref.topology(), preconditioner=preconditioner,
                                    masks=ref.masks)
        assert [p.name for p in self.st.params] == ref.names
        assert self.st.target_nnz == ref.nnz
        ref.fill_momentum(self.model, self.opt)
        self.params = {p.name: p.param for p in self.st.params}
        for n, p in self.params.items():
            p.grad = ref.grads[n].clone()
        self.dense = {n: p.grad for n, p in self.params.items()}
        assert self.st.topology.is_update_step(0)
        assert all(self.st.topology.drop_count(0, ref.nnz[n]) == ref.n_drop[n] for n in ref.names)

    @torch.no_grad()
    def prepare(self) -> None:
        """Restore the starting state, and every cache derived from the masks with it: the active indices (stale
        ones made later repetitions time a different update), the change counts and the per-step grad scales."""
        for n, p in self.params.items():
            p.copy_(self.ref.weights[n])
            self.st.masks[n].copy_(self.ref.masks[n])
            self.st.fired.load(n, self.ref.masks[n])
            self.opt.state[p]["momentum_buffer"].copy_(self.ref.momentum[n])
        self.st.step_count = 0
        self.st.changed = dict.fromkeys(self.st.masks, 0)
        self.st._reset_active()
        self.st._refresh_grad_scales()

    def run(self) -> None:
        with torch.no_grad():  # _update_masks runs inside the optimizer's pre-step hook, which is under no_grad
            self.st._update_masks(self.dense)  # the dense gradients RigL grows from (the hooks' copy in training)

    def new_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.st.masks[n].clone() for n in self.ref.names}


class TopkSelectionUpdate(SparseoptUpdate):
    """sparseopt's update with its selections forced to plain ``torch.topk`` (the code before the sampled one):
    no sampled bracket, and the pick is ``torch.topk`` rather than the native ``nth_element``."""

    def run(self) -> None:
        saved = selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN, selection._pick
        selection.SAMPLED_TOPK_MIN = selection.SAMPLED_GROW_MIN = 1 << 62
        selection._pick = lambda scores, k, largest: torch.topk(scores, k, largest=largest, sorted=False).indices
        try:
            super().run()
        finally:
            selection.SAMPLED_TOPK_MIN, selection.SAMPLED_GROW_MIN, selection._pick = saved


class TorchOpsUpdate(SparseoptUpdate):
    """sparseopt's update on its torch path: the native selection kernels switched off for the call (what a
    failed build or ``SPARSEOPT_NATIVE_KERNELS=0`` runs)."""

    def run(self) -> None:
        saved = native_selection.library
        native_selection.library = lambda: None
        try:
            super().run()
        finally:
            native_selection.library = saved


# ---- c. sparsimony ------------------------------------------------------------------------------------------------
class SparsimonyUpdate:
    def __init__(self, ref: Reference) -> None:
        from sparsimony.distributions.base import BaseDistribution
        from sparsimony.dst.rigl import RigL as SmRigL
        from sparsimony.schedulers.base import ConstantScheduler
        from sparsimony.utils import get_mask, get_original_tensor, get_parametrization

        class SparseoptNnz(BaseDistribution):
            """Each layer gets sparseopt's nnz: int(numel * (1 - s)) == nnz exactly (sparsimony's own count)."""

            def __call__(self, sparsity, groups, *args, **kwargs):
                for cfg in groups:
                    numel = math.prod(get_original_tensor(**cfg).shape)
                    nnz = ref.nnz[cfg["tensor_fqn"]]
                    cfg["sparsity"] = 0.0 if nnz == numel else 1.0 - (nnz + 0.5) / numel
                return groups

        self.ref = ref
        self.model = ref.fresh_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        ref.fill_momentum(self.model, self.opt)
        self.sparsifier = SmRigL(scheduler=ConstantScheduler(DROP_FRACTION, t_end=10**9, delta_t=1),
                                 distribution=SparseoptNnz(), optimizer=self.opt, sparsity=1 - DENSITY,
                                 init_method=None)
        self.sparsifier.prepare(self.model, [{"tensor_fqn": n} for n in ref.names])
        self.configs = {cfg["tensor_fqn"]: cfg for cfg in self.sparsifier.groups}
        assert list(self.configs) == ref.names
        self._get_mask, self._get_orig, self._get_par = get_mask, get_original_tensor, get_parametrization
        with torch.no_grad():
            for n, cfg in self.configs.items():
                self._get_par(**cfg).dense_grad = ref.grads[n].clone()
        self.prepare()
        for n, cfg in self.configs.items():
            numel = self.ref.masks[n].numel()
            assert int(numel * (1 - cfg["sparsity"])) == ref.nnz[n], n

    @torch.no_grad()
    def prepare(self) -> None:
        for n, cfg in self.configs.items():
            self._get_orig(**cfg).copy_(self.ref.weights[n])
            self._get_mask(**cfg).copy_(self.ref.masks[n])
        self.sparsifier._step_count = 0

    def run(self) -> None:
        updated = self.sparsifier.step()
        assert updated

    def new_masks(self) -> dict[str, torch.Tensor]:
        return {n: self._get_mask(**cfg).bool().clone() for n, cfg in self.configs.items()}


# ---- d. rigl-torch ------------------------------------------------------------------------------------------------
def _import_rigl_torch():
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv_models = types.ModuleType("torchvision.models")
        tv_resnet = types.ModuleType("torchvision.models.resnet")
        tv_resnet.Bottleneck, tv_resnet.BasicBlock = Bottleneck, BasicBlock
        tv.models, tv_models.resnet = tv_models, tv_resnet
        sys.modules.update({"torchvision": tv, "torchvision.models": tv_models, "torchvision.models.resnet": tv_resnet})
    from rigl_torch.RigL import RigLScheduler
    return RigLScheduler


class RiglTorchUpdate:
    def __init__(self, ref: Reference) -> None:
        RigLScheduler = _import_rigl_torch()
        self.ref = ref
        self.model = ref.fresh_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        ref.fill_momentum(self.model, self.opt)
        self.sched = RigLScheduler(self.model, self.opt, dense_allocation=DENSITY, T_end=10_000,
                                   sparsity_distribution="uniform", ignore_linear_layers=False, delta=100,
                                   alpha=DROP_FRACTION)
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        w_names = [by_id[id(w)] for w in self.sched.W]
        # rigl-torch's W is every conv/linear weight; the stem (index 0) is dense under its 'uniform' rule.
        assert w_names[1:] == ref.names and self.sched.S[0] == 0, w_names[:3]
        self.index = {n: i + 1 for i, n in enumerate(ref.names)}
        self.params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, i in self.index.items():
                numel = ref.masks[n].numel()
                self.sched.S[i] = 0 if ref.nnz[n] == numel else 1 - ref.nnz[n] / numel
                self.sched.backward_masks[i] = ref.masks[n].clone()
                self.sched.backward_hook_objects[i].dense_grad = ref.grads[n].clone()
                self.params[n].grad = ref.grads[n].clone()
        self.prepare()

    @torch.no_grad()
    def prepare(self) -> None:
        for n, i in self.index.items():
            p = self.params[n]
            p.copy_(self.ref.weights[n])
            p.grad.copy_(self.ref.grads[n])
            self.sched.backward_masks[i].copy_(self.ref.masks[n])
            self.opt.state[p]["momentum_buffer"].copy_(self.ref.momentum[n])
        self.sched.step = 0  # cosine_annealing() at step 0 is exactly alpha = 0.3

    def run(self) -> None:
        self.sched._rigl_step()

    def new_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.sched.backward_masks[i].bool().clone() for n, i in self.index.items()}


# ---- checks, profile, main ---------------------------------------------------------------------------------------
def mask_check(name: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ref: Reference) -> dict:
    differing = sum(int((got[n] != expected[n]).sum()) for n in ref.names)
    same_layers = sum(bool(torch.equal(got[n], expected[n])) for n in ref.names)
    nnz_ok = all(int(got[n].sum()) == ref.nnz[n] for n in ref.names)
    line = (f"mask check {name:<13} identical layers {same_layers}/{len(ref.names)}, differing entries "
            f"{differing}, nnz per layer preserved: {nnz_ok}")
    print(line)
    return {"identical_layers": same_layers, "layers": len(ref.names), "differing_entries": differing,
            "nnz_preserved": nnz_ok}


def scaling_check(ref: Reference, base: Baseline, so_plain: SparseoptUpdate, reps: int) -> dict:
    """Baseline and sparseopt at width x1 and x2, interleaved in one loop: is the update linear in the weights?"""
    wide = Reference(width=2)
    wide_base, wide_so = Baseline(wide), SparseoptUpdate(wide)
    numel = {w: sum(r.masks[n].numel() for n in r.names) for w, r in ((1, ref), (2, wide))}
    wide_so.prepare()
    wide_so.run()
    check = mask_check("sparseopt x2", wide_so.new_masks(), wide_base.expected, wide)
    contenders = [Contender("baseline x1", base.run), Contender("sparseopt x1", so_plain.run, so_plain.prepare),
                  Contender("baseline x2", wide_base.run), Contender("sparseopt x2", wide_so.run, wide_so.prepare)]
    print(f"\nscaling: width x1 {numel[1]:,} and x2 {numel[2]:,} entries in sparse layers "
          f"({numel[2] / numel[1]:.2f}x); timing {reps} interleaved repetitions ...", flush=True)
    times = time_interleaved(contenders, reps=reps, warmup=1)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    growth = {who: med[f"{who} x2"] / med[f"{who} x1"] for who in ("baseline", "sparseopt")}
    for who in ("baseline", "sparseopt"):
        print(f"  {who:<9}: x1 {med[who + ' x1']:.4f} s, x2 {med[who + ' x2']:.4f} s (medians): time ratio "
              f"{growth[who]:.2f} for {numel[2] / numel[1]:.2f}x the weights")
    print(f"  sparseopt / baseline at x2: {med['sparseopt x2'] / med['baseline x2']:.3f}")
    return {"numel": numel, "times": times, "medians": med, "time_ratio_x2_over_x1": growth,
            "numel_ratio": numel[2] / numel[1], "mask_check_x2": check}


def profile_sparseopt(c: SparseoptUpdate) -> dict:
    c.prepare()
    prof = cProfile.Profile()
    prof.enable()
    c.run()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(14)
    cprof_total = stats.total_tt
    native_s = sum(v[2] for k, v in stats.stats.items() if "sparseopt/native/" in k[0])  # the ctypes calls
    cprof_text = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    c.prepare()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        c.run()
    events = tp.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=16)
    total = sum(e.self_cpu_time_total for e in events)
    topk = sum(e.self_cpu_time_total for e in events if e.key == "aten::topk")
    return {"cprofile": cprof_text, "torch_profiler": table, "self_cpu_ms_total": total / 1e3,
            "self_cpu_ms_topk": topk / 1e3, "cprofile_ms_total": cprof_total * 1e3,
            "cprofile_ms_native": native_s * 1e3}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-packages", action="store_true", help="skip sparsimony and rigl-torch")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of sparseopt's update")
    ap.add_argument("--scaling", action="store_true",
                    help="also time baseline and sparseopt at width x2 (98 M weights), interleaved with width x1")
    args = ap.parse_args(argv)
    setup_torch(1)

    ref = Reference()
    numel = sum(ref.masks[n].numel() for n in ref.names)
    print(f"ResNet-50 conv/fc weights: {len(ref.names)} sparse layers (stem conv kept dense), {numel:,} entries, "
          f"ERK density {DENSITY} -> {sum(ref.nnz.values()):,} active, drop fraction {DROP_FRACTION} -> "
          f"{sum(ref.n_drop.values()):,} dropped+grown; torch {torch.__version__}, {torch.get_num_threads()} thread")

    base = Baseline(ref)
    contenders = [Contender("baseline", base.run)]
    checks, failures, impls = {}, {}, {}
    so_plain = SparseoptUpdate(ref)
    impls["sparseopt"] = so_plain
    impls["sparseopt-topk"] = TopkSelectionUpdate(ref)
    impls["sparseopt-torchops"] = TorchOpsUpdate(ref)
    impls["sparseopt+SO"] = SparseoptUpdate(ref, preconditioner=so.SparseOpt())
    if not args.no_packages:
        for name, cls in (("sparsimony", SparsimonyUpdate), ("rigl-torch", RiglTorchUpdate)):
            try:
                impls[name] = cls(ref)
            except ImportError as err:
                failures[name] = (f"{type(err).__name__}: {err} (install with: .venv/bin/pip install --no-deps "
                                  "sparsimony rigl-torch)")
                print(f"{name}: could not be set up: {failures[name]}")
            except Exception as err:  # report, do not hide
                failures[name] = f"{type(err).__name__}: {err}"
                print(f"{name}: could not be set up: {failures[name]}")
    for name, impl in list(impls.items()):
        try:  # the untimed check pass doubles as the warm-up
            impl.prepare()
            impl.run()
            first = impl.new_masks()
            checks[name] = mask_check(name, first, base.expected, ref)
            impl.prepare()  # a second repetition must time the very same update
            impl.run()
            again = impl.new_masks()
            if not all(torch.equal(first[n], again[n]) for n in ref.names):
                raise RuntimeError(f"{name}: a second repetition computed different masks; prepare() misses a cache")
        except Exception as err:
            failures[name] = f"{type(err).__name__}: {err}"
            print(f"{name}: failed during its update: {failures[name]}")
            del impls[name]
            continue
        contenders.append(Contender(name, impl.run, impl.prepare))
    base.run()

    print(f"timing {args.reps} interleaved repetitions ...", flush=True)
    times = time_interleaved(contenders, reps=args.reps, warmup=0)
    rows = summarize(times, "baseline")
    print()
    print("One RigL mask update, ResNet-50 shapes, 90% ERK, drop fraction 0.3 (seconds, 1 thread)")
    print(format_table(rows, "baseline"))
    ratio = next(r for r in rows if r["name"] == "sparseopt")
    verdict = {
        "goal_within_0_5x_baseline": ratio["ratio_of_medians"] <= GOAL and ratio["median_paired_ratio"] <= GOAL,
        "faster_than": {r["name"]: ratio["median_s"] < r["median_s"] for r in rows
                        if r["name"] in ("sparsimony", "rigl-torch")},
    }
    print(f"\nsparseopt / baseline = {ratio['ratio_of_medians']:.3f} (ratio of medians), "
          f"{ratio['median_paired_ratio']:.3f} (median of paired ratios); goal <= {GOAL} for both: "
          f"{'met' if verdict['goal_within_0_5x_baseline'] else 'MISSED'}")
    for name, faster in verdict["faster_than"].items():
        other = next(r for r in rows if r["name"] == name)
        print(f"sparseopt vs {name}: {other['median_s'] / ratio['median_s']:.2f}x faster" if faster
              else f"sparseopt vs {name}: SLOWER ({ratio['median_s'] / other['median_s']:.2f}x)")
    for name, why in failures.items():
        print(f"{name}: NOT MEASURED: {why}")

    scaling = None
    if args.scaling:
        scaling = scaling_check(ref, base, so_plain, args.reps)

    profile = None
    if not args.no_profile:
        profile = profile_sparseopt(so_plain)
        print("\nProfile of one sparseopt _update_masks() (cProfile, by own time):")
        print(profile["cprofile"])
        print("\ntorch.profiler, by self CPU time:")
        print(profile["torch_profiler"])
        tot, tk = profile["self_cpu_ms_total"], profile["self_cpu_ms_topk"]
        print(f"where the time goes: aten::topk {tk:.0f} ms ({100 * tk / tot:.0f}%), all other ops {tot - tk:.0f} ms "
              f"({100 * (tot - tk) / tot:.0f}%) of {tot:.0f} ms profiled; the baseline is the topk part alone")
        ctot, cnat = profile["cprofile_ms_total"], profile["cprofile_ms_native"]
        print(f"torch.profiler does not see the native selection kernels (ctypes calls): by cProfile they take "
              f"{cnat:.0f} ms of the {ctot:.0f} ms update ({100 * cnat / ctot:.0f}%)")

    payload = {
        "setting": {"model": "sparseopt.models.resnet50 (= torchvision resnet50 shapes)",
                    "sparse_layers": len(ref.names), "stem_conv": "dense (not in the sparse set)",
                    "sparse_numel": numel, "density": DENSITY, "distribution": "erk (sparseopt.layer_nnz)",
                    "active": sum(ref.nnz.values()), "drop_fraction": DROP_FRACTION,
                    "dropped_and_grown": sum(ref.n_drop.values()), "reps": args.reps},
        "rows": rows, "mask_checks": checks, "failures": failures, "verdict": verdict, "profile": profile,
        "scaling": scaling,
    }
    path = write_json("rigl_update", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
