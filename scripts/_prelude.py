"""The first import of every script: this checkout's `sdpo` ahead of any installed copy, no hub downloads, and a
quiet stop on Ctrl-C / SIGTERM while the libraries import (sdpo.cli.run takes the signals over from there)."""

import os
import signal
import sys
from pathlib import Path


def _stop_while_importing(signum, frame):
    sys.stderr.write(f"stopped at once by {signal.Signals(signum).name} while starting: nothing was written\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # nothing to clean up yet: no run directory, no engine, no worker


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _stop_while_importing)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
