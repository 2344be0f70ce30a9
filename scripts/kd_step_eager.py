#!/usr/bin/env python3
"""The KD training step of `distill train` written in PyTorch eager, for comparison in
scripts/bench_train.py: same student, same shards, same loss (forward KL on the (k+1)
buckets), same batch rule (rows in order, up to BATCH_TOKENS padded tokens), AdamW.

    kd_step_eager.py STUDENT_DIR SHARD_DIR STEPS BATCH_TOKENS DEVICE

Prints `tokens_per_s=<median over steps after the first two>`.
"""
import glob
import statistics
import sys
import time

import pyarrow.parquet as pq
import torch
import transformers


def rows_of(shard_dir):
    for f in sorted(glob.glob(f"{shard_dir}/shard-*.parquet")):
        yield from pq.read_table(f, columns=["input_ids", "loss_mask", "topk_ids", "topk_logprobs",
                                              "tail_logmass"]).to_pylist()


def batches(shard_dir, batch_tokens):
    while True:
        batch = []
        for r in rows_of(shard_dir):
            width = max([len(x["input_ids"]) for x in batch] + [len(r["input_ids"])])
            if batch and width * (len(batch) + 1) > batch_tokens:
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch


def step(model, opt, batch, device):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pred, nxt = [], []
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        pred += [i * width + t - 1 for t in range(1, n) if r["loss_mask"][t]]
    ids, mask = ids.to(device), mask.to(device)
    top_ids = torch.tensor([p for r in batch for p in r["topk_ids"]], device=device)
    logp_k = torch.tensor([p for r in batch for p in r["topk_logprobs"]], device=device, dtype=torch.float32)
    tail = torch.tensor([x for r in batch for x in r["tail_logmass"]], device=device)
    # bf16 autocast on CUDA, as `distill train --precision auto` does; float32 on CPU.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(pred, device=device)]
        z = model.lm_head(h).float()
    lse = z.logsumexp(-1, keepdim=True)
    q_k = z.gather(-1, top_ids) - lse
    q_rest = z.scatter(-1, top_ids, -1e4).logsumexp(-1, keepdim=True) - lse
    log_q = torch.cat([q_k, q_rest], -1).clamp(min=-1e4)
    log_p = torch.cat([logp_k, tail.unsqueeze(-1)], -1).clamp(min=-1e4).log_softmax(-1)
    loss = (log_p.exp() * (log_p - log_q)).sum(-1).sum() / len(pred)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return int(mask.sum())


def main():
    student, shards, steps, batch_tokens, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rates = []
    for i, batch in zip(range(steps), batches(shards, batch_tokens)):
        t0 = time.perf_counter()
        tokens = step(model, opt, batch, device)
        rates.append(tokens / (time.perf_counter() - t0))
    print(f"tokens_per_s={statistics.median(rates[2:] or rates):.1f}")
    if device.startswith("cuda"):
        # Reserved, not allocated: comparable with the driver's "in use" that distill logs.
        print(f"peak_memory_bytes={torch.cuda.max_memory_reserved()}")


if __name__ == "__main__":
    main()
