"""Files in the simulator, made through its control API (`POST /_simulator/files`)."""

from __future__ import annotations

import asyncio

import httpx

# The old SDK's headers (x-api-key and the beta header): the form whose list pages take id cursors,
# which the Zipf mix uses to spread list reads over many pages.
HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "files-api-2025-04-14"}


async def add_files(
    simulator_url: str, api_key: str, count: int, *, size_bytes: int = 1024, downloadable: bool = True
) -> list[str]:
    """Create `count` files (16 control requests at a time); their ids, in creation order."""
    ids: list[str] = [""] * count
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=simulator_url, timeout=30) as client:

        async def add(index: int) -> None:
            spec = {
                "api_key": api_key,
                "filename": f"bench-{index}.bin",
                "size_bytes": size_bytes,
                "downloadable": downloadable,
            }
            async with gate:
                response = await client.post("/_simulator/files", json=spec)
            response.raise_for_status()
            ids[index] = response.json()["id"]

        await asyncio.gather(*(add(index) for index in range(count)))
    return ids


def upstream_bodies(simulator_url: str, api_key: str, file_id: str) -> tuple[bytes, bytes]:
    """The metadata and first-list-page bytes the simulator answers, for the bare Starlette app."""
    headers = {**HEADERS, "x-api-key": api_key}
    with httpx.Client(base_url=simulator_url, headers=headers) as client:
        metadata = client.get(f"/v1/files/{file_id}")
        listing = client.get("/v1/files", params={"limit": "20"})
    metadata.raise_for_status()
    listing.raise_for_status()
    return metadata.content, listing.content
