#!/usr/bin/env python3
"""Checks a distill shard set against transformers, reading it with pyarrow only.

    check_shards.py SHARD_DIR MODEL_DIR INPUT.jsonl [--fields text,prompt,response,messages]

For every row: recomputes the teacher's distribution with transformers (float32, each
packed document on its own) and compares top-k ids and log-probs (float16 tolerance),
the tail mass, the true token's log-prob and the stored hidden states; checks the loss
mask against transformers' own masks (all tokens for text, assistant tokens from
apply_chat_template(return_assistant_tokens_mask=True) for chat and prompt/response)
and the sample ids against the input file. Prints a JSON report; exit 1 on a mismatch.
"""
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# float16 log-probs: |x| < 16 has a spacing of at most 2^-7; round-to-nearest halves it.
LOGPROB_TOL = 2 ** -7
HIDDEN_TOL = 2e-3  # relative to max |h|, float16 values times float32 rms
F32_TOL = 2e-4  # tail and true-token log-probs, stored in float32


def expected_examples(input_path: Path, tok):
    """id -> (input ids, loss mask) as transformers produces them."""
    out = {}
    stem = input_path.stem
    for line_no, line in enumerate(input_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        rid = str(row["id"]) if "id" in row else f"{stem}:{line_no}"
        if "messages" in row or "prompt" in row:
            msgs = row.get("messages") or [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]},
            ]
            enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
        else:
            ids = tok(row["text"])["input_ids"]
            mask = [True] * len(ids)
        mask[0] = False
        out[rid] = (ids, mask)
    return out


def main():
    shard_dir, model_dir, input_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    cap = manifest["settings"]["capture"]
    k, layers = cap["top_k"], cap["hidden_layers"]
    vocab = manifest["settings"]["tokenizer"]["vocab_size"]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = expected_examples(input_path, tok)
    worst = {"logprob": 0.0, "tail": 0.0, "target": 0.0, "hidden": 0.0}
    errors, rows, targets, seen = [], 0, 0, []

    def fail(msg):
        if len(errors) < 20:
            errors.append(msg)

    for shard in manifest["shards"]:
        table = pq.read_table(shard_dir / shard["file"])
        meta = pq.read_metadata(shard_dir / shard["file"]).metadata
        if meta.get(b"distill.format") != b"distill-shards":
            fail(f"{shard['file']}: key-value metadata lacks distill.format")
        for row in table.to_pylist():
            rows += 1
            ids, mask = row["input_ids"], row["loss_mask"]
            # Recompute each document alone: packing must not change its targets.
            logp_rows, hidden_rows, start = [], {l: [] for l in layers}, 0
            for n in row["doc_lengths"]:
                x = torch.tensor([ids[start:start + n]])
                with torch.no_grad():
                    out = model(input_ids=x, output_hidden_states=True)
                logp_rows.append(torch.log_softmax(out.logits[0, :, :vocab].double(), -1))
                for l in layers:
                    hidden_rows[l].append(out.hidden_states[l][0].double())
                start += n
            logp = torch.cat(logp_rows)
            hidden = {l: torch.cat(h) for l, h in hidden_rows.items()}
            # Expected ids and mask, document by document.
            pos = 0
            for sid, n in zip(row["sample_ids"], row["doc_lengths"]):
                seen.append(sid)
                if sid not in expected:
                    fail(f"row {row['row_index']}: unknown sample id {sid}")
                else:
                    e_ids, e_mask = expected[sid]
                    if ids[pos:pos + n] != e_ids[:n] or n > len(e_ids):
                        fail(f"{sid}: input_ids differ from transformers' tokenisation")
                    if mask[pos:pos + n] != e_mask[:n]:
                        fail(f"{sid}: loss_mask differs from transformers' mask")
                pos += n
            trained = [t for t in range(1, len(ids)) if mask[t]]
            if row["num_targets"] != len(trained) or len(row["topk_ids"]) != len(trained):
                fail(f"row {row['row_index']}: {len(row['topk_ids'])} targets stored, {len(trained)} trained")
                continue
            targets += len(trained)
            for j, t in enumerate(trained):
                ref = logp[t - 1]
                stored_ids = row["topk_ids"][j]
                stored_lp = np.array(row["topk_logprobs"][j], dtype=np.float64)
                ref_top = torch.topk(ref, k).values.numpy()
                at_ids = ref[stored_ids].numpy()
                err = max(np.abs(stored_lp - ref_top).max(), np.abs(stored_lp - at_ids).max())
                worst["logprob"] = max(worst["logprob"], float(err))
                if err > LOGPROB_TOL or len(set(stored_ids)) != k:
                    fail(f"row {row['row_index']} token {t}: top-k differs by {err:.2e}")
                rest = torch.ones_like(ref, dtype=torch.bool)
                rest[stored_ids] = False
                ref_tail = torch.logsumexp(ref[rest], 0).item() if rest.any() else -math.inf
                got_tail = row["tail_logmass"][j]
                terr = 0.0 if (ref_tail == -math.inf and got_tail == -math.inf) else abs(got_tail - ref_tail)
                worst["tail"] = max(worst["tail"], terr)
                if terr > F32_TOL * max(1.0, abs(ref_tail)):
                    fail(f"row {row['row_index']} token {t}: tail {got_tail} vs {ref_tail}")
                gerr = abs(row["target_logprob"][j] - ref[ids[t]].item())
                worst["target"] = max(worst["target"], gerr)
                if gerr > F32_TOL * max(1.0, abs(ref[ids[t]].item())):
                    fail(f"row {row['row_index']} token {t}: true-token log-prob off by {gerr:.2e}")
            for l in layers:
                h = np.array(row[f"hidden_{l}"], dtype=np.float64) * np.array(row[f"hidden_{l}_rms"])[:, None]
                ref_h = hidden[l][[t - 1 for t in trained]].numpy()
                herr = float(np.abs(h - ref_h).max() / np.abs(ref_h).max())
                worst["hidden"] = max(worst["hidden"], herr)
                if herr > HIDDEN_TOL:
                    fail(f"row {row['row_index']}: hidden_{l} differs by {herr:.2e}")
    missing = sorted(set(expected) - set(seen))
    if missing:
        fail(f"{len(missing)} input rows are in no shard, e.g. {missing[:3]}")
    if len(seen) != len(set(seen)):
        fail("some sample ids appear twice")
    report = {"rows": rows, "targets": targets, "worst": worst, "errors": errors}
    print(json.dumps(report))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
