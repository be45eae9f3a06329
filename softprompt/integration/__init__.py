"""Drop-in transformers integration: ``attach(model)`` routes attention through the prefix kernels.

Usage::

    store = softprompt.attach(model)                 # backend=None: Triton on CUDA, torch on the CPU
    store.add("sentiment", k, v)                     # k, v [L, Hkv, P, D] in cache convention
    ids = store.task_ids(["sentiment", "ner"])       # or pass task names to model(...)
    model(input_ids, attention_mask=am, task_ids=ids)
    model.generate(input_ids, attention_mask=am, task_ids=ids)   # a tensor: beams repeat it
    softprompt.detach(model)                         # model(..., task_ids=...) is now a ValueError

Modules (each imports only those listed before it): ``families`` (supported families and their
facts), ``positions`` (RoPE rotation and learned-position offsets), ``store`` (``ModelPrefixStore``:
cache-convention add/get/prefix_grad), ``attention`` (the registered attention and mask
functions), ``wiring`` (what attach installs on a model and detach takes off: store, attention
slots, the ``task_ids`` forward), the adapters ``decoder`` (decoder-only and encoder-only
families) and ``encdec`` (T5 / BART), and ``attach`` (attach/detach: picks the adapter).

Semantics: a prefix behaves exactly like PEFT's prefix pre-filled in a KV cache (real tokens at
positions P..P+S-1), with these deliberate differences: the prefix is exempt from sliding
windows (a PEFT cache prefix would be evicted by a sliding-window cache), from cache cropping
and beam reordering (it is not in the HF cache at all), and from gradient checkpointing's
``cache=None`` (it keeps working). Explicit ``position_ids`` are own-token positions: learned
absolute families get ``+P`` added (as PEFT does), RoPE families use them as they are.

Task ids: an id is the task's row of the store's block table and is never given to another task
while the store lives; ``model(..., task_ids=...)`` refuses ids of removed tasks (and negative or
unknown ids) with a ``ValueError`` naming ``task_ids``. Names are resolved to ids per forward, so
passing names never goes stale. After ``detach`` the model's forward refuses ``task_ids``: stock
transformers forwards accept unknown keywords and would run every row without its prefix.

Limitations:
* Families outside ``SUPPORTED_FAMILIES`` raise ``ValueError``; rope schedules with
  length-dependent frequencies (``dynamic``, ``longrope``) are refused (a fixed pre-rotation
  would be inexact).
* Soft-capping (gemma2), attention dropout in training and additive non-binary float masks run
  on the integration's dense PyTorch path (materialises ``[prefix ; own]`` per sequence), not on
  the kernels. Right-padded causal batches go to the kernel as a bool ``attn_mask``.
* ``generate()`` needs ``task_ids`` as a tensor (names are only resolved by ``forward``), so that
  beam search / ``num_return_sequences`` can repeat it.
* ``torch.compile``: reducing the mask to lengths is data-dependent (graph breaks).
* The store is a submodule (``model.softprompt_store``): it is in ``state_dict()``; strip it
  (or detach) before ``save_pretrained`` if the base checkpoint must stay clean.
* ``PrefixStore`` with ``trainable=True`` trains the stored (pre-rotated) keys; ``prefix_grad``
  reports gradients in cache convention.
"""
from .attach import attach, attached_store, detach
from .attention import ATTN_NAME
from .families import SUPPORTED_FAMILIES
from .store import ModelPrefixStore

__all__ = ["attach", "detach", "attached_store", "ModelPrefixStore", "SUPPORTED_FAMILIES", "ATTN_NAME"]
