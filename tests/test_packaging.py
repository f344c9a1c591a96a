"""The package as users get it: built with ``python -m build``, installed into a fresh venv.

The editable install the test-suite runs on hides packaging mistakes (a build backend too
old for ``pyproject.toml``, a file missing from the sdist or the wheel, an extra that lacks
a dependency), so these tests build the sdist and the wheel from a copy of the sources and
install each into a venv of its own, away from the source tree.

They take about a minute and need PyPI (or pip's cache) for the dependencies: ``-m 'not
slow'`` leaves them out of a quick run; ``make test`` runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from _readme import README, parse, run_project, write_project

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 300  # seconds for one build or one pip install, downloads included


def _env() -> dict[str, str]:
    """The environment without this venv's traces, so a fresh venv sees only itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in cmd],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def lowest_setuptools() -> str:
    """The lowest setuptools ``[build-system] requires`` allows (it must name one exactly)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (pin,) = [r for r in requires if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools\s*>=\s*([0-9][0-9.]*)", pin)
    assert match, f"give setuptools a lower bound: {pin!r}"
    return match[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sdist and a wheel built by ``python -m build`` with the lowest setuptools allowed.

    A lower bound that is too low goes unnoticed when the build picks the newest
    setuptools, so the build is pinned to the bound itself. ``python -m build`` builds the
    wheel from the unpacked sdist, so a file the sdist forgets breaks the wheel too. The
    sources are copied first: a build writes ``*.egg-info`` and ``build/`` into them.
    """
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache"
        ),
    )
    constraints = tmp / "constraints.txt"
    constraints.write_text(f"setuptools=={lowest_setuptools()}\n")
    out = tmp / "out"
    _run(
        [sys.executable, "-m", "build", "--outdir", out, src],
        cwd=tmp,
        env={**_env(), "PIP_CONSTRAINT": str(constraints)},
    )
    return out


def _artifact(dist: Path, pattern: str) -> Path:
    (path,) = dist.glob(pattern)
    return path


def _fresh_venv(where: Path) -> Path:
    """A new venv with nothing but pip; returns its ``bin`` directory."""
    _run([sys.executable, "-m", "venv", where], cwd=where.parent)
    return where / "bin"


#: Without the otel extra, /metrics still renders the run counts and the backlog.
_METRICS_WITHOUT_SDK = """
import importlib.util
assert importlib.util.find_spec("opentelemetry.sdk") is None, "the SDK came without the extra"
from conveyor_driver.exposition import BACKLOGS, render
from conveyor_driver.telemetry import Telemetry
Telemetry().count_run("success")
backlog = BACKLOGS.track("messages", "probe")
backlog.set(3, 1)
status, _, body = render()
text = body.decode()
assert status == 200, text
assert 'conveyor_driver_runs_total{outcome="success"} 1.0' in text, text
assert 'conveyor_driver_backlog{consumer="probe",stream="messages"} 4.0' in text, text
"""


def _check_installed(bin_dir: Path, cwd: Path) -> None:
    """The console script answers ``--help``, and the package comes from the venv."""
    help_text = _run([bin_dir / "conveyor-driver", "--help"], cwd=cwd)
    for command in ("run", "emit", "routes", "status", "logs"):
        assert re.search(rf"^\s+{command}\b", help_text, re.M), help_text
    where = _run(
        [
            bin_dir / "python",
            "-c",
            "import pathlib, conveyor_driver; print(pathlib.Path(conveyor_driver.__file__).parent)",
        ],
        cwd=cwd,
    ).strip()
    package = Path(where)
    assert package.is_relative_to(bin_dir.parent), f"imported from {package}, not the venv"
    assert (package / "py.typed").is_file()


def test_metadata_and_files_of_the_wheel_and_the_sdist(dist: Path) -> None:
    with zipfile.ZipFile(_artifact(dist, "conveyor_driver-*-py3-none-any.whl")) as wheel:
        names = set(wheel.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = wheel.read(metadata).decode().split("\n\n", 1)[0].splitlines()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert "conveyor_driver/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "examples/", "bench/")) for n in names)
    assert "License-Expression: Apache-2.0" in fields
    assert "Requires-Python: >=3.11" in fields
    for classifier in (
        "Typing :: Typed",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ):
        assert f"Classifier: {classifier}" in fields
    for extra in ("embedded", "otel", "testing"):
        assert f"Provides-Extra: {extra}" in fields
    assert "conveyor-driver = conveyor_driver.cli:main" in scripts

    with tarfile.open(_artifact(dist, "conveyor_driver-*.tar.gz")) as sdist:
        files = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "conveyor_driver/py.typed"} <= files


def test_the_wheel_installs_into_a_fresh_venv_and_its_testing_extra_runs_the_readme(
    dist: Path, tmp_path: Path
) -> None:
    wheel = _artifact(dist, "conveyor_driver-*-py3-none-any.whl")
    bin_dir = _fresh_venv(tmp_path / "venv")
    _run([bin_dir / "pip", "install", "--quiet", wheel], cwd=tmp_path)
    _check_installed(bin_dir, tmp_path)
    _run([bin_dir / "python", "-c", _METRICS_WITHOUT_SDK], cwd=tmp_path)

    # `pip install conveyor-driver[testing]` must be all the documented tests need: the
    # README's, and the testing how-to's (FakeContext, dispatch, the nats-server fixtures).
    _run([bin_dir / "pip", "install", "--quiet", f"{wheel}[testing]"], cwd=tmp_path)
    for document in (README, README.parent / "docs" / "how-to" / "testing.md"):
        project_dir = tmp_path / "project" / document.stem
        project_dir.mkdir(parents=True)
        project = write_project(parse(document.read_text()), project_dir)
        outcome = run_project(bin_dir / "python", project)
        assert outcome.not_passed == {}, outcome.output
        assert outcome.passed == project.expected_tests, outcome.output


def test_the_sdist_installs_into_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    sdist = _artifact(dist, "conveyor_driver-*.tar.gz")
    bin_dir = _fresh_venv(tmp_path / "venv")
    _run([bin_dir / "pip", "install", "--quiet", sdist], cwd=tmp_path)
    _check_installed(bin_dir, tmp_path)
