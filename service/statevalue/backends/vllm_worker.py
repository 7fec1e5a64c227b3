"""What the vLLM backend adds to vLLM's workers (``worker_extension_cls``): weights sent
from the server's memory, staged bucket by bucket and loaded only once all have arrived.

vLLM imports this module in its worker processes and mixes the class into its worker, so
``collective_rpc`` can call these methods by name. Its RPC messages carry plain values,
copied several times on the way through vLLM's engine process, so a bucket's bytes travel
through a file in shared memory instead (the workers of ``vllm.LLM`` run on the server's
host) and the message carries only the file's path and its layout.
"""

from __future__ import annotations

from typing import Any

import torch

# One weight of a staged bucket file, in file order: name, dtype name ("float32"), shape.
# Its bytes follow the previous weight's, row-major.
StagedTensor = tuple[str, str, list[int]]


class StagedWeightLoading:
    """Collective-RPC methods for weights sent from memory (mixed into vLLM's worker)."""

    _statevalue_staged: dict[str, torch.Tensor]

    def stage_sent_weights(self, path: str, layout: list[StagedTensor]) -> None:
        """Read one bucket file into host memory, kept until ``load_staged_weights``."""
        staged = self.__dict__.setdefault("_statevalue_staged", {})
        with open(path, "rb") as file:
            for name, dtype, shape in layout:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                target = tensor.reshape(-1).view(torch.uint8).numpy()
                if file.readinto(target) != target.nbytes:
                    raise ValueError(f"{path} ends inside {name}")
                staged[name] = tensor

    def load_staged_weights(self) -> int:
        """Load every staged weight in place through vLLM's own reload path; returns how
        many weights it loaded. The staged copy is dropped either way."""
        staged = self.__dict__.pop("_statevalue_staged", {})
        worker: Any = self
        try:
            worker.reload_weights(weights_iterator=list(staged.items()))
        except Exception:
            _abandon_reload(worker.get_model())
            raise
        return len(staged)

    def drop_staged_weights(self) -> None:
        """Forget a staged update that will not be loaded (its transfer failed)."""
        self.__dict__.pop("_statevalue_staged", None)


def _abandon_reload(model: torch.nn.Module) -> None:
    """Undo what a failed in-place reload left half done, so the model can be reloaded.

    vLLM's reload moves each layer aside, buffers its weights and processes the layer once
    all have arrived, copying the result into the layer's own tensors. A failure leaves the
    layers still waiting with their tensors aside, their buffers kept for the next reload:
    each gets its own tensors (its old values) back and its buffer dropped. Layers already
    processed keep their new values; the caller reloads a checkpoint over the mix.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if info.can_load():
            if info.kernel_tensors is not None:
                layerwise._place_kernel_tensors(layer, info)
            info.reset()
    layerwise.LOADING_LAYERS.clear()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
