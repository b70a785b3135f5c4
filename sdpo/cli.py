"""The Hydra entry point the scripts share: `run(main)` checks the command line, composes `configs/`, routes the
log messages (sdpo/console.py) and calls `main(config)` with the typed config.

    def main(config: SDPOConfig) -> None: ...

    if __name__ == "__main__":
        run(main)

A script imports `_prelude` (scripts/_prelude.py) before anything from `sdpo`, so that it runs this checkout's code.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from pathlib import Path
import sys

import hydra
from omegaconf import DictConfig

from sdpo.config import ConfigError, SDPOConfig
from sdpo.console import setup_logging
from sdpo.hydra_config import CONFIG_DIR, check_overrides, register_configs, to_config


def run(main: Callable[[SDPOConfig], None]) -> None:
    """Reject unknown group options and keys with a message that names the valid ones, then run `main` under Hydra."""
    from hydra._internal.utils import get_args_parser  # Hydra's own command line: flags apart from overrides

    register_configs()
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        check_overrides(args.overrides, args.config_name or "config")
    except ConfigError as exc:
        sys.exit(f"error: {exc}")

    @functools.wraps(main)  # Hydra names the job (and its log file) after the function it unwraps to: the script's
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        config = to_config(cfg)
        hydra_config = HydraConfig.get()
        setup_logging(Path(hydra_config.runtime.output_dir) / f"{hydra_config.job.name}.log", config.logging.verbose)
        main(config)

    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(task)()
