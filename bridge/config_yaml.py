"""config.yaml's text as a document: plain YAML only, its keys as the operator wrote them.

Everything YAML can do wrong is a ConfigError naming the file and the place: a file too large,
anchors and aliases (an alias loop would recurse without end, and a few nested aliases expand
to billions of entries), nesting too deep for the composer's recursion, a key given twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from bridge.errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024  # a config of 10,000 subjects is about 400 kB
MAX_DEPTH = 20  # config.yaml needs 3 levels: the top, a section, a meter's long form


@dataclass(frozen=True)
class Document:
    """A config file's content, what YAML silently drops (keys given twice), and each mapping's
    keys as written (`yes`, where YAML reads True)."""

    content: Any
    duplicates: list[str]
    written: Mapping[str, Mapping[Any, str]]  # mapping path ("" at the top) -> key -> its text


def read_document(raw: bytes, source: str) -> Document:
    """Parses config.yaml's bytes; a ConfigError names the file and line of what is wrong."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: {len(raw)} bytes, over the {MAX_CONFIG_BYTES} allowed"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{source}: not UTF-8 at byte {error.start}"]) from error
    try:
        _check_plain(text, source)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        content = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError) as error:
        # TypeError: a mapping or list used as a key (`? [a]: b`) cannot be a dict key.
        raise ConfigError([f"{source}: not valid YAML: {_one_line(error)}"]) from error
    duplicates: list[str] = []
    written: dict[str, dict[Any, str]] = {}
    if node is not None:
        _walk(node, "", duplicates, written)
    return Document(content, duplicates, written)


def _check_plain(text: str, source: str) -> None:
    """Refuses anchors, aliases and deep nesting, from the parser's events (no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        mark = event.start_mark
        place = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError([f"{place}: anchors and aliases (&name, *name) are not allowed; "
                               "write each entry out"])  # fmt: skip
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError([f"{place}: nested deeper than {MAX_DEPTH} levels"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _walk(
    node: yaml.Node, path: str, duplicates: list[str], written: dict[str, dict[Any, str]]
) -> None:
    """Records keys given twice (YAML would keep the last) and every key's written text."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        names = written.setdefault(path, {})
        for key_node, value_node in node.value:
            text = str(key_node.value)
            key_path = f"{path}.{text}" if path else text
            if text in seen:
                duplicates.append(
                    f"{key_path}: duplicate key (line {key_node.start_mark.line + 1})"
                )
            seen.add(text)
            if isinstance(key_node, yaml.ScalarNode):
                names[SafeConstructor().construct_object(key_node)] = text
            _walk(value_node, key_path, duplicates, written)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", duplicates, written)


def _one_line(error: BaseException) -> str:
    """A YAML error on one line (its marks name line and column), short enough to log."""
    return " ".join(str(error).split())[:300] or type(error).__name__
