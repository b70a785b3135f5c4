"""Where one default training step's time goes: per stage, and inside the update per part, with the update's model
FLOPs utilisation against the matmul throughput this machine achieves in the model's shapes.

    python benchmarks/profile_step.py --steps 4 --results benchmarks/results/profile_step.md

Each precision (float32: `model.autocast_dtype=none`; bf16: `model.autocast_dtype=bfloat16`, measured only where the
CPU runs bf16 natively) runs in its own process, on the default run's workload (configs/experiment/cpu.yaml:
SmolLM2-135M-Instruct, 8 questions x 4 rollouts, 48 new tokens, lambda = 0.9 hybrid, the vLLM engine). The first step
warms up and is not counted; the table gives the median of the others.

Inside the update, the trainer's own stage timer (exclusive nesting, `sdpo.tracking.StageTimer`) is wrapped around
the calls `micro_batch_loss` and `optimizer_step` make, so every second of the step lands in exactly one row:
student forward (the transformer body up to the final hidden states), head and loss terms (`chunked_response_terms`:
the student's and the teacher's vocabulary projections, log-softmax, entropy, distillation), objective, backward,
optimizer (clip + AdamW), EMA (the teacher's lerp), and "update (rest)" (batch assembly, masks, metric sums).

`--colocation ROUNDS` answers a different question: the same update (same batch, same weights) replayed in processes
without a vLLM engine, with one built in-process (vLLM's CPU worker binds the whole process's memory to a NUMA
node), with that binding undone, and with the binding alone, in turn. `--shared-prompts`: the same update with
trainer.learner.planner.share_prompts off and with each thing it shares added in turn (`SHARING`), alternating. `--op-profile`: one
replayed update under torch.profiler, its top operators by input shape. `--cast-once`: the update with
trainer.learner.cast_weights_once off, on for the policy's casts, on for the teacher copy's too, in turn. `--attention`: the
update with attn_implementation sdpa and sdpa_cpu_float32, in turn. `--huge-pages ROUNDS`: the same update replayed
in processes with THP_MEM_ALLOC_ENABLE=0 and =1 (transparent huge pages for torch's large CPU tensors, which `import
sdpo` turns on), the two alternating for ROUNDS rounds. `--malloc ROUNDS`: the same in processes with glibc's malloc
defaults (SDPO_KEEP_FREED_MEMORY=0) and with the trainer keeping freed memory.
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
    (trainer.learner.planner.share_prompts) a distinct prompt counts once, in the forward that runs it (`PromptPass`): that is the
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

    def prompt_pass(block, pack):  # a block's shared prompts: part of the student's forward
        prompts = saved_prompt_pass(block, pack)
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
PROCESS_SETUPS = {
    "none": lambda trainer: None,
    "engine": colocate_engine,
    "engine, memory policy undone": functools.partial(colocate_engine, memory_policy=False),
    "memory binding alone": bind_memory_alone,
}


# What trainer.learner.planner.share_prompts shares, step by step: (the student's prompts once per block, the teacher's reprompts
# once per block, the prompts' common prefix once per pass). "off" is one forward per row; "prompts" the student's
# prompt passes alone, the teacher sharing a reprompt only within a micro-batch; the last is the default.
SHARING = {"off": (False, False, False), "prompts": (True, False, False), "+ reprompts": (True, True, False),
           "+ common prefix": (True, True, True)}


def shared_prompts_ab(overrides: list[str], repeats: int) -> dict:
    """The same update (same rollouts, weights, optimizer and EMA state) under each step of SHARING, alternating, so
    that machine drift hits all alike; the parts of each update by the stage timer."""
    import sdpo.batch

    trainer = make_trainer(overrides)
    flops = FlopCounter(trainer.learner.unwrapped.config)
    replay = update_replay(trainer)
    out: dict[str, list] = {label: [] for label in SHARING}
    min_prefix_saving = sdpo.batch.MIN_PREFIX_SAVING
    with instrumented(trainer, flops):
        teacher_passes = trainer.learner.teacher._prompt_passes
        for _ in range(repeats):
            for label, (share, teacher, prefix) in SHARING.items():
                trainer.learner.planner.share_prompts = share
                trainer.learner.teacher._prompt_passes = teacher_passes if teacher else (lambda *args, **kwargs: None)
                sdpo.batch.MIN_PREFIX_SAVING = min_prefix_saving if prefix else 1 << 62  # no prefix pays
                seconds, parts = replay()
                out[label].append({"update": seconds, **parts, **flops.pop()})
    sdpo.batch.MIN_PREFIX_SAVING = min_prefix_saving
    out["peak"] = matmul_peak(trainer.learner.unwrapped.config, trainer.config.trainer.micro_batch_size * 96, torch.float32)
    out["tokens/response"] = float(replay.batch.response_lengths_B.sum())
    return out


def shared_prompts_report(result: dict, command: str) -> str:
    def med(label, key):
        return statistics.median(r.get(key, 0.0) for r in result[label])

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    keys = [("update (whole)", "update"), *((f"update: {p}", f"time/{p}") for p in UPDATE_PARTS),
            ("teacher forward", "time/teacher_forward")]
    lines = ["# The update with and without shared prompts (trainer.learner.planner.share_prompts)", "",
             f"Machine: {machine.describe()}", "", f"Command: `{command}`", "",
             f"One process, one batch of the default workload ({result['tokens/response']:.0f} response tokens), the "
             "weights, optimizer and EMA state restored before each update; the settings alternate "
             f"({len(result['off'])} each): share_prompts=false (one forward per row); the student's prompts once per "
             "block (the teacher sharing a reprompt only within a micro-batch); + the teacher's reprompts once per "
             "block; + the prompts' common prefix once per pass (the default). Seconds per update, median (range):",
             "", f"| | {' | '.join(SHARING)} | default / off | default / prompts |", "|---|---|---|---|---|---|---|"]
    default = list(SHARING)[-1]
    for label, key in keys:
        runs = {side: [r.get(key, 0.0) for r in result[side]] for side in SHARING}
        m = {side: statistics.median(v) for side, v in runs.items()}
        lines.append(f"| {label} | {' | '.join(median_and_range(runs[side]) for side in SHARING)} | "
                     f"{ratio(m[default], m['off'])} | {ratio(m[default], m['prompts'])} |")
    for who in ("student", "teacher"):
        for kind in ("padded", "real"):
            m = {side: med(side, f"flops/{kind}_{who}") for side in SHARING}
            lines.append(f"| {who} forward GFLOP ({kind}) | {' | '.join(f'{m[side] / 1e9:.0f}' for side in SHARING)} "
                         f"| {ratio(m[default], m['off'])} | {ratio(m[default], m['prompts'])} |")
    lines += ["", f"Matmul rate in the model's shapes after the runs (float32, weighted): {result['peak']['weighted']:.0f} GFLOP/s", ""]
    return "\n".join(lines)


REPLAY_MEASURES = {"update": "wall s", "teacher_forward": "of which the teacher's forward, s", "user": "CPU s, user",
                   "system": "CPU s, kernel", "faults": "minor page faults, thousands"}


def replay_times(overrides: list[str], repeats: int, setup: str = "none") -> dict[str, list[float]]:
    """`repeats` updates of one batch (the weights, optimizer and EMA state restored before each): wall seconds and
    the process's CPU seconds (user, kernel) and minor page faults over each (all threads). `setup`: what the
    process does to itself after the warm-up update (`PROCESS_SETUPS`)."""
    trainer = make_trainer(overrides)
    replay = update_replay(trainer)
    PROCESS_SETUPS[setup](trainer)
    out: dict[str, list[float]] = {key: [] for key in REPLAY_MEASURES}
    for _ in range(repeats):
        measure_update(replay, out)
    return out


def measure_update(replay, out: dict[str, list[float]]) -> None:
    """One replayed update: its wall seconds, the teacher forward's (the stage timer's, inside the update), the
    process's CPU seconds (user, kernel) and minor page faults."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, parts = replay()
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["update"].append(seconds)
    out["teacher_forward"].append(parts.get("time/teacher_forward", 0.0))
    out["user"].append(after.ru_utime - before.ru_utime)
    out["system"].append(after.ru_stime - before.ru_stime)
    out["faults"].append((after.ru_minflt - before.ru_minflt) / 1000)


def cast_weights(once: bool, teacher_cached: bool = True):
    """Learner.cast_weights_once, and whether the teacher's own copy is cached with the policy
    (`Teacher.cacheable_casts`)."""
    def apply(trainer) -> None:
        trainer.learner.cast_weights_once = once
        vars(trainer.learner.teacher).pop("cacheable_casts", None)  # the method, unless shadowed here:
        if not teacher_cached:
            trainer.learner.teacher.cacheable_casts = contextlib.nullcontext
    return apply


def attention(name: str):
    """model.attn_implementation of the policy and the teacher's own copy."""
    def apply(trainer) -> None:
        for model in (trainer.learner.unwrapped, trainer.learner.teacher.model):
            if model is not None:
                model.set_attn_implementation(name)
    return apply


# In-process A/B modes: label -> what each variant sets on the trainer before its update.
CAST_ONCE = {"a region per forward": cast_weights(False),
             "one region per step, the policy's casts cached": cast_weights(True, teacher_cached=False),
             "one region per step, the teacher copy's too": cast_weights(True)}
ATTENTION = {"sdpa (bf16 kernel under bf16 autocast)": attention("sdpa"),
             "sdpa_cpu_float32 (the default)": attention("sdpa_cpu_float32")}


def in_process_ab(overrides: list[str], repeats: int, variants: dict) -> dict[str, dict[str, list[float]]]:
    """The same update (same batch, weights, optimizer and EMA state) with each variant's setting, in turn in one
    process for `repeats` rounds."""
    trainer = make_trainer(overrides)
    replay = update_replay(trainer)
    out = {label: {key: [] for key in REPLAY_MEASURES} for label in variants}
    for _ in range(repeats):
        for label, apply in variants.items():
            apply(trainer)
            measure_update(replay, out[label])
    return out


def op_profile(overrides: list[str], repeats: int) -> dict:
    """The update replayed `repeats` times, the last under torch.profiler: its most expensive operators by self CPU
    time, per input shape (which casts, which matmuls, which element-wise passes)."""
    from torch.profiler import ProfilerActivity, profile

    replay = update_replay(make_trainer(overrides))
    seconds = [replay()[0] for _ in range(repeats - 1)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        seconds.append(replay()[0])
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                                max_name_column_width=50, max_shapes_column_width=60)
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)
    return {"seconds": seconds, "by_op": by_op, "by_shape": table}


# Process variants compared by `process_ab`: label -> (environment variables, PROCESS_SETUPS entry, overrides).
HUGE_PAGES = {"off (=0)": ({"THP_MEM_ALLOC_ENABLE": "0"}, "none", []),
              "on (=1)": ({"THP_MEM_ALLOC_ENABLE": "1"}, "none", [])}
# glibc's malloc returns freed memory above 128 KB-32 MB to the kernel (munmap, heap trimming), so every step's large
# tensors fault their pages in again, unless the trainer keeps it (`sdpo.precision.keep_freed_memory`).
MALLOC = {"glibc defaults (SDPO_KEEP_FREED_MEMORY=0)": ({"SDPO_KEEP_FREED_MEMORY": "0"}, "none", []),
          "freed memory kept (the trainer's default)": ({}, "none", [])}
# The trainer itself on transformers generate, so that the only engine in a process is the one its setup builds.
COLOCATION = {"no engine": ({}, "none", ["rollout=hf"]), "vLLM engine in-process": ({}, "engine", ["rollout=hf"]),
              "engine, memory policy undone": ({}, "engine, memory policy undone", ["rollout=hf"]),
              "memory binding alone": ({}, "memory binding alone", ["rollout=hf"])}


def process_ab(precision: str, args: argparse.Namespace, variants: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """`replay_times` in a fresh process per variant, the variants in turn for `rounds` rounds (a process-wide
    setting such as THP_MEM_ALLOC_ENABLE, read once by torch, or an engine's binding, can only be compared across
    processes); the updates pooled by variant."""
    out = {label: {key: [] for key in REPLAY_MEASURES} for label in variants}
    for _ in range(rounds):
        for label, (env, setup, overrides) in variants.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, __file__, "--one", f"{precision}:{f.name}", "--replay", "--setup", setup,
                                "--repeats", str(args.repeats), "--extra", *args.extra, *overrides],
                               env={**os.environ, **env}, check=True)
                for key, values in json.loads(Path(f.name).read_text()).items():
                    out[label][key] += values
    return out


def ab_report(title: str, layout: str, results: dict[str, dict[str, dict[str, list[float]]]], command: str) -> str:
    labels = list(next(iter(results.values())))
    lines = [f"# {title}", "", f"Machine: {machine.describe()}", "", f"Command: `{command}`", "",
             f"{layout} Per update, median (range) of the pooled updates, and each variant over the first:", "",
             "| precision | per update | " + " | ".join(labels) + " | " + " | ".join(f"{l} / {labels[0]}" for l in labels[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(labels) - 1)]
    for precision, runs in results.items():
        for key, label in REPLAY_MEASURES.items():
            base = statistics.median(runs[labels[0]][key])
            ratios = [statistics.median(runs[l][key]) / base if base else float("nan") for l in labels[1:]]
            lines.append(f"| {precision} | {label} | " + " | ".join(median_and_range(runs[l][key]) for l in labels)
                         + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join([*lines, ""])


def default_memory_policy() -> int:
    """Undo the strict NUMA MEMBIND that vLLM's CPU worker sets for the whole process (set_mempolicy(MPOL_DEFAULT));
    0 on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(238, 0, None, 0)  # x86-64 SYS_set_mempolicy, MPOL_DEFAULT


# ---------------------------------------------------------------------------------------------------------------
# the driver


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def report(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# One default training step, profiled",
        "",
        f"Machine: {machine.describe()}",
        "",
        f"Command: `{command}`",
        "",
        "Workload: the default run (configs/experiment/cpu.yaml: SmolLM2-135M-Instruct, 8 questions x 4 rollouts, at most "
        "48 new tokens, lambda = 0.9 hybrid with the EMA teacher, vLLM engine in-process, one optimizer step of 4 "
        f"micro-batches of 8), no evaluation; median of {args.steps} steps after one warm-up step. Each precision "
        f"ran in its own process. Overrides on top: {' '.join(args.extra) or 'none'}"
        f"{'; every rollout forced to rollout.max_new_tokens' if args.force_length else ''}.",
        "",
        "## Per stage and inside the update (seconds per step, median)",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    rows = {name: r["steps"] for name, r in results.items()}
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(f"{median(rows[n], f'time/{stage}'):.3f}" for n in results) + " |")
    for part in UPDATE_PARTS:
        lines.append(f"| update: {part} | " + " | ".join(f"{median(rows[n], f'time/{part}'):.3f}" for n in results) + " |")
    lines.append("| **step (wall)** | " + " | ".join(f"**{median(rows[n], 'wall'):.2f}**" for n in results) + " |")
    lines.append("| response tokens / step | " + " | ".join(f"{median(rows[n], 'tokens/response'):.0f}" for n in results) + " |")
    lines.append("| rows with a teacher signal / 32 | " + " | ".join(f"{median(rows[n], 'distill_rows'):.0f}" for n in results) + " |")
    lines += ["", "## The update's model FLOPs utilisation", "",
              "Model FLOPs: the matmuls of the student forward (x3 with its backward) and of the teacher forward (x1), "
              "each with the output head on the response positions, counted on the real tokens (a prompt that its "
              "rows share, trainer.learner.planner.share_prompts, counts once: the work the forward needs); \"padded\" counts "
              "what the padded micro-batches compute. The compute time is student forward + teacher forward + head "
              "and terms + backward; MFU is achieved FLOP/s over the measured matmul rate in the model's shapes "
              "(FLOP-weighted over the layer shapes and the head, micro-batch of 8 x 96 rows), measured for 1.5 s per "
              "shape after the run and for 0.3 s right after each step (the per-step MFU); the last rows measure the "
              "same rates at M = the median number of token rows the update's forwards run (padded), the update's own "
              "shapes.", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]

    def flops(rows_, kind):
        return [3 * r[f"flops/{kind}_student"] + r[f"flops/{kind}_teacher"] for r in rows_]

    def compute_s(r):
        return sum(r.get(f"time/{p}", 0.0) for p in ("student_forward", "teacher_forward", "head_and_terms", "backward"))

    def update_s(r):
        return sum(r.get(f"time/{p}", 0.0) for p in ("update", "teacher_forward", *UPDATE_PARTS))

    def achieved(n, seconds, per_step_peak=False):
        """Median over the steps of model GFLOP/s in `seconds(step)` (divided by the step's own matmul rate)."""
        return statistics.median(f / seconds(r) / 1e9 / (r["step_peak"] if per_step_peak else 1.0)
                                 for f, r in zip(flops(rows[n], "real"), rows[n]))

    peak = {n: results[n]["peak"]["weighted"] for n in results}
    table = {
        "model GFLOP / step (real tokens)": lambda n: statistics.median(flops(rows[n], "real")) / 1e9,
        "GFLOP / step as padded": lambda n: statistics.median(flops(rows[n], "padded")) / 1e9,
        "compute time (s)": lambda n: median_of(rows[n], compute_s),
        "whole update incl. teacher forward (s)": lambda n: median_of(rows[n], update_s),
        "achieved GFLOP/s (compute time)": lambda n: achieved(n, compute_s),
        "measured matmul peak, GFLOP/s": lambda n: peak[n],
        "**MFU, compute time**": lambda n: achieved(n, compute_s) / peak[n],
        "MFU, whole update": lambda n: achieved(n, update_s) / peak[n],
        "matmul rate right after each step, GFLOP/s (median)": lambda n: median(rows[n], "step_peak"),
        "MFU, each step against the rate right after it (median)": lambda n: achieved(n, compute_s, per_step_peak=True),
        "forward size M (median token rows per forward)": lambda n: results[n]["own_rows"],
        "measured matmul rate at that M, GFLOP/s": lambda n: results[n]["own_peak"]["weighted"],
        "MFU at the update's own M, compute time": lambda n: achieved(n, compute_s) / results[n]["own_peak"]["weighted"],
    }
    for label, fn in table.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(label, fn(n)) for n in results) + " |")
    lines += ["", "## The generate stage against its floor", "",
              "A decode step runs every sequence of the batch through every weight of the model: the floor is the "
              "model's matmuls alone with the batch's rows (each layer its own weight tensor, streamed from memory as "
              "in decoding), in the engine's dtype, times the decode steps of a step (its longest response). "
              "Attention, norms, sampling and the engine's own work come on top.", "",
              "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    generate = {
        "engine dtype": lambda n: results[n]["engine_dtype"].removeprefix("torch."),
        "decode steps per step (longest response)": lambda n: f"{median(rows[n], 'decode_steps'):.0f}",
        "generate, s per decode step": lambda n: f"{median_of(rows[n], _per_decode_step):.3f}",
        "one decode step's matmuls alone, s": lambda n: f"{results[n]['decode']['seconds']:.3f}",
        "  as weight GB/s read / GFLOP/s": lambda n: f"{results[n]['decode']['GB/s']:.1f} / {results[n]['decode']['GFLOP/s']:.0f}",
        "**generate / its matmul floor**": lambda n: f"**{median_of(rows[n], _per_decode_step) / results[n]['decode']['seconds']:.2f}**",
    }
    for label, fn in generate.items():
        lines.append(f"| {label} | " + " | ".join(fn(n) for n in results) + " |")
    lines += ["", "Matmul rates in the model's shapes (GFLOP/s, [768, K] @ [K, N], torch threads as in the run):", "",
              "| shape | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for shape in next(iter(results.values()))["peak"]:
        lines.append(f"| {shape} | " + " | ".join(f"{results[n]['peak'][shape]:.0f}" for n in results) + " |")
    lines.append("")
    lines.append("torch threads: " + ", ".join(f"{n} {r['threads']}" for n, r in results.items()))
    return "\n".join(lines) + "\n"


def _per_decode_step(r: dict) -> float:
    return r["time/generate"] / r["decode_steps"]


def median_of(rows, fn):
    return statistics.median(fn(r) for r in rows)


def _fmt(label: str, value: float) -> str:
    return f"{value:.0%}" if "MFU" in label else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def median_and_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument("--results", default=None, help="markdown file to write")
    parser.add_argument("--colocation", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes without/with an in-process vLLM engine (and its memory "
                             "binding undone, or that binding alone), in turn, ROUNDS times")
    parser.add_argument("--shared-prompts", action="store_true", help="time the update with trainer.learner.planner.share_prompts off and each thing it shares added in turn")
    parser.add_argument("--huge-pages", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes without/with THP_MEM_ALLOC_ENABLE, alternating, ROUNDS times")
    parser.add_argument("--malloc", type=int, default=0, metavar="ROUNDS",
                        help="time the update in processes with glibc's malloc defaults and with the trainer keeping "
                             "freed memory (sdpo.precision.keep_freed_memory), alternating, ROUNDS times")
    parser.add_argument("--cast-once", action="store_true",
                        help="the update with trainer.learner.cast_weights_once off, on for the policy, on for the teacher "
                             "copy too, in turn --repeats rounds")
    parser.add_argument("--attention", action="store_true",
                        help="the update with attn_implementation sdpa and sdpa_cpu_float32, in turn --repeats rounds")
    parser.add_argument("--op-profile", action="store_true",
                        help="replay one update --repeats times, the last under torch.profiler: top operators")
    parser.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)  # internal: replay_times
    parser.add_argument("--setup", default="none", choices=list(PROCESS_SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force-length", action="store_true", help="every rollout runs to rollout.max_new_tokens")
    parser.add_argument("--json", default=None, help="also write the raw per-step rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one precision, JSON to this path
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/profile_step.py", *sys.argv[1:]])
    if args.one:
        precision = args.one.split(":", 1)[0]
        overrides = [PRECISIONS[precision], *args.extra]
        if args.force_length:
            force_length()
        result = (replay_times(overrides, args.repeats, args.setup) if args.replay else
                  op_profile(overrides, args.repeats) if args.op_profile else
                  in_process_ab(overrides, args.repeats, CAST_ONCE) if args.cast_once else
                  in_process_ab(overrides, args.repeats, ATTENTION) if args.attention else
                  shared_prompts_ab(overrides, args.repeats) if args.shared_prompts else profile_one(overrides, args.steps))
        Path(args.one.split(":", 1)[1]).write_text(json.dumps(result))
        return
    results = {}
    for precision in args.precisions:
        if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            print("bf16 skipped: not native on this CPU")
            continue
        process_modes = [(HUGE_PAGES, args.huge_pages), (COLOCATION, args.colocation), (MALLOC, args.malloc)]
        variants, rounds = next(((v, r) for v, r in process_modes if r), (None, 0))
        if rounds:
            results[precision] = process_ab(precision, args, variants, rounds)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--one", f"{precision}:{f.name}", "--steps", str(args.steps),
                            "--repeats", str(args.repeats), *(["--shared-prompts"] if args.shared_prompts else []),
                            *(["--op-profile"] if args.op_profile else []),
                            *(["--cast-once"] if args.cast_once else []),
                            *(["--attention"] if args.attention else []),
                            *(["--force-length"] if args.force_length else []),
                            "--extra", *args.extra], check=True)
            results[precision] = json.loads(Path(f.name).read_text())
    def in_processes(rounds: int, what: str) -> str:
        return (f"One batch of the default workload per process, replayed {args.repeats} times (weights, optimizer and "
                f"EMA state restored before each update; the batch's first update is a warm-up); {rounds} rounds of one "
                f"process per variant, in turn: {what}.")

    def in_one_process(what: str) -> str:
        return (f"One batch of the default workload, one process: its update replayed with {what}, in turn, "
                f"{args.repeats} rounds (weights, optimizer and EMA state restored before each update; one warm-up "
                f"update first).")

    if args.huge_pages:
        text = ab_report("The update with and without huge pages for large CPU tensors (THP_MEM_ALLOC_ENABLE)",
                         in_processes(args.huge_pages, "THP_MEM_ALLOC_ENABLE=0, then =1"), results, command)
    elif args.colocation:
        text = ab_report("The update with and without an in-process vLLM engine", in_processes(
            args.colocation, "a transformers-engine trainer alone; with a vLLM engine built in the process; the same "
            "with the engine's strict NUMA memory binding undone (set_mempolicy(MPOL_DEFAULT)); that binding alone, "
            "no engine"), results, command)
    elif args.malloc:
        text = ab_report("The update with glibc's malloc returning freed memory, or keeping it", in_processes(
            args.malloc, "glibc's defaults (SDPO_KEEP_FREED_MEMORY=0); the trainer's mallopt (no heap trimming below "
            "2 GB of free top, no mmap)"), results, command)
    elif args.cast_once:
        text = ab_report("The update with autocast's weight casts once per forward and once per optimizer step",
                         in_one_process("one autocast region per forward, one per optimizer step caching the "
                                        "policy's casts (trainer.learner.cast_weights_once), and the same caching the "
                                        "teacher copy's too (Teacher.cacheable_casts)"), results, command)
    elif args.attention:
        text = ab_report("The update's attention: torch's bf16 CPU kernel, or the same SDPA in float32",
                         in_one_process("the policy's and the teacher's attn_implementation sdpa and sdpa_cpu_float32 "
                                        "(sdpo/attention.py)"), results, command)
    elif args.op_profile:
        text = "\n\n".join(f"## {n}: update {', '.join(f'{x:.2f}' for x in r['seconds'])} s (the last profiled)\n\n"
                           f"```\n{r['by_op']}\n{r['by_shape']}\n```" for n, r in results.items())
        text = f"# The update's operators (torch.profiler)\n\nMachine: {machine.describe()}\n\nCommand: `{command}`\n\n{text}\n"
    elif args.shared_prompts:
        text = "\n\n".join(shared_prompts_report(r, command) + f"\n(precision: {n})" for n, r in results.items())
    else:
        text = report(results, args, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
