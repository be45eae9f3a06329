"""The engine's decode-shaped linear layers: same results as ``F.linear``, model restored after."""
import torch
import torch.nn.functional as F
from torch import nn

from softprompt.engine.small_gemm import linear_transposed, small_batch_linears


def test_linear_transposed_matches_linear(seed):
    g = torch.Generator().manual_seed(seed)
    for shape, out_features, bias in (((5, 7), 11, True), ((2, 3, 16), 9, False), ((1, 1, 4), 4, True)):
        x = torch.randn(*shape, generator=g)
        w = torch.randn(out_features, shape[-1], generator=g)
        b = torch.randn(out_features, generator=g) if bias else None
        got = linear_transposed(x, w, b)
        assert got.is_contiguous() and got.shape == (*shape[:-1], out_features)
        torch.testing.assert_close(got, F.linear(x, w, b))


def test_small_batch_linears_only_inside_the_block_and_only_small_inputs(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3, bias=False))
    small, large = torch.randn(4, 8), torch.randn(300, 8)
    want_small, want_large = model(small), model(large)

    with small_batch_linears(model, max_rows=16):
        assert all("forward" in m.__dict__ for m in model if isinstance(m, nn.Linear))
        torch.testing.assert_close(model(small), want_small)
        torch.testing.assert_close(model(large), want_large)
    assert not any("forward" in m.__dict__ for m in model)          # the model is as it was
    with small_batch_linears(model, max_rows=16, enabled=False):
        assert not any("forward" in m.__dict__ for m in model)
