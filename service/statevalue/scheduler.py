"""Runs the forward passes of concurrent requests in time-sized micro-batches, oldest first.

Requests are checked and tokenised as they arrive, then queued in arrival order. One
batcher task fills each forward micro-batch from the front of the queue: the oldest
request's sequences first, then the next request's, so requests finish one after another
instead of all progressing together and all being cut off together (a drain that runs
out of time completes the oldest work and refuses only the rest). The requests of one
step (the same ``step_id``) stay together: a request of a step that already has work
queued goes right after that work, ahead of steps that came later. Between steps (and so
between API tokens, each of which sends its own steps) the order is arrival: the step
whose first request came first goes first. A micro-batch is sized by time, about
``micro_batch_seconds`` of model work at the measured speed (at most
``max_batch_tokens``), so "the next micro-batch" comes soon on a CPU and on a GPU alike.

The model runs on a dedicated thread; a request whose sequences are all done is handed
to the estimator thread, which overlaps the next micro-batch. A request whose caller went
away or whose deadline passed is answered at once and leaves the queue at once (its
tokens stop counting for admission); the rest of its work is dropped before the next
micro-batch, even when it is half way through its forward pass.

Admission bounds time as well as size: the batcher fits ``seconds = overhead + per_token
× tokens`` to its recent micro-batches (:mod:`statevalue.forward_time`), and a request
that would wait longer than ``max_queue_wait_s`` behind the work queued ahead of it is
refused at once, with a Retry-After of the time until it would fit. A request with
nothing queued ahead of it is always admitted (up to the per-request limits). A drain
that runs out of time answers every request still open with NotAccepting, so nothing
accepted is left without an answer.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from statevalue.backends.base import LoadedWeights, ModelIdentity
from statevalue.engine import Engine, PreparedRequest
from statevalue.forward_time import ForwardTimeModel
from statevalue.metrics import Metrics
from statevalue.schema import EstimateRequest, EstimateResult, InvalidRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is at its request, token or time limit; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The scheduler is not running: not started yet, or draining for shutdown."""


DRAINING = "draining: the server is shutting down; retry on another replica"

# Length of each warm-up sequence: a typical rollout, so the warm-up's prior matches
# real batches (padding, attention over a few hundred tokens).
_WARMUP_SEQUENCE = 256

# Predicted waits shorter than this are not compared with the actual ones: they are
# within the batcher's merge delay and the event loop's jitter.
_SHORTEST_COMPARED_WAIT_S = 0.1


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
    step_id: str
    # Place in the queue: (first arrival of its step's queued work, its own arrival).
    order: tuple[int, int] = (0, 0)
    predicted_wait: float = 0.0
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

    def untaken(self) -> Iterator[int]:
        """Lengths of the sequences no micro-batch has taken yet."""
        return (len(s) for s in self.sequences[self.next_index :])


@dataclass
class _Stage:
    """Where a request is, for the message of an expired deadline."""

    job: _Job | None = None
    computing: bool = False

    def describe(self, batch_tokens: int) -> str:
        job = self.job
        if self.computing or (job is not None and job.started and job.pending == 0):
            return "while computing the estimators (the forward pass was done)"
        if job is None:
            return "while checking the request"
        if not job.started:
            return "while queued"
        done = sum(len(job.sequences[i]) for i in range(job.next_index))
        left = job.tokens - done
        # Micro-batches are shared with other requests, so the count ahead is an estimate.
        per_step = done / job.steps if job.steps else batch_tokens
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
        max_batch_tokens: most tokens per micro-batch (the backend pads sub-batches within it).
        micro_batch_seconds: the model time one micro-batch aims at (its token count comes
            from the measured speed): how soon a cancel or a deadline stops work.
        max_wait_s: how long a micro-batch waits for more requests to merge.
        max_queue_requests, max_queue_tokens: admission limits (QueueFull past them).
        max_queue_wait_s: refuse (QueueFull) a request whose estimated wait behind the work
            queued ahead of it is longer than this.
    """

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch_tokens: int = 8192,
        micro_batch_seconds: float = 1.0,
        max_wait_s: float = 0.005,
        max_queue_requests: int = 256,
        max_queue_tokens: int = 1_000_000,
        max_queue_wait_s: float = 20.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.micro_batch_seconds = micro_batch_seconds
        self.max_wait_s = max_wait_s
        self.max_queue_requests = max_queue_requests
        self.max_queue_tokens = max_queue_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.forward_time = ForwardTimeModel()
        # Queued requests in the order their work runs (see the module docstring).
        self._jobs: list[_Job] = []
        self._arrivals = itertools.count()
        # First arrival of each step that has work queued: where its next request goes.
        self._step_order: dict[str, int] = {}
        # Tokens of every admitted request whose forward pass is not done (memory bound).
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
        # When the micro-batch now running began (monotonic clock) and its predicted time;
        # None between micro-batches.
        self._step_started: float | None = None
        self._step_predicted = 0.0
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-model")
        self._estimator_thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-estimator")
        self._prepare_threads = ThreadPoolExecutor(2, thread_name_prefix="statevalue-prepare")

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    @property
    def batch_tokens(self) -> int:
        """Tokens the next micro-batch takes: about ``micro_batch_seconds`` of model work."""
        return self.forward_time.tokens_within(self.micro_batch_seconds, self.max_batch_tokens)

    @property
    def tokens_per_second(self) -> float | None:
        """Measured model throughput at the micro-batch size (None before any measurement).

        A micro-batch takes at least one whole sequence, so where the time budget is
        smaller than that, the size is that of the micro-batches that actually ran.
        """
        if not self.forward_time.ready:
            return None
        tokens = max(self.batch_tokens, self.forward_time.typical_tokens)
        return tokens / self.forward_time.seconds(tokens)

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
        """Start the batcher; with ``warmup`` run forward passes first (first-call latency).

        The first pass pays one-off start-up costs; two more, of one sequence and of about a
        micro-batch of sequences, give the prior of the forward-time model, so admission is
        right from the first request.
        """
        if warmup:
            loop = asyncio.get_running_loop()
            sequence = np.arange(1, _WARMUP_SEQUENCE + 1, dtype=np.int32)
            for measured, count in ((False, 1), (True, 1), (True, 0)):
                # Count 0: as many sequences as a micro-batch takes at the speed so far.
                batch = [sequence] * (count or max(2, self.batch_tokens // _WARMUP_SEQUENCE))
                started = time.perf_counter()
                await loop.run_in_executor(
                    self._model_thread, self.engine.backend.hidden_states, batch
                )
                if measured:
                    self._measure(_WARMUP_SEQUENCE * len(batch), time.perf_counter() - started)
        self._batcher = asyncio.create_task(self._run(), name="statevalue-batcher")
        self._accepting = True

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and finish what was accepted within ``timeout`` seconds.

        Work runs oldest first, so the requests that fit in the time finish; those still
        open when the time is up are answered with NotAccepting (retryable elsewhere).
        A queued request whose estimated wait is over twice the time is answered so at
        once: it would not even start in time, and its caller can retry elsewhere now.
        Returns True if everything finished.
        """
        self._accepting = False
        self._draining = True
        refused = 0
        for job in [j for j in self._jobs if not (j.started or j.dead)]:
            if self.estimated_wait(job.order, len(job.sequences[0])) > 2 * timeout:
                job.future.set_exception(NotAccepting(DRAINING))
                self._remove(job)
                refused += 1
        if refused:
            log.info("drain: %d queued requests refused at once (could not start in time)", refused)
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
        Either way the request leaves the queue at once.

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
                f"{stage.describe(self.batch_tokens)}; the rest of its work was dropped"
            )
        finally:
            # Also reached when the caller is cancelled or the drain gave up on it: the job's
            # future is cancelled with the work, its tokens leave admission now, and the
            # batcher takes nothing more of it.
            work.cancel()
            abandon.cancel()
            if stage.job is not None:
                self._remove(stage.job)
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
        return await self._enqueue(prepared, request.step_id, stage)

    def estimated_wait(self, order: tuple[int, int] | None = None, first: int = 0) -> float:
        """Seconds until the first micro-batch of a request placed at ``order`` begins.

        The rest of the micro-batch now running, then the micro-batches that the work
        queued ahead (all of it, by default) fills, packed as the batcher packs them; the
        request joins the last of them if its first sequence (``first`` tokens) fits.
        """
        wait = 0.0
        if self._step_started is not None:
            wait = max(0.0, self._step_predicted - (time.monotonic() - self._step_started))
        budget = self.batch_tokens
        used = 0
        for job in self._jobs:
            if order is not None and job.order >= order:
                break
            for size in job.untaken():
                if used and used + size > budget:
                    wait += self.forward_time.seconds(used)
                    used = 0
                used += size
        if used and used + first > budget:
            wait += self.forward_time.seconds(used)
        return wait

    def _retry_after(self, tokens: int) -> float:
        """Seconds the model needs for ``tokens`` tokens in micro-batches of the usual size
        (at least 1)."""
        size = max(self.batch_tokens, self.forward_time.typical_tokens)
        return max(1.0, tokens / size * self.forward_time.seconds(size))

    def _admit(self, job: _Job) -> None:
        """Place ``job`` in the queue, or raise QueueFull with the time until it would fit."""
        tokens = job.tokens
        if tokens > self.max_queue_tokens:
            # It would never fit, so "retry later" would be a lie: a permanent error.
            raise InvalidRequest(
                "groups",
                f"the request has {tokens} prompt+response tokens, more than this server "
                f"queues ({self.max_queue_tokens}); split it",
            )
        arrival = next(self._arrivals)
        # A step's requests stay together: a request goes after its step's queued work.
        job.order = (self._step_order.get(job.step_id, arrival), arrival)
        ahead = any(j.next_index < len(j.sequences) for j in self._jobs if j.order < job.order)
        if len(self._jobs) >= self.max_queue_requests:
            raise QueueFull(
                f"queue is full ({self.max_queue_requests} requests waiting)",
                retry_after=self._retry_after(sum(self._jobs[0].untaken())),
            )
        if self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(
                f"queue is full ({self._queued_tokens} tokens waiting)",
                retry_after=self._retry_after(self._queued_tokens + tokens - self.max_queue_tokens),
            )
        wait = self.estimated_wait(job.order, len(job.sequences[0]))
        # Nothing queued ahead: always admitted, whatever the micro-batch now running costs.
        if ahead and wait > self.max_queue_wait_s:
            raise QueueFull(
                f"queue is full (estimated wait {wait:.1f} s, limit {self.max_queue_wait_s:g} s)",
                retry_after=max(1.0, wait - self.max_queue_wait_s),
            )
        job.predicted_wait = wait
        if job.step_id:
            self._step_order.setdefault(job.step_id, arrival)
        bisect.insort(self._jobs, job, key=lambda j: j.order)
        self._queued_tokens += tokens
        self._update_queue_metrics()

    async def _enqueue(
        self, prepared: PreparedRequest, step_id: str, stage: _Stage
    ) -> EstimateResult:
        loop = asyncio.get_running_loop()
        sequences = prepared.sequences()
        job = _Job(
            prepared=prepared,
            sequences=sequences,
            prefix_lengths=prepared.prefix_lengths(),
            future=loop.create_future(),
            admitted=time.perf_counter(),
            step_id=step_id,
            hidden=[None] * len(sequences),
            pending=len(sequences),
        )
        self._admit(job)
        stage.job = job
        self._wakeup.set()
        return await job.future

    def _remove(self, job: _Job) -> None:
        if job not in self._jobs:
            return
        self._jobs.remove(job)
        self._queued_tokens -= job.tokens
        if job.step_id and not any(j.step_id == job.step_id for j in self._jobs):
            del self._step_order[job.step_id]
        self._update_queue_metrics()

    def _update_queue_metrics(self) -> None:
        self.metrics.queue_depth.set(len(self._jobs))
        self.metrics.queue_tokens.set(self._queued_tokens)

    def _drop_dead(self) -> None:
        for job in list(self._jobs):
            if job.dead:
                self._remove(job)

    def _take_step(self) -> list[tuple[_Job, int]]:
        """Sequences for one micro-batch: from the front of the queue, up to its token budget."""
        step: list[tuple[_Job, int]] = []
        budget = self.batch_tokens
        used = 0
        for job in self._jobs:
            while job.next_index < len(job.sequences):
                size = len(job.sequences[job.next_index])
                # Always make progress on the first sequence of a step, even an oversize one.
                if step and used + size > budget:
                    return step
                step.append((job, job.next_index))
                job.next_index += 1
                used += size
        return step

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.max_wait_s > 0 and self._queued_tokens < self.batch_tokens:
                await asyncio.sleep(self.max_wait_s)
            while True:
                self._drop_dead()
                step = self._take_step()
                if not step:
                    break
                await self._forward(loop, step)

    def _started(self, job: _Job, now: float) -> None:
        """``job``'s first micro-batch begins: its wait, and how well it was predicted."""
        job.started = True
        waited = now - job.admitted
        self.metrics.queue_wait_seconds.observe(waited)
        if job.predicted_wait >= _SHORTEST_COMPARED_WAIT_S:
            self.metrics.queue_wait_predicted_seconds.observe(job.predicted_wait)
            self.metrics.queue_wait_ratio.observe(waited / job.predicted_wait)

    async def _forward(self, loop: asyncio.AbstractEventLoop, step: list[tuple[_Job, int]]) -> None:
        now = time.perf_counter()
        jobs = list(dict.fromkeys(job for job, _ in step))
        for job in jobs:
            job.steps += 1
            if not job.started:
                self._started(job, now)
        sequences = [job.sequences[i] for job, i in step]
        prefix_lengths = [job.prefix_lengths[i] for job, i in step]
        tokens = sum(len(s) for s in sequences)
        self._step_predicted = self.forward_time.seconds(tokens)
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
        """Fold one micro-batch into the forward-time model that admission and sizing use."""
        self.forward_time.add(tokens, seconds)
        rate = self.tokens_per_second
        if rate is not None:
            self.metrics.throughput.set(rate)
            self.metrics.micro_batch_tokens.set(self.batch_tokens)

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
