#!/usr/bin/env python3
"""How distill's cost grows with model size, row length and vocabulary (not a test).

    bench_scale.py DISTILL_BINARY WORK_DIR [--sections precompute,train,recompute,rows,memory,kd60,vocab]
                   [--device cpu] [--quick]

Random-weight models at published shapes (scripts/tiny_models.py scale-model: SmolLM2
135M / 360M / 1.7B, Qwen3 0.6B, Gemma 3 270M with its 262k vocabulary), float32, side by
side in one run with what users run today, each line a fresh process whose peak resident
memory is read by a parent that runs nothing else (GPU memory in use on CUDA):

  precompute  distill precompute (top-16, no draws) against transformers (scripts/
              capture_eager.py: full logits, log-softmax, top-k) on the same token rows:
              tokens/s, peak memory, seconds per 10^12 parameter-tokens.
  train       per student size: distill's KD step (float32; with 8-bit moments; and with
              --recompute) against the eager PyTorch step on identical padded batches
              (scripts/kd_step_eager.py): tokens/s, peak memory, the ratio to eager.
  recompute   the same batches with activations recomputed on both sides: transformers'
              gradient checkpointing against distill's --recompute.
  rows        the 135M shape across row lengths: 256-token documents packed to 256 / 1k /
              4k / 16k tokens (the same documents, the same 16,384 tokens per step), and
              single rows of 4k and 16k tokens with --recompute: tokens/s, peak memory,
              memory per 1k tokens of row length.
  memory      the 360M shape with each training-state option: bytes per parameter (read
              off the live tensors), peak memory, tokens/s.
  kd60        the KD loss after 60 steps of 8-bit moments against float32 (135M shape).
  vocab       Gemma 3 270M's body with 262,144 and 49,152 ids: precompute and train peak
              memory, and the memory above the training state (weights, gradients, AdamW).

Prints markdown tables. The data are the tiny BPE's tokens of tests/data/corpus.txt.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_train import measure  # one line, one process, its peak resident memory

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def model(a, shape, **overrides):
    """The random model of `shape` (made once, cached under WORK_DIR/models); `seed=1`
    draws a student for the teacher of seed 0 (the same tokenizer file, copied)."""
    suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    out = a.work / "models" / f"{shape}{suffix}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fields = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
        subprocess.run([sys.executable, ROOT / "scripts/tiny_models.py", "scale-model", out, shape, *fields],
                       check=True)
        if overrides.get("seed"):
            teacher = model(a, shape, **{k: v for k, v in overrides.items() if k != "seed"})
            shutil.copy(teacher / "tokenizer.json", out / "tokenizer.json")
    return out


def parameters(model_dir):
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(_numel(t["shape"]) for n, t in header.items() if n != "__metadata__")
    return total


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def text_rows(path, rows, tokens_per_row):
    """`rows` JSONL text rows of at least `tokens_per_row` tokens of the tiny BPE (about
    2.2 characters per token), from the corpus lines laid end to end."""
    if path.exists():
        return path
    lines = (ROOT / "tests/data/corpus.txt").read_text().splitlines()
    out, i = [], 0
    for r in range(rows):
        text = []
        while sum(len(t) + 1 for t in text) < tokens_per_row * 3:
            text.append(lines[i % len(lines)])
            i += 1
        out.append(json.dumps({"id": f"r{r}", "text": " ".join(text)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def shards(a, teacher, data, max_len, name, extra=()):
    """Top-16 shards of `data` cut to `max_len` tokens (made once)."""
    out = a.work / "shards" / name
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        measure([a.binary, "precompute", "--teacher", teacher, "--input", data, "--output", out, "--top-k", "16",
                 "--sample", "0", "--max-len", max_len, "--devices", a.device, "--no-progress", *extra])
    return out


def distill_train(a, name, student, shard_dir, steps, batch_tokens, extra=()):
    """A distill KD line: (median tokens/s over the steps after the first, peak memory,
    the last step's log)."""
    out = a.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    args = [a.binary, "train", "--student", student, "--shards", shard_dir, "--output", out, "--device", a.device,
            "--steps", steps, "--batch-tokens", batch_tokens, "--save-every", 1_000_000, "--keep-last", 1,
            "--shuffle", "false", "--alpha", "0", "--lr", "1e-4", *extra]
    _, rss = measure(args)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    gpu = [l["gpu_memory_bytes"] for l in logs if "gpu_memory_bytes" in l]
    rate = statistics.median(l["tokens_per_s"] for l in logs[1:] or logs)
    return rate, max(gpu) if gpu else rss, logs


def eager_train(a, student, shard_dir, steps, batch_tokens, extra=()):
    """The eager PyTorch line: (median tokens/s of the steps after the first, peak memory);
    tokens/s None when it failed (out of memory: the peak is where it was stopped)."""
    out, rss = measure([sys.executable, ROOT / "scripts/kd_step_eager.py", student, shard_dir, steps,
                           batch_tokens, a.device, *extra], may_fail=True)
    if out is None:
        return None, rss
    rates = [int(t) / float(s) for t, s in re.findall(r"tokens=(\d+) seconds=([\d.]+)", out)]
    gpu = re.search(r"peak_memory_bytes=(\d+)", out)
    return statistics.median(rates[1:] or rates), int(gpu.group(1)) if gpu else rss


def against(rate, mem, e_rate, e_mem):
    """tokens/s, its ratio, peak memory and its ratio against an eager line that may have
    run out of memory (then it needed more than its peak: the memory ratio is a bound)."""
    speed = f"{rate:.0f} | {rate / e_rate:.2f}x" if e_rate else (f"{rate:.0f} | eager ran out" if rate else
                                                                  "out of memory | -")
    ratio = f"{mem / e_mem:.2f}x" if e_rate else (f"< {mem / e_mem:.2f}x" if rate else f"stopped at {mem / GIB:.2f} GiB")
    return f"{speed} | {mem / GIB:.2f} GiB | {ratio}"


def state_bytes(log):
    b = log["state_bytes"]
    return b["weights"] + b["gradients"] + b["optimizer"], b["parameters"]


def section_precompute(a):
    shapes = ["smollm2-360m", "qwen3-0.6b"] if a.quick else ["smollm2-360m", "qwen3-0.6b", "smollm2-1.7b"]
    rows_of = {1024: 4, 4096: 1}
    print(f"\n## precompute at real shapes ({a.device}, top-16, float32; distill vs transformers on the same "
          f"token rows; {date()})")
    print("| teacher | parameters | row length | tokens | distill tokens/s | transformers tokens/s | distill / "
          "transformers | distill peak | transformers peak | distill s per 1e12 parameter-tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        teacher = model(a, shape)
        n = parameters(teacher)
        for length, rows in rows_of.items():
            data = text_rows(a.work / "data" / f"rows-{length}.jsonl", rows, length)
            out = a.work / "shards" / f"pre-{shape}-{length}"
            shutil.rmtree(out, ignore_errors=True)
            stdout, d_rss = measure([a.binary, "precompute", "--teacher", teacher, "--input", data, "--output", out,
                                        "--top-k", "16", "--sample", "0", "--max-len", length, "--devices", a.device,
                                        "--batch-tokens", max(length, 4096), "--no-progress"])
            run_s = float(re.search(r"time\s+([\d.]+)s", stdout).group(1))
            m = json.loads((out / "manifest.json").read_text())
            tokens = sum(s["tokens"] for s in m["shards"])
            e_out, e_rss = measure([sys.executable, ROOT / "scripts/capture_eager.py", teacher, out,
                                       max(length, 4096), 16, a.device])
            e_rate = float(re.search(r"tokens_per_s=([\d.]+)", e_out).group(1))
            d_rate = tokens / run_s
            print(f"| {shape} | {n / 1e6:.0f}M | {length} | {tokens} | {d_rate:.0f} | {e_rate:.0f} | "
                  f"{d_rate / e_rate:.2f}x | {d_rss / GIB:.2f} GiB | {e_rss / GIB:.2f} GiB | "
                  f"{run_s / (n * tokens / 1e12):.1f} |", flush=True)
            shutil.rmtree(out, ignore_errors=True)


def train_students(a):
    """(shape, student dir, parameters, shard dir) of each student size of `train` and
    `recompute`: the same padded 1024-token rows, scored by the shape's seed-0 model."""
    for shape in a.students or ["smollm2-135m", "smollm2-360m"] + ([] if a.quick else ["qwen3-0.6b"]):
        student = model(a, shape, seed=1)
        data = text_rows(a.work / "data" / "rows-1024x8.jsonl", 8, 1024)
        yield shape, student, parameters(student), shards(a, model(a, shape), data, 1024, f"train-{shape}")


def section_train(a):
    steps, batch = 3, 2048
    print(f"\n## train at real shapes ({a.device}; KD, padded batches of 2 rows x 1024 tokens in shard order, "
          f"identical for every line; median tokens/s of steps 2-{steps}; {date()})")
    print("| student | parameters | line | tokens/s | vs eager | peak memory | vs eager | s per 1e12 parameter-tokens "
          "| training state (bytes/parameter) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, student, n, shard_dir in train_students(a):
        e_rate, e_mem = eager_train(a, student, shard_dir, steps, batch)
        # bf16 weights are a GPU option: without AVX512-BF16 a CPU runs bf16 matmuls at a
        # third of float32's rate (the memory section shows them).
        lines = [("distill, float32", []),
                 ("distill, 8-bit moments", ["--optimizer-moments", "8bit"]),
                 ("distill, 8-bit moments, --recompute", ["--optimizer-moments", "8bit", "--recompute"])]
        rows = [("PyTorch eager + transformers (AdamW, float32)", e_rate, e_mem, "16.00 (float32 AdamW)")]
        for name, extra in lines:
            rate, mem, logs = distill_train(a, f"train-{shape}", student, shard_dir, steps, batch,
                                            ["--pack", "false", *extra])
            held, count = state_bytes(logs[-1])
            rows.append((name, rate, mem, f"{held / count:.2f}"))
        for name, rate, mem, per in rows:
            cost = f"{1e12 / (rate * n):.0f}" if rate else "-"
            print(f"| {shape} | {n / 1e6:.0f}M | {name} | {against(rate, mem, e_rate, e_mem)} | {cost} | {per} |",
                  flush=True)


def section_recompute(a):
    # The same batches as `train`, both sides recomputing: transformers' gradient
    # checkpointing (non-reentrant) against distill's --recompute, float32.
    steps, batch = 3, 2048
    print(f"\n## train with activations recomputed ({a.device}; the batches of `train`; {date()})")
    print("| student | parameters | line | tokens/s | vs eager | peak memory | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for shape, student, n, shard_dir in train_students(a):
        e_rate, e_mem = eager_train(a, student, shard_dir, steps, batch, ["--gradient-checkpointing"])
        rate, mem, _ = distill_train(a, f"train-{shape}", student, shard_dir, steps, batch,
                                     ["--pack", "false", "--recompute"])
        for name, r, m in [("PyTorch eager + transformers, gradient checkpointing", e_rate, e_mem),
                           ("distill, float32, --recompute", rate, mem)]:
            print(f"| {shape} | {n / 1e6:.0f}M | {name} | {against(r, m, e_rate, e_mem)} |", flush=True)


def section_rows(a):
    shape = "smollm2-135m"
    # SmolLM2's config says 8192 positions; the 16k rows need more (RoPE takes any position).
    student = model(a, shape, max_position_embeddings=32768)
    n = parameters(student)
    docs = text_rows(a.work / "data" / "docs-256.jsonl", 64 * 3 + 8, 256)
    doc_shards = shards(a, student, docs, 256, "docs-256")
    batch = 16384
    print(f"\n## train across row lengths ({a.device}; {shape} shape, {n / 1e6:.0f}M parameters, float32, KD, "
          f"--recompute on every line; {batch} tokens per step, rows in shard order; median tokens/s of steps 2-3 "
          f"(single rows: step 2); {date()})")
    print("| rows | attention | tokens/s | vs packed to 256 | peak memory | memory above the training state |")
    print("|---|---|---|---|---|---|")
    base = None
    for length in [256, 1024, 4096, 16384]:
        rate, mem, logs = distill_train(a, f"rows-{length}", student, doc_shards, 3, batch,
                                        ["--pack", "true", "--seq-len", length, "--recompute"])
        base = base or rate
        held, _ = state_bytes(logs[-1])
        docs_per_row = length // 256
        kind = "causal (one document per row)" if docs_per_row == 1 else f"per document ({docs_per_row} per row)"
        print(f"| 256-token documents packed to {length} | {kind} | {rate:.0f} | {rate / base:.2f}x | "
              f"{mem / GIB:.2f} GiB | {(mem - held) / GIB:.2f} GiB |", flush=True)
    single = {}
    for length in [4096, 16384]:
        data = text_rows(a.work / "data" / f"rows-{length}x3.jsonl", 3, length)
        shard_dir = shards(a, student, data, length, f"single-{length}")
        rate, mem, logs = distill_train(a, f"single-{length}", student, shard_dir, 2, length,
                                        ["--pack", "false", "--recompute"])
        held, _ = state_bytes(logs[-1])
        single[length] = (mem, held)
        print(f"| one row of {length} tokens, --recompute | causal | {rate:.0f} | {rate / base:.2f}x | "
              f"{mem / GIB:.2f} GiB | {(mem - held) / GIB:.2f} GiB |", flush=True)
    (m4, h4), (m16, h16) = single[4096], single[16384]
    above4, above16 = m4 - h4, m16 - h16
    print(f"\nSingle rows with --recompute: memory above the training state {above4 / GIB:.2f} GiB at 4k, "
          f"{above16 / GIB:.2f} GiB at 16k: {above16 / above4:.2f}x for 4x the tokens "
          f"({(above16 - above4) / 12 / 2**20:.0f} MiB per 1k tokens of row length).")
    if not a.quick:
        e_rate, e_mem = eager_train(a, student, a.work / "shards" / "single-4096", 2, 4096,
                                    ["--gradient-checkpointing"])
        print(f"Eager PyTorch + transformers on the 4k rows (gradient checkpointing): "
              f"{against(e_rate, e_mem, e_rate, e_mem)} (distill: {single[4096][0] / GIB:.2f} GiB).")


def section_memory(a):
    shape = "smollm2-360m"
    student = model(a, shape, seed=1)
    n = parameters(student)
    data = text_rows(a.work / "data" / "rows-1024x8.jsonl", 8, 1024)
    shard_dir = shards(a, model(a, shape), data, 1024, f"train-{shape}")
    options = [("float32 weights and moments", []),
               ("8-bit moments", ["--optimizer-moments", "8bit"]),
               ("bf16 moments", ["--optimizer-moments", "bf16"]),
               ("bf16 weights (+ float32 master as its low 16 bits)", ["--weights", "bf16"]),
               ("bf16 weights + 8-bit moments", ["--weights", "bf16", "--optimizer-moments", "8bit"]),
               ("bf16 weights + 8-bit moments + --recompute",
                ["--weights", "bf16", "--optimizer-moments", "8bit", "--recompute"])]
    print(f"\n## training state options ({a.device}; {shape} shape, {n / 1e6:.0f}M parameters; KD, 2 x 1024 "
          f"padded tokens per step; {date()})")
    print("| option | bytes per parameter (measured) | weights | gradients | optimizer | peak memory | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, extra in options:
        rate, mem, logs = distill_train(a, "memory", student, shard_dir, 3, 2048, ["--pack", "false", *extra])
        b = logs[-1]["state_bytes"]
        per = lambda k: b[k] / b["parameters"]
        held, _ = state_bytes(logs[-1])
        print(f"| {name} | {held / b['parameters']:.3f} | {per('weights'):.2f} | {per('gradients'):.2f} | "
              f"{per('optimizer'):.3f} | {mem / GIB:.2f} GiB | {rate:.0f} |", flush=True)


def section_kd60(a):
    # The loss after 60 steps: 8-bit moments against float32, on the 135M shape. transformers'
    # init (std 0.02) gives a nearly uniform next-token distribution, so two random models
    # are already each other's match (KD 0.002 nats); the teacher's weights are drawn with
    # std 0.15, which gives it a peaked distribution for the student to learn.
    small = model(a, "smollm2-135m", seed=1)
    data = text_rows(a.work / "data" / "rows-512x64.jsonl", 64, 512)
    small_shards = shards(a, model(a, "smollm2-135m", initializer_range=0.15), data, 512, "kd-135m-peaked")
    steps = 20 if a.quick else 60
    print(f"\nKD loss over {steps} steps (smollm2-135m shape; a teacher of the same shape drawn with std 0.15; "
          f"1024 tokens per step, lr 1e-4, cosine; {date()}):")
    print("| option | loss at step 1 | at step 30 | mean of the last 10 steps | vs float32 | largest step difference "
          "| bytes per parameter |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, extra in [("float32", []), ("8-bit moments", ["--optimizer-moments", "8bit"])]:
        _, _, logs = distill_train(a, "kd60", small, small_shards, steps, 1024, ["--pack", "false", *extra])
        losses = [l["loss"] for l in logs]
        tail = statistics.mean(losses[-10:])
        base = base or (tail, losses)
        worst = max(abs(x - y) / y for x, y in zip(losses, base[1]))
        held, count = state_bytes(logs[-1])
        print(f"| {name} | {losses[0]:.4f} | {losses[min(29, len(losses) - 1)]:.4f} | {tail:.4f} | "
              f"{(tail - base[0]) / base[0]:+.2%} | {worst:.2%} | {held / count:.3f} |", flush=True)


def section_vocab(a):
    print(f"\n## vocabulary ({a.device}; Gemma 3 270M's body, float32; precompute 8 rows of 1024 tokens at top-16, "
          f"2048 tokens per batch; train KD 3 steps of 2 x 1024 padded tokens; {date()})")
    print("| vocabulary | parameters | precompute peak | above the teacher's weights | train peak | training state "
          "| train peak above the state | eager train peak | eager above the state |")
    print("|---|---|---|---|---|---|---|---|---|")
    above = {}
    for vocab in [49152, 262144]:
        m = model(a, "gemma3-270m", vocab_size=vocab)
        student = model(a, "gemma3-270m", vocab_size=vocab, seed=1)
        n = parameters(m)
        data = text_rows(a.work / "data" / "rows-1024x8.jsonl", 8, 1024)
        out = a.work / "shards" / f"vocab-{vocab}"
        shutil.rmtree(out, ignore_errors=True)
        _, p_rss = measure([a.binary, "precompute", "--teacher", m, "--input", data, "--output", out, "--top-k",
                               "16", "--sample", "0", "--max-len", 1024, "--devices", a.device, "--batch-tokens",
                               2048, "--no-progress"])
        _, t_mem, logs = distill_train(a, f"vocab-{vocab}", student, out, 3, 2048, ["--pack", "false"])
        held, _ = state_bytes(logs[-1])
        e_rate, e_mem = eager_train(a, student, out, 3, 2048)
        above[vocab] = (p_rss - 4 * n, t_mem - held)
        print(f"| {vocab} | {n / 1e6:.0f}M | {p_rss / GIB:.2f} GiB | {(p_rss - 4 * n) / GIB:.2f} GiB | "
              f"{t_mem / GIB:.2f} GiB | {held / GIB:.2f} GiB | {(t_mem - held) / GIB:.2f} GiB | "
              f"{e_mem / GIB:.2f} GiB{'' if e_rate else ' (out of memory)'} | {(e_mem - held) / GIB:.2f} GiB |", flush=True)
    (p49, t49), (p262, t262) = above[49152], above[262144]
    print(f"\n262k vs 49k ids: precompute memory above the teacher's weights {p262 / p49:.2f}x, train memory above "
          f"the training state {t262 / t49:.2f}x (the head and its loss run in chunks of 64 MiB of float32 logits: "
          f"64 positions at 262k ids, 341 at 49k).")


def date():
    return time.strftime("%Y-%m-%d", time.gmtime())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("work", type=Path)
    ap.add_argument("--sections", default="precompute,train,recompute,rows,memory,kd60,vocab")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--students", type=lambda v: v.split(","), help="shapes for train and recompute (a subset)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and steps (a smoke run)")
    a = ap.parse_args()
    a.binary = str(Path(a.binary).resolve())
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale: {a.device}, {os.cpu_count()} CPUs, sections {a.sections}", file=sys.stderr)
    sections = {"precompute": section_precompute, "train": section_train, "recompute": section_recompute, "rows": section_rows,
                "memory": section_memory, "kd60": section_kd60, "vocab": section_vocab}
    for name in a.sections.split(","):
        started = time.perf_counter()
        sections[name](a)
        print(f"({name}: {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
