"""The measuring parts of benchmarks/profile_step.py: model FLOPs and the machine's matmul peak, the trainer built
on the default workload with its update instrumented part by part, one profiled run, an update replayed on one batch.
Also imported by benchmarks/cost_growth_cpu.py and benchmarks/vs_trl_cpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from benchmarks import machine  # first: it imports sdpo before torch

import torch

PRECISIONS = {"float32": "model.autocast_dtype=none", "bf16": "model.autocast_dtype=bfloat16"}
STAGES = ["generate", "score", "teacher_context", "teacher_forward", "update", "sync"]
UPDATE_PARTS = ["student_forward", "head_and_terms", "objective", "backward", "optimizer", "ema"]


# ---------------------------------------------------------------------------------------------------------------
# model FLOPs


def layer_shapes(config) -> list[tuple[int, int]]:
    """[K, N] of each linear layer of one decoder layer: q, k, v, o, gate, up, down (k and v as wide as the
    key/value heads)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def forward_flops(config, tokens: int, sequences: list[int], head_positions: int,
                  continued: list[tuple[int, int]] = ()) -> float:
    """Matmul FLOPs of one forward: the linear layers on `tokens` positions, causal attention over each sequence
    (`sequences`: lengths) and over each (prefix, length) continuation of a cached prefix (`continued`: responses
    run on a shared prompt's key/value cache), and the output head on `head_positions` (the response positions)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    linear = layers * sum(k * n for k, n in layer_shapes(config))
    attention = sum(layers * 2 * h * n * n for n in sequences)  # QK^T and AV, causal half: 2 * (2 h n^2 / 2)
    attention += sum(layers * 2 * h * ((p + n) ** 2 - p * p) for p, n in continued)  # the prefix's part is cached
    return 2 * linear * tokens + attention + 2 * h * config.vocab_size * head_positions


class FlopCounter:
    """Counts the tokens each forward of the update sees (padded and real), for the model FLOPs. With shared prompts
    (trainer.share_prompts) a distinct prompt counts once, in the forward that runs it (`PromptPass`): that is the
    work the update needs."""

    def __init__(self, config) -> None:
        self.config = config
        self.real = {"student": 0.0, "teacher": 0.0}
        self.padded = {"student": 0.0, "teacher": 0.0}
        self.rows: list[int] = []  # the token rows (padded) of each forward's matmuls: their M

    def record_prompts(self, who: str, prompts) -> None:
        """A `PromptPass` over `prompts` (`PromptInputs`): the prompts' forward, no output head; their common prefix
        (`PromptInputs.common`) once, the rest of each prompt on its cache."""
        common = prompts.common
        rest = (prompts.attention_mask.sum(-1) - common).tolist()
        n, width = prompts.attention_mask.shape
        prefix = forward_flops(self.config, common, [common], 0) if common else 0.0
        self.real[who] += prefix + forward_flops(self.config, sum(rest), [], 0, [(common, r) for r in rest])
        self.padded[who] += prefix + forward_flops(self.config, n * (width - common), [], 0, [(common, width - common)] * n)
        self.rows.append(n * (width - common))

    def record(self, who: str, inputs, prompts_given: bool, head: tuple[int, int] | None = None) -> None:
        """`head`: (real, padded) positions of the output head where they are not the inputs' response positions
        (a packed episode's turns)."""
        from sdpo.batch import SharedPromptInputs
        from sdpo.layout import BranchInputs, PackedInputs

        if isinstance(inputs, PackedInputs):  # each episode's sequence once; the head on its turns' responses only
            real = sum(int(row.unique().numel()) for row in inputs.index_BR)
            self.record(who, inputs.sequences, prompts_given, head=(real, inputs.index_BR.numel()))
            return
        if isinstance(inputs, BranchInputs):  # the trunks once, each row's branch on its trunk's visible prefix
            self.record_prompts(who, inputs.trunks)
            branch, response = inputs.branch_mask.sum(-1).tolist(), inputs.branch_mask[:, inputs.tail_width:].sum(-1)
            n, width = inputs.branch_mask.shape
            visible = inputs.visible_B.tolist()
            self.real[who] += forward_flops(self.config, sum(branch), [], int(response.sum()), list(zip(visible, branch)))
            self.padded[who] += forward_flops(self.config, n * width, [], n * (width - inputs.tail_width),
                                              [(inputs.trunks.attention_mask.shape[1], width)] * n)
            self.rows.append(n * width)
            return
        if isinstance(inputs, SharedPromptInputs):  # the responses on their prompts' cache
            if not prompts_given:  # response_features runs the pass itself
                used = inputs.prompt_of_B.unique()
                self.record_prompts(who, replace(inputs.prompts, input_ids=inputs.prompts.input_ids[used],
                                                 attention_mask=inputs.prompts.attention_mask[used]))
            prompt_B = inputs.prompts.attention_mask.sum(-1)[inputs.prompt_of_B].tolist()
            responses = inputs.response_mask.sum(-1).tolist()
            n, width = inputs.response_mask.shape
            prompt_width = inputs.prompts.attention_mask.shape[1]
            real_head, padded_head = head or (sum(responses), n * width)
            self.real[who] += forward_flops(self.config, sum(responses), [], real_head, list(zip(prompt_B, responses)))
            self.padded[who] += forward_flops(self.config, n * width, [], padded_head, [(prompt_width, width)] * n)
            self.rows.append(n * width)
            return
        mask = inputs.attention_mask
        lengths = mask.sum(-1).tolist()
        n, width = mask.shape
        real_head, padded_head = head or (mask[:, inputs.prompt_width:].sum().item(), n * inputs.response_width)
        self.real[who] += forward_flops(self.config, sum(lengths), lengths, real_head)
        self.padded[who] += forward_flops(self.config, n * width, [width] * n, padded_head)
        self.rows.append(n * width)

    def pop(self) -> dict[str, float]:
        out = {f"flops/{k}_{who}": v[who] for k, v in (("real", self.real), ("padded", self.padded)) for who in v}
        out["forward_rows"] = float(statistics.median(self.rows)) if self.rows else 0.0
        self.__init__(self.config)
        return out


# ---------------------------------------------------------------------------------------------------------------
# matmul peak


def matmul_peak(config, rows: int, dtype: torch.dtype, seconds: float = 1.5) -> dict[str, float]:
    """GFLOP/s of [rows, K] @ [K, N] in the model's shapes (forward and the backward's transposed products), and
    their FLOP-weighted harmonic mean: the rate the update's matmuls could run at."""
    q_proj, k_proj, _, _, gate_proj, _, down_proj = layer_shapes(config)
    shapes = {"q/o h->h": q_proj, "k/v h->kv": k_proj, "mlp h->i": gate_proj, "mlp i->h": down_proj,
              "head h->V": (config.hidden_size, config.vocab_size)}
    weight = {"q/o h->h": 2, "k/v h->kv": 2, "mlp h->i": 2, "mlp i->h": 1, "head h->V": 0}  # per layer
    rates, total_flops, total_time = {}, 0.0, 0.0
    for name, (k, n) in shapes.items():
        a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        rate = 2 * rows * k * n * count / (time.perf_counter() - start)
        rates[name] = rate / 1e9
        flops = 2 * rows * k * n * (weight[name] * config.num_hidden_layers if weight[name] else 1)
        total_flops += flops
        total_time += flops / rate
    rates["weighted"] = total_flops / total_time / 1e9
    return rates


def decode_floor(config, rows: int, dtype: torch.dtype, repeats: int = 7) -> dict[str, float]:
    """Seconds of one decode step's matmuls alone: `rows` token rows through every linear layer of the model and
    the output head, each with its own weight tensor (fresh, as big as the model's: a decode step streams them all
    from memory, they do not stay in cache). Nothing else of a decode step (attention, norms, sampling): a floor
    for the engine's time per decode step. Median of `repeats`; also as GB/s of weights read and GFLOP/s."""
    h = config.hidden_size
    weights = [torch.randn(k, n, dtype=dtype) for _ in range(config.num_hidden_layers) for k, n in layer_shapes(config)]
    weights.append(torch.randn(h, config.vocab_size, dtype=dtype))
    inputs = {k: torch.randn(rows, k, dtype=dtype) for k in (h, config.intermediate_size)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            inputs[w.shape[0]] @ w
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    elements = sum(w.numel() for w in weights)
    return {"seconds": seconds, "GB/s": elements * weights[0].element_size() / seconds / 1e9,
            "GFLOP/s": 2 * rows * elements / seconds / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# one precision, in its own process


def timed(timer, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with timer(name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def instrumented(trainer, flops: FlopCounter):
    """Wrap the update's calls with the trainer's stage timer (and count the forwards' tokens); undone on exit."""
    import sdpo.teacher.teacher as teacher_module
    import sdpo.learner as learner_module

    timer = trainer.timer
    saved = {(learner_module, k): getattr(learner_module, k) for k in ("response_features", "chunked_response_terms", "objective")}
    saved[(teacher_module, "response_features")] = teacher_module.response_features

    def counted(who, fn):
        def wrapper(model, inputs, prompts=None, last=True):
            flops.record(who, inputs, prompts_given=prompts is not None)
            return fn(model, inputs, prompts, last)
        return wrapper

    def prompt_pass(block_prompts):  # a block's shared prompts: part of the student's forward
        prompts = saved_prompt_pass(block_prompts)
        flops.record_prompts("student", prompts.prompts)
        return prompts

    def teacher_prompt_passes(*args, **kwargs):  # a block's shared reprompts, once per teacher source
        passes = saved_teacher_passes(*args, **kwargs)
        for _ in passes or []:
            flops.record_prompts("teacher", passes[0].prompts)
        return passes

    saved_prompt_pass, saved_teacher_passes = trainer.learner.prompt_pass, trainer.learner.teacher._prompt_passes
    trainer.learner.prompt_pass = timed(timer, "student_forward", prompt_pass)
    trainer.learner.teacher._prompt_passes = teacher_prompt_passes

    learner_module.response_features = timed(timer, "student_forward", counted("student", saved[(learner_module, "response_features")]))
    teacher_module.response_features = counted("teacher", saved[(teacher_module, "response_features")])
    learner_module.chunked_response_terms = timed(timer, "head_and_terms", saved[(learner_module, "chunked_response_terms")])
    learner_module.objective = timed(timer, "objective", saved[(learner_module, "objective")])
    trainer.dist.backward = timed(timer, "backward", trainer.dist.backward)
    trainer.dist.optimizer_step = timed(timer, "optimizer", trainer.dist.optimizer_step)
    trainer.learner.teacher.update = timed(timer, "ema", trainer.learner.teacher.update)
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def force_length() -> None:
    """Every training rollout runs to rollout.max_new_tokens (vLLM's min_tokens = max_tokens: EOS is held back), so
    that a step's cost is measured at that length (the cost-growth runs)."""
    from sdpo.rollout.vllm import VLLMEngine

    params = VLLMEngine._sampling_params

    def forced(self, sampling, prompt_index):
        out = params(self, sampling, prompt_index)
        out.min_tokens = out.max_tokens
        return out

    VLLMEngine._sampling_params = forced


def make_trainer(overrides: list[str]):
    from sdpo.trainer import SDPOTrainer

    out = tempfile.mkdtemp(prefix="profile_step-")
    return SDPOTrainer(overrides=[f"trainer.output_dir={out}", "eval.every=0", "logging.progress_bar=false",
                                  "trainer.total_steps=1000", *overrides])


def profile_one(overrides: list[str], steps: int) -> dict:
    trainer = make_trainer(overrides)
    flops = FlopCounter(trainer.learner.unwrapped.config)
    dtype = torch.bfloat16 if trainer.learner.autocast_dtype == torch.bfloat16 else torch.float32
    micro = trainer.config.trainer.micro_batch_size
    rows = []
    with instrumented(trainer, flops):
        for _ in range(steps + 1):
            start = time.perf_counter()
            result = trainer.training_step()
            wall = time.perf_counter() - start
            batch = result.batch
            # The machine's matmul rate right after each step (short): neighbours move it by up to 1.5x within a
            # run, so each step's MFU is read against its own (`step_peak`), as well as against the longer
            # measurement after the run.
            step_peak = matmul_peak(trainer.learner.unwrapped.config, micro * 96, dtype, seconds=0.3)["weighted"]
            rows.append({**result.metrics, **flops.pop(), "wall": wall, "step_peak": step_peak,
                         "tokens/response": float(batch.response_lengths_B.sum()),
                         "decode_steps": float(batch.response_lengths_B.max()),
                         "distill_rows": float(batch.distill_mask_B.sum()) if batch.distill_mask_B is not None else 0.0})
    peak = matmul_peak(trainer.learner.unwrapped.config, micro * 96, dtype)
    # The same rates at the size the update's forwards actually run at (their median M): the achievable rate in
    # the update's own shapes, which small micro-batches could hold below the rate at 768 rows.
    own_rows = int(statistics.median(r["forward_rows"] for r in rows[1:]))
    own_peak = matmul_peak(trainer.learner.unwrapped.config, own_rows, dtype)
    # The generate stage's floor: one decode step's matmuls with the whole batch's rows, in the engine's dtype.
    engine_dtype = getattr(trainer.engine, "engine_dtype", dtype)
    decode = decode_floor(trainer.learner.unwrapped.config, batch.response_lengths_B.numel(), engine_dtype)
    return {"steps": rows[1:], "peak": peak, "own_rows": own_rows, "own_peak": own_peak, "decode": decode,
            "engine_dtype": str(engine_dtype), "threads": torch.get_num_threads(), "dtype": str(dtype)}


def update_replay(trainer):
    """Run one training step (a warm-up) and keep its batch and the state after it; the returned function restores
    the weights, optimizer and EMA state, updates on the same batch again and gives (seconds, the stage timer's
    parts)."""
    batch = trainer.training_step().batch
    weights = copy.deepcopy(trainer.learner.unwrapped.state_dict())
    optim = copy.deepcopy(trainer.learner.optimizer.state_dict())
    ema = copy.deepcopy(trainer.learner.teacher.state_dict())

    def one_update() -> tuple[float, dict[str, float]]:
        trainer.learner.unwrapped.load_state_dict(weights)
        trainer.learner.optimizer.load_state_dict(optim)
        trainer.learner.teacher.load_state_dict(ema)
        trainer.timer.pop()
        start = time.perf_counter()
        trainer.learner.update(copy.copy(batch), trainer.step)
        return time.perf_counter() - start, trainer.timer.pop()

    one_update.batch = batch
    return one_update


def colocate_engine(trainer, memory_policy: bool = True) -> None:
    """Build a vLLM engine in this process beside the trainer (as `rollout=vllm` does); with memory_policy=False, undo
    the strict NUMA memory binding its CPU worker sets for the whole process."""
    from sdpo.rollout import EngineSource, build_engine

    config = trainer.config
    engine_config = copy.deepcopy(config.rollout)
    engine_config.engine = "vllm"
    max_len = config.rollout.max_prompt_len + config.rollout.max_new_tokens
    trainer.colocated = build_engine(engine_config, EngineSource(trainer.learner.unwrapped, trainer.tokenizer,
                                                                 trainer.model_path, max_len,
                                                                 trainer.learner.autocast_dtype))
    if not memory_policy:
        default_memory_policy()


def bind_memory_alone(trainer) -> None:
    """Only what vLLM's CPU worker does to the process's memory: a strict MEMBIND to the first CPU's NUMA node."""
    from sdpo.rollout.vllm import import_vllm

    import_vllm()
    import vllm._C  # noqa: F401  (registers torch.ops._C.*)

    torch.ops._C.init_cpu_memory_env([0])


# What a replay process does to itself after its warm-up update and before the timed ones (`--colocation`).


def default_memory_policy() -> int:
    """Undo the strict NUMA MEMBIND that vLLM's CPU worker sets for the whole process (set_mempolicy(MPOL_DEFAULT));
    0 on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(238, 0, None, 0)  # x86-64 SYS_set_mempolicy, MPOL_DEFAULT


def median_and_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
