"""Code environments: programs from model responses run against tests in a sandbox (docs/algorithm.md §6).

- `codecontests`: stdin/stdout Codeforces problems (the local stand-in for LiveCodeBench v6);
- `leetcode`: LeetCodeDataset, `Solution().method` asserts;
- `humaneval`, `mbpp`, `mbppplus`: the usual function-level RLVR / eval sets;
- `livecodebench`: LiveCodeBench's own release format (not shipped locally).

Shared pieces: `extract` (the program in a response), `sandbox` (isolation and limits), `execution` (tests and
verdicts), `feedback` (LeetCode-style text), `env` (splits, prompt, reward).
"""

from sdpo.envs.code import codecontests, humaneval, leetcode, livecodebench, mbpp  # noqa: F401  (registration)
from sdpo.envs.code.env import CodeEnv, CodeEnvConfig, CodeTask
from sdpo.envs.code.extract import extract_program
from sdpo.envs.code.sandbox import RunResult, Sandbox, SandboxLimits, SandboxUnavailable

__all__ = [
    "CodeEnv",
    "CodeEnvConfig",
    "CodeTask",
    "RunResult",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailable",
    "extract_program",
]
