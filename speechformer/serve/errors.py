"""OpenAI's error envelope: every refusal is ``{"error": {"message", "type", "param", "code"}}``
with the HTTP status that says what kind it is, so the ``openai`` client raises its usual
exception (``BadRequestError``, ``AuthenticationError``, ``RateLimitError`` ...) with our message.

The message follows the toolkit's one-line rule (``WHAT: reason; what to do``); ``param`` names
the form field at fault where there is one.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..options import option_names

#: The envelope's ``type`` by status (OpenAI's names where it has one).
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """A request refused (or failed) with ``status``; raised anywhere in a route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(envelope(self.status, self.message, self.param, self.code), self.status,
                            headers=self.headers)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


_FLAG = re.compile(r"--([a-z][a-z-]*)")


def field_error(err: UserError, fields: dict[str, str]) -> APIError:
    """A :class:`UserError` from the options' ``replace``/``check`` as a 400 naming the form field:
    the flags in its message (``--ctc-weight``) are written as the fields a request sends
    (``ctc_weight``); ``fields`` maps an option to the field that set it (``timestamps`` to
    ``response_format``)."""
    options = set(option_names())

    def as_field(match: re.Match[str]) -> str:
        name = match.group(1).replace("-", "_")
        return fields.get(name, name) if name in options else match.group(0)

    message = _FLAG.sub(as_field, str(err))
    word = err.what.split(" ")[0]
    word = word[2:].replace("-", "_") if word.startswith("--") else word
    param = fields.get(word, word) if word in options or word in fields.values() else None
    return APIError(400, message, param=param, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Every error the app returns, FastAPI's own (404, 405, validation) included, in the envelope."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, f"{request.url.path}: {exc.detail}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}; fix the request",
                        param=param).response()
