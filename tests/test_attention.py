"""sdpo/attention.py: SDPA computed in float32 on a CPU under bf16 autocast, checked against float64 attention by
hand, forward and gradients, and that the kernel really runs in float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo.attention import sdpa_cpu_float32
from sdpo.config import ModelConfig
from sdpo.models import load_model

SDPA_KERNELS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                torch.ops.aten._scaled_dot_product_attention_math.default}


class KernelDtypes(TorchDispatchMode):
    """The dtypes of the query each SDPA kernel call receives."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SDPA_KERNELS:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def reference_attention(q, k, v, groups: int, offset: int):
    """float64, by hand: each query position i (of the last Lq of Lk) attends to key positions <= i + offset."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + offset
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2)  # [B, Lq, H, D], as transformers' attention functions return


@pytest.mark.parametrize("lq,lk", [(12, 12), (7, 19)])  # a whole sequence; responses continuing a prompt's cache
def test_float32_attention_under_bf16_autocast_matches_float64(lq, lk):
    torch.manual_seed(0)
    b, heads, kv_heads, d = 3, 6, 2, 16
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    q32 = torch.randn(b, heads, lq, d, requires_grad=True)
    k32 = torch.randn(b, kv_heads, lk, d, requires_grad=True)
    v32 = torch.randn(b, kv_heads, lk, d, requires_grad=True)
    mask = (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))[None, None].expand(b, 1, lq, lk)
    grad_out = torch.randn(b, lq, heads, d)
    with torch.autocast("cpu", dtype=torch.bfloat16), KernelDtypes() as kernels:
        q, k, v = (t.bfloat16() for t in (q32, k32, v32))  # as the autocast projections hand them over
        out, _ = sdpa_cpu_float32(module, q, k, v, mask if lq != lk else None)
    assert kernels.dtypes == [torch.float32] and out.dtype == torch.bfloat16
    (out.float() * grad_out).sum().backward()

    leaves = [t.detach().bfloat16().double().requires_grad_() for t in (q32, k32, v32)]
    ref = reference_attention(*leaves, groups=heads // kv_heads, offset=lk - lq)
    (ref * grad_out.double()).sum().backward()
    # bf16 output and gradients: rounding at 2^-8 relative, nothing more
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    for ours, theirs in zip((q32, k32, v32), leaves, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=2e-2, atol=2e-2 * theirs.grad.abs().max().item())


def test_plain_sdpa_where_nothing_is_16_bit():
    # float32 or float64 inputs without autocast: SDPA as it is, in the inputs' dtype (no cast either way).
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(2, 2, 5, 8, dtype=dtype)
        with KernelDtypes() as kernels:
            out, _ = sdpa_cpu_float32(module, q, q, q, None)
        assert out.dtype == dtype and set(kernels.dtypes) == {dtype}


def test_the_default_policy_attends_in_float32_under_bf16_autocast():
    model = load_model(ModelConfig(name_or_path="tiny"))
    assert model.config._attn_implementation == "sdpa_cpu_float32"
    with torch.autocast("cpu", dtype=torch.bfloat16), KernelDtypes() as kernels:
        model(torch.randint(0, 100, (2, 9))).logits.float().sum().backward()
    assert kernels.dtypes and set(kernels.dtypes) == {torch.float32}


def test_padded_batches_get_sdpa_s_masks():
    # transformers builds the masks by attention implementation: the float32 path must get SDPA's (padding and a
    # causal mask), so that without autocast it computes exactly what "sdpa" does, left padding included.
    torch.manual_seed(0)
    ours = load_model(ModelConfig(name_or_path="tiny"))
    sdpa = load_model(ModelConfig(name_or_path="tiny", attn_implementation="sdpa"))
    sdpa.load_state_dict(ours.state_dict())
    ids = torch.randint(3, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, sdpa))
    assert torch.equal(a, b)
    unmasked = sdpa(input_ids=ids).logits
    assert not torch.allclose(a[0], unmasked[0], atol=1e-3)  # the padding mattered
