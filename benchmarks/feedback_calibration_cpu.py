"""Calibration of answer-convention candidates for the learning-from-feedback task (issue #16) on SmolLM2-135M-Instruct.

For each candidate convention, on the first N shuffled single-digit products (operands 2..9) asked as "What is a * b?":
success of 4 samples at temperature 1 and of greedy decoding, for the student (the question alone) and for the
teacher (the question with the checker's feedback in the paper's reprompt template); the probability of the first
token and the log-probability of the whole correct response (with EOS) under both; and the mean student-teacher gap
log q(y_t) - log p(y_t) on the student's own sampled tokens of failed attempts (per token and on the first token).
transformers generate in float32, one thread.

    python benchmarks/feedback_calibration_cpu.py answer_prefix,bare,bare_noex,unit 12
    python benchmarks/feedback_calibration_cpu.py equation 12

The feedback strings are the candidates as measured; the environment (sdpo/envs/convention.py) states its rule
without an example number because of what this measured. scripts/probe.py measures the same things on the real env.
"""
import os, sys, re, random, time, itertools, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from sdpo.models import load_tokenizer, render_chat
from sdpo.config import RepromptConfig
from transformers import AutoModelForCausalLM

torch.manual_seed(0); torch.set_num_threads(1)
path = os.path.expanduser("~/.cache/sdpo/smollm2-135m-instruct")
tok = load_tokenizer(path)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
rc = RepromptConfig()

pairs = list(itertools.product(range(2, 10), range(2, 10)))
random.Random(0).shuffle(pairs)
pairs = pairs[:int(sys.argv[2]) if len(sys.argv) > 2 else 24]
EX = "17"
CANDS = {
    "bare": dict(
        ok=lambda r, n: r.strip().rstrip(".") == str(n),
        ref=lambda n, a, b: f"{n}",
        fb=f"Format error: the grader accepts only the bare number as the whole response: no words, no equation, no punctuation (for example: {EX})."),
    "answer_prefix": dict(
        ok=lambda r, n: re.match(rf"\s*Answer:\s*{n}\s*\.?\s*$", r) is not None,
        ref=lambda n, a, b: f"Answer: {n}",
        fb="Format error: the grader reads only a response of the form 'Answer: <number>' (for example 'Answer: 17')."),
    "bare_noex": dict(
        ok=lambda r, n: r.strip().rstrip(".") == str(n),
        ref=lambda n, a, b: f"{n}",
        fb="Format error: the grader reads only the bare number as the whole response: no words, no equation."),
    "unit": dict(
        ok=lambda r, n: re.search(rf"\b{n} points\b", r) is not None,
        ref=lambda n, a, b: f"{n} points",
        fb="Unit error: the answer must be given in points, written as '<number> points' (for example '17 points')."),
    # The equation the model writes by habit ("7 * 8 = 56"), as the whole response: a convention the reprompted
    # teacher may be able to follow, where it could not follow the bare number.
    "equation": dict(
        ok=lambda r, n: (m := re.fullmatch(r"\s*(\d+)\s*[*x\u00d7]\s*(\d+)\s*=\s*(-?\d+)\s*\.?\s*", r)) is not None
        and int(m.group(1)) * int(m.group(2)) == n == int(m.group(3)),
        ref=lambda n, a, b: f"{a} * {b} = {n}",
        fb="Format error: the grader reads only the equation as the whole response: the two numbers, the operation, "
           "an equals sign and the result, nothing else."),
    "word": dict(
        ok=lambda r, n: r.strip().lower().startswith("product"),
        ref=lambda n, a, b: f"Product: {n}",
        fb="Format error: the grader expects the response to start with the word 'Product' and then the number (for example 'Product: 17')."),
}
which = sys.argv[1].split(",")
N_SAMP = 4


def gen(prompts, n, temp, max_new=20):
    out = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        batch = tok.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**batch, do_sample=temp > 0, temperature=temp if temp > 0 else None, top_p=1.0, top_k=0,
                               max_new_tokens=max_new, num_return_sequences=n, pad_token_id=tok.pad_token_id)
        L = batch["input_ids"].shape[1]
        for row in g[:, L:]:
            ids = [t for t in row.tolist() if t != tok.pad_token_id]
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id) + 1]
            out.append(ids)
    return out


def seq_logp(prompts, responses):
    """per-token log p of responses given prompts: list of tensors"""
    res = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)
        res.append(lp.gather(-1, torch.tensor(r)[:, None])[:, 0])
    return res


t0 = time.time(); print("loaded", flush=True)
for name in which:
    c = CANDS[name]
    qs = [(a, b, a * b) for a, b in pairs]
    sp = [render_chat(tok, [{"role": "user", "content": f"What is {a} * {b}?"}]) for a, b, _ in qs]
    tp = [render_chat(tok, [{"role": "user", "content": rc.reprompt_template.format(
        prompt=f"What is {a} * {b}?", solution="", feedback=rc.feedback_template.format(feedback_raw=c["fb"]))}]) for a, b, _ in qs]
    s_samp = gen(sp, N_SAMP, 1.0); print("gen1", time.time()-t0, flush=True)
    t_samp = gen(tp, N_SAMP, 1.0)
    s_greedy = gen(sp, 1, 0)
    t_greedy = gen(tp, 1, 0)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
    succ = lambda samples, k: sum(c["ok"](dec(s), qs[i // k][2]) for i, s in enumerate(samples)) / len(samples)
    refs = [tok.encode(c["ref"](n, a, b), add_special_tokens=False) + [tok.eos_token_id] for a, b, n in qs]
    lp_s = seq_logp(sp, refs)
    lp_t = seq_logp(tp, refs)
    first_s = sum(float(x[0].exp()) for x in lp_s) / len(qs)
    first_t = sum(float(x[0].exp()) for x in lp_t) / len(qs)
    seq_s = sum(float(x.sum()) for x in lp_s) / len(qs)
    seq_t = sum(float(x.sum()) for x in lp_t) / len(qs)
    # gap on failed student samples
    failed = [(i // N_SAMP, s) for i, s in enumerate(s_samp) if not c["ok"](dec(s), qs[i // N_SAMP][2])]
    failed = failed[:32]
    g_s = seq_logp([sp[q] for q, _ in failed], [s for _, s in failed])
    g_t = seq_logp([tp[q] for q, _ in failed], [s for _, s in failed])
    gap_tok = sum(float((b - a).sum()) for a, b in zip(g_s, g_t)) / max(1, sum(len(a) for a in g_s))
    gap_first = sum(float(b[0] - a[0]) for a, b in zip(g_s, g_t)) / max(1, len(g_s))
    print(json.dumps(dict(cand=name, n=len(qs), samp_student=succ(s_samp, N_SAMP), samp_teacher=succ(t_samp, N_SAMP),
                          greedy_student=succ(s_greedy, 1), greedy_teacher=succ(t_greedy, 1),
                          ref_first_p_student=round(first_s, 4), ref_first_p_teacher=round(first_t, 4),
                          ref_seq_logp_student=round(seq_s, 2), ref_seq_logp_teacher=round(seq_t, 2),
                          gap_per_token=round(gap_tok, 3), gap_first_token=round(gap_first, 3), secs=round(time.time() - t0))), flush=True)
    for k in range(3):
        print("   S:", repr(dec(s_samp[k * N_SAMP])), "| T:", repr(dec(t_samp[k * N_SAMP])), "| Tg:", repr(dec(t_greedy[k])))
