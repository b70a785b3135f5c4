"""Where the processes are and how the policy is spread over them: the only module that knows DDP, FSDP2 and DeepSpeed.

`Distributed` owns the `Accelerator` and every decision that depends on the launch:
- set-up checks (whole groups per rank, no FSDP1, DeepSpeed needs as many processes as Accelerate counts);
- the DeepSpeed config, filled in from the trainer's (the loop owns gradient accumulation);
- frozen copies of the policy (teacher, reference) taken and placed the way the policy is (a device, FSDP2 shards,
  or a ZeRO-3 engine of their own);
- one micro-batch's forward/backward (`micro_batch` + `backward`) and one optimizer step (`optimizer_step`);
- reductions over ranks, and the collective "does any rank need this forward?" (`any_rank`);
- the DeepSpeed part of checkpoints (its own partitioned optimizer state) versus the plain optimizer state.

The trainer and the learner call these and never ask which backend runs. Under FSDP2 and ZeRO-3 (`sharded`) every forward is a
collective: all ranks must join it, which is why `any_rank` exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import copy as copy_module
import logging
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, fsdp2_prepare_model
import torch
from torch import Tensor

from sdpo import checkpoint as ckpt
from sdpo.config import TrainerConfig
from sdpo.models import unwrap
from sdpo.sharding import full_state_dict
from sdpo.teacher.weights import frozen_copy

log = logging.getLogger(__name__)


class Distributed:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        # Launched with torchrun on a machine without GPUs: Accelerate needs `cpu` to set up gloo (not under
        # DeepSpeed, which `cpu` would switch off).
        deepspeed_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        self.accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
                                       and not deepspeed_env)
        acc = self.accelerator
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        launched = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.deepspeed and launched != acc.num_processes:
            # Accelerate takes the process count from the accelerator's backend; without GPUs it has none.
            raise RuntimeError(f"DeepSpeed runs {launched} processes but Accelerate counts "
                               f"{acc.num_processes}: DeepSpeed through Accelerate needs GPUs (on the CPU, "
                               "use torchrun with DDP, or see tests/test_distributed.py for how the test sets it up)")
        if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
            raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                             "(configs/accelerate/fsdp2.yaml)")
        self.zero3 = self.deepspeed and acc.state.deepspeed_plugin.zero_stage == 3
        self.sharded = acc.is_fsdp2 or self.zero3  # parameters split over ranks: every forward is a collective
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process
        if config.questions_per_step % self.world or config.mini_batch_questions % self.world:
            raise ValueError(
                f"trainer.questions_per_step and trainer.mini_batch_questions must be multiples of the number of "
                f"processes ({self.world}) so that every rank holds whole groups"
            )
        if self.deepspeed:
            self._configure_deepspeed()
        self.policy: Any = None
        self.optimizer: Any = None
        self.trainable: list[Tensor] = []

    # -- set-up

    @property
    def whole_weights(self) -> bool:
        """Whether each process holds the policy's weights whole, as plain tensors (one process or DDP), not split
        over processes (FSDP2, ZeRO-3) nor flattened into DeepSpeed's buffers. Prompt sharing, an optimizer step's
        cached casts and the fused optimizer need them."""
        return not (self.sharded or self.deepspeed)

    def num_weights(self) -> int:
        """The policy's trainable weights, counted whole (a ZeRO-3 process holds a partition of each: ds_numel)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable)

    def share(self, items: list) -> list:
        """This process's share of a list that every process holds alike (questions, held-out problems)."""
        return items[self.rank :: self.world]

    def local_count(self, count: int) -> int:
        """A global count of whole groups (questions per mini-batch) as this process's part of it."""
        return count // self.world

    def sampling_seed(self, seed: int, step: int) -> int:
        """A sampling seed of its own for every (step, process)."""
        return seed + step * self.world + self.rank

    def shared_value(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (e.g. a timestamped run directory: every rank writes into one)."""
        box = [value]
        if self.world > 1:
            broadcast_object_list(box)
        return box[0]

    def _configure_deepspeed(self) -> None:
        """Fill in the DeepSpeed config from the trainer's (before `prepare`): the loop owns accumulation.

        One optimizer step per mini-batch of whole groups, its micro-batches accumulated by `engine.backward` and
        applied by one `engine.step` (`managed_gradient_accumulation: false`); the engine clips with
        trainer.optim.grad_clip. The batch sizes are only DeepSpeed's bookkeeping.
        """
        ds, tcfg = self.accelerator.state.deepspeed_plugin.deepspeed_config, self.config
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ValueError(f"the DeepSpeed config sets {key!r}: remove it, the trainer builds its own "
                                 "(trainer.optim.*)")
        ds.update(train_micro_batch_size_per_gpu=tcfg.micro_batch_size, gradient_accumulation_steps=1,
                  train_batch_size=tcfg.micro_batch_size * self.world, gradient_clipping=tcfg.optim.grad_clip,
                  managed_gradient_accumulation=False)
        # Communication buckets sized by the model (Accelerate fills "auto" from its hidden size), as the
        # transformers integration does; DeepSpeed's fixed defaults (5e8-element buckets) suit no particular model.
        zero = ds.setdefault("zero_optimization", {})
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            zero.setdefault(key, "auto")

    def frozen_copy(self, model: torch.nn.Module, reload: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A frozen copy of the initial policy (teacher, reference), taken before `prepare`.

        Under ZeRO-3 transformers partitions the weights while loading (zero.Init), so the copy is a second load of
        the same checkpoint (`reload`) instead of a deepcopy of empty partitions.
        """
        if not self.zero3:
            return frozen_copy(model)
        return reload().requires_grad_(False).eval()

    def place_copy(self, copy: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the policy placed like the prepared policy."""
        if self.accelerator.is_fsdp2:
            return fsdp2_prepare_model(self.accelerator, copy)
        if self.zero3:  # an engine of its own, without an optimizer, partitioned like the policy
            import deepspeed

            ds = copy_module.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            # Every parameter partitioned (none kept whole on every rank): the EMA update lerps the partitions.
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            engine, *_ = deepspeed.initialize(model=copy, config=ds)
            engine.eval()  # DeepSpeed's eval() returns None
            return engine
        return copy.to(self.device)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        self.policy, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP2 replaced them by shards
        return self.policy, self.optimizer

    # -- one optimizer step

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: DDP all-reduces gradients on the last one only."""
        if last or self.deepspeed:
            yield
        else:
            with self.accelerator.no_sync(self.policy):
                yield

    def backward(self, loss: Tensor, scaled: Tensor | None = None) -> None:
        """`scaled`: a term whose gradient is already in the scale of `loss * world` (it was gathered from earlier
        backwards: `sdpo.models.PromptPass.pending`), added after the scaling."""
        # DDP and DeepSpeed average gradients over ranks; the loss's counts are already global, so undo the average.
        loss = loss * self.world if scaled is None else loss * self.world + scaled
        if self.deepspeed:  # accumulates; `optimizer_step` applies (accelerator.backward would step the engine)
            self.policy.backward(loss)
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> tuple[bool, float]:
        """Clip, then step unless the grad norm is not finite; (applied, grad norm). Gradients are zeroed after."""
        if self.deepspeed:
            # The engine clips (gradient_clipping = trainer.optim.grad_clip), skips a non-finite step, zeroes.
            self.policy.step()
            return self.policy.was_step_applied(), float(self.policy.get_global_grad_norm())
        grad_norm = float(self.accelerator.clip_grad_norm_(self.trainable, self.config.optim.grad_clip))
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    # -- reductions

    def reduce(self, value: Tensor, op: str) -> Tensor:
        """sum / mean / max over ranks (identity on one process)."""
        if self.world == 1:
            return value
        value = value.to(self.device)
        if op == "max":
            return self.accelerator.gather(value.reshape(1, -1)).max(dim=0).values.reshape(value.shape)
        return self.accelerator.reduce(value, reduction=op)

    def reduce_mean(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Means over ranks. A value that is undefined (NaN) on a rank is left out of its mean, and a metric undefined
        on every rank is left out of the result (e.g. diagnostics/demo_copy on a step without two solved questions),
        so that logged metrics are numbers and one rank's missing case does not turn the mean into NaN."""
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        defined = ~values.isnan()
        sums, counts = self.reduce(torch.stack([torch.where(defined, values, 0.0), defined.double()]), "sum")
        return {k: s / c for k, s, c in zip(keys, sums.tolist(), counts.tolist()) if c > 0}

    def sum_counts(self, counts: dict[str, Tensor | float]) -> dict[str, float]:
        """Counts summed over ranks (the loss normalisers of one optimizer step)."""
        keys = list(counts)
        local = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.reduce(local, "sum").tolist()))

    def any_rank(self, flag: bool) -> bool:
        """Whether a forward must run here: sharded, it is a collective, so every rank runs it if one rank needs it."""
        if not self.sharded:
            return flag
        return bool(self.reduce(torch.tensor(float(flag)), "max"))

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # -- checkpoints

    def write_rng_state(self, staging: Path) -> None:
        ckpt.write_rank_state(staging, self.rank, {"rng": ckpt.rng_state()})

    def restore_rng_state(self, path: Path, saved_world: int) -> None:
        """This process's RNG streams from a checkpoint; another process count continues from other streams."""
        rank_state = ckpt.read_rank_state(path, self.rank)
        if rank_state is None or saved_world != self.world:
            log.warning("checkpoint %s was written by %d processes, resumed with %d: sampling continues from other "
                        "RNG streams (not bit-exact)", path, saved_world, self.world)
            rank_state = rank_state or ckpt.read_rank_state(path, 0)
        ckpt.set_rng_state(rank_state["rng"])

    def policy_state(self, staging: Path) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        """(whole weights when sharded else None, optimizer state or None under DeepSpeed); every rank calls it.

        DeepSpeed: each rank writes its partitions of the fp32 master weights and optimizer state into `staging`.
        """
        model = unwrap(self.policy)
        weights = full_state_dict(model) if self.sharded else None  # sharded: a collective gather
        if self.deepspeed:
            ckpt.save_deepspeed_state(self.policy, staging)
            return weights, None
        return weights, ckpt.optimizer_state_dict(model, self.optimizer.optimizer)

    def load_policy_state(self, path: Path, state: dict[str, Any]) -> None:
        """Weights and optimizer state from a checkpoint written by `policy_state` under the same kind of launch."""
        if self.deepspeed:
            if state["world_size"] != self.world:
                raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} DeepSpeed processes: resume "
                                   f"it with as many (here {self.world}), or from its weights as a new run "
                                   f"(model.name_or_path={path})")
            ckpt.load_deepspeed_state(self.policy, path)
            return
        if state["optimizer"] is None:
            raise RuntimeError(f"checkpoint {path} was written under DeepSpeed: resume it with the same DeepSpeed "
                               f"launch, or start a new run from its weights (model.name_or_path={path})")
        ckpt.load_model_weights(unwrap(self.policy), path)
        ckpt.load_optimizer_state_dict(unwrap(self.policy), self.optimizer.optimizer, state["optimizer"])
