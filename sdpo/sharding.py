"""Whole tensors from sharded parameters: FSDP2 (DTensor shards) and DeepSpeed ZeRO-3 (flat partitions).

Under either, a rank holds only a slice of each parameter outside the forward pass. Whatever needs a whole tensor
(a checkpoint, the vLLM weight sync, the EMA teacher's state) comes through here, and every function that gathers
is a collective: all ranks call it, on the same tensors, in the same order. On a plain model they are no-ops.

Outside a forward a ZeRO-3 parameter's `.data` is empty and its `ds_tensor` holds this rank's partition (padded, the
same layout for every model partitioned over the same ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib

import torch
from torch import Tensor


def is_zero3_param(tensor: Tensor) -> bool:
    return getattr(tensor, "ds_tensor", None) is not None  # (DeepSpeed also tags some of its own buffers with ds_id)


def is_zero3(model: torch.nn.Module) -> bool:
    return any(is_zero3_param(p) for p in model.parameters())


def is_fsdp2(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_sharded(model: torch.nn.Module) -> bool:
    return is_fsdp2(model) or is_zero3(model)


def numel(tensor: Tensor) -> int:
    """Elements of the whole tensor (a ZeRO-3 parameter's `.numel()` is 0 while it is partitioned)."""
    return tensor.ds_numel if is_zero3_param(tensor) else tensor.numel()


def local_part(tensor: Tensor) -> Tensor:
    """What this rank stores of the tensor: an FSDP2 DTensor as is, a ZeRO-3 partition, or the tensor itself.

    Two models partitioned over the same ranks store matching parts, so elementwise updates between them (the EMA
    teacher) work on the parts without gathering.
    """
    return tensor.ds_tensor if is_zero3_param(tensor) else tensor


@torch.no_grad()
def lerp_(target: Tensor, source: Tensor, weight: float) -> None:
    """target <- target + weight * (source - target), on what this rank stores (no gathering of partitions).

    ZeRO-3 keeps small parameters whole on every rank besides their partition ("persistent", refreshed from the
    partitions only by an optimizer step); such a whole copy is updated too, or forwards would read stale values.
    """
    part = local_part(target)
    part.lerp_(local_part(source).detach().to(part.dtype), weight)
    if is_zero3_param(target) and target.numel() > 0:  # gathered (persistent): its whole copy as well
        with gathered([source]):
            target.data.lerp_(source.data.to(target.dtype), weight)


@contextlib.contextmanager
def gathered(tensors: Sequence[Tensor], modify: bool = False) -> Iterator[None]:
    """ZeRO-3: the parameters whole for the duration (a collective). With `modify`, writes made inside on every rank
    are kept (rank 0's copy is partitioned again on exit); otherwise they are discarded."""
    zero3 = [t for t in tensors if is_zero3_param(t)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


def whole(tensor: Tensor) -> Tensor:
    """A detached CPU copy of the whole tensor; an FSDP2 shard or a ZeRO-3 partition is gathered first."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    with gathered([tensor]):
        return tensor.detach().cpu().clone()


@torch.no_grad()
def copy_whole_into(param: Tensor, value: Tensor) -> None:
    """param <- value, where value is the whole tensor and param may be an FSDP2 shard or a ZeRO-3 partition."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    with gathered([param], modify=True):
        param.copy_(value)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's state dict; sharded models are gathered whole onto rank 0's CPU (the other ranks get {})."""
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_zero3(model):
        return model.state_dict()
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        value = whole(tensor)  # every rank joins the gather
        if main:
            state[name] = value
    return state


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Load whole tensors into the model (into this rank's shards or partitions); (missing, unexpected) keys.

    ZeRO-3: every rank passes the same `state`. Only for models without an optimizer: a ZeRO-3 optimizer keeps its
    own fp32 copy of the policy's partitions, which DeepSpeed's checkpoint restores (sdpo/checkpoint.py).
    """
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    if not is_zero3(model):
        return model.load_state_dict(state, strict=strict)
    own = model.state_dict(keep_vars=True)
    for name, tensor in own.items():
        if name in state:
            copy_whole_into(tensor, state[name])
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise RuntimeError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return missing, unexpected
