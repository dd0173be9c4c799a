"""Header filtering (pure) and the proxy's promise never to retry, seen from the simulator."""

from __future__ import annotations

import anthropic
import pytest

from proxy.simulator import Simulator
from proxy.upstream import end_to_end


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("Content-Type", "a/b")], [("content-type", "a/b")], id="lower-cased"),
        pytest.param(
            [("connection", "close"), ("keep-alive", "5"), ("transfer-encoding", "chunked"), ("x-a", "1")],
            [("x-a", "1")],
            id="hop-by-hop",
        ),
        pytest.param(
            [("Connection", "X-Secret, Upgrade"), ("x-secret", "s"), ("upgrade", "h2c"), ("x-b", "2")],
            [("x-b", "2")],
            id="named-in-connection",
        ),
        pytest.param(
            [
                ("proxy-authorization", "Basic x"),
                ("te", "trailers"),
                ("trailer", "x"),
                ("proxy-connection", "k"),
            ],
            [],
            id="proxy-and-te",
        ),
        pytest.param(
            [
                ("anthropic-beta", "a"),
                ("anthropic-beta", "b"),
                ("request-id", "req_1"),
                ("retry-after-ms", "5"),
            ],
            [
                ("anthropic-beta", "a"),
                ("anthropic-beta", "b"),
                ("request-id", "req_1"),
                ("retry-after-ms", "5"),
            ],
            id="end-to-end-kept-with-repeats",
        ),
    ],
)
def test_end_to_end_drops_hop_by_hop_headers(
    headers: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    assert end_to_end(headers) == expected


def test_a_failed_upload_is_never_retried_by_the_proxy(
    alpha: anthropic.Anthropic, simulator: Simulator
) -> None:
    simulator.inject_fault(status=503, method="POST")
    with pytest.raises(anthropic.InternalServerError):
        alpha.files.upload(file=("once.txt", b"once", "text/plain"))
    assert [r.method for r in simulator.received] == ["POST"]
    assert simulator.uploads == {}
