#!/usr/bin/env python3
"""A stand-in for a vLLM or SGLang server scoring prompts, for the tests: the same
responses those servers document, computed with transformers from a model folder.

    fake_server.py respond --model DIR --requests REQ.jsonl --format F --top-k K --output OUT.jsonl
        writes one `{"id", "prompt_token_ids", "response"}` line per request, as
        scripts/capture_served.py saves them;
    fake_server.py serve --model DIR --port P
        answers POST /v1/completions (vLLM, `prompt_logprobs` or `echo` + `logprobs`) and
        POST /generate (SGLang) on localhost until killed.

Formats: `vllm` (completions, `prompt_logprobs` with ranks, the prompt token listed
also outside the top k, `prompt_token_ids` from `return_token_ids`), `vllm-chat` (the
chat response's top-level fields), `echo` (OpenAI `echo` + `logprobs` with
`return_tokens_as_token_ids`), `sglang` (`meta_info.input_token_logprobs` and
`input_top_logprobs`). Like the servers, the softmax runs over all of the model's rows
(padded ones included). `--logits` answers raw logits instead (vLLM's
`--logprobs-mode raw_logits`), which the import must refuse.
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import transformers

LOCK = threading.Lock()


def load(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return model.eval()


def scores(model, ids, logits_mode=False):
    """[n, rows] float64 log-probs (or logits) of every prompt position."""
    with LOCK, torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].double()
    return out if logits_mode else torch.log_softmax(out, -1)


def respond(model, ids, fmt, k, logits_mode=False):
    lp = scores(model, ids, logits_mode)
    top_v, top_i = lp.topk(k, -1)
    ranks = (lp > lp.gather(-1, torch.tensor(ids[1:] + [0]).unsqueeze(-1))).sum(-1) + 1
    positions = []  # position j predicts ids[j] from row j - 1
    for j in range(1, len(ids)):
        row = j - 1
        top = [(int(i), float(v)) for i, v in zip(top_i[row], top_v[row])]
        positions.append((top, float(lp[row, ids[j]]), int(ranks[row])))
    if fmt in ("vllm", "vllm-chat"):
        plp = [None]
        for j, (top, label, rank) in enumerate(positions, start=1):
            entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": f"token_id:{i}"} for r, (i, v) in enumerate(top)}
            entry.setdefault(str(ids[j]), {"logprob": label, "rank": rank, "decoded_token": f"token_id:{ids[j]}"})
            plp.append(entry)
        if fmt == "vllm":
            return {"id": "cmpl-fake", "object": "text_completion", "model": "fake",
                    "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                                 "prompt_logprobs": plp, "prompt_token_ids": ids, "token_ids": []}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}],
                "prompt_logprobs": plp, "prompt_token_ids": ids,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}}
    if fmt == "echo":
        tokens = [f"token_id:{i}" for i in ids]
        token_lps = [None] + [label for _, label, _ in positions]
        tops = [None] + [{f"token_id:{i}": v for i, v in top} for top, _, _ in positions]
        return {"id": "cmpl-fake", "object": "text_completion", "model": "fake",
                "choices": [{"index": 0, "text": "", "finish_reason": "length",
                             "logprobs": {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                                          "text_offset": list(range(len(ids)))}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}}
    if fmt == "sglang":
        token_lps = [[None, ids[0], None]] + [[label, ids[j], None] for j, (_, label, _) in enumerate(positions, 1)]
        tops = [None] + [[[v, i, None] for i, v in top] for top, _, _ in positions]
        return {"text": "", "meta_info": {"id": "fake", "prompt_tokens": len(ids), "completion_tokens": 0,
                                          "input_token_logprobs": token_lps, "input_top_logprobs": tops,
                                          "output_token_logprobs": [], "output_top_logprobs": []}}
    raise SystemExit(f"unknown format {fmt}")


def cmd_respond(a):
    model = load(a.model)
    with open(a.requests) as f, open(a.output, "w") as out:
        for line in f:
            req = json.loads(line)
            resp = respond(model, req["prompt_token_ids"], a.format, a.top_k, a.logits)
            out.write(json.dumps({"id": req["id"], "prompt_token_ids": req["prompt_token_ids"], "response": resp}) + "\n")


def cmd_serve(a):
    model = load(a.model)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/completions":
                ids = body["prompt"]
                if body.get("echo"):
                    resp = respond(model, ids, "echo", body["logprobs"])
                else:
                    resp = respond(model, ids, "vllm", body["prompt_logprobs"])
            elif self.path == "/generate":
                resp = respond(model, body["input_ids"], "sglang", body["top_logprobs_num"])
            else:
                self.send_error(404)
                return
            data = json.dumps(resp).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(f"serving on {server.server_address[1]}", flush=True)
    server.serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("respond")
    r.add_argument("--model", required=True)
    r.add_argument("--requests", required=True)
    r.add_argument("--format", required=True, choices=["vllm", "vllm-chat", "echo", "sglang"])
    r.add_argument("--top-k", type=int, required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--logits", action="store_true")
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    (cmd_respond if a.cmd == "respond" else cmd_serve)(a)


if __name__ == "__main__":
    sys.exit(main())
