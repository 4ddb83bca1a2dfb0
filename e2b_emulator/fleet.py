"""The emulated E2B's sandboxes: ids, lookup, creation, removal and listing."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from e2b_emulator.model import DEFAULT_TIMEOUT, STATES, Box, Sizes, new_box

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The filters and the page of ``GET /v2/sandboxes``; ``after_seq`` is the decoded nextToken."""

    states: tuple[str, ...] = STATES
    metadata: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    started_after: datetime | None = None
    order: str = "desc"
    limit: int = 100
    after_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``next_seq`` is set when more follow, ``running`` counts all pages."""

    boxes: list[Box]
    running: int
    next_seq: int | None


class Fleet:
    """Every sandbox by id. A killed id stays dead, even with ``auto_create``."""

    def __init__(self, rng: random.Random, *, auto_create: bool) -> None:
        self._rng = rng
        self._auto_create = auto_create
        self._boxes: dict[str, Box] = {}
        self._killed: set[str] = set()
        self._seq = 0

    def get(self, sandbox_id: str) -> Box | None:
        """The sandbox as it is, whatever the faults say."""
        return self._boxes.get(sandbox_id)

    def find(self, sandbox_id: str | None, missing: Collection[str], now: datetime) -> Box | None:
        """The sandbox an API call names: None when hidden by ``missing`` or unknown
        (with ``auto_create``, a never-seen id comes to exist, running)."""
        if sandbox_id is None or sandbox_id in missing:
            return None
        box = self._boxes.get(sandbox_id)
        if box is None and self._auto_create and sandbox_id not in self._killed:
            box = self.add(
                sandbox_id, now, template="base", metadata={}, timeout=DEFAULT_TIMEOUT, sizes=Sizes()
            )
        return box

    def add(
        self,
        sandbox_id: str,
        now: datetime,
        *,
        template: str,
        metadata: dict[str, str],
        timeout: int,
        sizes: Sizes,
    ) -> Box:
        """Make ``sandbox_id`` exist, running, replacing any earlier one; ValueError on bad input."""
        box = new_box(
            sandbox_id, self._seq + 1, now, template=template, metadata=metadata, timeout=timeout, sizes=sizes
        )
        self._seq += 1
        self._killed.discard(sandbox_id)
        self._boxes[sandbox_id] = box
        return box

    def new_id(self) -> str:
        """An id that no sandbox has or had, shaped like E2B's."""
        while True:
            new_id = "i" + "".join(self._rng.choices(_ID_ALPHABET, k=19))
            if new_id not in self._boxes and new_id not in self._killed:
                return new_id

    def kill(self, box: Box) -> None:
        del self._boxes[box.sandbox_id]
        self._killed.add(box.sandbox_id)

    def clear(self) -> None:
        self._boxes.clear()
        self._killed.clear()

    def page(self, query: ListQuery, missing: Collection[str]) -> Page:
        """Filter, order by creation, count the running ones before paging (as the spec says), page."""
        matches = [
            box
            for box in self._boxes.values()
            if box.state in query.states
            and box.sandbox_id not in missing
            and (query.template is None or box.template == query.template)
            and (query.started_after is None or box.started_at >= query.started_after)
            and all(box.metadata.get(k) == v for k, v in query.metadata)
        ]
        matches.sort(key=lambda box: box.seq, reverse=query.order == "desc")
        running = sum(box.state == "running" for box in matches)
        if query.after_seq is not None:
            after = query.after_seq
            matches = [
                box for box in matches if (box.seq < after if query.order == "desc" else box.seq > after)
            ]
        boxes = matches[: query.limit]
        next_seq = boxes[-1].seq if len(matches) > query.limit else None
        return Page(boxes, running, next_seq)
