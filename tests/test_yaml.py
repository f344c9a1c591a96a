"""The manifests' YAML emitter: what it writes, PyYAML (as kubectl) reads back unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from conveyor_driver._yaml import dump_all

# Strings YAML would read as something else if written plain, and some it would not.
TRICKY = [
    "true", "False", "yes", "NO", "on", "Off", "y", "n", "null", "~", "", " ",
    "1", "0.5", "1e3", "0x1F", "0o17", "1_000", "12:30", ".5", "-1", "+1", ".inf", ".NaN",
    "-x", "- x", "*anchor", "&a", "!tag", "%x", "@x", "`x", "|", ">", "?", ":", "foo:",
    "a: b", "a #b", "#c", "a,b", "[a]", "{a}", "'q'", '"q"', "multi\nline", "tab\tx",
    "é", "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
    'max(conveyor_driver_backlog{consumer="x"})', "http://prometheus:9090", "/healthz",
    "500m", "256Mi", "app.kubernetes.io/name", "<<",
]  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_a_string_reads_back_as_the_same_string(text: str) -> None:
    document = {"key": text, text or "empty": [text, {"inner": text}]}
    (loaded,) = yaml.safe_load_all(dump_all([document]))
    assert loaded == document


def test_nesting_empty_containers_numbers_and_booleans_read_back() -> None:
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "items": [
            {"name": "a", "ports": [{"containerPort": 9090}], "empty": {}},
            [1, [2, 3], []],
            {},
            [],
            None,
        ],
        "mapping": {"deep": {"deeper": {"flag": False, "count": 0, "negative": -3}}},
        "flags": [True, False],
    }
    text = dump_all([document, {"second": 1}], header="line one\n\nline three")
    assert text.startswith("# line one\n#\n# line three\n---\n")
    assert list(yaml.safe_load_all(text)) == [document, {"second": 1}]


def test_plain_strings_stay_plain() -> None:
    text = dump_all([{"image": "registry.example/x:1.2", "path": "/healthz"}])
    assert "image: registry.example/x:1.2\n" in text and "path: /healthz\n" in text


@pytest.mark.parametrize("value", [1.5, b"bytes", object()])
def test_values_a_manifest_never_holds_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        dump_all([{"key": value}])
    with pytest.raises(TypeError):
        dump_all([{1: "a"}])  # type: ignore[dict-item]
