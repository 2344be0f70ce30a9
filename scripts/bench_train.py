#!/usr/bin/env python3
"""Benchmark of `distill train` (not a test): KD vs plain SFT tokens/s of the same student
in the same run, the shard reader's decode rate as a multiple of the trainer's consumption,
and the same KD step in PyTorch eager (scripts/kd_step_eager.py) on the same device.

    bench_train.py DISTILL_BINARY WORK_DIR [--device cpu] [--steps 30] [--batch-tokens 2048]

Teacher and student are the tiny models of scripts/tiny_models.py (CPU harness); on a GPU,
pass a real student and shard set with --student/--shards. Prints a markdown table.
"""
import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args):
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{args[:2]} failed:\n{res.stderr}")
    return res.stdout


def train_rate(binary, student, shards, out, device, steps, batch_tokens, alpha, extra=()):
    """Median tokens/s after the first two steps, and the peak GPU memory (None on CPU)."""
    shutil.rmtree(out, ignore_errors=True)
    run([binary, "train", "--student", str(student), "--shards", str(shards), "--output", str(out),
         "--device", device, "--steps", str(steps), "--batch-tokens", str(batch_tokens),
         "--alpha", str(alpha), "--save-every", str(steps + 1), "--keep-last", "1", *extra])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = [l["gpu_memory_bytes"] for l in logs if "gpu_memory_bytes" in l]
    return statistics.median(l["tokens_per_s"] for l in logs[2:] or logs), max(memory, default=None)


def gib(n):
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("work", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--student", type=Path)
    ap.add_argument("--shards", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if a.shards is None:
        models = a.work / "tiny-models"
        run([py, str(ROOT / "scripts/tiny_models.py"), "make", str(models)])
        data = a.work / "bench-train.jsonl"
        lines = (ROOT / "tests/data/corpus.txt").read_text().splitlines()
        data.write_text("".join(json.dumps({"id": f"b{i}", "text": lines[i % len(lines)]}) + "\n" for i in range(200)))
        a.shards = a.work / "train-shards"
        shutil.rmtree(a.shards, ignore_errors=True)
        run([a.binary, "precompute", "--teacher", str(models / "llama"), "--input", str(data), "--output",
             str(a.shards), "--top-k", "16", "--devices", "cpu", "--no-progress"])
        a.student = models / "qwen3"
    args = (a.device, a.steps, a.batch_tokens)
    kd, kd_mem = train_rate(a.binary, a.student, a.shards, a.work / "run-kd", *args, 0.0)
    sft, sft_mem = train_rate(a.binary, a.student, a.shards, a.work / "run-sft", *args, 1.0)
    packed, packed_mem = train_rate(a.binary, a.student, a.shards, a.work / "run-kd-pack", *args, 0.0, ["--pack", "--seq-len", "256"])
    recompute, recompute_mem = train_rate(a.binary, a.student, a.shards, a.work / "run-kd-recompute", *args, 0.0,
                                          ["--recompute"])
    out = run([a.binary, "bench-reader", "--shards", str(a.shards), "--epochs", "3"])
    decode = float(re.search(r"([\d.]+) tokens/s", out).group(1))
    eager_out = run([py, str(ROOT / "scripts/kd_step_eager.py"), str(a.student), str(a.shards), str(a.steps),
                     str(a.batch_tokens), a.device])
    eager = float(re.search(r"tokens_per_s=([\d.]+)", eager_out).group(1))
    eager_mem = re.search(r"peak_memory_bytes=(\d+)", eager_out)
    eager_mem = int(eager_mem.group(1)) if eager_mem else None
    print(f"\n## train ({a.device}, student {a.student.name}, {a.batch_tokens} padded tokens per step, median of {a.steps} steps)")
    print("| what | tokens/s | ratio | peak GPU memory |")
    print("|---|---|---|---|")
    print(f"| distill train, plain SFT (alpha 1) | {sft:.0f} | 1.00 | {gib(sft_mem)} |")
    print(f"| distill train, KD (bucket forward KL) | {kd:.0f} | {kd / sft:.2f} of SFT | {gib(kd_mem)} |")
    print(f"| distill train, KD, --pack --seq-len 256 | {packed:.0f} | {packed / kd:.2f} of KD | {gib(packed_mem)} |")
    print(f"| distill train, KD, --recompute | {recompute:.0f} | {recompute / kd:.2f} of KD | {gib(recompute_mem)} |")
    print(f"| PyTorch eager, same KD step | {eager:.0f} | {eager / kd:.2f} of distill KD | {gib(eager_mem)} |")
    print(f"| shard reader decode (bench-reader, {a.shards.name}) | {decode:.0f} | {decode / kd:.0f}x KD consumption | |")


if __name__ == "__main__":
    main()
