#!/usr/bin/env python3
"""What `distill precompute` computes, written in PyTorch eager + transformers, for
comparison in scripts/bench_precompute.py: the teacher over the same token rows (read
from a shard set distill wrote, so tokenisation is not timed), batched as distill batches
them (per shard, longest first, up to BATCH_TOKENS padded tokens), and per position the
top-k log-probs, the tail's log-mass and the true next token's log-prob. Nothing is
written: the targets are only moved to the host, as a writer would need them.

    capture_eager.py TEACHER_DIR SHARD_DIR BATCH_TOKENS TOP_K DEVICE [EXPERTS]

EXPERTS picks transformers' experts implementation for a mixture-of-experts teacher
(`grouped_mm`, its default, or `eager`, its loop over experts).

Prints `tokens=N seconds=S tokens_per_s=R` (the teacher's loading not included).
"""
import glob
import sys
import time

import pyarrow.parquet as pq
import torch
import transformers


def batches(shard_dir, batch_tokens):
    for f in sorted(glob.glob(f"{shard_dir}/shard-*.parquet")):
        rows = pq.read_table(f, columns=["input_ids"]).column(0).to_pylist()
        batch = []
        for ids in sorted(rows, key=len, reverse=True):
            if batch and (len(batch) + 1) * len(batch[0]) > batch_tokens:
                yield batch
                batch = []
            batch.append(ids)
        if batch:
            yield batch


@torch.inference_mode()
def capture(model, batch, k, device):
    width = len(batch[0])
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(batch):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    top, top_ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0)) if k < logp.shape[-1] else None
    label = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = mask[:, 1:].bool()
    return [t[valid].cpu() for t in (top.half(), top_ids, tail, label) if t is not None]


def main():
    teacher, shards, batch_tokens, k, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    experts = {"experts_implementation": sys.argv[6]} if len(sys.argv) > 6 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, **experts).to(device).eval()
    tokens = 0
    t0 = time.perf_counter()
    for batch in batches(shards, batch_tokens):
        capture(model, batch, k, device)
        tokens += sum(len(r) for r in batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f"tokens={tokens} seconds={seconds:.2f} tokens_per_s={tokens / seconds:.1f}")


if __name__ == "__main__":
    main()
