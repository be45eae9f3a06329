"""Where input-level soft tokens go: a template of segments.

A template is a list of segments, normalised to
``("virtual", n)`` (n soft tokens), ``("input",)`` (the row's own tokens, exactly once) and
``("tokens", (id, ...))`` (fixed anchor tokens, e.g. "It was"). It can be written as

* a string: ``"[P] [P] {x} [P] It was"``: each ``[P]`` is one soft token, ``{x}`` the input,
  other text is tokenized (needs a tokenizer; whitespace-only pieces are dropped);
* a list: ``[2, "{x}", 1, [1029, 373]]``: an int is that many soft tokens, ``"{x}"`` the input, a
  list of ints anchor token ids, any other string literal text (needs a tokenizer).

Soft tokens are numbered 0..P-1 in template order (the order the prompt encoder sees them).
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

INPUT = "{x}"


def _tokenize(text: str, tokenizer, owner: str) -> Tuple[int, ...]:
    if tokenizer is None:
        raise ValueError(f"{owner}: template text {text!r} needs a `tokenizer` (or give anchor token ids as a list)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tuple(int(i) for i in ids)


def parse_template(template, tokenizer=None, owner: str = "template") -> List[tuple]:
    """Normalise a template (string or list) to segments; validates it."""
    segments: List[tuple] = []

    def add_virtual(n):
        if segments and segments[-1][0] == "virtual":
            segments[-1] = ("virtual", segments[-1][1] + n)
        else:
            segments.append(("virtual", n))

    if isinstance(template, str):
        for piece in re.split(r"(\[P\]|\{x\})", template):
            if piece == "[P]":
                add_virtual(1)
            elif piece == INPUT:
                segments.append(("input",))
            elif piece.strip():
                segments.append(("tokens", _tokenize(piece, tokenizer, owner)))
    elif isinstance(template, (list, tuple)):
        for item in template:
            if isinstance(item, (list, tuple)) and item and item[0] in ("virtual", "input", "tokens"):
                kind = item[0]                          # already normalised (from a saved config)
                if kind == "virtual":
                    add_virtual(_count(item, owner))
                elif kind == "input":
                    segments.append(("input",))
                else:
                    segments.append(("tokens", _ids(item, owner)))
            elif isinstance(item, bool):
                raise ValueError(f"{owner}: template item {item!r} is invalid")
            elif isinstance(item, int):
                if item <= 0:
                    raise ValueError(f"{owner}: template item {item!r} is invalid; soft-token counts must be > 0")
                add_virtual(item)
            elif item == INPUT:
                segments.append(("input",))
            elif isinstance(item, str):
                segments.append(("tokens", _tokenize(item, tokenizer, owner)))
            elif isinstance(item, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in item):
                segments.append(("tokens", tuple(int(i) for i in item)))
            else:
                raise ValueError(f"{owner}: template item {item!r} is invalid; expected an int (soft tokens), "
                                 "'{x}', a list of token ids or text")
    else:
        raise ValueError(f"{owner}: `template` of type {type(template).__name__} is invalid; expected a string "
                         "like '[P] [P] {x} [P] It was' or a list like [2, '{x}', 1]")
    segments = [s for s in segments if not (s[0] == "tokens" and len(s[1]) == 0)]
    if sum(s[0] == "input" for s in segments) != 1:
        raise ValueError(f"{owner}: template {template!r} is invalid; it must contain the input '{{x}}' exactly once")
    if num_virtual(segments) == 0:
        raise ValueError(f"{owner}: template {template!r} is invalid; it has no soft token ([P] or an int)")
    return segments


def _count(item, owner: str) -> int:
    n = item[1] if len(item) == 2 else None
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{owner}: template segment {item!r} is invalid; expected ['virtual', n] with n a positive int")
    return n


def _ids(item, owner: str) -> Tuple[int, ...]:
    ids = item[1] if len(item) == 2 else None
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{owner}: template segment {item!r} is invalid; expected ['tokens', [token ids]]")
    return tuple(ids)


def num_virtual(segments: Sequence[tuple]) -> int:
    return sum(s[1] for s in segments if s[0] == "virtual")


def is_prefix(segments: Sequence[tuple]) -> bool:
    """True when everything the template adds comes before the input (compilable into a prefix)."""
    return segments[-1][0] == "input"


def to_json(segments: Sequence[tuple]) -> list:
    return [list(s[:1]) + ([list(s[1])] if s[0] == "tokens" else [s[1]] if s[0] == "virtual" else [])
            for s in segments]


def front(n: int) -> List[tuple]:
    return [("virtual", n), ("input",)]
