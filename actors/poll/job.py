"""Job mode of a poll source (`job = {…}`); `JobMode` is the poller's part that runs it.

A cycle submits the request (`Idempotency-Key: SOURCE-CYCLE`), stores the status URL, then polls
it every `job.interval` until `until` holds — the answer is then read like a page — or `fail`
holds, or `job.timeout` has passed since the submission (counted errors). A restart resumes
watching the stored job instead of submitting again. The timeout is on the poller's wall `clock`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin

import msgspec
import trio

from actors.poll.config import PollSourceConfig
from actors.poll.fetcher import where
from actors.poll.pages import Page, PageReader, excerpt
from daemon.errors import PollError
from daemon.http.client import Response
from daemon.store.api import Outbox
from daemon.store.poll import PageCheck, PollState

Batch = tuple[Page, PollState, PageCheck | None]
"""A page handed to the committer: its items, the state after it, the validators to store with it."""


class JobMode:
    """The job-mode cycle of `actors.poll.poller.Poller` (which provides these attributes)."""

    name: str
    status_name: str
    _config: PollSourceConfig
    _state: PollState
    _store: Outbox
    _headers: list[tuple[str, str]]
    _body: bytes
    _reader: PageReader
    _until: Any
    _fail: Any
    _status_url: Any
    _fetch: Callable[..., Awaitable[Response]]
    _clock: Callable[[], float]

    async def _commit(self, batch: list[Batch]) -> None:
        raise NotImplementedError

    async def _job_cycle(self) -> None:
        """Submit a job (unless one is stored), watch it, store its result; see "Job mode"."""
        config = self._config
        job = config.job
        assert job is not None
        if self._state.job is None:
            await self._submit()
        watched = json.loads(self._state.job or "{}")
        status_url, submitted_at = str(watched["status_url"]), float(watched["submitted_at"])
        while True:
            if self._clock() - submitted_at > job.timeout:
                await self._forget_job()
                raise PollError(
                    f"job {where(status_url)} not done within {job.timeout:g}s of its submission; given up",
                    kind="job_timeout",
                )
            self.status_name = "job"
            response = await self._fetch("GET", status_url, list(self._headers))
            answer = decode_answer(response)
            if self._fail is not None and holds(self._fail, answer, "job.fail"):
                await self._forget_job()
                raise PollError(
                    f"job {where(status_url)} failed: {excerpt(response.body)}", kind="job_failed"
                )
            if holds(self._until, answer, "job.until"):
                page = self._reader.read(response.body, response.header("content-type"))
                state = replace(self._state, job=None, cycles=self._state.cycles + 1)
                await self._commit([(page, state, None)])
                return
            await trio.sleep(job.interval)

    async def _submit(self) -> None:
        config = self._config
        headers = [*self._headers, ("idempotency-key", f"{self.name}-{self._state.cycles + 1}")]
        response = await self._fetch(config.method, config.url, headers, self._body)
        if self._status_url is not None:
            try:
                (target,) = self._status_url.input_value(decode_answer(response)).all()
            except ValueError as exc:
                raise PollError(f"job.status_url: jq failed on the submit answer: {exc}", kind="jq") from None
        else:
            target = response.header("location")
        if not isinstance(target, str) or not target:
            raise PollError(
                f"no status URL in the submit answer (job.status_url gave {target!r}): "
                + excerpt(response.body),
                kind="bad_shape",
            )
        job = json.dumps({"status_url": urljoin(config.url, target), "submitted_at": self._clock()})
        state = replace(self._state, job=job)
        await self._store.save_poll_state(self.name, state)
        self._state = state

    async def _forget_job(self) -> None:
        state = replace(self._state, job=None, cycles=self._state.cycles + 1)
        await self._store.save_poll_state(self.name, state)
        self._state = state


def decode_answer(response: Response) -> Any:
    try:
        return msgspec.json.decode(response.body)
    except msgspec.DecodeError as exc:
        kind = response.header("content-type") or "no content-type"
        raise PollError(
            f"response is not JSON ({kind}): {exc}: {excerpt(response.body)!r}", kind="not_json"
        ) from None


def holds(program: Any, answer: Any, key: str) -> bool:
    try:
        (value,) = program.input_value(answer).all()
    except ValueError as exc:
        raise PollError(f"{key}: jq failed on the status answer: {exc}", kind="jq") from None
    return value is not False and value is not None
