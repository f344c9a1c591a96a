"""The version is written once (``conveyor_driver/_version.py``) and everything agrees with it:
the package metadata, ``conveyor_driver.__version__`` and ``conveyor-driver --version``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

import conveyor_driver
from conveyor_driver._version import __version__
from conveyor_driver.cli import main

ROOT = Path(__file__).resolve().parent.parent
# PEP 440 public versions, as a release would carry them: 1.2.3, 1.2.3rc1, 1.2.3.post1, 1.2.3.dev4
_PEP440 = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?")


def test_the_version_is_a_release_version() -> None:
    assert _PEP440.fullmatch(__version__), __version__


def test_pyproject_takes_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "conveyor_driver._version.__version__"}


def test_the_installed_metadata_and_the_package_agree() -> None:
    # The editable install builds its metadata from _version.py; `make install` redoes it
    # when that file changes.
    assert version("conveyor-driver") == conveyor_driver.__version__ == __version__
    assert "__version__" in conveyor_driver.__all__


def test_the_cli_prints_the_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip().endswith(f"version {__version__}")


@pytest.mark.process
def test_the_installed_command_prints_the_version() -> None:
    done = subprocess.run(
        [Path(sys.executable).parent / "conveyor-driver", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"conveyor-driver, version {__version__}"
