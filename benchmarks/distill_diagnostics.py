"""The log-prob diagnostics of benchmarks/distill_cpu.py: how far each student is from the teacher on the teacher's own
answers, and the report of the sweep with them.

The teacher answers each held-out question `ANSWERS_PER_QUESTION` times at the training temperature (1.0, the
distribution the distillation matches; sampled once, seeded, cached in runs/distill_cpu/teacher_answers.json). For a
model M, `logp(M)` is the mean over the answers' tokens of log M(y_t | question, y_<t) at that temperature, the
student's prompt (no reprompt). logp(teacher) - logp(student) is the cross-entropy excess of the student on the
teacher's data: 0 when the student matches the teacher there.
"""

from __future__ import annotations

import json
from pathlib import Path
import shutil

ANSWERS = "teacher_answers.json"
DIAGNOSTICS = "diagnostics.json"
ANSWERS_PER_QUESTION = 4
SEED = 1234


def _setting():
    """The default run's config, environment, tokenizer, initial model path and held-out questions (every run of the
    sweep evaluates on these)."""
    from sdpo.inputs import resolve_inputs

    inputs = resolve_inputs()
    config = inputs.config
    problems = inputs.env.load(config.env.eval_split)[: config.eval.num_questions]
    return config, inputs.env, inputs.tokenizer, inputs.model_path, problems


def _load(path: Path | str, config):
    from sdpo.models import load_model

    model = load_model(config.model, path)
    model.eval()
    return model


def teacher_answers(out: Path, teacher: Path) -> dict:
    """The teacher's sampled answers to the held-out questions (prompt ids, answer ids, reward), cached."""
    import torch

    from sdpo.models import render_chat

    cache = out / ANSWERS
    if cache.exists():
        return json.loads(cache.read_text())
    config, env, tokenizer, _, problems = _setting()
    model = _load(teacher, config)
    torch.manual_seed(SEED)
    rows = []
    for p in problems:
        prompt = render_chat(tokenizer, p.messages, config.model.chat_template_kwargs)
        with torch.no_grad():
            out_ids = model.generate(torch.tensor([prompt]), do_sample=True, temperature=config.rollout.temperature,
                                     top_p=1.0, top_k=0, max_new_tokens=config.rollout.max_new_tokens,
                                     num_return_sequences=ANSWERS_PER_QUESTION, pad_token_id=tokenizer.pad_token_id)
        for seq in out_ids[:, len(prompt):].tolist():
            if tokenizer.eos_token_id in seq:
                seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
            while seq and seq[-1] == tokenizer.pad_token_id and seq[-1] != tokenizer.eos_token_id:
                seq.pop()
            text = tokenizer.decode(seq, skip_special_tokens=True)
            rows.append({"prompt": prompt, "answer": seq, "reward": env.score(p, text).reward})
    data = {"teacher": str(teacher), "temperature": config.rollout.temperature, "rows": rows}
    cache.write_text(json.dumps(data) + "\n")
    return data


def mean_logp(model, answers: dict) -> float:
    """Mean per-token log-prob of the teacher's answers under `model`, at the sampling temperature."""
    import torch

    from sdpo.losses import token_logprobs

    total, count = 0.0, 0
    with torch.no_grad():
        for row in answers["rows"]:
            if not row["answer"]:
                continue
            ids = torch.tensor([row["prompt"] + row["answer"]])
            logits = model(ids).logits[:, len(row["prompt"]) - 1: -1].float()
            logp = token_logprobs(logits, torch.tensor([row["answer"]]), answers["temperature"])
            total, count = total + float(logp.sum()), count + logp.numel()
    return total / max(count, 1)


def diagnose(run_dir: Path, teacher: Path, out: Path) -> dict:
    """The run's final policy's log p of the teacher's answers (and the teacher's and the initial student's, once),
    written to <run>/diagnostics.json; then the run's checkpoints are deleted (the table reads metrics only)."""
    from sdpo.checkpoint import latest_checkpoint

    answers = teacher_answers(out, teacher)
    config, _, _, initial, _ = _setting()
    reference = out / "reference_logp.json"
    if not reference.exists():
        reference.write_text(json.dumps({
            "teacher": mean_logp(_load(teacher, config), answers),
            "initial_student": mean_logp(_load(initial, config), answers),
            "teacher_answer_accuracy": sum(r["reward"] for r in answers["rows"]) / len(answers["rows"])}) + "\n")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    result = {"checkpoint": checkpoint.name, "final_student": mean_logp(_load(checkpoint, config), answers)}
    (run_dir / DIAGNOSTICS).write_text(json.dumps(result) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def report(out: Path, reference_dir: Path | None = None) -> str:
    """The sweep's table (sdpo.sweep.table) followed by the log-prob diagnostics and the opd runs' KL per step;
    `reference_dir`: where the teacher's and the initial student's log-probs lie (default `out`)."""
    from sdpo.sweep.table import write_table
    from sdpo.tracking import read_metrics

    lines = []
    if any(out.glob("*-seed*/metrics.jsonl")):
        _, text = write_table(out, f"python scripts/table.py {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
        lines.append(text)
    reference = (reference_dir or out) / "reference_logp.json"
    if reference.exists():
        ref = json.loads(reference.read_text())
        lines += ["", "## Log-probs of the teacher's answers (per token, temperature 1.0)", "",
                  f"teacher {ref['teacher']:.4f} · initial student {ref['initial_student']:.4f} · "
                  f"the answers' accuracy {ref['teacher_answer_accuracy']:.3f}", "",
                  "| run | final student log p | gap to the teacher (nats/token) |", "|---|---|---|"]
        for path in sorted(out.glob("*-seed*/" + DIAGNOSTICS)):
            d = json.loads(path.read_text())
            lines.append(f"| {path.parent.name} | {d['final_student']:.4f} | {ref['teacher'] - d['final_student']:.4f} |")
    kl_rows = []
    for path in sorted(out.glob("opd*-seed*/metrics.jsonl")):
        kl = [(m["step"], m["distill/student_teacher_kl"]) for m in read_metrics(path) if "distill/student_teacher_kl" in m]
        if kl:
            kl_rows.append(f"| {path.parent.name} | " + " ".join(f"{v:.3f}" for _, v in kl) + " |")
    if kl_rows:
        lines += ["", "## On-policy student-teacher KL per step (distill/student_teacher_kl, steps 1..)", "",
                  "| run | KL per step |", "|---|---|", *kl_rows]
    return "\n".join(lines)
