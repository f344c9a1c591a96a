"""The package's version, written in this one place.

``pyproject.toml`` takes it for the package metadata (setuptools' dynamic ``attr``, read
from this file's text without importing the package), and the code takes it from here
(``conveyor_driver.__version__``, ``conveyor-driver --version``, the OpenTelemetry
instrumentation scope), so the wheel's metadata and the running code cannot disagree.
Change it here, with a section for it in ``CHANGELOG.md``.
"""

__version__ = "0.1.0"
