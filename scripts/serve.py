"""Start the vLLM server that a run with rollout=vllm_server generates with (sdpo/rollout/server.py).

    python scripts/serve.py model=smollm2-135m-instruct rollout.server.url=http://0.0.0.0:8000
    python scripts/serve.py rollout.server.url=http://0.0.0.0:8000 "rollout.server.extra_args=[--tensor-parallel-size,2]" \
        rollout.server.devices=2,3

then, on the trainer's machine (the address the server's workers can reach the trainer at: rollout.server.sync_host):

    python scripts/train.py rollout=vllm_server rollout.server.url=http://<server>:8000 rollout.server.sync_host=<trainer>

It runs vLLM's OpenAI-compatible server with what the engine needs: the token-in/token-out endpoint
(--enable-scale-out), processed log-probs, the weight-sync worker extension and the dev endpoints
(VLLM_SERVER_DEV_MODE=1), the model and engine settings from the same config the run uses (model.*, rollout.vllm.*;
the context window as the trainer sizes it). It prints the command, then becomes the server (Ctrl-C stops it).
The address it listens on is rollout.server.url's (default http://127.0.0.1:8000). The dev endpoints let whoever
reaches the port run methods on the server's workers: listen on a trusted network only.
"""

from __future__ import annotations

import _prelude  # noqa: F401 - this checkout's sdpo first; no hub downloads

import os
import shlex
import sys
from urllib.parse import urlparse

from sdpo.cli import run
from sdpo.config import SDPOConfig

DEFAULT_URL = "http://127.0.0.1:8000"


def main(config: SDPOConfig) -> None:
    from sdpo.models import resolve_checkpoint
    from sdpo.precision import resolve_precision
    from sdpo.rollout.server import server_command

    resolve_precision(config)  # rollout.vllm.dtype=auto -> what the trainer computes in on this kind of machine
    rollout, algorithm = config.rollout, config.algorithm
    address = urlparse(rollout.server.url or DEFAULT_URL)
    context = rollout.max_prompt_len + rollout.max_new_tokens
    if algorithm.uses_teacher and algorithm.teacher.scorer == "engine":  # the server also reads reprompt + response
        context = max(context, algorithm.reprompt.max_reprompt_len + rollout.max_new_tokens)
    command, env = server_command(resolve_checkpoint(config.model), rollout, rollout.vllm.max_model_len or context,
                                  address.hostname or "127.0.0.1", address.port or 8000)
    print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(command), flush=True)
    os.execvpe(command[0], command, os.environ | env)


if __name__ == "__main__":
    run(main, uses=["model", "rollout", "algorithm", "logging", "trainer", "env"])
    sys.exit(0)
