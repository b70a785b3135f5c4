"""`rollout.*`: how rollouts are sampled: by transformers, a colocated vLLM engine or a vLLM server."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpo.config.checks import ConfigError, check_choice, check_range


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = 0.5
    # Free the KV cache (level 1) or also the weights (level 2) during the update; 0 disables sleep mode.
    sleep_level: int = 0
    # false: vLLM's torch.compile (and CUDA graphs on a GPU; vLLM's own default). On the 2-core CPU a training step
    # generated the same tokens in 0.83-0.92x the eager time, for about 90 s more start-up once per run
    # (benchmarks/results/vs_trl_cpu.md): worth it past 100-200 steps. The 10-step CPU preset keeps eager mode.
    enforce_eager: bool = False
    # Weights are streamed to the engine in buckets of at most this many MiB.
    sync_bucket_mb: int = 256
    # None: max_prompt_len + max_new_tokens (+ the reprompt length when the engine scores the teacher).
    max_model_len: int | None = None
    # "auto": the trainer's compute dtype (model.autocast_dtype, resolved from the machine), so that the sampler and
    # the trainer run one precision; or an explicit bfloat16 / float16 / float32.
    dtype: str = "auto"
    seed: int = 0
    # KV-cache size in GiB. None: gpu_memory_utilization sizes it on a GPU; on vLLM's CPU backend (where that
    # fraction is of host memory and start-up fails when other processes hold it) the engine uses 1 GiB.
    kv_cache_gb: float | None = None
    # Most log-probs per position the engine may return (top-k of engine teacher scoring; vLLM's default is 20).
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        check_range("rollout.vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0)
        check_choice("rollout.vllm.sleep_level", self.sleep_level, [0, 1, 2])
        check_range("rollout.vllm.sync_bucket_mb", self.sync_bucket_mb, 1)
        check_range("rollout.vllm.max_logprobs", self.max_logprobs, 0)
        check_choice("rollout.vllm.dtype", self.dtype, ["auto", "bfloat16", "float16", "float32"])
        if self.kv_cache_gb is not None:
            check_range("rollout.vllm.kv_cache_gb", self.kv_cache_gb, 0.01)


@dataclass
class ServerConfig:
    """rollout=vllm_server: a vLLM OpenAI-compatible server in its own process (sdpo/rollout/server.py)."""

    # The server's address, e.g. http://gpu-node-2:8000. None: the engine starts one on this machine
    # (scripts/serve.py's command line, from rollout.vllm.* and the policy's checkpoint) and stops it at the end.
    url: str | None = None
    # The address the server's workers connect to for the weight-sync process group: this trainer's host as the
    # server sees it (127.0.0.1 when both run on one machine), and its port (0: a free one).
    sync_host: str = "127.0.0.1"
    sync_port: int = 0
    # Process-group backend of the weight sync: gloo (through host memory), nccl (GPU to GPU); auto: nccl when this
    # trainer has CUDA (the server's workers then need it too), else gloo. Trainer and server on the same GPU: gloo
    # (NCCL refuses two ranks on one device).
    sync_backend: str = "auto"
    # Seconds one request (a generation, a weight sync) may take before the run fails naming the server.
    request_timeout_s: float = 1800.0
    # Seconds a server the engine started may take to come up (vLLM loads, profiles and compiles first).
    startup_timeout_s: float = 600.0
    # Requests in flight at once (one per prompt; the server batches them).
    max_concurrency: int = 256
    # A server the engine starts: extra `vllm serve` arguments (e.g. ["--tensor-parallel-size", "2"]) and the
    # devices it may use (CUDA_VISIBLE_DEVICES; None: inherited).
    extra_args: list[str] = field(default_factory=list)
    devices: str | None = None

    def __post_init__(self) -> None:
        check_choice("rollout.server.sync_backend", self.sync_backend, ["auto", "gloo", "nccl"])
        check_range("rollout.server.sync_port", self.sync_port, 0, 65535)
        check_range("rollout.server.request_timeout_s", self.request_timeout_s, 1.0)
        check_range("rollout.server.startup_timeout_s", self.startup_timeout_s, 1.0)
        check_range("rollout.server.max_concurrency", self.max_concurrency, 1)


@dataclass
class RolloutConfig:
    engine: str = "hf"
    num_generations: int = 8  # G rollouts per question
    max_prompt_len: int = 2048
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    stop: list[str] = field(default_factory=list)
    # Model turns per episode (docs/multi_turn.md): 1 is single-turn; more lets the environment answer each failed
    # turn (its `follow_up`) and the model try again, max_new_tokens per turn, the conversation evicted
    # first-in-first-out (question kept) to fit max_prompt_len.
    max_turns: int = 1
    # transformers engine: sequences per generate() call.
    hf_batch_size: int = 64
    # Asynchronous training (docs/rollout.md): the batch of step t + k is generated while step t updates, by the
    # weights of step t (k optimizer steps old when it is used; truncated IS against the sampler's log-probs corrects
    # for it). 0: generate, then update (the synchronous loop). Needs rollout=vllm_server: the server generates in
    # its own process while this one trains.
    async_steps: int = 0
    # vLLM's engine settings, for the colocated engine and for a server that rollout=vllm_server starts.
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        from sdpo.rollout import ENGINES  # the engines' modules import nothing of the config

        check_choice("rollout.engine", self.engine, ENGINES)
        check_range("rollout.num_generations", self.num_generations, 1)
        check_range("rollout.temperature", self.temperature, 1e-6)
        check_range("rollout.top_p", self.top_p, 1e-6, 1.0)
        check_range("rollout.max_new_tokens", self.max_new_tokens, 1)
        check_range("rollout.max_turns", self.max_turns, 1)
        check_range("rollout.async_steps", self.async_steps, 0)
        if self.async_steps and not ENGINES.get(self.engine).out_of_process:
            able = " or ".join(f"rollout={name}" for name in ENGINES.in_order() if ENGINES.get(name).out_of_process)
            raise ConfigError(
                f"rollout.async_steps={self.async_steps} needs {able} (generation in the engine's own process "
                f"while this one trains); rollout={self.engine} generates in the trainer's process: use "
                "rollout.async_steps=0"
            )
