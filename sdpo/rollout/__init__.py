"""Rollout engines behind one interface, each registered in `ENGINES` by name: `hf` (transformers generate),
`vllm` (colocated vLLM), `vllm_server` (a vLLM server in its own process), or one registered from outside.

The engines' modules import vLLM lazily (at an engine's construction), so all three are registered on import.
"""

from __future__ import annotations

from typing import Any

from sdpo.rollout.base import (
    ENGINES,
    Completion,
    EngineSource,
    RolloutEngine,
    SamplingSettings,
    SyncStats,
    TeacherScores,
)
from sdpo.rollout.hf import HFEngine
import sdpo.rollout.server  # noqa: F401  (registers vllm_server)
import sdpo.rollout.vllm  # noqa: F401  (registers vllm)


def build_engine(config: Any, source: EngineSource) -> RolloutEngine:
    """The engine rollout.engine (`config`: rollout.*) names, built from `source` as that engine needs."""
    return ENGINES.get(config.engine).build(config, source)


__all__ = ["ENGINES", "Completion", "EngineSource", "HFEngine", "RolloutEngine", "SamplingSettings", "SyncStats",
           "TeacherScores", "build_engine"]
