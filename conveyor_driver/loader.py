"""Finding the Driver an ``APP`` names: ``module:attr``, ``path/app.py:attr`` or ``module``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .app import Driver
from .errors import AppLoadError

DEFAULT_ATTRIBUTE = "driver"


def load_driver(spec: str) -> Driver:
    """Import ``spec`` and return its Driver, or raise AppLoadError with one line.

    Like ``flask run``, the current directory is importable, so ``app:driver`` finds
    ``./app.py`` without installing it.
    """
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute.isidentifier():
        target, attribute = spec, DEFAULT_ATTRIBUTE
    module = _import(target)
    try:
        value = getattr(module, attribute)
    except AttributeError:
        raise AppLoadError(f"{target!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Driver):
        raise AppLoadError(
            f"{target}:{attribute} is a {type(value).__name__}, not a conveyor_driver.Driver"
        )
    return value


def _import(target: str) -> ModuleType:
    if target.endswith(".py") or os.sep in target or "/" in target:
        return _import_file(Path(target))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise AppLoadError(f"cannot import {target!r}: no module named {exc.name!r}") from exc
        raise AppLoadError(f"importing {target!r} failed: {exc}") from exc
    except Exception as exc:
        raise AppLoadError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> ModuleType:
    if path.suffix != ".py":
        path = path.with_suffix(".py")
    if not path.is_file():
        raise AppLoadError(f"cannot import {str(path)!r}: no such file")
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = path.stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise AppLoadError(f"cannot import {str(path)!r}: not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise AppLoadError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module
