"""The dense path: what the ``torch`` backend runs when a call sets an option its no-copy path
lacks (the plan dispatches here). The options, validated by ``inputs.check_softcap``,
``check_bias`` and ``check_dropout``, and computed by neither the no-copy nor the Triton kernels:

* ``softcap`` (plan option): Gemma 2's soft-capping, ``tanh(scale * q·k / softcap) * softcap``.
* ``bias`` (run argument): an additive float bias on the own-key scores, ``[B|1, 1|Hq, Sq, Skv]``
  (T5's relative position bias, a caller's additive float mask); prefix columns get none.
  Differentiable: a trainable bias gets its gradient.
* ``dropout_p`` / ``generator`` (run arguments): dropout on the attention probabilities (the caller
  passes ``dropout_p > 0`` only in training); the keep mask is drawn from ``generator`` (default:
  torch's global generator), so the same generator state gives the same mask on every backend.

``dense_attention`` materialises ``[prefix ; own]`` per sequence like ``reference`` (the same code,
see :func:`~kernels.reference.materialised_attention`) but keeps the matrix products in the input
dtype (fp32 softmax), as the families' eager attention does.
"""
from __future__ import annotations

import torch

from .inputs import PrefixAttentionInputs
from .reference import materialised_attention


def dense_attention(x: PrefixAttentionInputs) -> torch.Tensor:
    return materialised_attention(x, x.q.dtype)
