"""What travels over the wire: a request's body as sent, the server's answer as read, and the
output line each request ends as (the OpenAI Batch API's and vllm run-batch's shape:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`).

Everything here holds to standard JSON in UTF-8: a body that cannot be sent so fails alone; an
answer with NaN or bytes that are not JSON is that request's `invalid_response`; a lone
surrogate in an answer is replaced with U+FFFD; an output line can always be written.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpujobs.batch import image_mime, image_urls, local_image_path
from gpujobs.jsontext import json_problem
from workers.inference.transport import Answer

log = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def output_line(
    custom_id: str,
    response: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One output line in the OpenAI Batch / vLLM run-batch shape."""
    return {"id": new_line_id(), "custom_id": custom_id, "response": response, "error": error}


def failure_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """The line of a request that got no usable response (no connection, bad image, deadline)."""
    return output_line(custom_id, error={"code": code, "message": message})


def error_from_body(status: int, body: Any) -> dict[str, Any]:
    """`{"code", "message"}` from an error body.

    Takes the OpenAI/vLLM shape `{"error": {"message", "type", "code"}}`, older vLLM's flat
    `{"object": "error", "message", "type", "code"}`, and anything else as text.
    """
    detail: Any = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = body if isinstance(body, dict) and "message" in body else None
    if detail is None:
        text = body if isinstance(body, str) else ""
        return {"code": str(status), "message": text.strip()[:500] or f"HTTP {status}"}
    code = detail.get("code") or detail.get("type") or status
    message = detail.get("message") or f"HTTP {status}"
    return {"code": str(code), "message": str(message)}


def usage_of(body: Any) -> dict[str, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return {}
    counts = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if isinstance(value, int):
            counts[name] = value
    return counts


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def scrub(value: Any) -> Any:
    """A JSON value with every lone UTF-16 surrogate (from a `\\ud800`..`\\udfff` escape that pairs
    with nothing) replaced by U+FFFD, so that it can be written as UTF-8."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def parse_answer(response: Answer) -> tuple[Any, str | None]:
    """A response's body (parsed JSON, else its text) and, when it is no usable JSON, why.

    Standard JSON only: NaN, Infinity and numbers out of range are refused as not JSON. Lone
    surrogates in strings are replaced with U+FFFD (the answer is kept).
    """
    text = response.text
    if "text/event-stream" in response.headers.get("content-type", ""):
        return text, "the server streamed its answer (text/event-stream); a batch needs one JSON"
    try:
        payload = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        return text, f"the server's answer is not JSON ({exc.msg} at character {exc.pos + 1})"
    except (ValueError, RecursionError) as exc:
        return text, f"the server's answer is not standard JSON ({exc})"
    # A lone surrogate can only come from a \uD800-\uDFFF escape (the text was decoded with
    # replacement), so an answer without one is not walked again.
    if ("\\ud" in text or "\\uD" in text) and json_problem(payload) is not None:
        payload = scrub(payload)
        log.warning("a lone surrogate in the server's answer was replaced with U+FFFD")
    return payload, None


def safe_line(line: dict[str, Any]) -> str:
    """An output line as one line of standard JSON that UTF-8 can hold, whatever it carries
    (a stray surrogate or NaN is replaced rather than fail the chunk)."""
    try:
        text = json.dumps(line, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
        return text
    except (ValueError, UnicodeError):
        return json.dumps(_sanitize(line), ensure_ascii=False, separators=(",", ":"))


def _sanitize(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {scrub(str(k)): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return scrub(value) if isinstance(value, str) else value


class BadBody(ValueError):
    """A body that cannot be sent as standard JSON in UTF-8."""


def encode_body(body: dict[str, Any]) -> bytes:
    """The request body as sent: standard JSON (no NaN/Infinity), UTF-8; BadBody naming the
    field when it cannot be (a batch checked by gpujobs never has one).

    The encoder itself refuses what cannot be sent (NaN and infinities, a lone surrogate, a
    value of no JSON type), so a good body is walked once, by the encoder; only a refused one is
    walked again (json_problem) to name the field. Nesting depth is the batch check's (at
    submit) to refuse; here only Python's recursion limit bounds it.
    """
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        problem = json_problem(body) or str(exc)
        raise BadBody(f"the body cannot be sent: {problem}") from None


class ImageError(ValueError):
    """A local image of a request cannot be read or is no image: that request fails alone."""


def inline_images(body: dict[str, Any], resolve: Callable[[str], Path]) -> dict[str, Any]:
    """A copy of `body` whose local images (media-relative paths, `file://`) are `data:` URLs.

    resolve: turns a media-relative or absolute path into the file to read, raising ValueError
    or OSError for a path outside the media root or unreadable: that becomes ImageError, and
    the request fails alone. http(s) and data: urls pass through untouched.
    """
    urls = [image for image in image_urls(body) if local_image_path(image["url"]) is not None]
    if not urls:
        return body
    copy: dict[str, Any] = _deep_copy(body)
    for image in image_urls(copy):
        local = local_image_path(image["url"])
        if local is None:
            continue
        try:
            path = resolve(local)
            mime = image_mime(path)
            if mime is None:
                raise ImageError(f"image {local} is missing or not an image")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except (OSError, ValueError) as exc:
            raise ImageError(str(exc)) from None
        image["url"] = f"data:{mime};base64,{data}"
    return copy


def _deep_copy(value: Any) -> Any:
    """A copy of a JSON value (dicts and lists copied, scalars shared)."""
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
