"""A local Anthropic Files API for tests, benchmarks, demos and offline development.

It follows Anthropic's Files API as the official SDKs use it: the beta shapes when `anthropic-beta` carries
`files-api-2025-04-14`, the GA shapes otherwise, Anthropic's error envelope and one workspace per key.
Uploads are parsed and hashed as they stream in, and generated files are computed chunk by chunk, so a
500 MB file costs neither memory nor disk. Faults and latency are injected from Python or over HTTP
under `/_simulator/`, which is never part of the API and needs no key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import mimetypes
import re
import secrets
import string
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

_BETA = "files-api-2025-04-14"
_CHUNK = 64 * 1024
# Odd, so consecutive chunks get distinct rotations for 65536 chunks (4 GiB).
_ROTATION_STEP = 4099
_MAX_UPLOAD_BYTES = 500 * 1000 * 1000
_MAX_FIELD_BYTES = 1024
_MAX_IDS = 100
_EXPIRES_IN_SECONDS = range(3600, 7776000 + 1)
_ALPHABET = string.ascii_letters + string.digits
_FILE_PATH = re.compile(r"/v1/files/([^/]+)(/content)?")
_INTEGER = re.compile(r"-?[0-9]{1,12}")
_PAGE_TOKEN = re.compile(r"after:([0-9]{1,12})")
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request to `/v1/...` as the simulator saw it, for tests to inspect."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body_bytes: int

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass(slots=True)
class Download:
    """One download of generated content: how far it got, and whether it ended "complete", "aborted"
    (the client went away) or "reset" (an injected fault); None while it is still streaming."""

    file_id: str
    bytes_sent: int = 0
    finished: Literal["complete", "aborted", "reset"] | None = None


@dataclass(frozen=True, slots=True)
class _File:
    id: str
    workspace: str
    seq: int
    filename: str
    mime_type: str
    size_bytes: int
    created_at: datetime
    downloadable: bool
    expires_at: datetime | None

    def to_json(self, beta: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "type": "file",
            "filename": self.filename,
            "mime_type": self.mime_type,
            "size_bytes": self.size_bytes,
            "created_at": _rfc3339(self.created_at),
            "downloadable": self.downloadable,
            "scope": None,
        }
        if not beta:
            body["expires_at"] = None if self.expires_at is None else _rfc3339(self.expires_at)
        return body


@dataclass(slots=True)
class _Fault:
    status: int | None
    delay_s: float
    reset_after_bytes: int | None
    method: str | None
    path_prefix: str
    times: int
    body: bytes | None = None
    headers: dict[str, str] | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.method in (None, method) and path.startswith(self.path_prefix)


class _ApiError(Exception):
    """An answer in Anthropic's error envelope: handlers raise it, `_serve_v1` renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}

    def response(self, request_id: str) -> JSONResponse:
        default = "api_error" if self.status >= 500 else "invalid_request_error"
        error: dict[str, Any] = {"type": _ERROR_TYPES.get(self.status, default), "message": self.message}
        if self.error_code is not None:
            error["details"] = {"error_code": self.error_code}
        return JSONResponse(
            {"type": "error", "error": error, "request_id": request_id},
            status_code=self.status,
            headers={**self.headers, "request-id": request_id},
        )


class _ResetError(RuntimeError):
    """Raised inside a body iterator so the server drops the connection mid-response."""


class _Body:
    """A request body, read exactly once and counted for the request log."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self.size = 0
        self.cut = False
        self._done = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._request.stream():
                self.size += len(chunk)
                yield chunk
        except ClientDisconnect:
            self.cut = True  # the body ends early; an upload then fails, even if its form looked whole
        self._done = True

    async def drain(self) -> None:
        """Read what is left, so an early answer still reaches a client that is sending."""
        if not self._done:
            async for _ in self.chunks():
                pass


@dataclass(frozen=True, slots=True)
class _Call:
    request: Request
    body: _Body
    workspace: str
    beta: bool
    file_id: str
    reset_after_bytes: int | None


class _MultipartUpload:
    """Feeds a body to python_multipart's streaming parser: the `file` part is hashed as it arrives and
    never kept, other fields are kept only while small."""

    def __init__(self, boundary: bytes) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.has_file = False
        self.filename = ""
        self.content_type = ""
        self.fields: dict[str, bytes] = {}
        self.complete = False
        self._error: _ApiError | None = None
        self._part = ""
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._headers.clear,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_end": self._on_end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse one chunk; after the first error the rest of the body is only drained."""
        if self._error is not None:
            return
        try:
            self._parser.write(chunk)
        except _ApiError as exc:
            self._error = exc
        except FormParserError:
            self._error = _ApiError(400, "Malformed multipart/form-data body.")

    def check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self.complete:
            raise _ApiError(400, "Truncated multipart/form-data body.")
        if not self.has_file:
            raise _ApiError(400, "file: Field required")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._part = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part == "file":
            if self.has_file:
                raise _ApiError(400, "file: only one file may be uploaded per request")
            self.has_file = True
            # Only the final path component of a client's filename is kept.
            raw_name = options.get(b"filename", b"").decode("utf-8", "replace")
            self.filename = raw_name.replace("\\", "/").rsplit("/", 1)[-1]
            self.content_type = self._headers.get(b"content-type", b"").decode("latin-1")
        else:
            self.fields[self._part] = b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part != "file":
            self.fields[self._part] += data[start:end]
            if len(self.fields[self._part]) > _MAX_FIELD_BYTES:
                raise _ApiError(400, f"{self._part}: form field too long")
            return
        self.size += end - start
        if self.size > _MAX_UPLOAD_BYTES:
            raise _ApiError(413, f"File exceeds the maximum size of {_MAX_UPLOAD_BYTES} bytes.")
        self.sha256.update(memoryview(data)[start:end])

    def _on_end(self) -> None:
        self.complete = True


class _DownloadResponse(StreamingResponse):
    """Streams generated content; closes the generator however the send ends, so its record is final."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        super().__init__(chunks, headers=headers)
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._chunks.aclose()


class Simulator:
    """The Files API with all its state on this instance: files, faults, and what it received."""

    def __init__(self, *, keys: Mapping[str, str] | None = None, latency_ms: float = 0.0) -> None:
        """keys maps an upstream API key to a workspace id. None: any non-empty key is accepted and
        gets its own workspace ("wrkspc_" + first 16 hex of sha256(key))."""
        self._keys = None if keys is None else dict(keys)
        self.latency_ms = latency_ms
        self.received: list[ReceivedRequest] = []
        self.uploads: dict[str, tuple[int, str]] = {}
        self.downloads: list[Download] = []
        self._files: dict[str, _File] = {}
        # Deleted files stay known to cursors, so a page that ends on one can still continue.
        self._deleted: dict[str, _File] = {}
        self._faults: list[_Fault] = []
        # Tests call add_file and inject_fault from their own thread while uvicorn serves in another.
        self._lock = threading.Lock()
        self._seq = 0
        self._last_created = datetime.min.replace(tzinfo=UTC)
        self.app = Starlette(
            routes=[
                Route("/_simulator/health", self._control_health, methods=["GET"]),
                Route("/_simulator/files", self._control_files, methods=["POST"]),
                Route("/_simulator/faults", self._control_faults, methods=["POST", "DELETE"]),
                Route("/_simulator/requests", self._control_requests, methods=["GET", "DELETE"]),
                Route("/_simulator/latency", self._control_latency, methods=["PUT"]),
                Route("/{path:path}", self._serve, methods=_ANY_METHOD),
            ]
        )

    def add_file(
        self,
        api_key: str,
        *,
        filename: str = "generated.bin",
        mime_type: str = "application/octet-stream",
        size_bytes: int = 1024,
        downloadable: bool = True,
        expires_at: datetime | None = None,
    ) -> str:
        """Create a file as if produced by code execution; returns its id. Its content is generated
        deterministically from the id (see download) and never held in memory whole."""
        workspace = self._workspace_of(api_key)
        if workspace is None:
            raise ValueError("unknown API key")
        if size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        return self._create(workspace, filename, mime_type, size_bytes, downloadable, expires_at).id

    def inject_fault(
        self,
        *,
        status: int | None = None,
        delay_s: float = 0.0,
        reset_after_bytes: int | None = None,
        method: str | None = None,
        path_prefix: str = "/v1/files",
        times: int = 1,
        body: str | bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue a fault for the next `times` matching /v1 requests (times=-1: until cleared).
        reset_after_bytes only acts on downloads; on other requests the rest of the fault still does.

        `body` and `headers` mangle an answer as a middlebox might: the request is still carried out
        (an upload creates its file), then its answer's body is replaced (a streamed one is not) and
        the headers are added; a `content-type` among them replaces the answer's own."""
        if times < 1 and times != -1:
            raise ValueError("times must be >= 1, or -1 for until cleared")
        if status is not None and not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400..599)")
        raw_body = body.encode() if isinstance(body, str) else body
        fault = _Fault(
            status,
            delay_s,
            reset_after_bytes,
            method and method.upper(),
            path_prefix,
            times,
            raw_body,
            headers,
        )
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    @property
    def faults_left(self) -> int:
        """How many faults are queued: one injected for N requests counts until all N came."""
        with self._lock:
            return len(self._faults)

    def content_of(self, file_id: str) -> Iterator[bytes]:
        """The generated content of a file, in the chunks a download sends."""
        file = self._files[file_id]
        return _generate(file.id, file.size_bytes)

    def _workspace_of(self, api_key: str | None) -> str | None:
        if not api_key:
            return None
        if self._keys is None:
            return "wrkspc_" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
        return self._keys.get(api_key)

    def _create(
        self,
        workspace: str,
        filename: str,
        mime_type: str,
        size_bytes: int,
        downloadable: bool,
        expires: datetime | timedelta | None,
    ) -> _File:
        with self._lock:
            self._seq += 1
            # Never earlier than the previous file, so creation order and created_at always agree.
            self._last_created = max(datetime.now(UTC), self._last_created)
            if isinstance(expires, timedelta):
                expires = self._last_created + expires
            file = _File(
                id=_random_id("file_"),
                workspace=workspace,
                seq=self._seq,
                filename=filename,
                mime_type=mime_type,
                size_bytes=size_bytes,
                created_at=self._last_created,
                downloadable=downloadable,
                expires_at=expires,
            )
            self._files[file.id] = file
        return file

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    async def _serve(self, request: Request) -> Response:
        path: str = request.scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            return await self._serve_v1(request)
        return _ApiError(404, "Not Found").response(_random_id("req_"))

    async def _serve_v1(self, request: Request) -> Response:
        request_id = _random_id("req_")
        raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        path = raw_path.decode("latin-1")
        body = _Body(request)
        fault = self._take_fault(request.method, path)
        if fault is not None and fault.delay_s > 0:
            await asyncio.sleep(fault.delay_s)
        response: Response
        try:
            if fault is not None and fault.status is not None:
                retry = fault.status == 429 or fault.status >= 500
                raise _ApiError(
                    fault.status,
                    "Fault injected by the simulator.",
                    headers={"retry-after": "1"} if retry else None,
                )
            handler, file_id = self._route(request.method, request.scope["path"])
            call = _Call(
                request,
                body,
                self._authenticate(request),
                _is_beta(request),
                file_id,
                None if fault is None else fault.reset_after_bytes,
            )
            response = await handler(call)
            response.headers["request-id"] = request_id
        except _ApiError as exc:
            response = exc.response(request_id)
        if fault is not None:
            response = _mangled(response, fault)
        try:
            await body.drain()
        finally:  # a request whose client went away mid-body is logged too, with the bytes that came
            headers = tuple(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.scope["headers"]
            )
            query = request.scope["query_string"].decode("latin-1")
            self.received.append(ReceivedRequest(request.method, path, query, headers, body.size))
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        return response

    def _route(self, method: str, path: str) -> tuple[Callable[[_Call], Awaitable[Response]], str]:
        handlers: dict[str, Callable[[_Call], Awaitable[Response]]]
        file_id = ""
        if path == "/v1/files":
            handlers = {"GET": self._list, "POST": self._upload}
        elif match := _FILE_PATH.fullmatch(path):
            file_id = match[1]
            handlers = (
                {"GET": self._download} if match[2] else {"GET": self._retrieve, "DELETE": self._delete}
            )
        else:
            raise _ApiError(404, "Not Found")
        if method not in handlers:
            raise _ApiError(
                405, f"Method {method} not allowed on {path}", headers={"allow": ", ".join(handlers)}
            )
        return handlers[method], file_id

    def _authenticate(self, request: Request) -> str:
        """The workspace of the request's key; auth, version and workspace checks in the API's order."""
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        workspace = self._workspace_of(key)
        if workspace is None:
            raise _ApiError(401, "invalid x-api-key" if key else "x-api-key header is required")
        if "anthropic-version" not in request.headers:
            raise _ApiError(400, "anthropic-version: header is required")
        asked = request.headers.get("anthropic-workspace-id")
        if asked is not None and asked != workspace:
            raise _ApiError(403, f"This API key cannot act on workspace {asked}.")
        return workspace

    def _file(self, call: _Call) -> _File:
        file = self._files.get(call.file_id)
        if file is None or file.workspace != call.workspace:
            raise _ApiError(404, f"File not found: {call.file_id}")
        return file

    async def _upload(self, call: _Call) -> Response:
        content_type, options = parse_options_header(call.request.headers.get("content-type"))
        boundary = options.get(b"boundary", b"")
        if content_type != b"multipart/form-data" or not boundary:
            raise _ApiError(400, "Expected a multipart/form-data body with a boundary.")
        try:
            upload = _MultipartUpload(boundary)
        except FormParserError as exc:
            raise _ApiError(400, "Invalid multipart boundary.") from exc
        async for chunk in call.body.chunks():
            upload.feed(chunk)
        if call.body.cut:
            raise _ApiError(400, "The request body ended before its Content-Length.")
        upload.check()
        expires_in = None
        if "expires_in_seconds" in upload.fields:
            seconds = _integer("expires_in_seconds", upload.fields["expires_in_seconds"].decode("latin-1"))
            if seconds not in _EXPIRES_IN_SECONDS:
                raise _ApiError(400, "expires_in_seconds: must be between 3600 and 7776000")
            expires_in = timedelta(seconds=seconds)
        filename = upload.filename or "unnamed"
        mime_type = upload.content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        file = self._create(call.workspace, filename, mime_type, upload.size, False, expires_in)
        self.uploads[file.id] = (upload.size, upload.sha256.hexdigest())
        return JSONResponse(file.to_json(call.beta))

    async def _list(self, call: _Call) -> Response:
        params = call.request.query_params
        with self._lock:
            newest_first = list(reversed(self._files.values()))
        files = [f for f in newest_first if f.workspace == call.workspace]
        if "scope_id" in params:
            files = []  # no simulated file belongs to a scope
        if call.beta:
            return JSONResponse(self._beta_page(call, files))
        if "after_id" in params or "before_id" in params:
            raise _ApiError(400, f"after_id and before_id need the anthropic-beta: {_BETA} header")
        ids = params.getlist("ids") + params.getlist("ids[]")
        if ids:
            if "page" in params or "limit" in params:
                raise _ApiError(400, "ids cannot be combined with page or limit")
            wanted = set(ids)
            if len(wanted) > _MAX_IDS:
                raise _ApiError(400, f"ids: at most {_MAX_IDS} ids")
            data = [f.to_json(beta=False) for f in files if f.id in wanted]
            return JSONResponse({"data": data, "next_page": None})
        limit = _limit(params.get("limit"))
        if "page" in params:
            after = _decode_page(params["page"])
            files = [f for f in files if f.seq < after]
        page = files[:limit]
        next_page = _encode_page(page[-1].seq) if len(files) > limit else None
        return JSONResponse({"data": [f.to_json(beta=False) for f in page], "next_page": next_page})

    def _beta_page(self, call: _Call, files: list[_File]) -> dict[str, Any]:
        """Anthropic's id cursors: after_id pages towards older files, before_id towards newer ones."""
        params = call.request.query_params
        limit = _limit(params.get("limit"))
        after_id, before_id = params.get("after_id"), params.get("before_id")
        if after_id is not None and before_id is not None:
            raise _ApiError(400, "after_id and before_id cannot be combined")
        if before_id is not None:
            before = self._cursor(call, "before_id", before_id)
            files = [f for f in files if f.seq > before]
            page = files[-limit:]
        else:
            if after_id is not None:
                after = self._cursor(call, "after_id", after_id)
                files = [f for f in files if f.seq < after]
            page = files[:limit]
        return {
            "data": [f.to_json(beta=True) for f in page],
            "has_more": len(files) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    def _cursor(self, call: _Call, name: str, file_id: str) -> int:
        file = self._files.get(file_id) or self._deleted.get(file_id)
        if file is None or file.workspace != call.workspace:
            raise _ApiError(400, f"{name}: unknown file id {file_id}")
        return file.seq

    async def _retrieve(self, call: _Call) -> Response:
        return JSONResponse(self._file(call).to_json(call.beta))

    async def _delete(self, call: _Call) -> Response:
        file = self._file(call)
        with self._lock:
            self._deleted[file.id] = self._files.pop(file.id)
        return JSONResponse({"id": file.id, "type": "file_deleted"})

    async def _download(self, call: _Call) -> Response:
        file = self._file(call)
        if file.expires_at is not None and datetime.now(UTC) >= file.expires_at:
            raise _ApiError(404, f"File {file.id} has expired.", error_code="file_expired")
        if not file.downloadable:
            raise _ApiError(400, f"File {file.id} is not downloadable.", error_code="file_not_downloadable")
        record = Download(file.id)
        self.downloads.append(record)
        headers = {
            "content-type": file.mime_type,
            "content-length": str(file.size_bytes),
            "content-disposition": _content_disposition(file.filename),
        }
        return _DownloadResponse(_stream(file, record, call.reset_after_bytes), headers)

    async def _control_health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def _control_files(self, request: Request) -> Response:
        try:
            spec = await _json_object(request)
            api_key = spec.pop("api_key")
            expires_in = spec.pop("expires_in_seconds", None)
            if expires_in is not None:
                spec["expires_at"] = datetime.now(UTC) + timedelta(seconds=expires_in)
            return JSONResponse({"id": self.add_file(api_key, **spec)})
        except (KeyError, TypeError, ValueError) as exc:
            return _control_error(exc)

    async def _control_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.clear_faults()
            return JSONResponse({"ok": True})
        try:
            self.inject_fault(**await _json_object(request))
        except (TypeError, ValueError) as exc:
            return _control_error(exc)
        return JSONResponse({"ok": True})

    async def _control_requests(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.received.clear()
            return JSONResponse({"ok": True})
        return JSONResponse([asdict(received) for received in self.received])

    async def _control_latency(self, request: Request) -> Response:
        try:
            latency = (await _json_object(request))["latency_ms"]
            if not isinstance(latency, int | float) or isinstance(latency, bool) or latency < 0:
                raise ValueError("latency_ms must be a number >= 0")
        except (KeyError, ValueError) as exc:
            return _control_error(exc)
        self.latency_ms = float(latency)
        return JSONResponse({"ok": True})


def _mangled(response: Response, fault: _Fault) -> Response:
    """The answer with the fault's body and headers, all else (status, request-id) kept."""
    if fault.body is not None and not isinstance(response, StreamingResponse):
        kept = [(n, v) for n, v in response.raw_headers if n not in (b"content-length", b"content-type")]
        mangled = Response(fault.body, status_code=response.status_code)
        mangled.raw_headers.extend(kept)
        response = mangled
    for name, value in (fault.headers or {}).items():
        response.headers[name] = value
    return response


def create_app(*, latency_ms: float = 0.0) -> Starlette:
    """A simulator that accepts any key, for `files-proxy simulate`."""
    return Simulator(latency_ms=latency_ms).app


def _generate(file_id: str, size: int) -> Iterator[bytes]:
    """A 64 KiB pattern of sha256 blocks seeded by the id, rotated differently for each chunk: cheap to
    compute, and a dropped, repeated or shifted range of bytes shows in any comparison."""
    seed = hashlib.sha256(file_id.encode()).digest()
    pattern = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(_CHUNK // 32))
    for index, offset in enumerate(range(0, size, _CHUNK)):
        shift = index * _ROTATION_STEP % _CHUNK
        yield (pattern[shift:] + pattern[:shift])[: size - offset]


async def _stream(
    file: _File, record: Download, reset_after_bytes: int | None
) -> AsyncGenerator[bytes, None]:
    limit = file.size_bytes if reset_after_bytes is None else min(reset_after_bytes, file.size_bytes)
    try:
        for chunk in _generate(file.id, limit):
            # A real suspension point: after a disconnect the server's send returns at once, and only
            # here can the cancellation reach the stream.
            await asyncio.sleep(0)
            yield chunk
            record.bytes_sent += len(chunk)
        if limit < file.size_bytes:
            record.finished = "reset"
            raise _ResetError(f"connection reset by fault after {limit} bytes")
        record.finished = "complete"
    finally:
        if record.finished is None:
            record.finished = "aborted"


def _is_beta(request: Request) -> bool:
    values = request.headers.getlist("anthropic-beta")
    return any(part.strip() == _BETA for value in values for part in value.split(","))


def _integer(name: str, raw: str) -> int:
    if not _INTEGER.fullmatch(raw.strip()):
        raise _ApiError(400, f"{name}: Input should be a valid integer")
    return int(raw)


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    limit = _integer("limit", raw)
    if not 1 <= limit <= 1000:
        raise _ApiError(400, "limit: Input should be between 1 and 1000")
    return limit


def _encode_page(seq: int) -> str:
    """A GA `page` token: where the next page starts, still valid if that file is deleted meanwhile."""
    return "page_" + base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def _decode_page(token: str) -> int:
    encoded = token.removeprefix("page_")
    try:
        decoded = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        decoded = ""
    match = _PAGE_TOKEN.fullmatch(decoded)
    if not token.startswith("page_") or match is None:
        raise _ApiError(400, "page: invalid page token")
    return int(match[1])


def _content_disposition(filename: str) -> str:
    fallback = filename.encode("ascii", "replace").decode().replace("\\", "\\\\").replace('"', '\\"')
    value = f'attachment; filename="{fallback}"'
    if not filename.isascii():
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


async def _json_object(request: Request) -> dict[str, Any]:
    value = await request.json()
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _control_error(exc: Exception) -> JSONResponse:
    return JSONResponse({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, status_code=400)


def _random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
