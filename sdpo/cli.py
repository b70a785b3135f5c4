"""The Hydra entry point the scripts share: `run(main)` checks the command line, composes `configs/`, routes the
log messages (sdpo/console.py) and calls `main(config)` with the typed config.

    def main(config: SDPOConfig) -> None: ...

    if __name__ == "__main__":
        run(main)                                     # scripts/train.py: every config key counts
        run(main, uses=EVAL_USES, run_dir=...)        # the other scripts: the keys they read, their own run directory

A script imports `_prelude` (scripts/_prelude.py) before anything from `sdpo`, so that it runs this checkout's code.

A command-line override of a key that the script never reads (`scripts/eval.py trainer.total_steps=5`) is an error
naming the key and the script: it would otherwise be accepted and do nothing. Group choices (`model=tiny`,
`experiment=...`) and Hydra's own settings (`hydra.*`, `--cfg job`) are never refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import functools
import logging
import os
from pathlib import Path
import signal
import sys
from typing import TextIO

import hydra
from omegaconf import DictConfig

from sdpo.config import ConfigError, SDPOConfig
from sdpo.console import log_path, setup_logging
from sdpo.interrupt import SIGNALS, raise_at_once, signal_name
from sdpo.hydra_config import CONFIG_DIR, check_overrides, register_configs, to_config

# What each script reads of the config: sections or dotted keys (a key counts with everything below it), less the
# `ignores` under them. scripts/train.py reads everything.
EVAL_USES = ("model", "env", "rollout", "eval", "logging.verbose", "logging.progress_bar", "trainer.seed",
             "trainer.output_dir", "trainer.resume", "algorithm.reprompt.success_reward_threshold")
# eval.every, eval.at_start: when the trainer evaluates, not how.
EVAL_IGNORES = ("eval.every", "eval.at_start")
# Test-time runs a fresh trainer per question (sdpo/test_time.py): no checkpoints, no resume, no wandb, no held-out
# evaluation, test_time.budget instead of trainer.total_steps.
TEST_TIME_IGNORES = ("eval", "trainer.total_steps", "trainer.save_every", "trainer.keep_last", "trainer.resume",
                     "trainer.keep_best", "trainer.collapse_drop", "logging.wandb", "logging.project",
                     "logging.run_name", "logging.tensorboard", "logging.samples_every", "logging.num_samples")
# The probe builds the trainer (its env, policy, engine, and trainer.resume's weights) and samples one step's
# questions; it takes no optimizer step and saves nothing. trainer.mini_batch_questions: a smaller
# trainer.questions_per_step must still divide by it.
PROBE_USES = ("model", "env", "rollout", "algorithm.reprompt", "logging.verbose", "logging.progress_bar",
              "trainer.seed", "trainer.questions_per_step", "trainer.mini_batch_questions", "trainer.output_dir",
              "trainer.resume")

# The default run directory of a script other than train.py, as configs/config.yaml's trainer.output_dir.
TIMESTAMP = "${now:%Y%m%d-%H%M%S}"


def script_name() -> str:
    """How the command line named the running script: `scripts/eval.py`."""
    path = Path(sys.argv[0])
    return f"{path.parent.name}/{path.name}" if path.parent.name == "scripts" else path.name


def override_key(override: str) -> str | None:
    """The config key a command-line override sets (`trainer.total_steps=5`, `+a.b=1`, `~a.b`), or None for a group
    choice (`model=tiny`, `trainer=paper`) and Hydra's own settings (`hydra.run.dir=...`)."""
    key = override.split("=", 1)[0].lstrip("+~")
    if "." not in key or "/" in key or key.startswith("hydra.") or key == "hydra":
        return None
    return key


def _under(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def is_used(key: str, uses: Sequence[str] | None, ignores: Sequence[str] = ()) -> bool:
    """Whether a script that reads `uses` (None: everything) less `ignores` reads `key`. A section override
    (`trainer.keep_best={...}`) counts when the script reads any key under it."""
    if any(_under(key, ignored) for ignored in ignores):
        return False
    return uses is None or any(_under(key, used) or _under(used, key) for used in uses)


def describe_uses(uses: Sequence[str] | None, ignores: Sequence[str] = ()) -> str:
    """`model.*, env.*, eval.* (not eval.every), trainer.seed`: what a script reads, for the error message."""
    star = lambda key: key if "." in key else f"{key}.*"  # noqa: E731
    if uses is None:
        return "every key" + (f" except {', '.join(map(star, ignores))}" if ignores else "")
    return ", ".join(map(star, uses)) + (f" (not {', '.join(map(star, ignores))})" if ignores else "")


def check_used(overrides: Sequence[str], script: str, uses: Sequence[str] | None,
               ignores: Sequence[str] = ()) -> None:
    """Refuse a command-line override of a key that `script` does not read: it would do nothing."""
    for override in overrides:
        key = override_key(override)
        if key is not None and not is_used(key, uses, ignores):
            raise ConfigError(f"{script} does not use {key}: it reads {describe_uses(uses, ignores)}")


def multirun_argv(argv: Sequence[str]) -> list[str]:
    """Hydra's multirun (`-m`): each job's run directory is <sweep dir>/<its overrides> (hydra.sweep.subdir, e.g.
    `algorithm=grpo,trainer.seed=1`), and trainer.output_dir is that directory, so that its log, .hydra/,
    config.yaml, metrics and checkpoints lie together. The sweep directory is the command line's trainer.output_dir,
    else runs/multirun-<time>."""
    base = f"runs/multirun-{TIMESTAMP}"
    rest = []
    for arg in argv:
        if override_key(arg) == "trainer.output_dir":
            base = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return [*rest, f"hydra.sweep.dir={base}", "trainer.output_dir=${hydra:runtime.output_dir}"]


def run(main: Callable[[SDPOConfig], None], uses: Sequence[str] | None = None, ignores: Sequence[str] = (),
        run_dir: str | None = None) -> None:
    """Reject unknown group options and keys with a message that names the valid ones, and keys the script does
    not read (`uses`: the sections or keys it does read, None: all; `ignores`: keys under those it does not), then
    run `main` under Hydra.

    `run_dir`: the script's default run directory (trainer.output_dir, and Hydra's), instead of configs/config.yaml's
    runs/<algorithm>-<env>-<time>; may interpolate `${env.name}` and `${now:...}`. An explicit trainer.output_dir wins.
    """
    from hydra._internal.utils import get_args_parser  # Hydra's own command line: flags apart from overrides

    register_configs()
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        check_overrides(args.overrides, args.config_name or "config")
        check_used(args.overrides, script_name(), uses, ignores)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    if run_dir is not None and not any(override_key(o) == "trainer.output_dir" for o in args.overrides):
        # Hydra reads sys.argv when it composes; first, where its parser takes it for an override whatever follows.
        sys.argv.insert(1, f"trainer.output_dir={run_dir}")
    if args.multirun:
        sys.argv[1:] = multirun_argv(sys.argv[1:])

    @functools.wraps(main)  # Hydra names the job (and its log file) after the function it unwraps to: the script's
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            config = to_config(cfg)
        except ConfigError as exc:  # a value out of range: the message alone, as for unknown keys
            sys.exit(f"error: {exc}")
        hydra_config = HydraConfig.get()
        setup_logging(Path(hydra_config.runtime.output_dir) / f"{hydra_config.job.name}.log", config.logging.verbose)
        try:
            main(config)
            for signum in SIGNALS:  # done: a signal while the interpreter shuts down changes nothing
                signal.signal(signum, signal.SIG_IGN)
        except (Exception, KeyboardInterrupt) as exc:  # every failure, a signal: one line (sdpo/errors.py)
            for signum in SIGNALS:  # stopping already: a further signal must not cut the report short
                signal.signal(signum, signal.SIG_IGN)
            from sdpo.errors import interrupt_behind, report

            code = report(exc, config.trainer.output_dir, log_path())
            if interrupt_behind(exc) is not None:
                # Stopped at once: the signal may have cut a library's import or native call short, and the
                # interpreter's own shutdown can then crash on it. What matters is written (checkpoints, logs,
                # flushed line by line); the engine is closed (scripts' `finally`), workers and a started server
                # follow their parent.
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            sys.exit(code)

    for signum in SIGNALS:  # SIGTERM too unwinds (clean-up runs); the training loop defers both (sdpo/interrupt.py)
        signal.signal(signum, raise_at_once)
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(task)()
    except KeyboardInterrupt as exc:  # while Hydra composed the config, before the script's own work
        for ignored in SIGNALS:
            signal.signal(ignored, signal.SIG_IGN)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"stopped at once by {signal_name(signum)} while starting: nothing was written", file=sys.stderr)
        sys.exit(128 + signum)


@contextlib.contextmanager
def library_output_to_log(config: SDPOConfig) -> Iterator[tuple[Path | None, TextIO]]:
    """Inside the block, what libraries print (vLLM's and transformers' loading bars, NUMA and C++ warnings) goes
    to the run's log file (sdpo/console.py's `native_output_to`; not under `logging.verbose=true`). Yields the log
    file and a stream that still reaches the terminal, for a progress bar.

    As scripts/train.py does around building the trainer; the other scripts keep the whole of their work inside."""
    from sdpo import console

    log_file = console.log_path()
    quiet = not config.logging.verbose and log_file is not None
    if not quiet:
        yield log_file, sys.stderr
        return
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)  # a copy, still the terminal inside
    try:
        with console.native_output_to(log_file):
            yield log_file, terminal
    finally:
        terminal.close()
