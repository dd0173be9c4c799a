"""The Files API simulator, driven in process through httpx's ASGI transport."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

import files_api_simulator.simulator
from files_api_simulator import Simulator, create_app
from tests.constants import FILES_BETA, SDK_VERSION, VERSION

KEY_A = "sk-test-alpha"
KEY_B = "sk-test-bravo"
# With the simulator's own key: these requests go to the simulator, not through a proxy.
GA = {"x-api-key": KEY_A, "anthropic-version": SDK_VERSION}
BETA = {**GA, "anthropic-beta": FILES_BETA}
MULTIPART = "multipart/form-data; boundary=bnd"
FORM = {**GA, "content-type": MULTIPART}
FILE_PART = 'content-disposition: form-data; name="file"; filename="a.txt"'
EXPIRES_PART = 'content-disposition: form-data; name="expires_in_seconds"'

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sim() -> Simulator:
    return Simulator(keys={KEY_A: "wrkspc_alpha", KEY_B: "wrkspc_bravo"})


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app), base_url="http://sim") as client:
        yield client


def _form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart body with boundary `bnd`; each part is (header lines, content)."""
    body = b"".join(b"--bnd\r\n" + head.encode() + b"\r\n\r\n" + content + b"\r\n" for head, content in parts)
    return body + b"--bnd--\r\n"


def _envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    assert re.fullmatch(r"req_[A-Za-z0-9]{24}", body["request_id"])
    return body


async def _upload(client: httpx.AsyncClient, content: bytes = b"x", headers: dict[str, str] = GA) -> str:
    response = await client.post(
        "/v1/files", headers=headers, files={"file": ("a.txt", content, "text/plain")}
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


async def _ids(client: httpx.AsyncClient, params: Any, headers: dict[str, str] = GA) -> list[str]:
    response = await client.get("/v1/files", headers=headers, params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


async def test_upload_metadata_delete_and_404_afterwards(client: httpx.AsyncClient, sim: Simulator) -> None:
    response = await client.post(
        "/v1/files", headers=GA, files={"file": ("notes.txt", b"hello, files", "text/plain")}
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    uploaded = response.json()
    assert re.fullmatch(r"file_[A-Za-z0-9]{24}", uploaded["id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", uploaded["created_at"])
    assert {k: v for k, v in uploaded.items() if k not in {"id", "created_at"}} == {
        "type": "file",
        "filename": "notes.txt",
        "mime_type": "text/plain",
        "size_bytes": 12,
        "downloadable": False,
        "scope": None,
        "expires_at": None,
    }
    assert sim.uploads[uploaded["id"]] == (12, hashlib.sha256(b"hello, files").hexdigest())

    path = f"/v1/files/{uploaded['id']}"
    assert (await client.get(path, headers=GA)).json() == uploaded
    beta = (await client.get(path, headers=BETA, params={"beta": "true"})).json()
    assert beta == {k: v for k, v in uploaded.items() if k != "expires_at"}

    deleted = await client.delete(path, headers=GA)
    assert deleted.json() == {"id": uploaded["id"], "type": "file_deleted"}
    _envelope(await client.get(path, headers=GA), 404, "not_found_error")
    _envelope(await client.delete(path, headers=GA), 404, "not_found_error")
    _envelope(await client.get(f"{path}/content", headers=GA), 404, "not_found_error")
    assert await _ids(client, {}) == []


@pytest.mark.parametrize(
    ("part", "filename", "mime_type"),
    [
        pytest.param(
            'content-disposition: form-data; name="file"', "unnamed", "application/octet-stream", id="no-name"
        ),
        pytest.param(
            'content-disposition: form-data; name="file"; filename=""',
            "unnamed",
            "application/octet-stream",
            id="empty",
        ),
        pytest.param(
            'content-disposition: form-data; name="file"; filename="dir/x.png"',
            "x.png",
            "image/png",
            id="guessed",
        ),
        pytest.param(FILE_PART + "\r\ncontent-type: text/csv", "a.txt", "text/csv", id="part-type-wins"),
    ],
)
async def test_upload_names_and_types(
    client: httpx.AsyncClient, part: str, filename: str, mime_type: str
) -> None:
    response = await client.post("/v1/files", headers=FORM, content=_form((part, b"abc")))

    assert response.status_code == 200, response.text
    assert (response.json()["filename"], response.json()["mime_type"]) == (filename, mime_type)


async def test_upload_expires_in_seconds_sets_expires_at(client: httpx.AsyncClient) -> None:
    body = _form((FILE_PART, b"abc"), (EXPIRES_PART, b"3600"))
    uploaded = (await client.post("/v1/files", headers=FORM, content=body)).json()

    created = datetime.fromisoformat(uploaded["created_at"])
    assert datetime.fromisoformat(uploaded["expires_at"]) - created == timedelta(hours=1)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param(MULTIPART, _form(('content-disposition: form-data; name="other"', b"x")), id="no-file"),
        pytest.param("application/json", b"{}", id="not-multipart"),
        pytest.param("multipart/form-data", _form((FILE_PART, b"x")), id="no-boundary"),
        pytest.param(MULTIPART, b"garbage", id="garbage"),
        pytest.param(MULTIPART, _form((FILE_PART, b"abc"))[:-12], id="truncated"),
        pytest.param(MULTIPART, _form((FILE_PART, b"a"), (FILE_PART, b"b")), id="two-files"),
        pytest.param(MULTIPART, _form((FILE_PART, b"a"), (EXPIRES_PART, b"3599")), id="expires-too-soon"),
        pytest.param(MULTIPART, _form((FILE_PART, b"a"), (EXPIRES_PART, b"7776001")), id="expires-too-late"),
        pytest.param(MULTIPART, _form((FILE_PART, b"a"), (EXPIRES_PART, b"1e4")), id="expires-not-int"),
        pytest.param(MULTIPART, _form((FILE_PART, b"a"), (EXPIRES_PART, b"1" * 2000)), id="huge-field"),
    ],
)
async def test_malformed_uploads_are_400(
    client: httpx.AsyncClient, sim: Simulator, content_type: str, body: bytes
) -> None:
    response = await client.post("/v1/files", headers={**GA, "content-type": content_type}, content=body)

    _envelope(response, 400, "invalid_request_error")
    assert sim.uploads == {}
    assert sim.received[-1].body_bytes == len(body)


async def test_upload_over_the_limit_is_413_and_the_body_is_still_read(
    client: httpx.AsyncClient, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files_api_simulator.simulator, "_MAX_UPLOAD_BYTES", 1000)
    body = _form((FILE_PART, b"y" * 1001))

    response = await client.post("/v1/files", headers=FORM, content=body)

    _envelope(response, 413, "request_too_large")
    assert sim.uploads == {}
    assert sim.received[-1].body_bytes == len(body)


async def test_ga_list_pages_newest_first_and_survives_a_deleted_cursor(
    client: httpx.AsyncClient, sim: Simulator
) -> None:
    created = [sim.add_file(KEY_A, filename=f"f{i}.bin") for i in range(7)]
    first = (await client.get("/v1/files", headers=GA, params={"limit": 3})).json()
    assert set(first) == {"data", "next_page"}
    assert first["next_page"].startswith("page_")
    assert all("expires_at" in item for item in first["data"])
    await client.delete(f"/v1/files/{first['data'][-1]['id']}", headers=GA)

    second = (
        await client.get("/v1/files", headers=GA, params={"limit": 3, "page": first["next_page"]})
    ).json()
    third = (
        await client.get("/v1/files", headers=GA, params={"limit": 3, "page": second["next_page"]})
    ).json()

    pages = [[item["id"] for item in page["data"]] for page in (first, second, third)]
    assert pages == [created[:3:-1], created[3:0:-1], created[:1]]
    assert third["next_page"] is None


async def test_ga_list_by_ids_is_one_page_without_unknown_or_deleted(
    client: httpx.AsyncClient, sim: Simulator
) -> None:
    a, b, c, gone = (sim.add_file(KEY_A) for _ in range(4))
    await client.delete(f"/v1/files/{gone}", headers=GA)
    sim.add_file(KEY_A)

    response = await client.get(
        "/v1/files",
        headers=GA,
        params=[("ids", a), ("ids", c), ("ids[]", b), ("ids", a), ("ids", gone), ("ids", "file_nope")],
    )

    assert [item["id"] for item in response.json()["data"]] == [c, b, a]
    assert response.json()["next_page"] is None


async def test_beta_list_shape_and_id_cursors(client: httpx.AsyncClient, sim: Simulator) -> None:
    assert (await client.get("/v1/files", headers=BETA)).json() == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
    newest_first = [sim.add_file(KEY_A) for _ in range(5)][::-1]

    page = (await client.get("/v1/files", headers=BETA, params={"beta": "true", "limit": 2})).json()
    assert set(page) == {"data", "has_more", "first_id", "last_id"}
    assert all("expires_at" not in item for item in page["data"])
    assert [item["id"] for item in page["data"]] == newest_first[:2]
    assert (page["has_more"], page["first_id"], page["last_id"]) == (True, newest_first[0], newest_first[1])

    after = (
        await client.get("/v1/files", headers=BETA, params={"limit": 2, "after_id": newest_first[3]})
    ).json()
    assert ([item["id"] for item in after["data"]], after["has_more"]) == ([newest_first[4]], False)

    before = (
        await client.get("/v1/files", headers=BETA, params={"limit": 2, "before_id": newest_first[3]})
    ).json()
    assert ([item["id"] for item in before["data"]], before["has_more"]) == (newest_first[1:3], True)


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        pytest.param(GA, {"ids": "file_a", "page": "page_YWZ0ZXI6NQ"}, id="ids-with-page"),
        pytest.param(GA, {"ids": "file_a", "limit": 5}, id="ids-with-limit"),
        pytest.param(GA, {"ids": [f"file_{i}" for i in range(101)]}, id="too-many-ids"),
        pytest.param(GA, {"after_id": "file_a"}, id="after-id-without-beta"),
        pytest.param(GA, {"before_id": "file_a"}, id="before-id-without-beta"),
        pytest.param(GA, {"page": "page_bm9wZQ"}, id="page-not-ours"),
        pytest.param(GA, {"page": "cursor"}, id="page-without-prefix"),
        pytest.param(GA, {"limit": 0}, id="limit-0"),
        pytest.param(GA, {"limit": 1001}, id="limit-1001"),
        pytest.param(GA, {"limit": "ten"}, id="limit-not-int"),
        pytest.param(BETA, {"limit": "-1"}, id="beta-limit"),
        pytest.param(BETA, {"after_id": "file_unknown"}, id="beta-unknown-cursor"),
        pytest.param(BETA, {"after_id": "file_a", "before_id": "file_b"}, id="beta-both-cursors"),
    ],
)
async def test_bad_list_queries_are_400(
    client: httpx.AsyncClient, headers: dict[str, str], params: dict[str, Any]
) -> None:
    _envelope(await client.get("/v1/files", headers=headers, params=params), 400, "invalid_request_error")


async def test_scope_id_matches_no_simulated_file(client: httpx.AsyncClient, sim: Simulator) -> None:
    sim.add_file(KEY_A)
    assert await _ids(client, {"scope_id": "sesn_1"}) == []
    assert await _ids(client, {"scope_id": "sesn_1"}, BETA) == []


async def test_workspaces_are_isolated(client: httpx.AsyncClient, sim: Simulator) -> None:
    mine = await _upload(client)
    theirs = {"authorization": f"Bearer {KEY_B}", "anthropic-version": SDK_VERSION}

    assert await _ids(client, {}, theirs) == []
    for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
        response = await client.request(method, f"/v1/files/{mine}{path}", headers=theirs)
        _envelope(response, 404, "not_found_error")
    assert await _ids(client, {"ids": mine}, theirs) == []
    assert await _ids(client, {}, {**GA, "anthropic-workspace-id": "wrkspc_alpha"}) == [mine]
    wrong = await client.get("/v1/files", headers={**GA, "anthropic-workspace-id": "wrkspc_bravo"})
    _envelope(wrong, 403, "permission_error")


async def test_without_a_key_map_every_key_is_its_own_workspace() -> None:
    sim = Simulator()
    sim.add_file("sk-one")
    expected = "wrkspc_" + hashlib.sha256(b"sk-one").hexdigest()[:16]
    headers = {"anthropic-version": SDK_VERSION, "anthropic-workspace-id": expected}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app), base_url="http://sim") as client:
        assert len(await _ids(client, {}, {**headers, "x-api-key": "sk-one"})) == 1
        other = await client.get("/v1/files", headers={**headers, "x-api-key": "sk-two"})
        _envelope(other, 403, "permission_error")


async def test_download_streams_the_generated_content(client: httpx.AsyncClient, sim: Simulator) -> None:
    file_id = sim.add_file(KEY_A, filename='out "1".csv', mime_type="text/csv", size_bytes=300_000)

    response = await client.get(f"/v1/files/{file_id}/content", headers=GA)

    assert response.status_code == 200
    assert response.content == b"".join(sim.content_of(file_id))
    assert response.headers["content-length"] == "300000"
    assert response.headers["content-type"] == "text/csv"
    assert response.headers["content-disposition"] == 'attachment; filename="out \\"1\\".csv"'
    assert response.headers["request-id"].startswith("req_")
    [download] = sim.downloads
    assert (download.file_id, download.bytes_sent, download.finished) == (file_id, 300_000, "complete")


async def test_non_ascii_filename_gets_an_rfc_5987_disposition(
    client: httpx.AsyncClient, sim: Simulator
) -> None:
    file_id = sim.add_file(KEY_A, filename="résumé.pdf", size_bytes=1)
    response = await client.get(f"/v1/files/{file_id}/content", headers=GA)
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"r?sum?.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
    )


def test_generated_content_is_deterministic_chunked_and_varied() -> None:
    sim = Simulator()
    file_id = sim.add_file("sk-any", size_bytes=3 * 65536 + 5)
    chunks = list(sim.content_of(file_id))

    assert [len(chunk) for chunk in chunks] == [65536, 65536, 65536, 5]
    assert b"".join(sim.content_of(file_id)) == b"".join(chunks)
    assert len(set(chunks)) == 4
    assert len({chunks[0][i : i + 32] for i in range(0, 65536, 32)}) == 2048
    assert b"".join(sim.content_of(sim.add_file("sk-any", size_bytes=5))) != chunks[-1]


async def test_download_errors_carry_their_error_code(client: httpx.AsyncClient, sim: Simulator) -> None:
    uploaded = await _upload(client)
    body = _envelope(
        await client.get(f"/v1/files/{uploaded}/content", headers=GA), 400, "invalid_request_error"
    )
    assert body["error"]["details"] == {"error_code": "file_not_downloadable"}

    expired = sim.add_file(KEY_A, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    body = _envelope(await client.get(f"/v1/files/{expired}/content", headers=GA), 404, "not_found_error")
    assert body["error"]["details"] == {"error_code": "file_expired"}
    assert (await client.get(f"/v1/files/{expired}", headers=GA)).status_code == 200


async def test_status_fault_is_consumed_exactly_times(client: httpx.AsyncClient, sim: Simulator) -> None:
    sim.inject_fault(status=529, times=2)
    sim.inject_fault(status=500, method="DELETE")

    statuses = [(await client.get("/v1/files", headers=GA)) for _ in range(3)]

    for response in statuses[:2]:
        _envelope(response, 529, "overloaded_error")
        assert response.headers["retry-after"] == "1"
    assert statuses[2].status_code == 200
    assert len(sim.received) == 3
    _envelope(await client.delete("/v1/files/file_x", headers=GA), 500, "api_error")
    _envelope(await client.delete("/v1/files/file_x", headers=GA), 404, "not_found_error")


async def test_fault_until_cleared_and_path_prefix(client: httpx.AsyncClient, sim: Simulator) -> None:
    sim.inject_fault(status=403, path_prefix="/v1/files/file_", times=-1)
    assert (await client.get("/v1/files", headers=GA)).status_code == 200
    for _ in range(3):
        _envelope(await client.get("/v1/files/file_x", headers=GA), 403, "permission_error")
    sim.clear_faults()
    assert (await client.get("/v1/files/file_x", headers=GA)).status_code == 404
    with pytest.raises(ValueError, match="times"):
        sim.inject_fault(status=500, times=0)


async def test_reset_fault_cuts_a_download_after_the_given_bytes(
    client: httpx.AsyncClient, sim: Simulator
) -> None:
    file_id = sim.add_file(KEY_A, size_bytes=200_000)
    sim.inject_fault(reset_after_bytes=70_000)

    with pytest.raises(RuntimeError, match="reset"):
        await client.get(f"/v1/files/{file_id}/content", headers=GA)

    [download] = sim.downloads
    assert (download.bytes_sent, download.finished) == (70_000, "reset")
    assert (await client.get(f"/v1/files/{file_id}/content", headers=GA)).status_code == 200


async def test_delay_fault_and_latency_slow_answers_down(client: httpx.AsyncClient, sim: Simulator) -> None:
    sim.latency_ms = 30
    sim.inject_fault(delay_s=0.05)

    started = time.monotonic()
    assert (await client.get("/v1/files", headers=GA)).status_code == 200
    assert time.monotonic() - started >= 0.08
    started = time.monotonic()
    _envelope(await client.get("/v1/nothing", headers=GA), 404, "not_found_error")
    assert time.monotonic() - started >= 0.03


@pytest.mark.parametrize(
    ("headers", "status", "error_type"),
    [
        pytest.param({"anthropic-version": SDK_VERSION}, 401, "authentication_error", id="no-key"),
        pytest.param({**GA, "x-api-key": ""}, 401, "authentication_error", id="empty-key"),
        pytest.param({**GA, "x-api-key": "sk-unknown"}, 401, "authentication_error", id="unknown-key"),
        pytest.param(
            {"authorization": "Bearer sk-unknown", "anthropic-version": SDK_VERSION},
            401,
            "authentication_error",
            id="unknown-bearer",
        ),
        pytest.param(
            {"authorization": f"Basic {KEY_A}", "anthropic-version": SDK_VERSION},
            401,
            "authentication_error",
            id="basic",
        ),
        pytest.param({"x-api-key": KEY_A}, 400, "invalid_request_error", id="no-version"),
    ],
)
async def test_auth_and_version_errors(
    client: httpx.AsyncClient, sim: Simulator, headers: dict[str, str], status: int, error_type: str
) -> None:
    _envelope(await client.get("/v1/files", headers=headers), status, error_type)
    assert len(sim.received) == 1


async def test_bearer_key_is_accepted(client: httpx.AsyncClient) -> None:
    headers = {"authorization": f"Bearer {KEY_A}", "anthropic-version": VERSION}
    assert (await client.get("/v1/files", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        pytest.param("GET", "/v1/messages", 404, None, id="other-v1"),
        pytest.param("GET", "/v1/files/file_a/content/more", 404, None, id="deeper"),
        pytest.param("PUT", "/v1/files", 405, "GET, POST", id="put-list"),
        pytest.param("PATCH", "/v1/files/file_a", 405, "GET, DELETE", id="patch-file"),
        pytest.param("POST", "/v1/files/file_a/content", 405, "GET", id="post-content"),
    ],
)
async def test_unknown_routes_and_methods(
    client: httpx.AsyncClient, sim: Simulator, method: str, path: str, status: int, allow: str | None
) -> None:
    response = await client.request(method, path, headers=GA)

    _envelope(response, status, "not_found_error" if status == 404 else "invalid_request_error")
    assert response.headers.get("allow") == allow
    assert [(r.method, r.path) for r in sim.received] == [(method, path)]


async def test_paths_outside_v1_are_404_and_not_logged(client: httpx.AsyncClient, sim: Simulator) -> None:
    _envelope(await client.get("/admin", headers=GA), 404, "not_found_error")
    assert sim.received == []


async def test_received_requests_record_what_arrived(client: httpx.AsyncClient, sim: Simulator) -> None:
    body = _form((FILE_PART, b"abc"))
    await client.post("/v1/files?beta=true", headers={**FORM, "X-Trace": "t-1"}, content=body)

    [received] = sim.received
    assert (received.method, received.path, received.query, received.body_bytes) == (
        "POST",
        "/v1/files",
        "beta=true",
        len(body),
    )
    assert received.header("X-TRACE") == "t-1"
    assert received.header("missing") is None
    assert all(name == name.lower() for name, _ in received.headers)


async def test_control_routes(client: httpx.AsyncClient, sim: Simulator) -> None:
    assert (await client.get("/_simulator/health")).json() == {"ok": True}
    created = await client.post(
        "/_simulator/files",
        json={
            "api_key": KEY_A,
            "filename": "c.txt",
            "mime_type": "text/plain",
            "size_bytes": 3,
            "downloadable": True,
            "expires_in_seconds": 60,
        },
    )
    file_id = created.json()["id"]
    assert (await client.get(f"/v1/files/{file_id}/content", headers=GA)).content == b"".join(
        sim.content_of(file_id)
    )
    bad = await client.post("/_simulator/files", json={"api_key": "sk-unknown"})
    assert bad.status_code == 400

    assert (await client.post("/_simulator/faults", json={"status": 429, "times": 2})).status_code == 200
    assert (await client.get("/v1/files", headers=GA)).status_code == 429
    assert (await client.delete("/_simulator/faults")).status_code == 200
    assert (await client.get("/v1/files", headers=GA)).status_code == 200
    assert (await client.post("/_simulator/faults", json={"bogus": 1})).status_code == 400

    logged = (await client.get("/_simulator/requests")).json()
    assert [(r["method"], r["path"], r["body_bytes"]) for r in logged] == [
        ("GET", f"/v1/files/{file_id}/content", 0),
        ("GET", "/v1/files", 0),
        ("GET", "/v1/files", 0),
    ]
    assert ["x-api-key", KEY_A] in logged[0]["headers"]
    await client.delete("/_simulator/requests")
    assert sim.received == []

    assert (await client.put("/_simulator/latency", json={"latency_ms": 5})).status_code == 200
    assert sim.latency_ms == 5.0
    assert (await client.put("/_simulator/latency", json={"latency_ms": -1})).status_code == 400


async def test_create_app_accepts_any_key() -> None:
    transport = httpx.ASGITransport(app=create_app(latency_ms=0))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        file_id = await _upload(client, headers={**GA, "x-api-key": "sk-whatever"})
        assert await _ids(client, {}, {**GA, "x-api-key": "sk-whatever"}) == [file_id]
        assert await _ids(client, {}, {**GA, "x-api-key": "sk-someone-else"}) == []
