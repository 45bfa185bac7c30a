"""A small JSON-aware scanner: finds complete JSON objects inside free LLM text.

The public code took the text from the first "{" to the last "}" (docs/spec.md section 9, defect 6): a LaTeX
brace in the reasoning (`\\frac{1}{2}`), a `<think>` block or a trailing remark breaks that and the
output was silently dropped. Here every "{" is a candidate start; from it, braces are matched while
honouring JSON strings and their escapes (a "}" inside a string does not close anything), and the
candidate is kept only if `json.loads` accepts it. `<think>...</think>` blocks are removed first, and
a ```json fence is not needed.
"""

from __future__ import annotations

import json
import re
from typing import Iterator

from sgsd.storage import JSONObject

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove `<think>...</think>` blocks (an unclosed block runs to the end of the text)."""
    text = _THINK.sub("", text)
    # A completion may start inside a thinking block whose opening tag was part of the prompt.
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text


def _brackets(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, char) of each bracket outside JSON strings from `start`; a final (len(text), '"')
    when the text ends inside a string."""
    in_string = False
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{}[]":
            yield index, char
    if in_string:
        yield len(text), '"'


def matching_brace(text: str, start: int) -> int | None:
    """Index of the "}" closing the "{" at `start`, skipping braces inside JSON strings; None if open."""
    depth = 0
    for index, char in _brackets(text, start):
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index if char == "}" else None
    return None


def iter_json_objects(text: str) -> Iterator[JSONObject]:
    """Every top-level JSON object embedded in `text`, in order of appearance."""
    position = 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return
        end = matching_brace(text, start)
        if end is not None:
            try:
                obj = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                yield obj
                position = end + 1
                continue
        position = start + 1


def ends_inside_value(text: str) -> bool:
    """True when `text` stops inside a string or with an unclosed "{"/"[" (a truncated JSON file)."""
    depth = 0
    for _, char in _brackets(text):
        if char == '"':
            return True
        depth += 1 if char in "{[" else -1
    return depth > 0
