"""Shared helpers for the transformers-integration tests (tiny random models, PEFT-style references).

The reference for a prefix is the stock model with eager attention and a ``DynamicCache``
pre-filled with the prefix in cache convention (``k, v [1, Hkv, P, D]`` per layer) plus an
attention mask covering it: exactly what PEFT prefix tuning feeds the model.
"""
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, DynamicCache

VOCAB = 96
PAD = {"roberta": 1}                 # roberta's positions depend on padding_idx
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4)
GQA = dict(num_key_value_heads=2)
NO_DROP = dict(attention_dropout=0.0)


def config_for(family: str, **overrides):
    """A tiny fp32 config (hidden 32, 2 layers, 4 heads; GQA with 2 kv heads where supported)."""
    if family == "llama":
        cfg = tf.LlamaConfig(**COMMON, **GQA, max_position_embeddings=128)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**COMMON, **GQA, max_position_embeddings=128)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**COMMON, **GQA, head_dim=8, max_position_embeddings=128)
    elif family == "mistral":
        cfg = tf.MistralConfig(**COMMON, **GQA, sliding_window=64, max_position_embeddings=128)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**COMMON, **GQA, head_dim=8, max_position_embeddings=128)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**COMMON, **GQA, head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
                              attn_logit_softcapping=1.5, max_position_embeddings=128)
    elif family == "phi3":
        cfg = tf.Phi3Config(**COMMON, **GQA, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=2,
                            eos_token_id=3, max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**COMMON, rotary_pct=0.5, max_position_embeddings=128, hidden_dropout=0.0)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=0, bos_token_id=2, eos_token_id=3)
    elif family in ("bert", "roberta"):
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        cfg = cls(**COMMON, max_position_embeddings=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=PAD.get(family, 0))
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2", "opt"]
ENCODERS = ["bert", "roberta"]
FAMILIES = DECODERS + ENCODERS


def make_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = config_for(family, **overrides)
    auto = AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def geometry(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.num_hidden_layers, kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def random_prefixes(model, lengths, seed=1, scale=1.0):
    """``{name: (k, v)}`` random cache-convention prefixes ``[L, Hkv, P, D]``."""
    L, H, D = geometry(model)
    g = torch.Generator().manual_seed(seed)
    return {f"task{i}": (torch.randn(L, H, P, D, generator=g) * scale, torch.randn(L, H, P, D, generator=g) * scale)
            for i, P in enumerate(lengths)}


def prefix_cache(k, v, batch=1):
    """A DynamicCache holding ``k, v [L, Hkv, P, D]`` as the prefix of ``batch`` sequences (PEFT-style)."""
    cache = DynamicCache()
    for layer in range(k.shape[0]):
        cache.update(k[layer][None].expand(batch, -1, -1, -1), v[layer][None].expand(batch, -1, -1, -1), layer)
    return cache


def pad_id(family):
    return PAD.get(family, 0)


def random_rows(lengths, seed=2, low=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g) for n in lengths]


def pad_rows(rows, pad, side):
    """Stack token rows into ``ids, mask [B, S]``, padding with ``pad`` on the ``"left"`` or ``"right"``."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, r in enumerate(rows):
        at = slice(S - len(r), S) if side == "left" else slice(0, len(r))
        ids[b, at] = r
        mask[b, at] = 1
    return ids, mask


def left_pad(rows, family):
    return pad_rows(rows, pad_id(family), "left")


def right_pad(rows, family):
    return pad_rows(rows, pad_id(family), "right")


def positions_from_mask(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def reference_logits(model, row, k=None, v=None):
    """Stock-model logits ``[S, V]`` of one unpadded row with its prefix in a pre-filled cache."""
    ids = row[None]
    if k is None or k.shape[2] == 0:
        return model(ids, attention_mask=torch.ones_like(ids)).logits[0]
    P = k.shape[2]
    mask = torch.ones(1, P + ids.shape[1], dtype=torch.long)
    return model(ids, attention_mask=mask, cache=prefix_cache(k, v), use_cache=True).logits[0]


def reference_generate(model, row, k, v, **gen):
    """PEFT-style generation of one row: prefix in a pre-filled DynamicCache, mask of length P+S."""
    ids = row[None]
    if k.shape[2] == 0:
        return model.generate(ids, attention_mask=torch.ones_like(ids), **gen)[0, ids.shape[1]:]
    mask = torch.ones(1, k.shape[2] + ids.shape[1], dtype=torch.long)
    out = model.generate(ids, attention_mask=mask, cache=prefix_cache(k, v), **gen)
    return out[0, ids.shape[1]:]


def uses_positions_from_mask(family):
    """Families whose default positions are not pad-aware: tests pass cumsum positions when left-padding."""
    return family != "roberta"

