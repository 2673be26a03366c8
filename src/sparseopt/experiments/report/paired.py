"""Paired comparisons for ``sparseopt report``: every two configurations that differ in exactly one setting and
share seeds, with the per-seed difference of final test accuracy, its t statistic and 95% interval.

Seed-paired differences cancel what a seed fixes in both runs (initial weights, masks, data order), which is most of
the run-to-run spread; the t statistic is mean / (sd / sqrt(n)) over the n shared seeds.
"""

from __future__ import annotations

import itertools
import json

from sparseopt.stats import paired_difference

IGNORED = ("name", "train.seed")   # what differs between compared runs by construction
PREFIXES = ("logging.", "diagnostics.")   # measurement settings: they do not change training


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{dotted}."))
        else:
            out[dotted] = json.dumps(value, sort_keys=True)
    return {k: v for k, v in out.items() if k not in IGNORED and not k.startswith(PREFIXES)}


def paired_comparisons(groups: dict[str, list]) -> list[dict]:
    """One row per pair of groups (in report order: ``a`` is listed first) that differ in one setting and share
    at least two seeds."""
    settings = {label: _flat(runs[0].results["config"]) for label, runs in groups.items()}
    rows = []
    for a, b in itertools.combinations(groups, 2):
        keys = sorted(set(settings[a]) | set(settings[b]))
        differ = [k for k in keys if settings[a].get(k) != settings[b].get(k)]
        if len(differ) != 1:
            continue
        final = {label: {r.seed: r.results["final"]["test_accuracy"] for r in groups[label]} for label in (a, b)}
        seeds = sorted(set(final[a]) & set(final[b]))
        if len(seeds) < 2:
            continue
        d = paired_difference([final[a][s] for s in seeds], [final[b][s] for s in seeds])
        key = differ[0]
        rows.append({"a": a, "b": b, "setting": key, "a_value": settings[a].get(key), "b_value": settings[b].get(key),
                     "seeds": seeds, "mean": d.mean, "sd": d.sd, "t": d.t, "ci_low": d.low, "ci_high": d.high})
    return rows


def paired_table(rows: list[dict]) -> str:
    """Markdown: Δ = b − a in final test accuracy (percentage points), paired over the shared seeds."""
    if not rows:
        return "No two configurations differ in exactly one setting with at least two shared seeds."
    head = ["a", "b", "setting (a → b)", "seeds", "Δ final acc (b − a), points", "95% CI", "t"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = "-" if r["ci_low"] is None else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        lines.append("| " + " | ".join([
            r["a"], r["b"], f"{r['setting']}: {r['a_value']} → {r['b_value']}", str(len(r["seeds"])),
            f"{100 * r['mean']:+.2f} ± {100 * r['sd']:.2f}", ci, "-" if r["t"] is None else f"{r['t']:+.2f}"]) + " |")
    return "\n".join(lines)
