"""The integrations stay outside the core: ``import sparseopt`` must not import any framework."""

import subprocess
import sys


def test_import_sparseopt_loads_no_framework():
    code = ("import sys, sparseopt; print(sorted(m for m in ('transformers', 'accelerate', 'lightning', "
            "'pytorch_lightning', 'sparseopt.integrations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
