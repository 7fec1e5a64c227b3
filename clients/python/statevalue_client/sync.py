"""Keeping the service's weights fresh from a training loop: the adapters' weight sync.

Every ``sync_every`` optimizer steps the trainer's weights go to every replica through
:meth:`ValueClient.update_weights`, on a thread of their own, so the sync of step n runs
while the trainer generates the rollouts of step n + 1 (generation reads the weights,
never writes them). The next estimate waits for it and asks for the revision it produced
(``min_model_revision``): a replica that did not take the update refuses instead of
answering with older weights.

    sync = WeightSync(client, admin_token=TOKEN)
    for step in range(1, steps + 1):
        rollouts = generate(policy)                  # overlaps the sync of step - 1
        result = client.estimate(groups(rollouts), min_model_revision=sync.revision())
        loss(result).backward()
        sync.wait()                                  # never step under a sync in flight
        optimizer.step()
        sync.step_done(step, policy.state_dict)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from statevalue_client.client import ReloadResult, ValueClient

if TYPE_CHECKING:
    import torch

#: What ``update_weights`` takes: a state dict or ``named_parameters()``.
NamedTensors = Mapping[str, "torch.Tensor"] | Iterable[tuple[str, "torch.Tensor"]]

# Optimizer steps between two weight syncs, unless the caller says otherwise: the served
# weights are at most this many steps minus one older than the trainer's. From the staleness
# table (docs/benchmarks.md, "Stale weights"): Hista's accuracy with weights up to 16 steps
# old did not differ from fresh weights' within the paired standard error; 4 stays a
# quarter of that, as one run of a small policy is all the evidence there is.
DEFAULT_SYNC_EVERY = 4


class WeightSync:
    """Sends the trainer's weights to the service every ``sync_every`` steps, in the
    background, and tells each estimate which revision to ask for.

    Args:
        client: the client the estimates go through (its target reaches every replica).
        admin_token: the servers' admin token.
        sync_every: optimizer steps between two syncs (at least 1).
        transport, timeout: as :meth:`ValueClient.update_weights`.
    """

    def __init__(
        self,
        client: ValueClient,
        *,
        admin_token: str,
        sync_every: int = DEFAULT_SYNC_EVERY,
        transport: str = "auto",
        timeout: float | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, not {sync_every}")
        self.client = client
        self.sync_every = sync_every
        self._admin_token = admin_token
        self._transport = transport
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="statevalue-sync")
        self._in_flight: Future[ReloadResult] | None = None
        self._revision = 0

    def step_done(self, step: int, weights: Callable[[], NamedTensors]) -> bool:
        """After optimizer step ``step``: on every ``sync_every``-th step, start sending
        ``weights()`` (a state dict or ``named_parameters()``; called on the sync's thread)
        and return at once; True when a sync started.

        The weights must not change until the sync is over: :meth:`wait` before the next
        optimizer step (the next estimate waits by itself).
        """
        if step % self.sync_every:
            return False
        self.wait()
        self._in_flight = self._thread.submit(self._send, step, weights)
        return True

    def _send(self, step: int, weights: Callable[[], NamedTensors]) -> ReloadResult:
        return self.client.update_weights(
            weights(),
            admin_token=self._admin_token,
            version=f"step-{step}",
            transport=self._transport,
            timeout=self._timeout,
        )

    def wait(self) -> None:
        """Wait for the sync in flight, if any.

        Raises:
            ReloadFailed: it failed on some replica (they keep their old weights, and an
                estimate asking for the new revision would be refused).
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._revision = in_flight.result().revision

    def revision(self) -> int:
        """The ``min_model_revision`` of the next estimate: the lowest revision among the
        replicas after the last sync (waited for here), 0 before the first."""
        self.wait()
        return self._revision

    def close(self) -> None:
        """Wait for the sync in flight, then stop the thread."""
        try:
            self.wait()
        finally:
            self._thread.shutdown()
