"""kill -9 at random moments, then resume: the bytes must equal an uninterrupted run's.

For each job (precompute with every kind of target, generate --capture, train --nproc 2)
one uninterrupted reference run is timed (the faster of two); then each trial empties the job's directory,
starts the same command there, kills its whole process group with SIGKILL after a uniform
random delay between the time a process takes to start (loading libtorch) and the
reference time, reruns the command (the resume), and compares every byte of what the job
writes with the reference. Prints a table; exits 1 if any trial differs.

Usage: python scripts/kill_resume.py --distill BIN --models DIR [--trials 20] [--seed 0]
       [--only NAME ...] [--copies 24] [--work DIR]
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def digest(paths):
    """Relative path -> sha256 of every file under each path (files or directories)."""
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f.relative_to(root.parent))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stderr[-3000:]}")


def kill_after(cmd, delay):
    """Starts cmd in its own process group; SIGKILLs the group after `delay` s.
    Returns True if the command was still running when killed."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return True


def data(work, copies):
    """The shipped sample repeated (distinct ids; 24 times by default): a run writes ~100
    shards over a few seconds, most of it after start-up, where the kills land."""
    rows = [json.loads(l) for l in (REPO / "tests/data/sample.jsonl").read_text().splitlines()]
    path = work / "data.jsonl"
    with path.open("w") as f:
        for copy in range(copies):
            for r in rows:
                f.write(json.dumps(dict(r, id=f"{r.get('id', 'row')}-{copy}")) + "\n")
    prompts = work / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(4 * copies):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about the number {i}."}) + "\n")
    return path, prompts


def jobs(distill, models, work, copies):
    corpus, prompts = data(work, copies)
    teacher = str(models / "llama")
    ids = work / "ids.jsonl"
    run([distill, "generate", "--no-progress", "--device", "cpu", "--model", teacher, "--input", str(prompts),
         "--output", str(ids), "--with-ids", "--max-new-tokens", "24", "--temperature", "1", "--seed", "3"])
    pre = [distill, "precompute", "--no-progress", "--devices", "cpu", "--teacher", teacher,
           "--shard-tokens", "300", "--row-group-rows", "2", "--batch-tokens", "512"]
    out = lambda d: ["--output", str(d)]
    kinds = {
        "precompute top-k": ["--input", str(corpus), "--top-k", "8", "--sample", "0"],
        "precompute top-k + draws": ["--input", str(corpus), "--top-k", "8", "--sample", "8"],
        "precompute draws only": ["--input", str(corpus), "--top-k", "0", "--sample", "16"],
        "precompute top-p + min-k": ["--input", str(corpus), "--top-k", "16", "--top-p", "0.9", "--min-k", "2"],
        "precompute hidden states": ["--input", str(corpus), "--hidden-layers", "1,2", "--sample", "0"],
        "precompute token ids (sampled)": ["--input", str(ids), "--token-ids"],
        "precompute packed": ["--input", str(corpus), "--pack", "--max-len", "512"],
    }
    for name, extra in kinds.items():
        yield name, lambda d, extra=extra: [pre + extra + out(d / "set")], lambda d: [d / "set"]
    gen = [distill, "generate", "--no-progress", "--device", "cpu", "--model", teacher, "--input", str(prompts),
           "--max-new-tokens", "32", "--temperature", "1", "--seed", "5", "--overwrite"]
    yield ("generate --capture",
           lambda d: [gen + ["--output", str(d / "out.jsonl"), "--capture", str(d / "cap")]],
           lambda d: [d / "out.jsonl", d / "cap"])
    shards = work / "train-set"
    run(pre + ["--input", str(corpus), "--top-k", "8", "--sample", "8"] + out(shards))
    train = [distill, "train", "--device", "cpu", "--student", str(models / "qwen3"), "--shards", str(shards),
             "--nproc", "2", "--steps", "16", "--save-every", "4", "--batch-tokens", "512", "--lr", "3e-3",
             "--alpha", "0.3", "--pack"]
    yield ("train --nproc 2",
           lambda d: [train + ["--output", str(d / "run")], train + ["--output", str(d / "run"), "--resume"]],
           lambda d: [d / "run" / "checkpoint-0000016"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distill", default=str(REPO / "target/release/distill"))
    ap.add_argument("--models", required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--copies", type=int, default=24, help="copies of the sample in the precompute data")
    ap.add_argument("--work", default=str(REPO / ".cache/kill-resume"))
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(a.seed)
    # Before this much time a process is still loading libtorch and has written nothing:
    # kills are drawn after it.
    started = time.monotonic()
    run([a.distill, "--version"])
    startup = time.monotonic() - started
    rows, failed = [], False
    for name, commands, outputs in jobs(a.distill, Path(a.models), work, a.copies):
        if a.only and not any(o in name for o in a.only):
            continue
        # One directory for the reference and every trial: a set records its input's
        # path (generate --capture's replies), so the bytes depend on it.
        d = work / "run"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        # Timed twice (the first run also warms the file cache): the faster is the
        # reference time, the kills' upper bound.
        walls = []
        for _ in range(2):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            started = time.monotonic()
            run(commands(d)[0])
            walls.append(time.monotonic() - started)
        wall = min(walls)
        expected = digest(outputs(d))
        interrupted = same = 0
        for trial in range(a.trials):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            first, resume = commands(d)[0], commands(d)[-1]
            if kill_after(first, rng.uniform(min(startup, wall), wall)):
                interrupted += 1
            run(resume)
            got = digest(outputs(d))
            if got == expected:
                same += 1
            else:
                failed = True
                bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
                print(f"  {name}: trial {trial} differs in {bad[:5]}", file=sys.stderr)
        shutil.rmtree(d)
        rows.append((name, wall, a.trials, interrupted, same))
        print(f"{name}: {same}/{a.trials} equal ({interrupted} killed mid-run)", file=sys.stderr, flush=True)
    print(f"\nkills drawn uniformly between {startup:.2f} s (process start-up) and the run's time")
    print(f"\n| job | uninterrupted run (s) | trials | killed mid-run | resumed to the same bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, trials, interrupted, same in rows:
        print(f"| {name} | {wall:.1f} | {trials} | {interrupted} | {same} |")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
