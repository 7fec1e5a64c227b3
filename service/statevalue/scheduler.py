"""Merges the forward passes of concurrent requests into token-budgeted batches.

Requests are checked and tokenised as they arrive, then queued. One batcher task fills
each forward step from the queued requests' sequences — every waiting request gets a fair
share of the step first, so one huge request cannot starve small ones — and runs the model
on a dedicated thread. A request whose sequences are all done is handed to the estimator
thread, which overlaps the next forward step. A request whose caller went away or whose
deadline passed is answered at once; the rest of its work is dropped before the next
forward step (micro-batch), even when the request is half way through its forward pass.

Admission bounds time as well as size: the batcher measures the model's throughput, and a
request that would wait longer than ``max_queue_wait_s`` behind the queued tokens is
refused at once. A drain that runs out of time answers every request still open with
NotAccepting, so nothing accepted is left without an answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from statevalue.backends.base import LoadedWeights, ModelIdentity
from statevalue.engine import Engine, PreparedRequest
from statevalue.metrics import Metrics
from statevalue.schema import EstimateRequest, EstimateResult, InvalidRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at its request or token limit; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The scheduler is not running: not started yet, or draining for shutdown."""


DRAINING = "draining: the server is shutting down; retry on another replica"

# Weight of the newest forward step in the throughput estimate (an exponential average).
_THROUGHPUT_WEIGHT = 0.3


class DeadlineExpired(Exception):
    """The request's deadline passed before its work was done; the rest of it was dropped.

    The message says where the request was when the deadline passed.
    """


class ModelTooOld(Exception):
    """The request asked for newer weights than the server holds (reload not landed yet)."""


@dataclass(eq=False)
class _Job:
    prepared: PreparedRequest
    sequences: list[np.ndarray]
    prefix_lengths: list[int]
    future: asyncio.Future[EstimateResult]
    admitted: float
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    next_index: int = 0
    pending: int = 0
    forward_seconds: float = 0.0
    started: bool = False
    model: ModelIdentity | None = None
    steps: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def dead(self) -> bool:
        """Answered already (failed, or given up by its caller): drop the rest of its work."""
        return self.future.done()


@dataclass
class _Stage:
    """Where a request is, for the message of an expired deadline."""

    job: _Job | None = None
    computing: bool = False

    def describe(self, max_batch_tokens: int) -> str:
        job = self.job
        if self.computing or (job is not None and job.started and job.pending == 0):
            return "while computing the estimators (the forward pass was done)"
        if job is None:
            return "while checking the request"
        if not job.started:
            return "while queued"
        done = sum(len(job.sequences[i]) for i in range(job.next_index))
        left = job.tokens - done
        # Steps are shared with other requests, so the count ahead is an estimate.
        per_step = done / job.steps if job.steps else max_batch_tokens
        total = job.steps + math.ceil(left / per_step)
        return (
            f"during the forward pass, at micro-batch {job.steps} of about {total} "
            f"({done} of {job.tokens} tokens taken)"
        )


class Scheduler:
    """Asynchronous front door of the engine used by both the gRPC and HTTP front ends.

    Args:
        engine: the value engine.
        metrics: where batch sizes, waits and timings go.
        max_batch_tokens: tokens per forward step (the backend pads sub-batches within it).
        max_wait_s: how long a step waits for more requests to merge.
        max_queue_requests, max_queue_tokens: admission limits (QueueFull past them).
        max_queue_wait_s: refuse (QueueFull) a request whose estimated wait behind the
            queued tokens, at the measured throughput, is longer than this.
    """

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.005,
        max_queue_requests: int = 256,
        max_queue_tokens: int = 1_000_000,
        max_queue_wait_s: float = 20.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_requests = max_queue_requests
        self.max_queue_tokens = max_queue_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.tokens_per_second: float | None = None
        self._step_tokens: float | None = None
        self._step_seconds: float | None = None
        self._jobs: list[_Job] = []
        self._queued_tokens = 0
        self._in_flight = 0
        self._accepting = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        # Set when a drain runs out of time: every open submit() then answers at once.
        self._abandon = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        # When the forward step now running began (monotonic clock); None between steps.
        self._step_started: float | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-model")
        self._estimator_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-estimator")
        self._prepare_threads = ThreadPoolExecutor(2, thread_name_prefix="statevalue-prepare")

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    def stalled(self, limit_s: float) -> str | None:
        """Why the batcher counts as stuck, or None while it makes progress.

        Stuck: the batcher task ended while the scheduler still accepts work, or one forward
        step has run for more than ``limit_s`` seconds (a hung device or kernel).
        """
        if self._accepting and self._batcher is not None and self._batcher.done():
            return "the batcher stopped"
        started = self._step_started
        if started is not None and time.monotonic() - started > limit_s:
            return f"a forward step has run for more than {limit_s:g} s"
        return None

    async def start(self, *, warmup: bool = True) -> None:
        """Start the batcher; with ``warmup`` run one forward pass first (first-call latency).

        A second, warm pass gives the first throughput measurement for admission (the
        first one pays one-off start-up costs).
        """
        if warmup:
            loop = asyncio.get_running_loop()
            sequence = np.arange(1, 257, dtype=np.int32)
            for _ in range(2):
                started = time.perf_counter()
                await loop.run_in_executor(
                    self._model_thread, self.engine.backend.hidden_states, [sequence]
                )
            self._measure(len(sequence), time.perf_counter() - started)
        self._batcher = asyncio.create_task(self._run(), name="statevalue-batcher")
        self._accepting = True

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and finish what was accepted within ``timeout`` seconds.

        Requests still open when the time is up are answered with NotAccepting (retryable
        elsewhere). Returns True if everything finished.
        """
        self._accepting = False
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            drained = True
        except asyncio.TimeoutError:
            drained = False
            log.warning("drain: %d requests unfinished after %.1f s", self._in_flight, timeout)
            self._abandon.set()
            # Every open submit() wakes on the abandon event and answers at once.
            await self._idle.wait()
        if self._batcher is not None:
            self._batcher.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._estimator_thread.shutdown(wait=False, cancel_futures=True)
        self._prepare_threads.shutdown(wait=False, cancel_futures=True)
        return drained

    async def submit(
        self, request: EstimateRequest, *, timeout: float | None = None
    ) -> EstimateResult:
        """Estimate ``request``.

        The answer comes at the latest at the deadline (``timeout`` seconds from now);
        cancelling the call (the caller went away) drops the request's remaining work.

        Raises:
            InvalidRequest, QueueFull, NotAccepting, DeadlineExpired, ModelTooOld.
        """
        if not self._accepting:
            raise NotAccepting(DRAINING if self._draining else "the server is not ready")
        revision = self.engine.backend.identity.revision
        if request.min_model_revision > revision:
            raise ModelTooOld(
                f"the request needs model revision {request.min_model_revision}, "
                f"this server has {revision}"
            )
        self._in_flight += 1
        self._idle.clear()
        stage = _Stage()
        work = asyncio.ensure_future(self._estimate(request, stage))
        abandon = asyncio.ensure_future(self._abandon.wait())
        try:
            await asyncio.wait(
                (work, abandon), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if work.done():
                return work.result()
            if abandon.done():
                raise NotAccepting(DRAINING)
            raise DeadlineExpired(
                f"the deadline ({timeout:g} s) passed "
                f"{stage.describe(self.max_batch_tokens)}; the rest of its work was dropped"
            )
        finally:
            # Also reached when the caller is cancelled or the drain gave up on it: the job's
            # future is cancelled with the work, and the batcher drops what is left of it
            # before the next step.
            work.cancel()
            abandon.cancel()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _estimate(self, request: EstimateRequest, stage: _Stage) -> EstimateResult:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_threads, self.engine.prepare, request)
        for method in prepared.methods:
            self.metrics.method_requests.labels(method=method).inc()
        if not prepared.needs_hidden_states:
            stage.computing = True
            return await self._compute(prepared, None, 0.0, self.engine.backend.identity)
        return await self._enqueue(prepared, stage)

    def estimated_wait(self) -> float:
        """Seconds the model needs for the queued tokens at the measured throughput."""
        if not self.tokens_per_second:
            return 0.0
        return self._queued_tokens / self.tokens_per_second

    async def _enqueue(self, prepared: PreparedRequest, stage: _Stage) -> EstimateResult:
        loop = asyncio.get_running_loop()
        tokens = prepared.num_tokens
        if tokens > self.max_queue_tokens:
            # It would never fit, so "retry later" would be a lie: a permanent error.
            raise InvalidRequest(
                "groups",
                f"the request has {tokens} prompt+response tokens, more than this server "
                f"queues ({self.max_queue_tokens}); split it",
            )
        if len(self._jobs) >= self.max_queue_requests:
            raise QueueFull(f"queue is full ({self.max_queue_requests} requests waiting)")
        if self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(f"queue is full ({self._queued_tokens} tokens waiting)")
        wait = self.estimated_wait()
        if wait > self.max_queue_wait_s:
            raise QueueFull(
                f"queue is full (estimated wait {wait:.1f} s, limit {self.max_queue_wait_s:g} s)",
                retry_after=max(1.0, wait - self.max_queue_wait_s),
            )
        sequences = prepared.sequences()
        job = _Job(
            prepared=prepared,
            sequences=sequences,
            prefix_lengths=prepared.prefix_lengths(),
            future=loop.create_future(),
            admitted=time.perf_counter(),
            hidden=[None] * len(sequences),
            pending=len(sequences),
        )
        stage.job = job
        self._add(job)
        self._wakeup.set()
        return await job.future

    def _add(self, job: _Job) -> None:
        self._jobs.append(job)
        self._queued_tokens += job.tokens
        self._update_queue_metrics()

    def _remove(self, job: _Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
            self._queued_tokens -= job.tokens
            self._update_queue_metrics()

    def _update_queue_metrics(self) -> None:
        self.metrics.queue_depth.set(len(self._jobs))
        self.metrics.queue_tokens.set(self._queued_tokens)

    def _drop_dead(self) -> None:
        for job in list(self._jobs):
            if job.dead:
                self._remove(job)

    def _take_step(self) -> list[tuple[_Job, int]]:
        """Sequences for one forward step: a fair share per waiting request, then fill up."""
        waiting = [job for job in self._jobs if job.next_index < len(job.sequences)]
        if not waiting:
            return []
        step: list[tuple[_Job, int]] = []
        used = 0
        share = self.max_batch_tokens // len(waiting)
        for limit in (share, self.max_batch_tokens):
            for job in waiting:
                taken = 0
                while job.next_index < len(job.sequences):
                    size = len(job.sequences[job.next_index])
                    # Always make progress on the first sequence of a step, even an oversize one.
                    if step and (used + size > self.max_batch_tokens or taken + size > limit):
                        break
                    step.append((job, job.next_index))
                    job.next_index += 1
                    used += size
                    taken += size
        return step

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.max_wait_s > 0 and self._queued_tokens < self.max_batch_tokens:
                await asyncio.sleep(self.max_wait_s)
            while True:
                self._drop_dead()
                step = self._take_step()
                if not step:
                    break
                await self._forward(loop, step)

    async def _forward(self, loop: asyncio.AbstractEventLoop, step: list[tuple[_Job, int]]) -> None:
        now = time.perf_counter()
        jobs = list(dict.fromkeys(job for job, _ in step))
        for job in jobs:
            job.steps += 1
            if not job.started:
                job.started = True
                self.metrics.queue_wait_seconds.observe(now - job.admitted)
        sequences = [job.sequences[i] for job, i in step]
        prefix_lengths = [job.prefix_lengths[i] for job, i in step]
        tokens = sum(len(s) for s in sequences)
        self._step_started = time.monotonic()
        try:
            hidden, model = await loop.run_in_executor(
                self._model_thread, self._model_step, sequences, prefix_lengths
            )
        except Exception as exc:  # a model failure fails the requests in this step, not the server
            log.exception("forward pass failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
                self._remove(job)
            return
        finally:
            self._step_started = None
        elapsed = time.perf_counter() - now
        self._measure(tokens, elapsed)
        self.metrics.forward_seconds.observe(elapsed)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.batch_sequences.observe(len(sequences))
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.tokens.inc(tokens)
        for job in jobs:
            if job.model is not None and job.model != model:
                # Weights changed under a request split over several steps: start it again
                # so all its hidden states come from one model.
                job.hidden = [None] * len(job.sequences)
                job.pending = len(job.sequences)
                job.next_index = 0
            job.model = model
        for (job, index), states in zip(step, hidden, strict=True):
            if job.hidden[index] is None and job.next_index > index:
                job.hidden[index] = states
                job.pending -= 1
        for job in jobs:
            job.forward_seconds += elapsed
            if job.pending == 0:
                self._remove(job)
                if not job.future.done():
                    asyncio.ensure_future(self._finish(job))

    def _measure(self, tokens: int, seconds: float) -> None:
        """Fold one forward step into the throughput estimate used for admission.

        Tokens and seconds are averaged apart, so a big step weighs more than a tiny one
        whose time is mostly fixed overhead.
        """
        if seconds <= 0:
            return
        if self._step_tokens is None or self._step_seconds is None:
            self._step_tokens, self._step_seconds = float(tokens), seconds
        else:
            self._step_tokens += _THROUGHPUT_WEIGHT * (tokens - self._step_tokens)
            self._step_seconds += _THROUGHPUT_WEIGHT * (seconds - self._step_seconds)
        self.tokens_per_second = self._step_tokens / self._step_seconds
        self.metrics.throughput.set(self.tokens_per_second)

    async def _finish(self, job: _Job) -> None:
        try:
            assert job.model is not None
            result = await self._compute(job.prepared, job.hidden, job.forward_seconds, job.model)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
            return
        if not job.future.done():
            job.future.set_result(result)

    def _model_step(
        self, sequences: list[np.ndarray], prefix_lengths: list[int]
    ) -> tuple[list[torch.Tensor], ModelIdentity]:
        """One forward step on the model thread, with the identity of the weights it used.

        Reloads run on the same thread, so the identity read here is the one that ran.
        """
        backend = self.engine.backend
        return backend.hidden_states(sequences, prefix_lengths), backend.identity

    async def reload(self, checkpoint: str, version: str | None = None) -> ModelIdentity:
        """Swap in the weights of a checkpoint directory without dropping accepted requests.

        The files load beside the running model; the swap itself runs on the model thread
        between two forward steps.
        """
        loop = asyncio.get_running_loop()
        weights = await loop.run_in_executor(
            self._prepare_threads, self.engine.backend.read_checkpoint, checkpoint
        )
        return await self.apply_weights(weights, version)

    async def apply_weights(
        self, weights: LoadedWeights, version: str | None = None
    ) -> ModelIdentity:
        """Swap in weights already read and checked, on the model thread between two
        forward steps."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._swap, weights, version)

    def _swap(self, weights: LoadedWeights, version: str | None) -> ModelIdentity:
        started = time.perf_counter()
        identity = self.engine.backend.apply_weights(weights, version)
        self.metrics.weight_swap_seconds.observe(time.perf_counter() - started)
        return identity

    async def _compute(
        self,
        prepared: PreparedRequest,
        hidden: list[torch.Tensor | None] | None,
        forward: float,
        model: ModelIdentity,
    ) -> EstimateResult:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._estimator_thread, self.engine.compute, prepared, hidden
        )
        result.model = model
        result.forward_seconds = forward
        self.metrics.estimator_seconds.observe(result.estimator_seconds)
        return result
