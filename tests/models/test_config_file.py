"""Editing `serving.api_keys` in a config file's text: comments and layout kept, the result
parsed back before it is accepted, a layout the edit cannot handle refused untouched."""

from __future__ import annotations

import stat

import pytest
import yaml

from models.config import config_from_dict
from models.config_file import (
    ConfigEditError,
    add_api_key_entry,
    revoke_api_key_entries,
    write_config_text,
)

pytestmark = pytest.mark.fast

A = "a" * 64
B = "0123456789" * 6 + "1e10"  # all digits but one `e`: a float if it were left unquoted
C = "c" * 64

HEAD = (
    "# my config\ndataset:\n  path: data.csv  # the table\n  target: y\n  numeric_features: [x]\n"
)


def _keys(text: str) -> list[dict]:
    return yaml.safe_load(text)["serving"]["api_keys"]


@pytest.mark.parametrize(
    "text",
    [
        HEAD,
        HEAD.rstrip("\n"),
        HEAD + "serving:\n  port: 3001\n",
        HEAD + "serving:\n    # the port\n    port: 3001\ncanary:\n  enabled: false\n",
        HEAD + "serving:\n  api_keys: []  # none yet\n  port: 3001\n",
        HEAD + "serving:\n  port: 3001\n  api_keys:\n",
        HEAD + "serving:\n",
    ],
    ids=["no-serving", "no-final-newline", "serving", "comments", "empty-list", "null", "bare"],
)
def test_a_key_is_added_and_everything_else_kept(text):
    out = add_api_key_entry(text, {"name": "ci", "sha256": A})
    assert _keys(out) == [{"name": "ci", "sha256": A}]
    assert out.startswith(HEAD.rstrip("\n"))
    assert "# my config" in out and "# the table" in out
    before = yaml.safe_load(text)
    after = yaml.safe_load(out)
    assert {k: v for k, v in after.items() if k != "serving"} == {
        k: v for k, v in before.items() if k != "serving"
    }
    config_from_dict(after)


@pytest.mark.parametrize("items_indent", [2, 4])
def test_a_key_is_appended_after_the_existing_ones(items_indent):
    pad = " " * items_indent
    text = (
        HEAD
        + "serving:\n  api_keys:\n"
        + f"{pad}- name: old\n{pad}  sha256: {A}\n"
        + f"{pad}  # a comment inside the list\n"
        + f"{pad}- {{name: other, sha256: {C}}}\n"
        + "  # about the port\n  port: 3001\n"
    )
    out = add_api_key_entry(text, {"name": "@new", "sha256": B, "rate_limit_per_s": 2.5})
    assert _keys(out) == [
        {"name": "old", "sha256": A},
        {"name": "other", "sha256": C},
        {"name": "@new", "sha256": B, "rate_limit_per_s": 2.5},
    ]
    assert "  # about the port\n  port: 3001\n" in out
    assert yaml.safe_load(out)["serving"]["port"] == 3001


@pytest.mark.parametrize(
    "text",
    [
        HEAD + "serving: {port: 3001}\n",
        HEAD + "serving:\n  api_keys: [{name: a, sha256: " + A + "}]\n",
        HEAD + "serving: [1, 2]\n",
        HEAD + '"serving":\n  port: 3001\n',
        "dataset: [unclosed\n",
        "- a list\n",
    ],
    ids=["inline-serving", "inline-keys", "serving-list", "quoted-key", "bad-yaml", "top-list"],
)
def test_a_layout_the_edit_cannot_handle_is_refused(text):
    with pytest.raises(ConfigEditError):
        add_api_key_entry(text, {"name": "ci", "sha256": A})


def test_revoking_marks_every_entry_with_that_digest_and_keeps_the_rest():
    text = (
        HEAD
        + "serving:\n  api_keys:\n"
        + f"  - name: ci  # the CI job\n    sha256: {A.upper()}\n    rate_limit_burst: 3\n"
        + f"  - {{name: ci-copy, sha256: '{A}'}}\n"
        + f"  - sha256: {A}\n    name: first-field\n"
        + f"  - name: stays\n    sha256: {C}\n"
        + f"  - name: was\n    revoked: false\n    sha256: {A}\n"
        + "  port: 3001\n"
    )
    out = revoke_api_key_entries(text, A)
    keys = _keys(out)
    assert [k.get("revoked", False) for k in keys] == [True, True, True, False, True]
    assert keys[0]["rate_limit_burst"] == 3 and "# the CI job" in out
    assert yaml.safe_load(out)["serving"]["port"] == 3001
    config_from_dict(yaml.safe_load(out))
    # Revoking again changes nothing.
    assert revoke_api_key_entries(out, A) == out


def test_revoking_an_unknown_digest_is_refused():
    text = HEAD + f"serving:\n  api_keys:\n  - name: a\n    sha256: {A}\n"
    with pytest.raises(ConfigEditError, match="no entry"):
        revoke_api_key_entries(text, C)


def test_the_file_is_replaced_in_one_step_with_its_mode(tmp_path):
    path = tmp_path / "mlgate.yaml"
    path.write_text(HEAD)
    path.chmod(0o600)
    write_config_text(path, HEAD + "serving:\n  port: 1\n")
    assert yaml.safe_load(path.read_text())["serving"] == {"port": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["mlgate.yaml"]
