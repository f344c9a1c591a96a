"""An app whose import fails, as a typo or a missing setting in user code would."""

raise RuntimeError("settings file missing")
