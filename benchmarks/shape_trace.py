"""The shape of one update, followed as data (benchmarks/results/shape_pass.md): which sdpo modules the generation
batch passes through inside `Learner.update`, how often it returns to a module it had left, how often it climbs back
up to a module above the one it is in, and how often the learner's micro-batch loop body calls the teacher.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/shape_trace.py

How it counts (`sys.setprofile` over one `Learner.update` of the tiny model, default tiny-test settings):
- a *stay* is a maximal run of calls into functions of one sdpo module that receive the batch (a `RolloutBatch`, a
  `MicroBatch` or a `Block` among their arguments, `self` included); a *visit* of a module is one stay in it;
- a *return* is a stay in a module the batch had already left before;
- a *climb* is a stay entered by a call from a module that sdpo's import graph places below it (the callee imports
  the caller, directly or not): the data going back up the layering through a callback;
- the same counts without the batch's own methods (calls into `sdpo.batch`: selecting, ordering, laying out);
- *teacher calls per micro-batch loop body*: calls from `sdpo.learner` into methods of the teacher object
  (`Teacher` / `NoTeacher`) between two `Learner.micro_batch_step` entries (the last one also holds the optimizer
  step's `update`), and apart from them the calls into methods of the records it returns (`TeacherTargets`,
  `TeacherFeatures`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
import sys
import tempfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import TINY_OVERRIDES  # noqa: E402
from test_imports import import_graph  # noqa: E402

from sdpo import SDPOTrainer, load_config  # noqa: E402
from sdpo.batch import RolloutBatch  # noqa: E402


def carried_types() -> tuple[type, ...]:
    types: list[type] = [RolloutBatch]
    try:
        from sdpo.plan import Block, MicroBatch

        types += [Block, MicroBatch]
    except ImportError:  # before the planner existed
        from sdpo.learner import MicroBatch

        types.append(MicroBatch)
    return tuple(types)


def below(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    """module -> every module it imports, directly or not."""
    out: dict[str, set[str]] = {}

    def reach(module: str) -> set[str]:
        if module not in out:
            out[module] = set()
            for nxt in graph.get(module, {}):
                out[module] |= {nxt} | reach(nxt)
        return out[module]

    for module in graph:
        reach(module)
    return out


def main() -> None:
    carried = carried_types()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp}", "algorithm=sdpo_grpo",
                              "trainer.micro_batch_size=4"])
        trainer = SDPOTrainer(config)
        batch, problems, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
        context = trainer.teacher_context(batch, problems)
        batch = context[0] if isinstance(context, tuple) else batch
        from sdpo.rollout.episodes import episode_advantages

        acfg = config.algorithm
        advantages = episode_advantages(batch, acfg.norm_adv_by_std, acfg.advantage_estimator)
        batch = batch.with_advantages(advantages) if hasattr(batch, "with_advantages") else batch
        if not hasattr(batch, "with_advantages"):
            batch.advantages_B = advantages

        graph = import_graph(ROOT / "sdpo", "sdpo")
        lower = below(graph)
        calls: list[tuple[str, str]] = []  # (caller module, callee module) of calls that carry the batch
        teacher_calls: list[int] = []
        record_calls: list[int] = []

        def profile(frame, event, arg):
            if event != "call":
                return
            module = frame.f_globals.get("__name__", "")
            if not module.startswith("sdpo"):
                return
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
            name = frame.f_code.co_name
            if module == "sdpo.learner" and name == "micro_batch_step":
                teacher_calls.append(0)
                record_calls.append(0)
            owner = frame.f_code.co_qualname.split(".")[0]
            if teacher_calls and caller == "sdpo.learner" and module.startswith("sdpo.teacher"):
                if owner in ("Teacher", "NoTeacher"):
                    teacher_calls[-1] += 1
                elif owner in ("TeacherTargets", "TeacherFeatures"):
                    record_calls[-1] += 1
            code = frame.f_code
            args = [frame.f_locals.get(v) for v in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
            if any(isinstance(a, carried) for a in args):
                calls.append((caller, module))

        sys.setprofile(profile)
        try:
            trainer.learner.update(batch, trainer.step)
        finally:
            sys.setprofile(None)

    for title, kept in (("every call", calls), ("without the batch's own methods",
                                                  [(c, m) for c, m in calls if m != "sdpo.batch"])):
        stays: list[str] = []
        climbs = 0
        for caller, module in kept:
            if stays and stays[-1] == module:
                continue
            if module in graph and caller in lower.get(module, set()):
                climbs += 1
            stays.append(module)
        visits = Counter(stays)
        returns = sum(1 for i, m in enumerate(stays) if m in stays[:i])
        print(f"-- {title}")
        print("path:", " -> ".join(m.removeprefix("sdpo.") for m in stays))
        print(f"stays: {len(stays)} in {len(visits)} modules; returns to a module left before: {returns}; climbs: {climbs}")
        print("visits:", ", ".join(f"{m.removeprefix('sdpo.')} {n}" for m, n in visits.most_common()))
    print(f"teacher calls per micro-batch loop body: {teacher_calls} (calls into its records: {record_calls})")


if __name__ == "__main__":
    main()
