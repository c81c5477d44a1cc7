"""The architecture as contracts (.importlinter): the suite fails when an import breaks one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the `framework` package found under `root`, with the contracts in `root`/.importlinter."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_every_import_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_and_a_cycle_breaks_the_acyclic_contract(tmp_path: Path):
    """The contracts can fail: a copy of the package where the model imports a benchmark, and the sweep's
    PBT module imports the sweep planner (which imports it back)."""
    shutil.copytree(ROOT / "framework", tmp_path / "framework", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "framework" / "model.py", "a") as f:
        f.write("\nfrom framework.bench import common as _upward  # noqa: E402,F401\n")
    with open(tmp_path / "framework" / "tune" / "pbt.py", "a") as f:
        f.write("\nfrom framework.tune import plan as _cycle  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "framework.model -> framework.bench.common" in result.stdout
    assert "No cycles are allowed in framework.tune." in result.stdout
    assert "3 kept, 2 broken" in result.stdout


def test_composing_a_serve_config_imports_no_torch():
    """Serving's config holds names, not torch dtypes: composing and typing it stays light (a RayService's args, submit)."""
    code = (
        "import sys\n"
        "from framework.serve.config import SERVE, to_serve_config, validate_serve\n"
        "validate_serve(to_serve_config(SERVE.compose(['serve.model_path=/models/m'])))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
