"""How a poll source's stored state moves on with each page committed (pure: no I/O)."""

from __future__ import annotations

from dataclasses import replace

from actors.poll.config import SinceConfig
from actors.poll.watermark import Watermark
from daemon.store.poll import PageCheck, PollState


def advance(
    state: PollState,
    since: SinceConfig | None,
    mark: Watermark | None,
    following: str | None,
    stuck: bool,
    check: PageCheck | None,
    refreshed: float | None,
) -> PollState:
    """The state to commit with a page whose items' highest mark is `mark`, whose validators
    are in `check`, read in full at `refreshed` (None: a 304, read in full at `check`'s time)."""
    state = replace(state, pages=state.pages + 1, next_url=following)
    if state.pages == 1:
        state.cycle_etag = check.etag if check is not None else None
        state.cycle_last_modified = check.last_modified if check is not None else None
    if refreshed is None:
        assert check is not None
        refreshed = check.refreshed_at
    if state.cycle_refreshed is None or refreshed < state.cycle_refreshed:
        state.cycle_refreshed = refreshed
    if since is not None and mark is not None:
        current = Watermark.parse(state.cycle_mark, since.format) if state.cycle_mark else None
        if current is None or mark.order > current.order:
            state.cycle_mark = mark.text
    if following is None or stuck:
        state.next_url = None
        if not stuck:
            state.mark = state.cycle_mark
            state.cycles += 1
            # The first page's validators and the oldest full read of any page of this
            # listing: what lets a 304 for that first page end a cycle (`newest_first`).
            state.etag, state.last_modified = state.cycle_etag, state.cycle_last_modified
            state.validated_url, state.refreshed = state.cycle_url, state.cycle_refreshed
        state.cycle_mark = state.cycle_etag = state.cycle_last_modified = state.cycle_url = None
        state.cycle_refreshed = None
        state.pages = 0
    return state


def dropped_listing(state: PollState) -> PollState:
    """`state` without the listing in progress: the next cycle starts over from the mark."""
    return replace(
        state,
        next_url=None,
        cycle_mark=None,
        cycle_url=None,
        cycle_etag=None,
        cycle_last_modified=None,
        cycle_refreshed=None,
        pages=0,
    )
