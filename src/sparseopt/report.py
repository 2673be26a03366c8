"""A readable per-layer account of a sparse model: shapes, densities, exploration, last changes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    target_density: float
    density: float          # active fraction of the mask
    itop: float             # fraction of entries ever active (ITOP rate, SPEC 4)
    changed: int            # connections grown at the last mask update
    zero_fanin: int         # output units with no active input: dead under BatchNorm
    norm_max: float = 0.0                       # largest ||w_i|| over output units
    norm_max_over_median: float | None = None   # ... over the median ||w_i|| of live units
    batchnorm: str | None = None                # the BatchNorm module this layer feeds, if any
    sigma_slope: float | None = None            # log-log slope of that BatchNorm's sigma_i against fan-in k_i
    gamma_slope: float | None = None            # ... of |gamma_i| against k_i
    execution: str = "masked"  # "sparse": CSR kernels (SparseTraining(sparse_execution=True)); "masked": dense ones
    out_axis: int = 0       # the weight axis of the output units (1 for Hugging Face Conv1D)

    @property
    def neurons(self) -> int:
        return self.shape[self.out_axis]


@dataclass(frozen=True)
class SparsityReport:
    step: int
    layers: list[LayerReport]
    correction_ratio: float | None = None   # ||SparseOpt-corrected g|| / ||g|| over the last step's gradients
    dense: dict[str, str] = field(default_factory=dict)   # weight layers left dense -> why

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def density(self) -> float:
        return sum(r.density * r.numel for r in self.layers) / self.numel

    @property
    def target_density(self) -> float:
        return sum(r.target_density * r.numel for r in self.layers) / self.numel

    @property
    def itop(self) -> float:
        return sum(r.itop * r.numel for r in self.layers) / self.numel

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.layers)

    def to_dict(self) -> dict:
        return {"step": self.step, "numel": self.numel, "density": self.density, "target_density": self.target_density,
                "itop": self.itop, "changed": self.changed, "correction_ratio": self.correction_ratio,
                "layers": [asdict(r) for r in self.layers],
                "dense": dict(self.dense)}

    def __str__(self) -> str:
        head = ("layer", "shape", "target", "density", "ITOP", "changed", "dead units", "max ||w_i||", "max/median",
                "BN sigma~k slope", "execution")
        rows = [(r.name, "x".join(map(str, r.shape)), f"{r.target_density:.4f}", f"{r.density:.4f}", f"{r.itop:.4f}",
                 str(r.changed), str(r.zero_fanin), f"{r.norm_max:.3g}", _opt(r.norm_max_over_median, ".3g"),
                 _opt(r.sigma_slope, "+.3f"), r.execution) for r in self.layers]
        rows.append(("total", f"{self.numel} weights", f"{self.target_density:.4f}", f"{self.density:.4f}",
                     f"{self.itop:.4f}", str(self.changed), str(sum(r.zero_fanin for r in self.layers)), "", "", "",
                     f"{sum(r.execution == 'sparse' for r in self.layers)} sparse"))
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        tail = ([] if self.correction_ratio is None else
                [f"||SparseOpt-corrected g|| / ||g|| at the last step: {self.correction_ratio:.4f}"])
        tail += [f"left dense: {name} ({why})" for name, why in self.dense.items()]
        return "\n".join([f"sparsity report at step {self.step}", fmt(head), rule, *map(fmt, rows[:-1]), rule,
                          fmt(rows[-1]), *tail])


def _opt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
