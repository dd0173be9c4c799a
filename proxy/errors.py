"""Errors the proxy answers itself, each carrying its HTTP status and Anthropic `error.type`.

    ProxyError
    ├── InvalidRequestError        400 invalid_request_error
    ├── AuthenticationError        401 authentication_error
    ├── NotFoundError              404 not_found_error
    ├── MethodNotAllowedError      405 invalid_request_error
    ├── RequestTimeoutError        408 timeout_error
    ├── RequestTooLargeError       413 request_too_large
    ├── RateLimitedError           429 rate_limit_error
    └── UpstreamError
        ├── UpstreamUnavailableError   502 api_error
        └── UpstreamTimeoutError       504 timeout_error

Routes raise these; one handler in `app.py` renders them with `error_response`. Messages are
written for the client and never contain hosts, keys or tracebacks.
"""

from __future__ import annotations

import itertools
import secrets

from starlette.responses import JSONResponse


class ProxyError(Exception):
    status_code = 500
    error_type = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequestError(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ProxyError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ProxyError):
    status_code = 404
    error_type = "not_found_error"


class MethodNotAllowedError(ProxyError):
    status_code = 405
    error_type = "invalid_request_error"


class RequestTimeoutError(ProxyError):
    """The client stopped sending its request body."""

    status_code = 408
    error_type = "timeout_error"


class RequestTooLargeError(ProxyError):
    status_code = 413
    error_type = "request_too_large"


class RateLimitedError(ProxyError):
    status_code = 429
    error_type = "rate_limit_error"


class UpstreamError(ProxyError):
    """The upstream could not give an answer; nothing it said reached the client."""


class UpstreamUnavailableError(UpstreamError):
    status_code = 502
    error_type = "api_error"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    error_type = "timeout_error"


# Ids need to be unique, not secret: a random prefix per process and a counter are unique across
# replicas and cost no system call per request.
_ID_PREFIX = "req_fp" + secrets.token_hex(5)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A proxy-made request id: `req_` like Anthropic's, `fp` so support can tell whose it is."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def error_response(status_code: int, error_type: str, message: str, request_id: str) -> JSONResponse:
    """Render an error in Anthropic's envelope, with the id in the body and the `request-id` header."""
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=status_code, headers={"request-id": request_id})
