"""Bad input at the public boundary raises a ValueError naming the argument."""
import pytest
import torch

from cases import Case
from softprompt.kernels import prefix_attention


def good():
    args, kw = Case(seed=0, requires_grad=False).build()
    return list(args), kw


def with_arg(index, value):
    args, kw = good()
    args[index] = value
    return args, kw


def with_kw(**changes):
    args, kw = good()
    kw.update(changes)
    return args, kw


BAD = {
    "q rank": (lambda: with_arg(0, torch.randn(5, 4, 16)), "`q`"),
    "q int": (lambda: with_arg(0, torch.zeros(5, 4, 7, 16, dtype=torch.long)), "`q`"),
    "k batch": (lambda: with_arg(1, torch.randn(4, 2, 7, 16)), "`k`"),
    "v shape": (lambda: with_arg(2, torch.randn(5, 2, 6, 16)), "`v`"),
    "k dtype": (lambda: with_arg(1, torch.randn(5, 2, 7, 16, dtype=torch.float64)), "`k`"),
    "heads not multiple": (lambda: with_arg(1, torch.randn(5, 3, 7, 16)), "`k`"),
    "prefix heads": (lambda: with_arg(3, torch.randn(9, 1, 4, 16)), "`prefix_k`"),
    "prefix_v shape": (lambda: with_arg(4, torch.randn(2, 2, 4, 16)), "`prefix_v`"),
    "prefix dtype": (lambda: with_arg(3, torch.randn(30, 2, 4, 16).half()), "`prefix_k`"),
    "table float": (lambda: with_arg(5, torch.zeros(3, 3)), "`block_table`"),
    "table out of pool": (lambda: with_arg(5, torch.full((3, 3), 999)), "`block_table`"),
    "prefix_lens shape": (lambda: with_arg(6, torch.tensor([1, 2])), "`prefix_lens`"),
    "prefix_lens too long": (lambda: with_arg(6, torch.tensor([1, 2, 1000])), "`prefix_lens`"),
    "prefix_lens negative": (lambda: with_arg(6, torch.tensor([1, -2, 0])), "`prefix_lens`"),
    "task id out of range": (lambda: with_arg(7, torch.tensor([0, 1, 2, 3, 0])), "`task_ids`"),
    "task id negative": (lambda: with_arg(7, torch.tensor([0, 1, -1, 0, 0])), "`task_ids`"),
    "task_ids shape": (lambda: with_arg(7, torch.tensor([0, 1])), "`task_ids`"),
    "q_lens too long": (lambda: with_kw(q_lens=torch.full((5,), 8)), "`q_lens`"),
    "kv_lens negative": (lambda: with_kw(kv_lens=torch.full((5,), -1)), "`kv_lens`"),
    "kv_starts past kv_lens": (lambda: with_kw(kv_lens=torch.full((5,), 3), kv_starts=torch.full((5,), 4)), "`kv_starts`"),
    "q_lens float": (lambda: with_kw(q_lens=torch.full((5,), 2.0)), "`q_lens`"),
    "window zero": (lambda: with_kw(window=0), "`window`"),
    "scale negative": (lambda: with_kw(scale=-1.0), "`scale`"),
    "mask not bool": (lambda: with_kw(attn_mask=torch.zeros(5, 1, 7, 7)), "`attn_mask`"),
    "mask shape": (lambda: with_kw(attn_mask=torch.ones(5, 3, 7, 7, dtype=torch.bool)), "`attn_mask`"),
    "backend unknown": (lambda: with_kw(backend="cuda-magic"), "`backend`"),
    # hardening: each of these used to pass, crash with another error, or blame another argument
    "q on meta": (lambda: with_arg(0, torch.empty(5, 4, 7, 16, device="meta")), "`q`.*meta"),
    "prefix_v on meta": (lambda: with_arg(4, torch.empty(30, 2, 4, 16, device="meta")), "`prefix_v`.*meta"),
    "task_ids on meta": (lambda: with_arg(7, torch.empty(5, dtype=torch.long, device="meta")), "`task_ids`.*meta"),
    "kv_lens on meta": (lambda: with_kw(kv_lens=torch.empty(5, dtype=torch.long, device="meta")), "`kv_lens`.*meta"),
    "scale two elements": (lambda: with_kw(scale=torch.tensor([0.5, 0.5])), "`scale`"),
    "scale bool": (lambda: with_kw(scale=True), "`scale`"),
    "scale bool tensor": (lambda: with_kw(scale=torch.tensor(True)), "`scale`"),
    "scale nan": (lambda: with_kw(scale=float("nan")), "`scale`"),
    "scale inf": (lambda: with_kw(scale=float("inf")), "`scale`"),
    "scale zero": (lambda: with_kw(scale=0.0), "`scale`"),
    "scale string": (lambda: with_kw(scale="0.5"), "`scale`"),
    "q_lens list of floats": (lambda: with_kw(q_lens=[2.7] * 5), "`q_lens`"),
    "kv_lens list of bools": (lambda: with_kw(kv_lens=[True] * 5), "`kv_lens`"),
    "kv_starts float tensor": (lambda: with_kw(kv_starts=torch.zeros(5)), "`kv_starts`"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error_naming_argument(name):
    make, expected = BAD[name]
    args, kw = make()
    with pytest.raises(ValueError, match=expected):
        prefix_attention(*args, **kw)


def test_unused_block_table_entries_may_be_anything():
    args, kw = good()
    table = args[5].clone()
    plens = args[6]
    for t in range(table.shape[0]):
        used = -(-int(plens[t]) // 4)
        table[t, used:] = -7
    args[5] = table
    prefix_attention(*args, **kw, backend="torch")


def test_triton_on_plain_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, kw = good()
    with pytest.raises(ValueError, match="`backend` 'triton' cannot run on cpu"):
        prefix_attention(*args, **kw, backend="triton")


def test_auto_on_cpu_is_torch_backend():
    args, kw = good()
    torch.testing.assert_close(prefix_attention(*args, **kw), prefix_attention(*args, **kw, backend="torch"))


def test_good_scales_and_integer_lists_are_accepted():
    import numpy as np
    args, kw = good()
    want = prefix_attention(*args, **kw, scale=0.25)
    for scale in (torch.tensor(0.25), torch.tensor([0.25]), np.float32(0.25), 0.25):
        torch.testing.assert_close(prefix_attention(*args, **kw, scale=scale), want)
    lists = dict(q_lens=[7, 6, 5, 4, 3], kv_lens=[7] * 5, kv_starts=[0, 1, 2, 3, 4])
    tensors = {k: torch.tensor(v) for k, v in lists.items()}
    torch.testing.assert_close(prefix_attention(*args, **kw, **lists), prefix_attention(*args, **kw, **tensors))
