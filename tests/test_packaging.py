"""Every data file the package reads at run time (C++ sources built on first use, preset YAML) ships in its wheel:
a source missing from package-data would make an installed sparseopt fall back to its slower paths."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sparseopt"


def test_every_cpp_and_yaml_file_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sparseopt"]
    shipped = {p for g in globs for p in PACKAGE.glob(g)}
    needed = {p for suffix in ("*.cpp", "*.yaml") for p in PACKAGE.rglob(suffix)}
    assert needed, "the test looks in the wrong place"
    missing = sorted(str(p.relative_to(PACKAGE)) for p in needed - shipped)
    assert not missing, f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"
