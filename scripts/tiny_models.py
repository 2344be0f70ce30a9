#!/usr/bin/env python3
"""Tiny random models in Hugging Face layout, and transformers' outputs for them.

    tiny_models.py make OUT_DIR     models + a tokenizer trained on tests/data/corpus.txt,
                                    and reference.safetensors per model (logits and every
                                    hidden state from transformers, for right-padded,
                                    left-padded and unpadded batches); plus `llama-spm`,
                                    a Llama with a second tokenizer of another kind
                                    (SentencePiece-style BPE: "▁" for spaces, a prefix
                                    space, byte fallback, no BOS) for cross-tokenizer KD
    tiny_models.py logits MODEL_DIR INPUTS OUT
                                    transformers' logits of MODEL_DIR for the input_ids /
                                    attention_mask in INPUTS (safetensors)
    tiny_models.py bench-model OUT_DIR [small|qwen2-7b|qwen3-moe|gemma2]
                                    a random Qwen2-shaped teacher with a realistic
                                    vocabulary (151,936 ids: the tiny BPE padded with
                                    added tokens) for benchmarks: `small` (hidden 128,
                                    2 layers) or Qwen2-7B's shape in bfloat16; or
                                    `qwen3-moe`, a Qwen3-MoE (hidden 256, 4 layers, 16
                                    experts, top 4) with the tiny BPE's 384 ids, so
                                    that the experts dominate the time; or `gemma2`
                                    (hidden 256, 4 layers, soft-capping 50 / 30,
                                    window 64 on every other layer, 384 ids), so that
                                    soft-capped attention takes its share
    tiny_models.py scale-model OUT_DIR SHAPE [FIELD=VALUE ...]
                                    a random model at a published shape (SCALE_SHAPES:
                                    smollm2-135m, smollm2-360m, smollm2-1.7b, qwen3-0.6b,
                                    qwen3-1.7b, gemma3-270m), float32, transformers' own
                                    init; the tiny BPE padded with added tokens to the
                                    shape's vocabulary; FIELD=VALUE overrides a config
                                    field (vocab_size=49152: the same body with another
                                    vocabulary); seed=N draws other weights (a student
                                    for a teacher of the same shape)
    tiny_models.py chat MODEL_DIR MESSAGES_JSON OUT_JSON
                                    transformers' apply_chat_template of a conversation:
                                    the rendered text and its token ids

Deterministic (fixed seeds), offline, a few seconds on a CPU. OUT_DIR is written to a
temporary sibling and renamed, so a concurrent or interrupted run never leaves half a set.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus.txt"
# ChatML with transformers' {% generation %} markers, so that transformers itself can
# say which tokens are the assistant's (return_assistant_tokens_mask): an independent
# reference for our loss masks.
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 384
SPM_VOCAB = 512

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

# name -> (config class name, config overrides, save options)
MODELS = {
    # Llama 3.1-style rope scaling, untied head.
    "llama": ("LlamaConfig", dict(rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)), dict()),
    # Tied embeddings, attention and MLP biases, MHA, stored sharded in bfloat16.
    "llama-tied-bf16": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, rope_theta=500000.0), dict(dtype=torch.bfloat16, max_shard_size="40KB")),
    # qkv bias, tied, padded vocabulary (more rows than tokens, as Qwen2 does).
    "qwen2": ("Qwen2Config", dict(vocab_size=TOKENIZER_VOCAB + 32, tie_word_embeddings=True,
        rope_theta=1000000.0), dict()),
    # q/k norms, head_dim independent of hidden_size / heads.
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False), dict(jinja=True)),
    # sliding window shorter than the test sequences.
    "mistral": ("MistralConfig", dict(sliding_window=8), dict()),
    # Mixture of experts: 8 experts, top 2 renormalised, layer 1 dense (mlp_only_layers),
    # a sliding window on every layer; router rows of uneven scale (uneven routing).
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1], use_sliding_window=True,
        sliding_window=8), dict()),
    # Shared expert with its sigmoid gate, top-2 of 6 not renormalised, qkv bias, first layer
    # dense, stored in bfloat16.
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
        shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[0]),
        dict(dtype=torch.bfloat16)),
    # Mixtral: 4 experts (w1/w2/w3 under block_sparse_moe), top 2.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), dict()),
    # Gemma 2: attention and final-logit soft-capping low enough to bend most scores
    # (`make` prints how many), query_pre_attn_scalar != head_dim, sliding window 8 on
    # layers 0 and 2, (1 + w) norms around attention and MLP, GELU-tanh, scaled
    # embeddings, tied head.
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0, sliding_window=8), dict()),
    # Gemma 3 (text): q/k norms, a RoPE per layer type (sliding: base 10,000; full: 10^6
    # with linear scaling 8, as Gemma 3 4B-27B), head_dim 32 with scalar 20, window 8.
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=20, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
        dict(model="Gemma3ForCausalLM")),
    # Gemma 3 with an image encoder (model_type gemma3): read as its text part, from
    # weights stored under the hub's names (language_model.model.*), bfloat16.
    "gemma3-mm": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=20, sliding_window=8,
        sliding_window_pattern=2, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}),
        dict(model="Gemma3ForConditionalGeneration", dtype=torch.bfloat16, hub_names=True)),
}

# A tiny SigLIP image encoder for gemma3-mm (the text tests never run it).
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   image_size=28, patch_size=14)


def model_class(cls, save):
    return save.get("model") or cls.replace("Config", "ForCausalLM")


def build_config(cls, overrides, save):
    import transformers

    text = getattr(transformers, cls)(**{**COMMON, "vocab_size": TOKENIZER_VOCAB, **overrides})
    if save.get("model") != "Gemma3ForConditionalGeneration":
        return text
    vision = transformers.SiglipVisionConfig(**TINY_VISION)
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     mm_tokens_per_image=4, image_token_index=TOKENIZER_VOCAB - 1,
                                     boi_token_index=TOKENIZER_VOCAB - 3, eoi_token_index=TOKENIZER_VOCAB - 2)


def to_hub_names(d: Path):
    """Rename a saved multimodal Gemma 3 to the names google's checkpoints use."""
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for k, v in tensors.items():
        for ours, hub in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                          ("model.vision_tower.", "vision_tower."),
                          ("model.multi_modal_projector.", "multi_modal_projector.")):
            if k.startswith(ours):
                k = hub + k[len(ours):]
                break
        renamed[k] = v
    save_file(renamed, str(path), metadata={"format": "pt"})


def train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    # Llama-style: BOS in front of plain text.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(out / "tokenizer.json"))


def train_spm_tokenizer(out: Path):
    """Llama-2 / Mistral style: Metaspace pre-tokenizer (spaces become the word-initial
    "▁", one is put before the text), byte fallback (<0x00>..<0xFF> for what the
    vocabulary lacks: emoji and CJK here), no BOS added. Another vocabulary and another
    way of writing whitespace than the byte-level tokenizer of the other models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=SPM_VOCAB - 256, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 256,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return len(vocab)


def make_spm_student(out: Path):
    import transformers

    out.mkdir()
    vocab = train_spm_tokenizer(out)
    torch.manual_seed(100)
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
                                      "pad_token_id": 0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)


def write_tokenizer_files(src: Path, dst: Path, jinja: bool):
    if src != dst:
        shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
           "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}
    if jinja:
        (dst / "chat_template.jinja").write_text(CHATML)
    else:
        cfg["chat_template"] = CHATML
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def spread_weights(model, seed):
    """transformers' init (std 0.02) makes every layer nearly the identity; larger
    weights and non-unit norms make a parity test sensitive to every part of a layer."""
    g = torch.Generator().manual_seed(seed)
    # Gemma's norms scale by (1 + w): around zero is their "one".
    one = 0.0 if "gemma" in model.config.model_type else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(one + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and p.shape[0] > 1:
                # A router: rows of uneven scale, so that some experts win far more often.
                scale = torch.linspace(0.05, 0.6, p.shape[0]).unsqueeze(1)
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def corpus_batches(tok_path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(CORPUS.read_text()).ids
    lengths = [40, 29, 13]
    seqs = [ids[1 + 50 * i: 1 + 50 * i + n] for i, n in enumerate(lengths)]
    width = max(lengths)
    batches = {}
    for side in ("right", "left"):
        input_ids = torch.full((len(seqs), width), 2, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            input_ids[r, sl] = torch.tensor(s)
            mask[r, sl] = 1
        batches[side] = (input_ids, mask)
    full = torch.tensor([ids[200:232], ids[300:332]])
    batches["full"] = (full, None)
    return batches


def hf_outputs(model, input_ids, mask):
    kwargs = dict(input_ids=input_ids, output_hidden_states=True)
    if mask is not None:
        kwargs["attention_mask"] = mask
        # Positions count real tokens, so left padding does not shift them.
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits.float(), [h.float() for h in out.hidden_states]


def make(out_dir: Path):
    import transformers

    if out_dir.exists():
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    train_tokenizer(tmp)
    batches = corpus_batches(tmp / "tokenizer.json")
    for seed, (name, (cls, overrides, save)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        cfg = build_config(cls, overrides, save)
        cfg._attn_implementation = "eager"
        model_cls = getattr(transformers, model_class(cls, save))
        model = model_cls(cfg).eval()
        spread_weights(model, seed)
        if save.get("dtype") is not None:
            model = model.to(save["dtype"])
        d = tmp / name
        model.save_pretrained(d, max_shard_size=save.get("max_shard_size", "5GB"))
        if save.get("hub_names"):
            to_hub_names(d)
        write_tokenizer_files(tmp, d, save.get("jinja", False))
        # The reference comes from the saved files, in float32, as our loader sees them.
        ref_model = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        # transformers' default attention (sdpa), the kernel we use too: with experts, a
        # rounding difference can flip a token's routing, so the kernel shows in the error.
        # Gemma 2's soft-capping has no sdpa path: eager, as ours.
        bf16_attention = "eager" if cls == "Gemma2Config" else "sdpa"
        bf16_model = model_cls.from_pretrained(d, dtype=torch.bfloat16, attn_implementation=bf16_attention).eval()
        if cls == "Gemma2Config":
            report_soft_capping(ref_model, batches["full"][0])
        tensors = {}
        for side, (input_ids, mask) in batches.items():
            # transformers' own bfloat16 run: the yardstick for our reduced-precision runs.
            tensors[f"{side}.logits_bf16"] = hf_outputs(bf16_model, input_ids, mask)[0]
            logits, hidden = hf_outputs(ref_model, input_ids, mask)
            tensors[f"{side}.input_ids"] = input_ids
            if mask is not None:
                tensors[f"{side}.attention_mask"] = mask
            tensors[f"{side}.logits"] = logits
            for i, h in enumerate(hidden):
                tensors[f"{side}.hidden.{i}"] = h
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "reference.safetensors"))
    make_spm_student(tmp / "llama-spm")
    (tmp / "README").write_text("Generated by scripts/tiny_models.py; random weights, not for use.\n")
    try:
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp)  # another process finished first
        if not out_dir.exists():
            raise


def report_soft_capping(model, input_ids):
    """How much of Gemma 2's soft-capping bites on the test batch: the share of attention
    scores (as the eager attention sees them, after RoPE) and of logits whose magnitude
    exceeds half the cap (tanh bends them by more than 7%)."""
    from transformers.models.gemma2 import modeling_gemma2 as m

    cfg, scores = model.config, []
    eager = m.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        k = m.repeat_kv(key, module.num_key_value_groups)
        scores.append((query @ k.transpose(2, 3) * scaling).flatten())
        return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    m.eager_attention_forward = spy
    try:
        with torch.no_grad():
            raw = model.lm_head(model.model(input_ids=input_ids).last_hidden_state)
    finally:
        m.eager_attention_forward = eager
    attention = (torch.cat(scores).abs() > cfg.attn_logit_softcapping / 2).float().mean().item()
    logits = (raw.abs() > cfg.final_logit_softcapping / 2).float().mean().item()
    print(f"gemma2 soft-capping: {attention:.0%} of attention scores and {logits:.0%} of logits "
          f"beyond half the cap", file=sys.stderr)


def logits(model_dir: Path, inputs: Path, out: Path):
    import transformers

    t = load_file(str(inputs))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mask = t.get("attention_mask")
    kwargs = dict(input_ids=t["input_ids"])
    if mask is not None:
        kwargs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        result = model(**kwargs).logits.float()
    save_file({"logits": result.contiguous()}, str(out))


BENCH_SHAPES = {
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True),
    # Qwen2-7B's config.json (152,064 embedding rows for 151,646 tokens).
    "qwen3-moe": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False),
    "gemma2": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064, rope_theta=1000000.0,
                     max_position_embeddings=32768),
}


def bench_model(out_dir: Path, shape: str):
    import transformers
    from tokenizers import AddedToken, Tokenizer

    if out_dir.exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    train_tokenizer(tmp)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    vocab = TOKENIZER_VOCAB if shape in ("qwen3-moe", "gemma2") else 151936
    extra = vocab - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(extra)])
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    if shape == "qwen3-moe":
        cfg = transformers.Qwen3MoeConfig(**{**COMMON, "vocab_size": vocab, **BENCH_SHAPES[shape]})
        model = transformers.Qwen3MoeForCausalLM(cfg).eval()
        spread_weights(model, 0)
    elif shape == "gemma2":
        cfg = transformers.Gemma2Config(**{**COMMON, "vocab_size": vocab, **BENCH_SHAPES[shape]})
        model = transformers.Gemma2ForCausalLM(cfg).eval()
        spread_weights(model, 0)
    elif shape == "small":
        cfg = transformers.Qwen2Config(**{**COMMON, "vocab_size": vocab, **BENCH_SHAPES[shape]})
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        spread_weights(model, 0)
    else:
        # transformers' own init (std 0.02), straight into bfloat16 to halve memory.
        cfg = transformers.Qwen2Config(**{**COMMON, "vocab_size": vocab, **BENCH_SHAPES[shape]})
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp)
    write_tokenizer_files(tmp, tmp, False)
    tmp.rename(out_dir)


# Published configs (config.json of each model on the hub), for scripts/bench_scale.py.
SCALE_SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    "smollm2-360m": ("LlamaConfig", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    "smollm2-1.7b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, rope_theta=130000.0,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3-1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Every sixth layer global (window 512 on the others), 262,144 ids.
    "gemma3-270m": ("Gemma3TextConfig", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        query_pre_attn_scalar=256, sliding_window=512,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)])),
}


def scale_model(out_dir: Path, shape: str, overrides=()):
    import transformers
    from tokenizers import AddedToken, Tokenizer

    if out_dir.exists():
        return
    cls, fields = SCALE_SHAPES[shape]
    fields = {**COMMON, **fields}
    seed = 0
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "seed":
            seed = int(value)
        else:
            fields[key] = json.loads(value)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    train_tokenizer(tmp)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    extra = fields["vocab_size"] - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(extra)])
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**fields)
    cfg.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp)
    write_tokenizer_files(tmp, tmp, False)
    tmp.rename(out_dir)


def chat(model_dir: Path, messages: Path, out: Path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    msgs = json.loads(messages.read_text())
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    plain = tok("Alice was beginning to get very tired.")["input_ids"]
    out.write_text(json.dumps({"text": text, "ids": ids, "plain_ids": plain}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "bench-model":
        bench_model(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "small")
    elif len(sys.argv) >= 4 and sys.argv[1] == "scale-model":
        scale_model(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 5 and sys.argv[1] == "chat":
        chat(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) == 5 and sys.argv[1] == "logits":
        logits(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
