"""The one-way imports of DESIGN.md, checked by import-linter (contracts in pyproject.toml).

import-linter walks the root package's directory, and our subpackages live in other top-level
folders (setuptools package-dir), so the check runs over a copy laid out as installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def installed_layout(dst: Path) -> Path:
    """Copy the package as `pip install .` would lay it out; returns the folder to put on sys.path."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    site = dst / "site"
    for package, folder in sorted(mapping.items()):
        target = site.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def lint(site: Path) -> subprocess.CompletedProcess[str]:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint_imports), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=site, capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )


def test_import_contracts_hold(tmp_path: Path) -> None:
    result = lint(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    site = installed_layout(tmp_path)
    (site / "moecluster" / "workers" / "_uses_cluster.py").write_text("import moecluster.cluster.cli\n")
    result = lint(site)
    assert result.returncode != 0
    assert "moecluster.workers._uses_cluster -> moecluster.cluster.cli" in result.stdout
