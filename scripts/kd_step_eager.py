#!/usr/bin/env python3
"""The KD training step of `distill train` written in PyTorch eager + transformers, for
comparison in scripts/bench_train.py: same student, same shards, same loss (forward KL on
the (k+1) buckets: top-k ids and the tail), same batches (rows in shard order, up to
BATCH_TOKENS padded tokens, as `distill train --shuffle false`), AdamW, clipping at 1.0.

    kd_step_eager.py STUDENT_DIR SHARD_DIR STEPS BATCH_TOKENS DEVICE [--mode MODE] [--gradient-checkpointing]

MODE `identical` (default) does what distill does: the head only at the positions that
have targets. MODE `users` is the step as people usually write it: the model's full
padded logits [batch, length, vocabulary], a log-softmax over all of them, then the
positions with targets selected.

Prints one `step=N tokens=T seconds=S` line per step, then
`tokens_per_s=<median over steps after the first two>`.
"""
import argparse
import glob
import statistics
import time

import pyarrow.parquet as pq
import torch
import transformers

COLUMNS = ["input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass"]


def rows_of(shard_dir):
    for f in sorted(glob.glob(f"{shard_dir}/shard-*.parquet")):
        yield from pq.read_table(f, columns=COLUMNS).to_pylist()


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


def bucket_kl(log_q_k, log_q_rest, batch, device):
    """Forward KL(p || q) over the k top-k buckets and the tail, summed over positions."""
    logp_k = torch.tensor([p for r in batch for p in r["topk_logprobs"]], device=device, dtype=torch.float32)
    tail = torch.tensor([x for r in batch for x in r["tail_logmass"]], device=device)
    log_q = torch.cat([log_q_k, log_q_rest], -1).clamp(min=-1e4)
    log_p = torch.cat([logp_k, tail.unsqueeze(-1)], -1).clamp(min=-1e4).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def step(model, opt, batch, device, mode):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pred = []
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        pred += [i * width + t - 1 for t in range(1, n) if r["loss_mask"][t]]
    ids, mask = ids.to(device), mask.to(device)
    pred = torch.tensor(pred, device=device)
    top_ids = torch.tensor([p for r in batch for p in r["topk_ids"]], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # bf16 autocast on CUDA, as `distill train --precision auto` does; float32 on CPU.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        if mode == "users":
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
            log_q_all = logits.log_softmax(-1).reshape(-1, logits.shape[-1])[pred]
            log_q_k = log_q_all.gather(-1, top_ids)
            log_q_rest = torch.log1p(-log_q_k.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
        else:
            hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            z = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[pred]).float()
            lse = z.logsumexp(-1, keepdim=True)
            log_q_k = z.gather(-1, top_ids) - lse
            log_q_rest = z.scatter(-1, top_ids, -1e4).logsumexp(-1, keepdim=True) - lse
    loss = bucket_kl(log_q_k, log_q_rest, batch, device) / len(pred)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return int(mask.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("student")
    ap.add_argument("shards")
    ap.add_argument("steps", type=int)
    ap.add_argument("batch_tokens", type=int)
    ap.add_argument("device")
    ap.add_argument("--mode", choices=["identical", "users"], default="identical")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="transformers' activation checkpointing per layer (what `distill train --recompute` does)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).to(a.device).train()
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rates = []
    for i, batch in zip(range(a.steps), batches(a.shards, a.batch_tokens)):
        t0 = time.perf_counter()
        tokens = step(model, opt, batch, a.device, a.mode)
        seconds = time.perf_counter() - t0
        rates.append(tokens / seconds)
        print(f"step={i + 1} tokens={tokens} seconds={seconds:.3f}", flush=True)
    print(f"tokens_per_s={statistics.median(rates[2:] or rates):.1f}")
    if a.device.startswith("cuda"):
        # Reserved, not allocated: comparable with the driver's "in use" that distill logs.
        print(f"peak_memory_bytes={torch.cuda.max_memory_reserved()}")


if __name__ == "__main__":
    main()
