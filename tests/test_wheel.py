"""A built wheel installs into a fresh virtual environment and works from outside the checkout.

Why: fucina reads YAML recipes, task files and the built-in corpus at run time, and an editable
install hides a wheel that lacks them. The wheel is built from a copy of the sources (a stale `build/`
in the checkout cannot leak files into it), compared with `git ls-files src`, installed with torch at
the pin `make setup` uses into a venv under tmp_path, and run from a directory outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN_TASKS = sorted(path.stem for path in (REPO / "src/fucina/evaluate/tasks").glob("*.yaml"))

pytestmark = pytest.mark.slow


def _run(command: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _torch_pin() -> str:
    match = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text(encoding="utf-8"))
    assert match, "the Makefile pins torch (pip install torch==X) before installing fucina"
    return match.group(1)


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    source = tmp_path / "source"
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("fucina-*.whl")
    return wheel


def test_wheel_installs_into_a_fresh_venv_and_runs_the_cli(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheel = _build_wheel(tmp_path, env)

    tracked = subprocess.run(
        ["git", "ls-files", "src/fucina"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = [path for path in tracked if path.removeprefix("src/") not in shipped]
    assert not missing, f"files of the package missing from the wheel: {missing}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, fucina = venv / "bin/python", venv / "bin/fucina"
    _run([python, "-m", "pip", "install", "-q", f"torch=={_torch_pin()}"], tmp_path, env)
    _run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    location, torch_version = _run(
        [python, "-c", "import fucina, torch; print(fucina.__file__); print(torch.__version__)"], outside, env
    ).split()
    assert Path(location).is_relative_to(venv), f"fucina imported from {location}, not the venv"
    assert torch_version.split("+")[0] == _torch_pin().split("+")[0], "installing fucina replaced torch"

    assert "usage: fucina demo" in _run([fucina, "demo", "--help"], outside, env)
    listed = _run([fucina, "eval", "--list-tasks"], outside, env)
    assert BUILTIN_TASKS and all(re.search(rf"^{name}\s", listed, re.M) for name in BUILTIN_TASKS), listed

    recipe = _run(
        [python, "-c", "from fucina.cli.demo import recipe_path; print(recipe_path('demo-pretrain.yaml'))"],
        outside,
        env,
    ).strip()
    assert Path(recipe).is_relative_to(venv)
    _run([fucina, "train", recipe, "--dry-run", "--steps", "2", "--out", outside / "run"], outside, env)
    assert (outside / "run" / "final" / "model.safetensors").is_file()
