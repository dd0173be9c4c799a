"""The five Files routes the proxy forwards, and the matching of a raw request path against them.

Matching works on the raw path, before any decoding by the framework, so that encoded slashes,
dot segments and NUL bytes are refused (400) instead of being decoded into another path. The
upstream path is rebuilt from the template and the validated file id, never copied from the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from urllib.parse import unquote_to_bytes

from proxy.errors import InvalidRequestError, MethodNotAllowedError, NotFoundError

_FILE_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_FORBIDDEN_IN_SEGMENT = re.compile(rb"[/\\\x00]")
_BAD_FILE_ID = "file_id: must be 1 to 256 letters, digits, '_' or '-'."


class Operation(Enum):
    """One Files API operation: its method and its route template."""

    LIST = ("GET", "/v1/files")
    UPLOAD = ("POST", "/v1/files")
    METADATA = ("GET", "/v1/files/{file_id}")
    DELETE = ("DELETE", "/v1/files/{file_id}")
    DOWNLOAD = ("GET", "/v1/files/{file_id}/content")

    @property
    def method(self) -> str:
        return self.value[0]

    @property
    def template(self) -> str:
        return self.value[1]


_ALLOWED_METHODS: dict[str, dict[str, Operation]] = {}
for _operation in Operation:
    _ALLOWED_METHODS.setdefault(_operation.template, {})[_operation.method] = _operation
del _operation


@dataclass(frozen=True, slots=True)
class RouteMatch:
    operation: Operation
    file_id: str | None

    @property
    def upstream_path(self) -> str:
        """The canonical path to request upstream."""
        if self.file_id is None:
            return self.operation.template
        return self.operation.template.replace("{file_id}", self.file_id)


# The longest path a Files route can have: a 256-character file id, every character %-escaped.
_MAX_PATH_BYTES = len("/v1/files//content") + 3 * 256


def resolve(method: str, raw_path: bytes) -> RouteMatch:
    """Match a request to a Files operation, or raise the error the proxy answers itself."""
    if len(raw_path) <= _MAX_PATH_BYTES:
        return _resolve(method, raw_path)
    if raw_path.startswith(b"/v1/files/"):
        raise InvalidRequestError(_BAD_FILE_ID)
    raise NotFoundError(f"Not found: the proxy serves only the Files API ({method} {_shown(raw_path)}).")


# Clients ask for the same few paths again and again; bounded in bytes by the check above.
@lru_cache(maxsize=4096)
def _resolve(method: str, raw_path: bytes) -> RouteMatch:
    segments = [_decode_segment(segment) for segment in raw_path.split(b"/")]
    shape = ["", "v1", "files", "{file_id}", "content"][: len(segments)]
    file_id = segments[3] if len(segments) > 3 else None
    if len(segments) < 3 or segments[:3] + segments[4:] != shape[:3] + shape[4:] or file_id == "":
        raise NotFoundError(f"Not found: the proxy serves only the Files API ({method} {_shown(raw_path)}).")
    if file_id is not None and not _FILE_ID.fullmatch(file_id):
        raise InvalidRequestError(_BAD_FILE_ID)
    template = "/".join(shape)
    operation = _ALLOWED_METHODS[template].get(method)
    if operation is None:
        allowed = ", ".join(sorted(_ALLOWED_METHODS[template]))
        raise MethodNotAllowedError(
            f"Method {method} is not allowed on {template}.", headers={"allow": allowed}
        )
    return RouteMatch(operation=operation, file_id=file_id)


def _decode_segment(segment: bytes) -> str:
    decoded = unquote_to_bytes(segment) if b"%" in segment else segment
    if _FORBIDDEN_IN_SEGMENT.search(decoded):
        raise InvalidRequestError("Invalid path: encoded slashes, backslashes and NUL bytes are not allowed.")
    if decoded in (b".", b".."):
        raise InvalidRequestError("Invalid path: dot segments are not allowed.")
    try:
        return decoded.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRequestError("Invalid path: only ASCII is allowed.") from None


def _shown(raw_path: bytes) -> str:
    """The path as echoed in an error: bounded, so a hostile path cannot bloat the answer."""
    text = raw_path.decode("ascii", "replace")
    return text if len(text) <= 100 else text[:100] + "..."
