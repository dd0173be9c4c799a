"""Every header rule of the proxy, each written once: what a request keeps, what goes upstream in
place of the client's key, what comes back, and what the cache stores and replays.

    client -> proxy     end_to_end: hop-by-hop headers go (and every header Connection names), before
                        anything reads the request: routing, auth, the cache key and forwarding all see
                        the same headers
    proxy -> upstream   to_upstream: the client's key headers swapped for the tenant's key; Host and,
                        without a body, Content-Length are the client library's to set; on_behalf_of:
                        a request the proxy makes itself for a tenant
    upstream -> client  from_upstream: end-to-end headers but Date and Server (our server sets its own);
                        whole_body: without Content-Length and Content-Encoding once the body was read
                        decoded and is sent whole
    cache               replayed: the few headers a stored answer keeps for its hits
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Where a client presents its proxy key, and so where the tenant's key goes upstream.
CREDENTIAL_HEADERS = ("x-api-key", "authorization")
# The headers that choose an answer's shape (part of the cache key), and their bound in bytes: real
# values are a few dozen bytes.
VARIANT_HEADERS = ("anthropic-beta", "anthropic-version")
MAX_VARIANT_HEADER_BYTES = 1024
_NOT_FORWARDED_WITH_BODY = frozenset({"host", *CREDENTIAL_HEADERS})
_NOT_FORWARDED = _NOT_FORWARDED_WITH_BODY | {"content-length"}
_NOT_FORWARDED_RESPONSE = frozenset({"date", "server"})
# Set by the proxy's own server or by the HTTP client; never copied across a body read whole.
_BODY_FRAMING = frozenset({"content-length", "content-encoding"})
_REPLAYED = frozenset({"content-type", "request-id", "anthropic-organization-id", "anthropic-workspace-id"})


def end_to_end(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers (RFC 9110 section 7.6.1), including every header named in Connection;
    names lower-cased."""
    pairs = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower() for name, value in pairs if name == "connection" for token in value.split(",")
    }
    return [(name, value) for name, value in pairs if name not in HOP_BY_HOP and name not in named]


def to_upstream(received: Headers, key_headers: Collection[str], api_key: str, *, with_body: bool) -> Headers:
    """The client's end-to-end headers as sent upstream: its proxy key replaced by the tenant's key,
    in the header forms the client used. With a body, the client's Content-Length is kept so the
    upstream gets a plain body, not a chunked one."""
    not_forwarded = (
        {"host", *CREDENTIAL_HEADERS} if with_body else {"host", "content-length", *CREDENTIAL_HEADERS}
    )
    headers = [(name, value) for name, value in received if name not in not_forwarded]
    if "x-api-key" in key_headers:
        headers.append(("x-api-key", api_key))
    if "authorization" in key_headers:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers


def on_behalf_of(api_key: str, anthropic_version: str) -> Headers:
    """The headers of a request the proxy makes itself for a tenant (the usage page's list, the
    owner records' reconciliation): the version it asks for and the tenant's key, as an SDK sends them."""
    return to_upstream([("anthropic-version", anthropic_version)], ("x-api-key",), api_key, with_body=False)


def from_upstream(raw: Iterable[tuple[str, str]]) -> Headers:
    return [(name, value) for name, value in end_to_end(raw) if name not in _NOT_FORWARDED_RESPONSE]


def whole_body(headers: Iterable[tuple[str, str]]) -> Headers:
    return [(name, value) for name, value in headers if name not in _BODY_FRAMING]


def replayed(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in headers if name in _REPLAYED)
