"""FSDP for `lorakit train`: the base sharded and frozen, the LoRA factors trained, the adapter saved whole.

`accelerate launch --config_file examples/fsdp.yaml -m lorakit.cli train ...` runs the training loop under torch's
FSDP2 (`fully_shard`, through accelerate's `prepare`): every parameter, frozen base weights and LoRA factors alike,
becomes a DTensor sharded across the processes, so each holds about 1/N of the model; a layer's weights are gathered
for its forward and backward only. FSDP2 shards frozen and trainable parameters of one unit side by side (FSDP1
needed `use_orig_params=True` for that), and accelerate hands the optimizer the sharded parameters.

What a sharded model changes for the loop: its forward is collective, so every process takes part in an evaluation
(not the main one alone), and the trained tensors are gathered whole (`full_tensor`, also collective) before the
main process writes the adapter in the usual format.

accelerate turns FSDP on only for accelerators (GPUs); processes launched with `--use_fsdp` on a machine without
them get it here too, on torch's FSDP2 over gloo, which is how the 2-process test runs.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from lorakit.core.errors import LoraError


def setup(acc, cfg, adapt, on_cpu: bool) -> bool:
    """Whether this run is sharded with FSDP; turns it on for CPU processes launched with FSDP (see the module
    docstring) and refuses what lorakit does not do sharded."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()  # read from the launch's env
        AcceleratorState._shared_state["distributed_type"] = PartialState._shared_state["distributed_type"] = \
            DistributedType.FSDP
    if acc.distributed_type != DistributedType.FSDP:
        return False
    if not acc.is_fsdp2:
        raise LoraError("lorakit trains under FSDP2: set fsdp_version: 2 in the accelerate config "
                        "(examples/fsdp.yaml) or pass --fsdp_version 2")
    if cfg.full_finetune or adapt is not None:
        raise LoraError("under FSDP lorakit trains its own LoRA adapters only (not --full-finetune or a PEFT model)")
    if cfg.save_every or cfg.resume:
        raise LoraError("checkpoints (--save-every, --resume) are not written sharded yet; under FSDP a run goes "
                        "from start to end")
    return True


def local_numel(model: nn.Module) -> int:
    """How many parameter values this process holds (its shards of the sharded ones)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def gather(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whole, on the CPU; every process must call it (a sharded tensor is all-gathered)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in params.items()}


@contextlib.contextmanager
def whole(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Within the block the parameters named in `tensors` are those whole tensors (the sharded ones are put back
    after): what lets lorakit.save read a sharded model's adapter on one process, without any collective."""
    swapped = []
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        swapped.append((module, leaf, module._parameters[leaf]))
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    try:
        yield model
    finally:
        for module, leaf, p in swapped:
            module._parameters[leaf] = p
