"""Masking secrets in the forms that stored text may contain them."""

from __future__ import annotations

import json
import shlex
import urllib.parse

import pytest

from bot.net.secrets import SecretStore

SECRET = 'p\u00e4ss"w0rd tok/1'

# (case, the secret as the text contains it)
FORMS = [
    ("raw", SECRET),
    ("json escaped", json.dumps(SECRET)[1:-1]),
    ("json escaped keeping unicode", json.dumps(SECRET, ensure_ascii=False)[1:-1]),
    ("json escaped twice", json.dumps(json.dumps(SECRET)[1:-1])[1:-1]),
    ("percent encoded", urllib.parse.quote(SECRET, safe="")),
    ("form encoded", urllib.parse.quote_plus(SECRET, safe="")),
    ("shell quoted", shlex.quote(SECRET)),
]


@pytest.mark.parametrize("written", [case[1] for case in FORMS], ids=[case[0] for case in FORMS])
def test_mask_hides_form(written: str) -> None:
    store = SecretStore({"TOKEN": SECRET})
    assert store.mask(f"before {written} after") == "before *** after"


def test_mask_shell_quote_with_apostrophe() -> None:
    secret = "it's-a-secret"
    store = SecretStore({"X": secret})
    assert store.mask(shlex.join(["run", secret])) == "run ***"


def test_mask_echoed_json_body() -> None:
    store = SecretStore({"TOKEN": SECRET})
    echoed = json.dumps({"received": json.dumps({"token": SECRET})})
    assert "w0rd" not in store.mask(echoed)


def test_mask_leaves_other_text() -> None:
    store = SecretStore({"TOKEN": "s3cret"})
    assert store.mask('{"a": "b%20c"}') == '{"a": "b%20c"}'
