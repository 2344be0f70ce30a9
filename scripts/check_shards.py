#!/usr/bin/env python3
"""Checks a distill shard set against transformers, reading it with pyarrow only.

    check_shards.py SHARD_DIR MODEL_DIR INPUT.jsonl [--fields text,prompt,response,messages]

For every row: recomputes the teacher's distribution with transformers (float32, each
packed document on its own) and compares top-k ids and log-probs (float16 tolerance),
the tail mass, the true token's log-prob and the stored hidden states; for tail draws
(precompute --sample), that each drawn id is what inverse-CDF sampling of transformers'
tail distribution gives for the documented uniform numbers (schemas/shards.md), that the
ids are distinct, ascending and outside the top-k, and that the counts sum to the draws
per position; checks the loss
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
# A draw may land on the neighbouring id when its uniform number falls this close (as a
# share of the tail mass) to the boundary between two ids: distill's float32 teacher
# and transformers' differ by about 1e-5 in each probability.
DRAW_TOL = 1e-4
MASK64 = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def draw_uniforms(seed, row_index, position, count):
    """The uniform numbers of one position's draws, as schemas/shards.md defines them."""
    state = splitmix64(seed ^ splitmix64(row_index ^ splitmix64((position + 0x5851F42D) & MASK64)))
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        out.append((splitmix64(state) >> 11) / float(1 << 53))
    return out


def check_draws(ref, top_ids, ids, counts, uniforms, fail, where):
    """One position's draws against transformers' distribution `ref` (float64 log-probs)."""
    if sorted(set(ids)) != list(ids) or any(i in top_ids for i in ids):
        return fail(f"{where}: drawn ids {ids} are not distinct, ascending, outside the top-k")
    if sum(counts) != len(uniforms) or min(counts, default=1) < 1:
        return fail(f"{where}: counts {counts} do not sum to {len(uniforms)} draws")
    p = ref.exp().numpy().copy()
    p[list(top_ids)] = 0.0
    cdf = np.cumsum(p)
    total = cdf[-1]
    expected = {}
    for u in uniforms:
        x = u * total
        j = int(np.searchsorted(cdf, x, side="right"))
        if j not in ids:
            # Allowed only at a boundary: x within DRAW_TOL of the interval of a stored id.
            near = [i for i in ids if cdf[i] - p[i] - DRAW_TOL * total <= x <= cdf[i] + DRAW_TOL * total]
            if not near:
                return fail(f"{where}: a draw at {u:.6f} of the tail should be id {j}, which is not stored")
            j = near[0]
        expected[j] = expected.get(j, 0) + 1
    if [expected.get(i, 0) for i in ids] != list(counts):
        worst = max(abs(expected.get(i, 0) - c) for i, c in zip(ids, counts))
        if worst > 1:
            fail(f"{where}: counts {list(counts)} for ids {list(ids)}, transformers' draws give {expected}")


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
    draws = cap.get("draws")
    top_p = cap.get("top_p")
    vocab = manifest["settings"]["tokenizer"]["vocab_size"]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = expected_examples(input_path, tok)
    worst = {"logprob": 0.0, "tail": 0.0, "target": 0.0, "hidden": 0.0}
    draws_checked = 0
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
            if k == 0:  # draws alone: no top-k columns
                row["topk_ids"] = [[] for _ in trained]
                row["topk_logprobs"] = [[] for _ in trained]
            if row["num_targets"] != len(trained) or len(row["tail_logmass"]) != len(trained):
                fail(f"row {row['row_index']}: {len(row['tail_logmass'])} targets stored, {len(trained)} trained")
                continue
            targets += len(trained)
            for j, t in enumerate(trained):
                ref = logp[t - 1]
                stored_ids = row["topk_ids"][j]
                stored_lp = np.array(row["topk_logprobs"][j], dtype=np.float64)
                n = len(stored_ids)  # k, or fewer when mass-adaptive
                ref_top = torch.topk(ref, n).values.numpy()
                if top_p:
                    # The fewest ids that reach top_p: the ones before the last hold less.
                    p_sorted = torch.topk(ref, k).values.exp().numpy()
                    before, through = p_sorted[:n - 1].sum(), p_sorted[:n].sum()
                    if not (1 <= n <= k and before < top_p + 1e-4 and (n == k or through >= top_p - 1e-4)):
                        fail(f"row {row['row_index']} token {t}: {n} ids kept, holding {through:.5f} (top_p {top_p})")
                at_ids = ref[stored_ids].numpy()
                err = max(np.abs(stored_lp - ref_top).max(), np.abs(stored_lp - at_ids).max()) if k else 0.0
                worst["logprob"] = max(worst["logprob"], float(err))
                if k > 0 and (err > LOGPROB_TOL or len(set(stored_ids)) != n):
                    fail(f"row {row['row_index']} token {t}: top-k differs by {err:.2e}")
                rest = torch.ones_like(ref, dtype=torch.bool)
                rest[stored_ids] = False
                ref_tail = torch.logsumexp(ref[rest], 0).item() if rest.any() else -math.inf
                got_tail = row["tail_logmass"][j]
                terr = 0.0 if (ref_tail == -math.inf and got_tail == -math.inf) else abs(got_tail - ref_tail)
                worst["tail"] = max(worst["tail"], terr)
                if terr > F32_TOL * max(1.0, abs(ref_tail)):
                    fail(f"row {row['row_index']} token {t}: tail {got_tail} vs {ref_tail}")
                if draws:
                    u = draw_uniforms(draws["seed"], row["row_index"], j, draws["per_position"])
                    where = f"row {row['row_index']} token {t}"
                    check_draws(ref, set(stored_ids), row["draw_ids"][j], row["draw_counts"][j], u, fail, where)
                    draws_checked += draws["per_position"]
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
    report = {"rows": rows, "targets": targets, "draws_checked": draws_checked, "worst": worst, "errors": errors}
    print(json.dumps(report))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
