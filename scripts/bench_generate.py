#!/usr/bin/env python3
"""Benchmark and check of `distill generate` against transformers' `generate` (not a test).

    bench_generate.py DISTILL_BINARY WORK_DIR [--model DIR] [--prompts 24] [--max-new-tokens 64]
                      [--batch 8] [--device cpu] [--reps 1]

Model: the main job's teacher (`scripts/run.sh` leaves it in .cache/real/teacher) when it
exists, else the tiny Qwen3 of scripts/tiny_models.py. Prompts: the main job's math chat
rows (question -> answer; the answer is the reference, the question the prompt), else the
shipped sample rows. Both sides decode greedily in float32, the same prompts in the same
batches (sorted by length, `--batch` rows, left-padded), stopping at the model's eos ids
or after --max-new-tokens. Checks that every reply is the same token for token, and
prints tokens/s of each (new tokens up to and including eos, over the time spent
generating, model loading excluded; best of --reps) and the ratio. transformers runs in
a fresh process twice: with the default process settings, and with the ones distill
applies to itself for generation on a CPU (spinning OpenMP workers, freed memory kept;
src/runtime.rs), so that the ratio is not the settings alone.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What distill sets for itself on CPU (src/runtime.rs), as glibc/libgomp variables.
DISTILL_PROCESS_SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def prompts_file(work: Path, count: int) -> Path:
    rows = []
    for path in sorted(glob.glob(str(ROOT / ".cache/real/data-*/*.jsonl"))):
        rows += [json.loads(l) for l in open(path) if '"messages"' in l]
    if not rows:
        rows = [json.loads(l) for l in open(ROOT / "tests/data/sample.jsonl")]
    seen, unique = set(), []
    for r in rows:
        key = json.dumps(r.get("messages", r.get("text")))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    out = work / "prompts.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in unique[:count]))
    return out


def eos_ids(model: Path):
    for name in ["generation_config.json", "config.json"]:
        p = model / name
        if p.exists():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return []


def distill_side(a, prompts: Path):
    out = a.work / "distill.jsonl"
    best = None
    for _ in range(a.reps):
        run = subprocess.run([a.binary, "generate", "--model", a.model, "--input", prompts, "--output", out,
                              "--overwrite", "--no-progress", "--with-ids", "--device", a.device,
                              "--max-new-tokens", str(a.max_new_tokens), "--max-batch", str(a.batch),
                              "--batch-tokens", "100000000"], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(run.stderr)
        m = re.search(r"generated (\d+) tokens .* in ([\d.]+)s", run.stderr)
        tokens, seconds = int(m.group(1)), float(m.group(2))
        best = min(best or (seconds, tokens), (seconds, tokens))
    replies = [json.loads(l)["response_ids"] for l in out.read_text().splitlines()]
    return replies, best[1], best[0]


def transformers_side(a, prompts: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device).eval()
    eos = eos_ids(Path(a.model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    ids = []
    for line in prompts.read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            turns = list(row["messages"])
            while turns and turns[-1]["role"] == "assistant":
                turns.pop()
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            ids.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tok(row.get("text") or row["prompt"])["input_ids"])
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable, as distill sorts
    best = None
    for _ in range(a.reps):
        replies, tokens, seconds = [None] * len(ids), 0, 0.0
        for start in range(0, len(order), a.batch):
            batch = order[start:start + a.batch]
            width = max(len(ids[i]) for i in batch)
            x = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=a.device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=a.device)
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=mask, do_sample=False,
                                     max_new_tokens=a.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            seconds += time.perf_counter() - began
            for i, row in zip(batch, out[:, width:].tolist()):
                end = next((t + 1 for t, v in enumerate(row) if v in eos), len(row))
                replies[i] = row[:end]
                tokens += end
        best = min(best or (seconds, tokens, replies), (seconds, tokens, replies), key=lambda b: b[0])
    return best[2], best[1], best[0]


def transformers_in_process(a, prompts: Path, env=None):
    """transformers_side in a fresh Python process (its own OpenMP and malloc settings)."""
    out = a.work / "transformers.json"
    args = [sys.executable, __file__, a.binary, a.work, "--model", a.model, "--max-new-tokens", str(a.max_new_tokens),
            "--batch", str(a.batch), "--device", a.device, "--reps", str(a.reps), "--transformers-only", prompts]
    subprocess.run([str(x) for x in args], check=True, env={**os.environ, **(env or {})})
    return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binary", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--model", type=Path)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--transformers-only", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.transformers_only:
        (a.work / "transformers.json").write_text(json.dumps(transformers_side(a, a.transformers_only)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        real = ROOT / ".cache/real/teacher"
        if real.exists():
            a.model = real
        else:
            subprocess.run([sys.executable, ROOT / "scripts/tiny_models.py", "make", ROOT / ".cache/tiny-models"], check=True)
            a.model = ROOT / ".cache/tiny-models/qwen3"
    prompts = prompts_file(a.work, a.prompts)
    ours, our_tokens, our_s = distill_side(a, prompts)
    theirs, their_tokens, their_s = transformers_in_process(a, prompts)
    _, tuned_tokens, tuned_s = transformers_in_process(a, prompts, DISTILL_PROCESS_SETTINGS)
    same = sum(o == t for o, t in zip(ours, theirs))
    print(f"model {a.model}, {len(ours)} prompts, batches of {a.batch}, up to {a.max_new_tokens} new tokens, "
          f"greedy, float32, {a.device}, best of {a.reps}")
    print(f"replies identical token for token: {same} of {len(ours)}")
    for i, (o, t) in enumerate(zip(ours, theirs)):
        if o != t:
            at = next((k for k, (x, y) in enumerate(zip(o, t)) if x != y), min(len(o), len(t)))
            print(f"  prompt {i}: first difference at new token {at} (distill {o[at:at + 3]}, transformers {t[at:at + 3]})")
    print()
    print("| generator | new tokens | seconds | tokens/s | vs transformers |")
    print("|---|---|---|---|---|")
    lines = [("transformers generate", their_tokens, their_s),
             ("transformers generate, distill's process settings", tuned_tokens, tuned_s),
             ("distill generate", our_tokens, our_s)]
    for name, tokens, seconds in lines:
        print(f"| {name} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} | "
              f"{(tokens / seconds) / (their_tokens / their_s):.2f}x |")
    if same != len(ours):
        sys.exit(1)


if __name__ == "__main__":
    main()
