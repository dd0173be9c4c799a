"""A whole answer, as read from upstream or replayed from the cache: what every whole response is
made from, whether or not the cache ever saw it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
