"""`${name}` placeholders: finding, rendering, escapes and known names."""

from __future__ import annotations

import pytest

from pipelines_schema.placeholders import (
    LABEL_NAMES,
    MissingValue,
    find_placeholders,
    find_unterminated,
    is_known_placeholder,
    render,
)

VALUES = {"sha": "abc123", "pr.number": "7", "secrets.TOKEN": "s3cret"}


def _resolve(name: str) -> str:
    if name not in VALUES:
        raise MissingValue(name)
    return VALUES[name]


def test_find_in_string() -> None:
    assert find_placeholders("build ${sha} of #${pr.number}") == {"sha", "pr.number"}


def test_find_nested() -> None:
    value = {"a": ["${sha}", {"b": "${run.id}"}], "c": 5, "d": None, "e": ("${branch}",)}
    assert find_placeholders(value) == {"sha", "run.id", "branch"}


def test_find_ignores_keys() -> None:
    assert find_placeholders({"${sha}": "plain"}) == set()


def test_find_skips_escape() -> None:
    assert find_placeholders("$${sha} and ${branch}") == {"branch"}


def test_find_keeps_odd_names() -> None:
    assert find_placeholders("${ sha }${}") == {" sha ", ""}


def test_find_unterminated() -> None:
    assert find_unterminated(["ok ${sha}", "bad ${sha", "end ${"]) == ["${sha", "${"]


def test_find_unterminated_ignores_escape() -> None:
    assert find_unterminated("$${sha") == []


def test_render_string() -> None:
    assert render("${sha}-${pr.number}", _resolve) == "abc123-7"


def test_render_escape() -> None:
    assert render("$${sha} is ${sha}", _resolve) == "${sha} is abc123"


def test_render_escape_after_dollar() -> None:
    assert render("$$${sha}", _resolve) == "$${sha}"


def test_render_plain_dollars() -> None:
    assert render("cost: $5, $$ and $HOME", _resolve) == "cost: $5, $$ and $HOME"


def test_render_unterminated_kept() -> None:
    assert render("a ${sha", _resolve) == "a ${sha"


def test_render_deep_copy() -> None:
    original = {"headers": {"X-Sha": "${sha}"}, "list": ["${sha}", 3, True, None]}
    rendered = render(original, _resolve)
    assert rendered == {"headers": {"X-Sha": "abc123"}, "list": ["abc123", 3, True, None]}
    assert original["headers"] == {"X-Sha": "${sha}"}
    assert rendered["headers"] is not original["headers"]


def test_render_keys_untouched() -> None:
    assert render({"${sha}": "${sha}"}, _resolve) == {"${sha}": "abc123"}


def test_render_tuple() -> None:
    assert render(("${sha}",), _resolve) == ("abc123",)


def test_render_missing_value() -> None:
    with pytest.raises(MissingValue) as caught:
        render({"a": ["${pr.number}", "${branch}"]}, _resolve)
    assert caught.value.name == "branch"
    assert "${branch}" in str(caught.value)


def test_missing_value_is_lookup_error() -> None:
    assert isinstance(MissingValue("sha"), LookupError)


@pytest.mark.parametrize(
    "name",
    [
        *LABEL_NAMES,
        "run.id",
        "run.url",
        "callback_url",
        "secrets.TOKEN",
        "secrets._x9",
        "labels.env",
        "labels.team.name",
    ],
)
def test_known_placeholder(name: str) -> None:
    assert is_known_placeholder(name) is True


@pytest.mark.parametrize(
    "name",
    [
        "",
        "SHA",
        " sha",
        "secrets.",
        "secrets.9x",
        "secrets.my-token",
        "labels.",
        "labels.a b",
        "labels.${x",
        "run",
        "pr",
        "branches",
    ],
)
def test_unknown_placeholder(name: str) -> None:
    assert is_known_placeholder(name) is False


def test_label_names_cover_every_run_label() -> None:
    assert set(LABEL_NAMES) == {
        "forge",
        "event",
        "trigger",
        "repository",
        "sha",
        "ref",
        "branch",
        "tag",
        "pr.number",
        "pr.source_branch",
        "pr.target_branch",
        "pr.labels",
        "author",
        "fork",
        "comment.author",
    }
