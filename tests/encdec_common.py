"""Helpers for the encoder-decoder tests: tiny random T5 / BART, and the materialised reference.

The reference is the stock model with eager attention, whose eager attention function is
wrapped (per test, through ``monkeypatch``) to prepend a prefix to K/V of the attention modules
the test itself picks by name: encoder self-attention, decoder self-attention and decoder
cross-attention. Prefix columns get a zero additive mask (always visible) and, for T5, a zero
relative position bias. The model's own positions are untouched (the prefix is position-free:
the convention of ``softprompt.integration.encdec``).
"""
import contextlib

import torch
import torch.nn.functional as F
import transformers as tf
from transformers.models.bart import modeling_bart
from transformers.models.t5 import modeling_t5

from test_integration_common import pad_rows, random_rows  # noqa: F401  (shared row helpers)

VOCAB = 96
FAMILIES = ["t5", "bart"]
KINDS = ("encoder", "decoder", "cross")


def config_for(family, decoder_layers=2):
    if family == "t5":
        return tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                           num_decoder_layers=decoder_layers, num_heads=4, dropout_rate=0.0,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=decoder_layers,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             decoder_start_token_id=2, forced_eos_token_id=None)
    raise KeyError(family)


def make_model(family, seed=0, decoder_layers=2, **overrides):
    torch.manual_seed(seed)
    cfg = config_for(family, decoder_layers)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cls = tf.T5ForConditionalGeneration if family == "t5" else tf.BartForConditionalGeneration
    return cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()


def pad_id(family):
    return 0 if family == "t5" else 1


def modules_by_kind(model):
    """The test's own pick of the three kinds of attention modules, by attribute path."""
    if isinstance(model, tf.T5ForConditionalGeneration):
        enc = [b.layer[0].SelfAttention for b in model.encoder.block]
        dec = [b.layer[0].SelfAttention for b in model.decoder.block]
        cross = [b.layer[1].EncDecAttention for b in model.decoder.block]
    else:
        enc = [layer.self_attn for layer in model.model.encoder.layers]
        dec = [layer.self_attn for layer in model.model.decoder.layers]
        cross = [layer.encoder_attn for layer in model.model.decoder.layers]
    return {"encoder": enc, "decoder": dec, "cross": cross}


def layer_counts(model):
    return {kind: len(ms) for kind, ms in modules_by_kind(model).items()}


def heads_dim(model):
    cfg = model.config
    return (cfg.num_heads, cfg.d_kv) if cfg.model_type == "t5" else (cfg.decoder_attention_heads,
                                                                     cfg.d_model // cfg.decoder_attention_heads)


def random_prefixes(model, lengths, seed=1, scale=1.0):
    """``{task: {kind: (k, v) [L_kind, H, P, D]}}``."""
    H, D = heads_dim(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, P in enumerate(lengths):
        out[f"task{i}"] = {kind: (torch.randn(n, H, P, D, generator=g) * scale,
                                  torch.randn(n, H, P, D, generator=g) * scale)
                           for kind, n in layer_counts(model).items()}
    return out


def joined(prefix):
    """Per-kind prefix -> ``k, v [Le + 2 Ld, H, P, D]`` in the store's virtual-layer order."""
    return (torch.cat([prefix[kind][0] for kind in KINDS]), torch.cat([prefix[kind][1] for kind in KINDS]))


class Reference:
    """Wraps the families' eager attention so ``model`` (eager) sees ``prefix`` on its three kinds."""

    def __init__(self, model, monkeypatch):
        self.where = {id(m): (kind, i) for kind, ms in modules_by_kind(model).items() for i, m in enumerate(ms)}
        self.prefix = None
        for mod in (modeling_t5, modeling_bart):
            original = mod.eager_attention_forward
            monkeypatch.setattr(mod, "eager_attention_forward", self._wrap(original))

    def _wrap(self, original):
        def eager(module, query, key, value, attention_mask, *args, position_bias=None, **kwargs):
            slot = self.where.get(id(module))
            if self.prefix is not None and slot is not None:
                kind, layer = slot
                pk, pv = self.prefix[kind]
                P = pk.shape[2]
                if P:
                    B = query.shape[0]
                    key = torch.cat([pk[layer][None].expand(B, -1, -1, -1).to(key.dtype), key], dim=2)
                    value = torch.cat([pv[layer][None].expand(B, -1, -1, -1).to(value.dtype), value], dim=2)
                    if position_bias is not None:
                        position_bias = F.pad(position_bias, (P, 0))          # zero bias on prefix columns
                    if attention_mask is not None:
                        attention_mask = F.pad(attention_mask, (P, 0))        # prefix always visible
            if position_bias is not None:
                kwargs["position_bias"] = position_bias
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return eager

    @contextlib.contextmanager
    def using(self, prefix):
        """Within the block the model runs with ``prefix`` (``{kind: (k, v)}``, or None)."""
        self.prefix = prefix
        try:
            yield
        finally:
            self.prefix = None


def right_pad(rows, family):
    return pad_rows(rows, pad_id(family), "right")
