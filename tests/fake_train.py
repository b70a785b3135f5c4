"""A stand-in for scripts/train.py in the sweep tests: takes the same `key=value` overrides, writes metrics.jsonl
(and checkpoints) into trainer.output_dir in a second, and can fail or wait when asked.

    fake.fail=<text>   print `error: <text>` and exit 1 (as scripts/train.py does on bad input)
    fake.sleep=<s>     sleep this long before each step
    fake.steps=<n>     steps to log (default 4)

Every start appends a line to <output_dir>/starts (how many times the sweep started this run) and writes the wandb
group and job type it was given to <output_dir>/wandb_env; with
trainer.resume=auto it continues after the last checkpoint/step-<n>/COMPLETE. The held-out value at step s is
  base(algorithm) + 0.05 * s + 0.01 * seed.
"""

import json
import os
from pathlib import Path
import sys
import time

BASE = {"grpo": 0.40, "sdpo_grpo": 0.42, "sdpo": 0.30}


def main() -> int:
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = Path(args["trainer.output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "starts").open("a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
    (out / "wandb_env").write_text(f"{os.environ.get('WANDB_RUN_GROUP')} {os.environ.get('WANDB_JOB_TYPE')}")
    if "fake.fail" in args:
        print("building the trainer", flush=True)
        print(f"error: {args['fake.fail']}", file=sys.stderr, flush=True)
        return 1
    seed, steps = int(args.get("trainer.seed", 0)), int(args.get("fake.steps", 4))
    base = BASE[args.get("algorithm", "grpo")]
    first = 0
    ckpts = sorted((out / "checkpoints").glob("step-*/COMPLETE")) if args.get("trainer.resume") == "auto" else []
    if ckpts:
        first = int(ckpts[-1].parent.name.removeprefix("step-"))
    with (out / "metrics.jsonl").open("a") as f:
        for step in range(first, steps + 1):
            if step > first:
                time.sleep(float(args.get("fake.sleep", 0)))
            f.write(json.dumps({"step": step, "eval/avg@4": base + 0.05 * step + 0.01 * seed,
                                "reward/mean": base + 0.02 * step}) + "\n")
            f.flush()
            if step and step % 2 == 0:
                (out / "checkpoints" / f"step-{step:06d}").mkdir(parents=True, exist_ok=True)
                (out / "checkpoints" / f"step-{step:06d}" / "COMPLETE").write_text(str(step))
    print(f"done: {steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
