"""``python -m conveyor_driver``: the ``conveyor-driver`` command without its script."""

from .cli import main

main(prog_name="conveyor-driver")
