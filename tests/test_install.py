"""lcseg installs with pip and its commands run from any directory.

The install goes into a fresh virtual environment in tmp_path that sees this
environment's packages (so nothing is downloaded: ``--no-deps --no-build-isolation``),
from a copy of the repository's sources, so that pip's build/ and
*.egg-info never land in the working tree and parallel runs do not race on them. The
commands then run from another directory, where the repository is not importable.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests import conftest

REPO_ROOT = Path(conftest.REPO_ROOT)

# module -> text its --help must print (a flag it defines).
COMMANDS = {"lcseg.evaluate": "--workdir", "lcseg.prepare": "--manual_dir",
            "lcseg.predict": "--workdir"}
# The default config and every dataset builder must import from the installed package.
IMPORT_CHECK = """
import configs, datasets, lcseg
from configs import default
from lcseg.data import DATASETS, get_metadata
default.get_config()
for name in DATASETS:
    get_metadata(name).builder_class()
print(lcseg.__file__, configs.__file__, datasets.__file__, sep="\\n")
"""


def _copy_sources(destination: Path) -> Path:
    """Copies the repository's sources into ``destination``: no build output, no caches.

    Hidden folders (.git, .venv, tool caches) and build/run outputs stay behind; a git
    checkout is not needed.
    """
    skip_anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(skip_anywhere(folder, names))
        if Path(folder) == REPO_ROOT:
            skipped |= {n for n in names if n.startswith(".") or n in ("build", "dist", "runs")}
        return skipped

    shutil.copytree(REPO_ROOT, destination, ignore=ignore, dirs_exist_ok=True)
    return destination


def _venv(path: Path) -> Path:
    """A virtual environment seeing this one's packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    # --system-site-packages reaches the base interpreter's packages, not those of the
    # virtual environment running the tests: a .pth file adds those.
    Path(purelib, "_lcseg_test_parent.pth").write_text("\n".join(site.getsitepackages()))
    return python


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # Without PYTHONPATH the repository is importable only through the installed package.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("editable", [False, True])
def test_pip_install_then_commands_run_anywhere(tmp_path, editable):
    source = _copy_sources(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
               "--no-deps", "--no-build-isolation", *(["-e"] if editable else []), str(source)]
    result = _run(install, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = _run([str(python), "-c", IMPORT_CHECK], elsewhere)
    assert result.returncode == 0, result.stderr
    locations = result.stdout.split()
    home = source if editable else tmp_path / "venv"
    assert all(Path(location).is_relative_to(home) for location in locations), locations

    # One command is enough to show the editable install works; all three for the wheel.
    for module, expected in list(COMMANDS.items())[: 1 if editable else None]:
        result = _run([str(python), "-m", module, "--help"], elsewhere)
        output = result.stdout + result.stderr
        # absl's --help exits 1 by design (every command is absl now).
        assert result.returncode == 1, output
        assert expected in output and "Traceback" not in output, output


def test_dependencies_match_requirements_txt():
    """pyproject's ranges name the same packages as requirements.txt and admit its pins."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(line).name.lower().replace("_", "-"): Requirement(line)
              for line in project["dependencies"]}
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pins[requirement.name.lower().replace("_", "-")] = requirement
    assert sorted(ranges) == sorted(pins)
    for name, pin in pins.items():
        (version,) = [spec.version for spec in pin.specifier]
        assert ranges[name].specifier.contains(version), (name, version, ranges[name])
