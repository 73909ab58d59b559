"""Read YAML text into plain data, keeping the line and column of every key and value.

PyYAML's own loaders drop node positions, silently keep the last of two equal keys,
and expand aliases without bound. This module builds the data from the parser's
event stream instead, so that it can:

- record the position of every key and value under its document path;
- report duplicate keys, undefined aliases and unsupported tags as issues;
- honour anchors, aliases and `<<` merge keys;
- stop at `MAX_DEPTH` levels of nesting and `MAX_NODES` nodes (aliases included), so a
  small file cannot expand into a huge document.

Mapping keys are taken as written (`on:` is the string "on", not a boolean). Timestamps
stay strings, as written. Positions count lines and columns from 1, in characters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipelines_schema.problems import DocPath

MAX_DEPTH = 100
MAX_NODES = 200_000

_TAG = "tag:yaml.org,2002:"
_MERGE_KEY = "<<"
# Characters the YAML 1.1 reader rejects (the same set as PyYAML's reader).
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
# Characters a string may not contain once its escapes are read: C0 controls other than
# tab, line feed and carriage return, and surrogates. Postgres text rejects NUL, and
# UTF-8 cannot encode a lone surrogate.
_UNSTORABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")

_Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]
try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader


@dataclass(frozen=True, order=True)
class Position:
    line: int
    column: int


@dataclass(frozen=True)
class Issue:
    """A problem before it gets a file name: where it is, and what is wrong.

    `at_key` places it on the key of `path` rather than its value; `position`, when set,
    overrides the lookup by path (for YAML syntax errors).
    """

    path: DocPath
    message: str
    at_key: bool = False
    position: Position | None = None


class _Invalid:
    """Stands in for a value that could not be read; its issue is already recorded."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()


@dataclass
class Document:
    data: Any
    positions: dict[DocPath, tuple[Position | None, Position]]

    def position(self, path: DocPath, at_key: bool = False) -> Position:
        """Return the position of a path's key or value, else of its nearest ancestor."""
        for length in range(len(path), -1, -1):
            located = self.positions.get(path[:length])
            if located is None:
                continue
            key, value = located
            if at_key and key is not None and length == len(path):
                return key
            return value
        return Position(1, 1)


@dataclass
class ReadResult:
    """The document, or None when the text could not be read at all, and its issues."""

    document: Document | None
    issues: list[Issue]


def position_of_index(text: str, index: int) -> Position:
    """Return the line and column of a character index, counting YAML's line breaks."""
    line = 1
    line_start = 0
    for match in _LINE_BREAK.finditer(text, 0, index):
        line += 1
        line_start = match.end()
    return Position(line, index - line_start + 1)


def _position(mark: Any) -> Position:
    """Return the position of a parser mark (PyYAML's or libyaml's), counting from 1."""
    if mark is None:
        return Position(1, 1)
    return Position(mark.line + 1, mark.column + 1)


class _DocumentTooLarge(Exception):
    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.message)
        self.issue = issue


@dataclass
class _Anchor:
    value: Any
    path: DocPath
    first_entry: int
    end_entry: int


@dataclass
class _Merge:
    value: Any
    base: DocPath
    first_entry: int
    end_entry: int


@dataclass
class _Frame:
    """An open mapping or sequence."""

    path: DocPath
    anchor: str | None
    first_entry: int
    value: Any  # dict or list
    # Mappings only: the key whose value comes next, and where it was written.
    key: str | None = None
    key_position: Position | None = None
    key_positions: dict[str, Position] = field(default_factory=dict)
    value_entry: int = 0
    merges: list[_Merge] = field(default_factory=list)

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)


_MERGE = "\x00merge"  # pending-key marker for `<<`; no real key can contain NUL


class _Builder:
    """Build plain data and positions from a stream of parser events."""

    def __init__(self) -> None:
        self.entries: list[tuple[DocPath, Position | None, Position]] = []
        self.anchors: dict[str, _Anchor] = {}
        self.open_anchors: set[str] = set()
        self.stack: list[_Frame] = []
        self.issues: list[Issue] = []
        self.root: Any = None
        self.resolver = yaml.resolver.Resolver()
        self.constructor = yaml.constructor.SafeConstructor()

    # -- entry points -------------------------------------------------------------

    def feed(self, events: Iterator[yaml.Event]) -> None:
        documents = 0
        for event in events:
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    message = (
                        "the file contains more than one YAML document, but a pipeline file "
                        "has one: remove the '---' line that starts the second"
                    )
                    self.issues.append(Issue((), message, position=_position(event.start_mark)))
                    return
            elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                self._node_start(event, events)
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                self._collection_end()
            elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                self._node_start(event, events)

    def document(self) -> Document:
        positions = {path: (key, value) for path, key, value in self.entries}
        return Document(self.root, positions)

    # -- nodes --------------------------------------------------------------------

    def _node_start(self, event: yaml.NodeEvent, events: Iterator[yaml.Event]) -> None:
        parent = self.stack[-1] if self.stack else None
        if parent is not None and parent.is_mapping and parent.key is None:
            self._mapping_key(parent, event, events)
            return
        path, key_position = self._child_path(parent)
        if parent is not None:
            parent.value_entry = len(self.entries)
        if isinstance(event, yaml.ScalarEvent):
            self._record(path, key_position, event.start_mark)
            value = self._scalar(event, path)
            self._register_anchor(event.anchor, value, path, len(self.entries) - 1)
            self._insert(value)
        elif isinstance(event, yaml.AliasEvent):
            self._insert(self._alias(event, path, key_position))
        else:
            self._record(path, key_position, event.start_mark)
            self._check_collection_tag(event, path)
            container: Any = {} if isinstance(event, yaml.MappingStartEvent) else []
            frame = _Frame(path, event.anchor, len(self.entries) - 1, container)
            if event.anchor:
                self.open_anchors.add(event.anchor)
            self.stack.append(frame)

    def _child_path(self, parent: _Frame | None) -> tuple[DocPath, Position | None]:
        if parent is None:
            return (), None
        if parent.is_mapping:
            key = _MERGE_KEY if parent.key == _MERGE else parent.key
            assert key is not None
            return (*parent.path, key), parent.key_position
        return (*parent.path, len(parent.value)), None

    def _collection_end(self) -> None:
        frame = self.stack.pop()
        if frame.is_mapping:
            self._apply_merges(frame)
        if frame.anchor:
            self.open_anchors.discard(frame.anchor)
        self._register_anchor(frame.anchor, frame.value, frame.path, frame.first_entry)
        self._insert(frame.value)

    def _insert(self, value: Any) -> None:
        if not self.stack:
            self.root = value
            return
        parent = self.stack[-1]
        if not parent.is_mapping:
            parent.value.append(value)
            return
        if parent.key == _MERGE:
            self._add_merge(parent, value)
        else:
            parent.value[parent.key] = value
        parent.key = None
        parent.key_position = None

    def _record(self, path: DocPath, key: Position | None, mark: Any) -> None:
        self._append_entry(path, key, _position(mark))

    def _append_entry(self, path: DocPath, key: Position | None, value: Position) -> None:
        if len(path) > MAX_DEPTH:
            message = f"the document nests deeper than {MAX_DEPTH} levels; flatten it"
            raise _DocumentTooLarge(Issue((), message, position=value))
        if len(self.entries) >= MAX_NODES:
            message = (
                f"the document has more than {MAX_NODES} values once aliases are "
                "expanded; shorten it or use fewer aliases"
            )
            raise _DocumentTooLarge(Issue((), message, position=value))
        self.entries.append((path, key, value))

    # -- mapping keys -------------------------------------------------------------

    def _mapping_key(
        self, frame: _Frame, event: yaml.NodeEvent, events: Iterator[yaml.Event]
    ) -> None:
        position = _position(event.start_mark)
        if not isinstance(event, yaml.ScalarEvent):
            message = "a mapping key must be a plain string, not a list, mapping or alias"
            self.issues.append(Issue(frame.path, message, position=position))
            _skip_node(event, events)
            _skip_node(next(events), events)  # its value
            return
        if event.value == _MERGE_KEY and event.implicit[0]:
            frame.key, frame.key_position = _MERGE, position
            return
        key = event.value
        unstorable = unstorable_message(key, "key")
        if unstorable:
            self.issues.append(Issue((*frame.path, key), unstorable, position=position))
        self._register_anchor(event.anchor, key, (), len(self.entries))
        first = frame.key_positions.get(key)
        if first is not None:
            message = (
                f"duplicate key '{key}'; the same key is already at line {first.line}, "
                f"column {first.column}: remove one of them"
            )
            self.issues.append(Issue((*frame.path, key), message, position=position))
        else:
            frame.key_positions[key] = position
        frame.key, frame.key_position = key, position

    # -- scalars ------------------------------------------------------------------

    def _scalar(self, event: yaml.ScalarEvent, path: DocPath) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            implicit = event.implicit
            tag = self.resolver.resolve(yaml.ScalarNode, event.value, implicit)  # type: ignore[no-untyped-call]
        if tag in (_TAG + "str", _TAG + "timestamp", _TAG + "merge"):
            message = unstorable_message(event.value, "string")
            return self._invalid(path, message) if message else event.value
        node = yaml.ScalarNode(tag, event.value)
        constructors = {
            _TAG + "int": self.constructor.construct_yaml_int,
            _TAG + "float": self.constructor.construct_yaml_float,
            _TAG + "bool": self.constructor.construct_yaml_bool,
            _TAG + "null": self.constructor.construct_yaml_null,
        }
        construct = constructors.get(tag)
        if construct is None:
            return self._invalid(path, f"unsupported YAML tag '{_short_tag(event.tag)}'; remove it")
        try:
            value = construct(node)
        except (ValueError, yaml.YAMLError) as error:
            excerpt = _shorten(event.value)
            return self._invalid(path, f"invalid {_short_tag(tag)} value '{excerpt}': {error}")
        if isinstance(value, float) and not math.isfinite(value):
            message = f"'{event.value}' is not a finite number; quote it if you mean a string"
            return self._invalid(path, message)
        return value

    def _invalid(self, path: DocPath, message: str) -> Any:
        self.issues.append(Issue(path, message))
        return INVALID

    def _check_collection_tag(self, event: yaml.NodeEvent, path: DocPath) -> None:
        tag = getattr(event, "tag", None)
        if tag in (None, "!", _TAG + "map", _TAG + "seq"):
            return
        self.issues.append(Issue(path, f"unsupported YAML tag '{_short_tag(tag)}'; remove it"))

    # -- anchors, aliases and merge keys -------------------------------------------

    def _register_anchor(self, name: str | None, value: Any, path: DocPath, first: int) -> None:
        if name:
            self.anchors[name] = _Anchor(value, path, first, len(self.entries))

    def _alias(self, event: yaml.AliasEvent, path: DocPath, key: Position | None) -> Any:
        self._record(path, key, event.start_mark)
        name = event.anchor or ""
        anchor = self.anchors.get(name)
        if anchor is None:
            if name in self.open_anchors:
                message = (
                    f"alias '*{name}' refers to a node that contains it; "
                    "a node cannot contain itself"
                )
            else:
                message = f"undefined alias '*{name}'; define the anchor '&{name}' before this line"
            return self._invalid(path, message)
        self._replay(anchor.first_entry + 1, anchor.end_entry, anchor.path, path)
        return anchor.value

    def _replay(self, first: int, end: int, source: DocPath, target: DocPath) -> None:
        """Copy the positions recorded under `source` in entries[first:end] to `target`."""
        size = len(source)
        for index in range(first, end):
            path, key, value = self.entries[index]
            if path[:size] == source:
                self._append_entry(target + path[size:], key, value)

    def _add_merge(self, frame: _Frame, value: Any) -> None:
        base = (*frame.path, _MERGE_KEY)
        end = len(self.entries)
        if isinstance(value, dict):
            frame.merges.append(_Merge(value, base, frame.value_entry, end))
            return
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                frame.merges.append(_Merge(item, (*base, index), frame.value_entry, end))
            return
        if value is not INVALID:
            message = "the merge key '<<' takes a mapping or a list of mappings"
            self.issues.append(Issue(base, message, at_key=True))

    def _apply_merges(self, frame: _Frame) -> None:
        explicit: dict[str, Any] = frame.value
        merged: dict[str, Any] = {}
        for merge in frame.merges:
            new_keys = [key for key in merge.value if key not in explicit and key not in merged]
            for key in new_keys:
                merged[key] = merge.value[key]
            self._replay_keys(merge, set(new_keys), frame.path)
        if merged:
            # Keep the same dict object: anchors registered inside may already refer to it.
            combined = {**merged, **explicit}
            explicit.clear()
            explicit.update(combined)

    def _replay_keys(self, merge: _Merge, keys: set[str], target: DocPath) -> None:
        """Copy the positions of the merged `keys` from the merge source to `target`."""
        size = len(merge.base)
        for index in range(merge.first_entry, merge.end_entry):
            path, key, value = self.entries[index]
            if len(path) > size and path[:size] == merge.base and path[size] in keys:
                self._append_entry(target + path[size:], key, value)


def unstorable_message(text: str, noun: str) -> str | None:
    """Return the problem with a string that contains a character KubeCI cannot store.

    Only escapes in double-quoted scalars (`"\\0"`, `"\\x01"`, `"\\e"`) produce these,
    because `read_yaml` rejects such raw characters in the file. Returns None when the
    string is fine.
    """
    bad = _UNSTORABLE.search(text)
    if bad is None:
        return None
    code = ord(bad.group())
    kind = "a control character" if code < 0x20 else "a lone surrogate"
    return (
        f"invalid character U+{code:04X} ({kind}) in the {noun} {_shorten(text)!r}: "
        "strings may contain no control characters other than tab, line feed and "
        "carriage return, and no lone surrogates. Remove the escape that writes it"
    )


def _short_tag(tag: str | None) -> str:
    """Write a standard tag the short way: `!!binary` for `tag:yaml.org,2002:binary`."""
    tag = tag or ""
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _skip_node(event: yaml.Event, events: Iterator[yaml.Event]) -> None:
    """Consume the rest of a node whose first event is `event`."""
    if not isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
        return
    depth = 1
    while depth:
        inner = next(events)
        if isinstance(inner, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
        elif isinstance(inner, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def _events(text: str) -> Iterator[yaml.Event]:
    loader = _Loader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if event is not None:
                yield event
    finally:
        loader.dispose()


def _syntax_issue(error: yaml.YAMLError, text: str) -> Issue:
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return Issue((), f"invalid YAML: {error}", position=Position(1, 1))
    message = f"invalid YAML: {error.problem}"
    if error.context:
        message += f" ({error.context}"
        if error.context_mark is not None:
            context = _position(error.context_mark)
            message += f" at line {context.line}, column {context.column}"
        message += ")"
    position = _position(error.problem_mark)
    hint = _syntax_hint(error.problem or "", _character_at(text, position))
    if hint:
        message += f"; {hint}"
    return Issue((), message, position=position)


def _character_at(text: str, position: Position) -> str:
    lines = _LINE_BREAK.split(text, maxsplit=position.line)
    if position.line > len(lines):
        return ""
    line = lines[position.line - 1]
    return line[position.column - 1] if position.column <= len(line) else ""


def _syntax_hint(problem: str, character: str) -> str:
    if "tab" in problem or character == "\t":
        return "indent with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "quote a value that contains ': ', or fix the indentation of the line"
    if "cannot start any token" in problem and character in ("@", "`"):
        return "quote a value that starts with '@' or '`'"
    return ""


def read_yaml(text: str) -> ReadResult:
    """Read YAML text into a document with positions, returning bad input as issues."""
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        count = len(_NON_PRINTABLE.findall(text))
        message = (
            f"invalid character U+{ord(bad.group()):04X}; a YAML file contains printable "
            f"text only ({count} such character{'s' if count > 1 else ''} in the file)"
        )
        return ReadResult(None, [Issue((), message, position=position_of_index(text, bad.start()))])
    builder = _Builder()
    try:
        builder.feed(_events(text))
    except yaml.YAMLError as error:
        return ReadResult(None, [*builder.issues, _syntax_issue(error, text)])
    except _DocumentTooLarge as error:
        return ReadResult(None, [*builder.issues, error.issue])
    return ReadResult(builder.document(), builder.issues)
