"""The weight-sync process group between the trainer and a vLLM server's workers, both ends.

The trainer (rank 0) opens a TCP store and the group; every worker of the server (ranks 1..n: one per tensor /
pipeline-parallel rank) joins it through `WeightReceiver`, the worker extension that `vllm serve` loads with
`--worker-extension-cls sdpo.rollout.weight_group.WeightReceiver`. The group is a bare gloo or NCCL backend made
from the store, outside `torch.distributed`'s global state, which the server's own parallel groups occupy.

A sync is one `reload_weights` call on every worker whose iterator reads the trainer's broadcasts as they come:

    for each bucket:  [header length: int64]  [header: JSON bytes, uint8]  [the bucket's tensors, flat, one dtype]
    then:             [0: int64]  (the end)

The header names each tensor with its shape and offset into the flat bucket, so the receiver needs nothing in
advance and the trainer materialises (gathers, LoRA-merges, converts) one bucket at a time. One call for all
buckets, as the colocated engine does (sdpo/rollout/vllm.py: vLLM's layer-wise reload must see a layer's tensors in
one call). This module imports torch only, so that a server on another host needs nothing else from sdpo.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

GROUP_PREFIX = "sdpo-weight-sync"


def open_group(store: Any, rank: int, world: int, backend: str, timeout_s: float) -> Any:
    """This process's end of the group (a backend object with `broadcast`): collective, every rank must call it."""
    prefixed = dist.PrefixStore(GROUP_PREFIX, store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world, options)
    raise ValueError(f"weight-sync backend must be gloo or nccl, not {backend!r}")


def group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def broadcast(group: Any, tensor: Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([tensor], options).wait()


def send_bucket(group: Any, bucket: Sequence[tuple[str, Tensor]], device: torch.device) -> None:
    """One bucket of same-dtype tensors: header, then the tensors as one flat broadcast (rank 0)."""
    entries, offset = [], 0
    for name, tensor in bucket:
        entries.append([name, list(tensor.shape), offset])
        offset += tensor.numel()
    header = json.dumps({"dtype": str(bucket[0][1].dtype).removeprefix("torch."), "numel": offset,
                         "tensors": entries}).encode()
    broadcast(group, torch.tensor([len(header)], dtype=torch.int64, device=device))
    broadcast(group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device))
    flat = torch.cat([t.reshape(-1).to(device) for _, t in bucket])
    broadcast(group, flat)


def send_end(group: Any, device: torch.device) -> None:
    broadcast(group, torch.zeros(1, dtype=torch.int64, device=device))


def receive_buckets(group: Any, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every bucket rank 0 sends, until its end marker (any other rank)."""
    while True:
        length = torch.zeros(1, dtype=torch.int64, device=device)
        broadcast(group, length)
        if int(length.item()) == 0:
            return
        raw = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        broadcast(group, raw)
        header = json.loads(bytes(raw.cpu().tolist()).decode())
        flat = torch.empty(header["numel"], dtype=getattr(torch, header["dtype"]), device=device)
        broadcast(group, flat)
        for name, shape, offset in header["tensors"]:
            numel = 1
            for size in shape:
                numel *= size
            yield name, flat[offset : offset + numel].view(shape)


class WeightReceiver:
    """vLLM worker extension (`--worker-extension-cls sdpo.rollout.weight_group.WeightReceiver`): joins the trainer's
    weight-sync group and loads what it broadcasts. Called through the server's `/collective_rpc` (dev mode), whose
    arguments arrive as strings. Methods are prefixed `sdpo_` (vLLM refuses an extension that shadows the worker's)."""

    def sdpo_rank(self) -> int:
        """This worker's rank among the server's workers (the trainer counts them and places them in the group)."""
        return int(self.rank)  # type: ignore[attr-defined]

    def sdpo_join(self, host: str, port: str, world: str, backend: str, timeout_s: str) -> None:
        store = dist.TCPStore(host, int(port), int(world), is_master=False, timeout=timedelta(seconds=float(timeout_s)))
        self._sdpo_backend = backend
        self._sdpo_group = open_group(store, 1 + self.sdpo_rank(), int(world), backend, float(timeout_s))
        self._sdpo_store = store  # the group reads the store while it lives

    def sdpo_receive(self) -> int:
        """Load every tensor the trainer broadcasts into the model (one `reload_weights`); returns how many."""
        group = getattr(self, "_sdpo_group", None)
        if group is None:
            raise RuntimeError("sdpo_receive before sdpo_join: the trainer has not opened the weight-sync group")
        count = 0

        def stream() -> Iterator[tuple[str, Tensor]]:
            nonlocal count
            for item in receive_buckets(group, group_device(self._sdpo_backend)):
                count += 1
                yield item

        self.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return count
