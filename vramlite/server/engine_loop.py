"""The one engine thread: it owns the `Engine`, drains a command queue, steps while there is work.

Request handlers run on the asyncio loop. They `submit` a `Generation` (admission control happens
there, synchronously, so a full queue is a 429 before any response starts), then iterate `stream`.
The engine thread adds and aborts requests between steps and hands each step's outputs back to the
loop with `call_soon_threadsafe`; nothing but this thread touches the engine after loading.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from vramlite.engine import Engine, FinishReason, SamplingParams, StepOutput
from vramlite.engine.errors import ModelLoadError
from vramlite.server.errors import ApiError
from vramlite.server.metrics import Metrics

log = logging.getLogger("vramlite.server")

LOADING_RETRY_AFTER_S = 5
QUEUE_FULL_RETRY_AFTER_S = 1
RECOVERY_S = 10.0  # /health reports degraded this long after a request failed in the engine
MAX_FAILED_STEPS = 8  # consecutive steps in which every sequence failed: the engine is broken, not a request


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(eq=False)
class Generation:
    """One request from admission to its last token. Timings (perf_counter seconds) are set by the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    deadline: float
    events: asyncio.Queue[StepOutput | ApiError] = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache held (`StepOutput.cached_tokens`)
    finish_reason: str | None = None
    output: list[str] = field(default_factory=list)  # the text delivered so far, piece by piece

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


_Command = tuple[str, Generation] | None  # ("add" | "abort", generation), or None to stop


class EngineLoop:
    """Loads the engine on its own thread, then runs it; the asyncio side talks to it through `submit`."""

    def __init__(self, load: Callable[[], Engine], metrics: Metrics, *, max_batch_size: int, max_queue: int,
                 request_timeout: float, recovery_s: float = RECOVERY_S) -> None:
        self._load = load
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.engine: Engine | None = None
        self.state = State.LOADING
        self.fault: str | None = None
        self.load_error: str | None = None
        self.on_load_failed: Callable[[], None] | None = None  # called on the engine thread
        self.recovery_s = recovery_s
        self._degraded_until = 0.0  # perf_counter time
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vramlite-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the asyncio loop: admitted generations not yet finished.
        self._active: set[Generation] = set()
        self._idle = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Owned by the engine thread.
        self._by_seq: dict[int, Generation] = {}
        self._failed_steps = 0
        self.num_running = 0
        self.num_waiting = 0
        self._counted: dict[object, int] = {}  # each engine total exported as a counter: its value so far

    # --- asyncio side -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start loading the model on the engine thread; requests get 503 until it is ready."""
        self._loop = loop
        self._thread.start()

    def check_ready(self) -> None:
        """Raise the 503 that explains why requests cannot be served now, if they cannot."""
        if self.state is State.READY:
            return
        if self.state is State.LOADING:
            raise ApiError(503, "loading", "the model is still loading; retry shortly",
                           {"Retry-After": str(LOADING_RETRY_AFTER_S)})
        if self.state is State.FAILED:
            raise ApiError(503, "engine_failed", f"the engine is out of service: {self.fault}")
        raise ApiError(503, "shutting_down", "the server is shutting down and accepts no new requests")

    def check_healthy(self) -> None:
        """`check_ready`, and the 503 that says the engine is recovering from a failed request."""
        self.check_ready()
        left = self._degraded_until - time.perf_counter()
        if left > 0:
            raise ApiError(503, "degraded", f"a request failed in the engine ({self.fault}); the engine freed it and "
                           f"serves the others; healthy again in {left:.0f} s if nothing else fails",
                           {"Retry-After": str(max(1, round(left)))})

    def check_room(self, count: int, field: str = "n", what: str = "choices") -> None:
        """Raise 503 (not ready), 422 (more than the batch and queue can ever hold: `field`'s `count` `what`)
        or 429 (not now) unless `count` more requests can be admitted. Nothing is admitted in between while the
        caller does not await."""
        self.check_ready()
        capacity = self.max_batch_size + self.max_queue
        if count > capacity:
            raise ApiError(422, "validation_error", f"{field}: {count} {what} are more than this server holds at once "
                           f"(max_batch_size {self.max_batch_size} + max_queue {self.max_queue})")
        if len(self._active) + count > capacity:
            raise ApiError(429, "queue_full", f"{len(self._active)} requests are in flight (max_batch_size "
                           f"{self.max_batch_size} + max_queue {self.max_queue}); retry later",
                           {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float) -> Generation:
        """Admit a request, or raise 503 (not ready) / 429 (running batch and queue full)."""
        self.check_room(1)
        gen = Generation(request_id, prompt_ids, params, arrival, arrival + self.request_timeout)
        self._active.add(gen)
        self._idle.clear()
        self._inbox.put(("add", gen))
        return gen

    async def stream(self, gen: Generation) -> AsyncIterator[StepOutput]:
        """The outputs of a submitted request until the finished one; leaving early aborts the request.

        Raises ApiError on an engine fault (500), a timeout (504) or shutdown (503).
        """
        finished = False
        try:
            while not finished:
                remaining = gen.deadline - time.perf_counter()
                try:
                    event = await asyncio.wait_for(gen.events.get(), max(remaining, 0))
                except asyncio.TimeoutError:
                    raise ApiError(504, "timeout", f"the request took longer than request_timeout="
                                   f"{self.request_timeout:g} s; lower max_tokens or raise the timeout") from None
                if isinstance(event, ApiError):
                    finished = True
                    raise event
                finished = event.finished
                yield event
        finally:
            if not finished:
                self._inbox.put(("abort", gen))

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, wait up to `timeout` s for the admitted ones, then cancel the rest."""
        if self.state in (State.LOADING, State.READY):
            self.state = State.DRAINING
        log.info("event=drain_start in_flight=%d timeout_s=%g", len(self._active), timeout)
        if self._active:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("event=drain_timeout cancelled=%d", len(self._active))
        for gen in list(self._active):
            self._deliver([(gen, ApiError(503, "shutting_down", "the server shut down before the request finished"))])
            self._inbox.put(("abort", gen))

    def drain_soon(self, timeout: float, then: Callable[[], None]) -> bool:
        """From any thread: `drain(timeout)` on the asyncio loop, then call `then`. False if not started."""
        if self._loop is None or self._loop.is_closed():
            return False

        async def drain_then() -> None:
            await self.drain(timeout)
            then()

        def schedule() -> None:
            task = asyncio.ensure_future(drain_then())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._loop.call_soon_threadsafe(schedule)
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain with no wait and end the engine thread."""
        await self.drain(0)
        self.state = State.STOPPED
        self._inbox.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)

    def _deliver(self, events: list[tuple[Generation, StepOutput | ApiError]]) -> None:
        for gen, event in events:
            if gen not in self._active:
                continue  # already ended (cancelled by drain): nobody reads it any more
            gen.events.put_nowait(event)
            if isinstance(event, StepOutput) and event.text:
                gen.output.append(event.text)
            if isinstance(event, ApiError) or event.finished:
                self._active.discard(gen)
        if not self._active:
            self._idle.set()

    def _fail_all(self) -> None:
        """On the asyncio loop: every admitted request, queued ones included, gets the 500."""
        message = "the engine failed while generating; the server log has the details under request id"
        self._deliver([(gen, ApiError(500, "internal_error", f"{message} {gen.request_id}"))
                       for gen in self._active])

    # --- engine thread ----------------------------------------------------------------------------

    def _post(self, events: list[tuple[Generation, StepOutput | ApiError]]) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            engine = self._load()
        except Exception as e:
            if isinstance(e, ModelLoadError):  # the message says what to fix; a traceback would bury it
                log.error("event=load_failed error=%s", e)
            else:
                log.exception("event=load_failed")
            self.fault = self.load_error = f"the model failed to load: {e}"
            self.state = State.FAILED
            if self.on_load_failed is not None:
                self.on_load_failed()
            return
        self.engine = engine
        if self.state is State.LOADING:
            self.state = State.READY
        log.info("event=model_loaded model=%s model_type=%s layers=%d device=%s dtype=%s context=%d "
                 "max_batch_size=%d load_s=%.2f", engine.model_dir, engine.config.model_type,
                 engine.config.num_layers, engine.device, str(engine.dtype).removeprefix("torch."), engine.context,
                 self.max_batch_size, time.perf_counter() - start)
        while self._take_commands(engine, block=not engine.has_unfinished()):
            if engine.has_unfinished() and not self._step(engine):
                return
        for seq_id in list(self._by_seq):
            engine.abort(seq_id)

    def _take_commands(self, engine: Engine, block: bool) -> bool:
        """Apply queued adds/aborts (waiting for one if `block`); False once told to stop."""
        events: list[tuple[Generation, StepOutput | ApiError]] = []
        try:
            command = self._inbox.get(block)
            while True:
                if command is None:
                    return False
                action, gen = command
                if action == "add":
                    try:
                        gen.seq_id = engine.add_request(gen.prompt_ids, gen.params)
                        self._by_seq[gen.seq_id] = gen
                    except ValueError as e:  # the handler checked length and vocabulary; this is a backstop
                        events.append((gen, ApiError(400, "invalid_request", str(e))))
                elif gen.seq_id is not None and self._by_seq.pop(gen.seq_id, None) is not None:
                    out = engine.abort(gen.seq_id)
                    if out is not None:
                        gen.finish_reason = out.finish_reason.value
                        events.append((gen, out))
                command = self._inbox.get_nowait()
        except queue.Empty:
            return True
        finally:
            self._post(events)
            self._update_gauges(engine)

    def _step(self, engine: Engine) -> bool:
        """One engine step, its outputs delivered and timed; False if the engine failed."""
        started = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:
            self._fail(e)
            return False
        now = time.perf_counter()
        for seq in engine.scheduler.running:
            self._mark_scheduled(self._by_seq[seq.seq_id], started)
        events: list[tuple[Generation, StepOutput | ApiError]] = []
        sampled: set[int] = set()  # sequences that got tokens (a verified draft brings several)
        failed = 0
        for out in outputs:
            gen = self._by_seq.get(out.seq_id)
            if gen is None:
                continue
            self._mark_scheduled(gen, started)
            if out.cached_tokens is not None:
                gen.cached_tokens = out.cached_tokens
            if out.token_id is not None:
                sampled.add(out.seq_id)
                self._mark_token(gen, now)
            if out.finished:
                gen.finish_reason = out.finish_reason.value
                del self._by_seq[out.seq_id]
            if out.finish_reason is FinishReason.ERROR:
                failed += 1
                events.append((gen, self._request_failed(gen, out.error)))
            else:
                events.append((gen, out))
        if sampled:
            self.metrics.batch_size.observe(len(sampled))
        self._post(events)
        self._update_gauges(engine)
        self._failed_steps = self._failed_steps + 1 if failed and not sampled else 0
        if self._failed_steps >= MAX_FAILED_STEPS:
            self._fail(RuntimeError(f"{MAX_FAILED_STEPS} steps in a row failed for every request in them"))
            return False
        return True

    def _request_failed(self, gen: Generation, error: str | None) -> ApiError:
        """The engine ended `gen` with an error and freed its slot: the engine is degraded for a while."""
        log.error("event=request_failed request_id=%s error=%s", gen.request_id, error)
        self.metrics.engine_faults.inc()
        self.fault = error
        self._degraded_until = time.perf_counter() + self.recovery_s
        return ApiError(500, "internal_error", f"the engine failed on this request ({error}); the server log has "
                        f"the details under request id {gen.request_id}")

    def _mark_scheduled(self, gen: Generation, at: float) -> None:
        if gen.scheduled_at is None:
            gen.scheduled_at = at
            self.metrics.queue_time.observe(at - gen.arrival)
            self.metrics.prompt_tokens.inc(gen.num_prompt_tokens)

    def _mark_token(self, gen: Generation, at: float) -> None:
        if gen.first_token_at is None:
            gen.first_token_at = at
            self.metrics.ttft.observe(at - gen.arrival)
        else:
            self.metrics.itl.observe(at - gen.last_token_at)
        gen.last_token_at = at
        gen.num_tokens += 1
        self.metrics.generation_tokens.inc()

    def _update_gauges(self, engine: Engine) -> None:
        """The load figures `Metrics.watch` reads at scrape time, and the prefix cache's and speculative
        decoding's new counts."""
        for counter, total in ((self.metrics.prefix_cache_hit_tokens, engine.scheduler.reused_tokens),
                               (self.metrics.speculative_draft_tokens, engine.drafted_tokens),
                               (self.metrics.speculative_accepted_tokens, engine.accepted_tokens)):
            counter.inc(total - self._counted.get(counter, 0))
            self._counted[counter] = total
        self.num_running = len(engine.scheduler.running)
        self.num_waiting = len(engine.scheduler.waiting) + self._inbox.qsize()

    def _fail(self, error: Exception) -> None:
        """The engine raised mid-step: every request in it gets a 500, and the engine is out of service."""
        ids = " ".join(gen.request_id for gen in self._by_seq.values())
        log.error("event=engine_fault request_ids=%s", ids or "-", exc_info=error)
        self.fault = f"{type(error).__name__} during a step"
        self.state = State.FAILED
        self._by_seq.clear()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all)
