"""Finding the Driver an APP names, and the one-line errors when it cannot be found."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor_driver import Driver
from conveyor_driver.errors import AppLoadError
from conveyor_driver.loader import load_driver

DRIVER_SOURCE = """
from conveyor_driver import Driver

{attr} = Driver({name!r})

@{attr}.on("pipeline")
async def build(ctx):
    return None
"""


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run each test in its own directory and undo what loading added to sys.path/modules."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    # The import system caches directory listings; a file written a moment ago must be seen.
    importlib.invalidate_caches()
    return path


def write_driver(path: Path, name: str, attr: str = "driver") -> Path:
    return write(path, DRIVER_SOURCE.format(attr=attr, name=name))


def load_error(spec: str) -> str:
    with pytest.raises(AppLoadError) as info:
        load_driver(spec)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_module_and_attribute(tmp_path: Path) -> None:
    write_driver(tmp_path / "loader_app_a.py", "alpha", attr="my_driver")
    driver = load_driver("loader_app_a:my_driver")
    assert isinstance(driver, Driver)
    assert driver.name == "alpha"
    assert driver.resource_types == ["pipeline"]


def test_module_alone_means_the_attribute_driver(tmp_path: Path) -> None:
    write_driver(tmp_path / "loader_app_b.py", "beta")
    assert load_driver("loader_app_b").name == "beta"


def test_dotted_module_in_a_package(tmp_path: Path) -> None:
    write(tmp_path / "loader_pkg" / "__init__.py", "")
    write_driver(tmp_path / "loader_pkg" / "drivers.py", "gamma", attr="runner")
    assert load_driver("loader_pkg.drivers:runner").name == "gamma"


def test_relative_file_path_and_attribute(tmp_path: Path) -> None:
    write_driver(tmp_path / "apps" / "loader_file_c.py", "delta", attr="worker")
    assert load_driver("apps/loader_file_c.py:worker").name == "delta"


def test_absolute_file_path_alone_means_the_attribute_driver(tmp_path: Path) -> None:
    path = write_driver(tmp_path / "elsewhere" / "loader_file_d.py", "epsilon")
    assert load_driver(str(path)).name == "epsilon"


def test_file_path_without_the_py_suffix(tmp_path: Path) -> None:
    write_driver(tmp_path / "apps" / "loader_file_e.py", "zeta")
    assert load_driver("apps/loader_file_e:driver").name == "zeta"


def test_file_can_import_its_siblings(tmp_path: Path) -> None:
    write(tmp_path / "proj" / "loader_helpers_f.py", "NAME = 'eta'\n")
    write(
        tmp_path / "proj" / "loader_file_f.py",
        """
        from loader_helpers_f import NAME
        from conveyor_driver import Driver

        driver = Driver(NAME)
        """,
    )
    assert load_driver("proj/loader_file_f.py").name == "eta"


def test_unimportable_module() -> None:
    assert load_error("loader_missing_module") == (
        "cannot import 'loader_missing_module': no module named 'loader_missing_module'"
    )


def test_module_whose_own_import_is_missing(tmp_path: Path) -> None:
    write(tmp_path / "loader_app_g.py", "import loader_no_such_dependency\n")
    assert load_error("loader_app_g") == (
        "importing 'loader_app_g' failed: No module named 'loader_no_such_dependency'"
    )


def test_missing_attribute(tmp_path: Path) -> None:
    write_driver(tmp_path / "loader_app_h.py", "theta")
    assert load_error("loader_app_h:nope") == "'loader_app_h' has no attribute 'nope'"


def test_missing_default_attribute(tmp_path: Path) -> None:
    write_driver(tmp_path / "loader_app_i.py", "iota", attr="app")
    assert load_error("loader_app_i") == "'loader_app_i' has no attribute 'driver'"


def test_attribute_that_is_not_a_driver(tmp_path: Path) -> None:
    write(tmp_path / "loader_app_j.py", "driver = 42\n")
    assert load_error("loader_app_j:driver") == (
        "loader_app_j:driver is a int, not a conveyor_driver.Driver"
    )


def test_module_that_raises_at_import(tmp_path: Path) -> None:
    write(tmp_path / "loader_app_k.py", "raise RuntimeError('no config file')\n")
    assert load_error("loader_app_k") == (
        "importing 'loader_app_k' failed: RuntimeError: no config file"
    )


def test_file_that_raises_at_import(tmp_path: Path) -> None:
    write(tmp_path / "apps" / "loader_file_l.py", "raise RuntimeError('no config file')\n")
    assert load_error("apps/loader_file_l.py:driver") == (
        "importing 'apps/loader_file_l.py' failed: RuntimeError: no config file"
    )
    # A half-imported module must not linger for the next attempt to pick up.
    assert "loader_file_l" not in sys.modules


def test_file_with_a_syntax_error(tmp_path: Path) -> None:
    write(tmp_path / "apps" / "loader_file_m.py", "def broken(:\n")
    message = load_error("apps/loader_file_m.py")
    assert message.startswith("importing 'apps/loader_file_m.py' failed: SyntaxError:")


def test_missing_file() -> None:
    assert load_error("apps/loader_nowhere.py:driver") == (
        "cannot import 'apps/loader_nowhere.py': no such file"
    )


def test_file_attribute_that_is_not_a_driver(tmp_path: Path) -> None:
    write(tmp_path / "apps" / "loader_file_n.py", "driver = 'a string'\n")
    assert load_error("apps/loader_file_n.py") == (
        "apps/loader_file_n.py:driver is a str, not a conveyor_driver.Driver"
    )
