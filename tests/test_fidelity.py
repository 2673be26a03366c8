"""`sparseopt reproduce fidelity` on a tiny budget: the mechanism probes measure what the theory predicts."""

import json

from sparseopt.cli import main
from sparseopt.experiments.studies.fidelity import fidelity


def test_fidelity_probes_and_grids_on_a_tiny_budget(tmp_path):
    summary = fidelity(tmp_path / "fid", seeds=2, probe_steps=(1,), collapse_epochs=0.25, convergence_epochs=0.25,
                       workers=1, quiet=True)
    base, with_so = summary["mechanism"]["baseline"], summary["mechanism"]["sparseopt"]
    for b, s in zip(base, with_so):   # at step 1: relative update ∝ k^-0.5 without SparseOpt, flat with it
        assert -0.7 < b[0] < -0.3 and -0.2 < s[0] < 0.2
    jump = summary["mask_update_jump"]
    assert all(0.45 < f < 0.55 for f in jump["factor_slope"])     # c_i ∝ sqrt(k_i) jumps with the mask
    assert all(abs(s) < 0.1 for s in jump["sigma_slope"])        # BatchNorm's sigma_i hardly moves
    table = (tmp_path / "fid" / "fidelity.md").read_text()
    assert "## 3. Training" in table and "98% rigl+sparseopt+nn-drop − 98% rigl+sparseopt: accuracy" in table
    assert len(json.loads((tmp_path / "fid" / "results.json").read_text())["accuracy"]) == 10
    assert (tmp_path / "fid" / "report" / "report.md").is_file()


def test_reproduce_lists_the_fidelity_preset(capsys):
    assert main(["reproduce", "fidelity", "--dry-run"]) == 0
    assert main(["reproduce", "--list"]) == 0
    assert "fidelity" in capsys.readouterr().out
