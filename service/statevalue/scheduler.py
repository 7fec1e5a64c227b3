"""Merges the forward passes of concurrent requests into token-budgeted batches.

Requests are checked and tokenised as they arrive, then queued. One batcher task fills
each forward step from the queued requests' sequences — every waiting request gets a fair
share of the step first, so one huge request cannot starve small ones — and runs the model
on a dedicated thread. A request whose sequences are all done is handed to the estimator
thread, which overlaps the next forward step. A request whose caller went away or whose
deadline passed is answered at once; the rest of its work is dropped before the next
forward step (micro-batch), even when the request is half way through its forward pass.
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

from statevalue.backends.base import ModelIdentity
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
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_requests = max_queue_requests
        self.max_queue_tokens = max_queue_tokens
        self._jobs: list[_Job] = []
        self._queued_tokens = 0
        self._in_flight = 0
        self._accepting = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._batcher: asyncio.Task[None] | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-model")
        self._estimator_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-estimator")
        self._prepare_threads = ThreadPoolExecutor(2, thread_name_prefix="statevalue-prepare")

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    async def start(self, *, warmup: bool = True) -> None:
        """Start the batcher; with ``warmup`` run one forward pass first (first-call latency)."""
        if warmup:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                self._model_thread,
                self.engine.backend.hidden_states,
                [np.arange(1, 33, dtype=np.int32)],
            )
        self._batcher = asyncio.create_task(self._run(), name="statevalue-batcher")
        self._accepting = True

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, finish everything already accepted; True if it all finished."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            drained = True
        except asyncio.TimeoutError:
            drained = False
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
            raise NotAccepting("the server is not accepting requests")
        revision = self.engine.backend.identity.revision
        if request.min_model_revision > revision:
            raise ModelTooOld(
                f"the request needs model revision {request.min_model_revision}, "
                f"this server has {revision}"
            )
        self._in_flight += 1
        self._idle.clear()
        stage = _Stage()
        work = asyncio.ensure_future(self._process(request, stage))
        try:
            done, _ = await asyncio.wait({work}, timeout=timeout)
            if work not in done:
                raise DeadlineExpired(
                    f"the deadline ({timeout:g} s) passed "
                    f"{stage.describe(self.max_batch_tokens)}; the rest of its work was dropped"
                )
            return work.result()
        finally:
            # Also reached when the caller is cancelled: the job's future is cancelled with
            # the work, and the batcher drops what is left of it before the next step.
            work.cancel()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _process(self, request: EstimateRequest, stage: _Stage) -> EstimateResult:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_threads, self.engine.prepare, request)
        for method in prepared.methods:
            self.metrics.method_requests.labels(method=method).inc()
        if not prepared.needs_hidden_states:
            stage.computing = True
            return await self._compute(prepared, None, 0.0, self.engine.backend.identity)
        return await self._enqueue(prepared, stage)

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
        sequences = prepared.sequences()
        job = _Job(
            prepared=prepared,
            sequences=sequences,
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
        tokens = sum(len(s) for s in sequences)
        try:
            hidden, model = await loop.run_in_executor(
                self._model_thread, self._model_step, sequences
            )
        except Exception as exc:  # a model failure fails the requests in this step, not the server
            log.exception("forward pass failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
                self._remove(job)
            return
        elapsed = time.perf_counter() - now
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

    def _model_step(self, sequences: list[np.ndarray]) -> tuple[list[torch.Tensor], ModelIdentity]:
        """One forward step on the model thread, with the identity of the weights it used.

        Reloads run on the same thread, so the identity read here is the one that ran.
        """
        backend = self.engine.backend
        return backend.hidden_states(sequences), backend.identity

    async def reload(self, checkpoint: str, version: str | None = None) -> ModelIdentity:
        """Swap in the weights of a checkpoint directory without dropping accepted requests.

        The files load beside the running model; the swap itself runs on the model thread
        between two forward steps.
        """
        loop = asyncio.get_running_loop()
        backend = self.engine.backend
        weights = await loop.run_in_executor(
            self._prepare_threads, backend.read_checkpoint, checkpoint
        )
        return await loop.run_in_executor(
            self._model_thread, backend.apply_weights, weights, version
        )

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
