"""Constants several test modules share: the test tenants and their keys, the admin key, and the Files
API's header values with the request headers made of them."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import Tenant, hash_key


@dataclass(frozen=True)
class TeamKeys:
    name: str
    workspace: str
    proxy_key: str
    upstream_key: str
    upstream_workspace: str

    def tenant(self) -> Tenant:
        return Tenant(
            name=self.name,
            workspace=self.workspace,
            client_key_hashes=frozenset({hash_key(self.proxy_key)}),
            api_key=self.upstream_key,
        )


ALPHA = TeamKeys("alpha", "alpha-prod", "fp-test-alpha-7c1d0e", "sk-ant-test-alpha-52aa", "wrkspc_alpha")
BRAVO = TeamKeys("bravo", "bravo-prod", "fp-test-bravo-91be44", "sk-ant-test-bravo-e07f", "wrkspc_bravo")
# Searched for in everything the proxy wrote during the run (conftest.no_secret_in_any_output).
ALL_SECRETS = (ALPHA.proxy_key, ALPHA.upstream_key, BRAVO.proxy_key, BRAVO.upstream_key)

# The key of `[admin]` wherever a test's proxy has one (configured by its sha256, as `key_sha256`).
ADMIN_KEY = "fp-test-admin-3f9a61"

# `anthropic-version`: VERSION is the one most tests send; SDK_VERSION is the one the SDK sends and the
# proxy sends for its own GA list pages. The proxy passes the version through and keys its cache on it,
# so GA_HEADERS and SDK_GA_HEADERS ask for two different cache entries of the same GA answer.
VERSION = "2026-10-21"
SDK_VERSION = "2023-06-01"
# The `anthropic-beta` value of the Files API's beta shape (`?beta=true` asks for it too).
FILES_BETA = "files-api-2025-04-14"

# ALPHA's GA and beta requests. Spread them into a new dict to add or change a header.
GA_HEADERS = {"x-api-key": ALPHA.proxy_key, "anthropic-version": VERSION}
SDK_GA_HEADERS = {"x-api-key": ALPHA.proxy_key, "anthropic-version": SDK_VERSION}
BETA_HEADERS = {**SDK_GA_HEADERS, "anthropic-beta": FILES_BETA}
