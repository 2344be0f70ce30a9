#!/usr/bin/env python3
"""Score a shard set's documents with a served teacher (vLLM or SGLang) and save the
responses for `distill import-logprobs`.

    distill import-logprobs --teacher MODEL_DIR --input DATA --write-requests requests.jsonl
    scripts/capture_served.py --requests requests.jsonl --url http://HOST:8000 \\
        --api vllm --top-k 20 --output responses.jsonl [--concurrency 8]
    distill import-logprobs --teacher MODEL_DIR --input DATA --top-k 20 \\
        --responses responses.jsonl --output shards/

Token ids are sent, never text, so the server scores exactly the ids distill planned
(chat template, truncation and packing included) and nothing is re-tokenised.
`--api vllm` posts `/v1/completions` with `prompt_logprobs` (vLLM's `--max-logprobs`,
20 by default, caps it; raise it on the server for a larger k); `--api echo` the
OpenAI `echo` + `logprobs` form with `return_tokens_as_token_ids`; `--api sglang`
posts `/generate` with `return_logprob`, `logprob_start_len: 0` and
`top_logprobs_num`. Requests run `--concurrency` at a time; each response is appended
to `--output` as one complete line as soon as it arrives, so an interrupted run
resumes: a rerun skips the ids already saved (a torn last line is dropped first).
Failed requests are retried with backoff, then reported; the run exits non-zero if
any request is left unanswered. Only the standard library is needed.
"""
import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from threading import Lock


def body_for(api, ids, k, model):
    if api == "vllm":
        return "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                   "prompt_logprobs": k, "return_token_ids": True}
    if api == "echo":
        return "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True,
                                   "logprobs": k, "return_tokens_as_token_ids": True}
    if api == "sglang":
        return "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                             "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k}
    raise SystemExit(f"--api {api}: vllm, echo or sglang")


def post(url, payload, timeout, retries, headers):
    data = json.dumps(payload).encode()
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
            # A 4xx is the request's fault: retrying cannot help.
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code != 429:
                raise RuntimeError(f"HTTP {e.code}: {e.read()[:500]!r}") from e
            if attempt == retries:
                raise RuntimeError(f"{type(e).__name__}: {e}") from e
            time.sleep(min(30.0, 0.5 * 2 ** attempt))


def saved_ids(path):
    """Ids already answered in `path`, a file this script wrote: every complete line must
    be one of its records, else it is refused untouched. Only then is a torn last line
    (an interrupted write) cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    ids = set()
    for n, line in enumerate(keep.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and "id" in record and "response" in record):
            raise SystemExit(f"{path}:{n}: not a response saved by capture_served.py; give another --output")
        ids.add(record["id"])
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return ids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", required=True, help="JSONL from `distill import-logprobs --write-requests`")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8000")
    p.add_argument("--api", default="vllm", choices=["vllm", "echo", "sglang"])
    p.add_argument("--top-k", type=int, required=True, help="log-probs per position to ask for")
    p.add_argument("--output", required=True, help="JSONL of responses, appended to and resumed")
    p.add_argument("--model", default="", help="model name for OpenAI-compatible servers")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="stop after this many new responses (0: all)")
    a = p.parse_args()
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if os.environ.get("OPENAI_API_KEY") else {}
    with open(a.requests) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    done = saved_ids(a.output)
    todo = [r for r in requests if r["id"] not in done]
    if a.limit:
        todo = todo[: a.limit]
    print(f"{len(requests)} requests, {len(done)} already answered, {len(todo)} to send", file=sys.stderr)
    lock, failed, written = Lock(), [], 0
    with open(a.output, "a") as out, ThreadPoolExecutor(max_workers=max(1, a.concurrency)) as pool:
        def one(r):
            path, payload = body_for(a.api, r["prompt_token_ids"], a.top_k, a.model)
            return r, post(a.url.rstrip("/") + path, payload, a.timeout, a.retries, headers)

        futures = [pool.submit(one, r) for r in todo]
        for fut in as_completed(futures):
            try:
                r, resp = fut.result()
            except RuntimeError as e:
                failed.append(str(e))
                continue
            line = json.dumps({"id": r["id"], "prompt_token_ids": r["prompt_token_ids"], "response": resp})
            with lock:
                out.write(line + "\n")
                out.flush()
                written += 1
    print(f"wrote {written} responses to {a.output}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} requests failed (rerun to retry them); first: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
