"""Standard JSON in UTF-8: what a batch line may hold, found wherever it hides.

JSON text can spell things no UTF-8 file and no standard JSON reader takes: a lone UTF-16
surrogate (`"\\ud83d"`), and Python's json reads and writes `NaN`, `Infinity` and numbers out of
any float's range (`1e999`). `json_problem` names the first such field of a value;
`parse_line` reads one JSONL line and names the column where a cut-off line really ends.
Used by the batch checks (gpujobs/batch.py) and by workers for what servers send back.
"""

from __future__ import annotations

import json
import math
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


# The byte-order marks an editor may put at the start of a file (Windows Notepad, Excel).
FOREIGN_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


BOM = "\ufeff"


_MAX_DEPTH = 200  # nesting deeper than any chat body needs; deeper would exhaust the stack


def _field(path: str, name: object) -> str:
    return f"{path}.{name}" if path else str(name)


def json_problem(value: object, path: str = "", depth: int = 0) -> str | None:
    """Why `value` cannot be written as standard JSON in UTF-8, naming the field; None if it can.

    Finds every kind: a string (or key) holding a lone UTF-16 surrogate (`"\\ud83d"` is legal
    JSON text, yet no UTF-8 can hold it), a number that is NaN or infinite (Python's json
    writes them, standard JSON has none: `NaN`, `Infinity`, `1e999`), a value of no JSON type
    (from the SDK), and nesting too deep to handle.
    """
    if depth > _MAX_DEPTH:
        return f"{path or 'the request'} is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            code = f"\\u{ord(found.group()):04x}"
            return (
                f"{path or 'a value'} holds a lone UTF-16 surrogate ({code}) at character "
                f"{found.start() + 1}, which is not a character and cannot be sent as UTF-8"
            )
        return None
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return f"{path or 'a value'} is {shown}, which is not a JSON number (use a number or null)"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path or 'an object'} has a key {key!r} that is not a string"
            problem = json_problem(key, f"{path or 'an object'} key {key[:40]!r}", depth + 1)
            problem = problem or json_problem(item, _field(path, key), depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = json_problem(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{path or 'a value'} is of type {type(value).__name__}, which JSON cannot hold"


def parse_line(text: str) -> object:
    """One JSONL line's value; ValueError with a message that names the column where the text
    breaks (`cut off at column 41`), for a line cut off mid-object as for any other."""
    text = text.rstrip("\r\n")
    if text.startswith(BOM):  # a BOM is not content (files glued together carry several)
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        unclosed = exc.msg.startswith("Unterminated string")
        if exc.pos >= len(text.rstrip()) or unclosed:
            end = len(text.rstrip()) + 1
            why = "a string is never closed" if unclosed else exc.msg.lower()
            raise ValueError(
                f"not valid JSON: the line is cut off at column {end} ({why})"
            ) from None
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"not valid JSON: nested too deeply (over {_MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer of over 4300 digits, say
        raise ValueError(f"not valid JSON ({str(exc).split(';')[0]})") from None
