"""Errors in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}`.

Every answer that is not a success, including FastAPI's own (a missing form field, an unknown
route, a wrong method), leaves in this shape, with the status code the OpenAI API uses.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpujobs.errors import BrokerUnreachable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer with an error body. status: HTTP status; kind: the body's `type`
    (invalid_request_error, not_found_error is never used: OpenAI says invalid_request_error for
    a missing object too); param: the request field at fault; code: a short machine name."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(what: str, object_id: str, param: str = "id") -> ApiError:
    """404 for an id that names nothing (`No such File object: file-abc`)."""
    return ApiError(404, f"No such {what} object: {object_id}", param=param)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first of FastAPI's validation errors as the OpenAI API words it."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = error.get("type", "")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "json_invalid" or (kind in ("model_attributes_type", "dict_type") and not param):
        return ApiError(
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload.",
        )
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param)


def install_handlers(app: FastAPI) -> None:
    """Answer ApiError, validation errors and HTTP errors in the OpenAI shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything else: 503 when the queue's Redis is out of reach, else 500; the traceback
        goes to the log, never to the client."""
        if isinstance(exc, BrokerUnreachable | redis.ConnectionError | redis.TimeoutError):
            log.warning("%s %s: the queue is unreachable: %s", request.method, request.url.path,
                        exc)  # fmt: skip
            body = error_body("The queue is unreachable; try again later.", "server_error")
            return JSONResponse(body, status_code=503)
        log.exception("%s %s failed", request.method, request.url.path)
        body = error_body("The server had an error while processing your request.",
                          "server_error")  # fmt: skip
        return JSONResponse(body, status_code=500)
