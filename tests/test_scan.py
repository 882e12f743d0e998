"""The reverse diagonal scan: the torch form (`reverse_scan_`, chunk by chunk with carries, constant or per-step decay)
equals the plain loop and the closed form sum_k a^(k-t) e_k."""

import pytest
import torch

from references import plain_loop_scan
from sfrnn_hf.scan_sfrnn import NoFeedback, reverse_diagonal_scan, reverse_scan_


def closed_form(errors, feedback):
    time = errors.shape[1]
    out = torch.zeros_like(errors, dtype=torch.float64)
    for t in range(time):
        for k in range(t, time):
            out[:, t] += feedback.double() ** (k - t) * errors[:, k].double()
    return out


@pytest.mark.parametrize("time", [1, 5, 16, 37])
def test_reference_is_the_closed_form(time):
    errors = torch.randn(2, time, 6, dtype=torch.float64)
    feedback = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    got = plain_loop_scan(errors.float(), feedback.float()).double()
    torch.testing.assert_close(got, closed_form(errors, feedback), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 16, 1000])
@pytest.mark.parametrize("time", [1, 7, 16, 33, 100])
def test_chunked_in_place_scan_equals_reference(chunk, time):
    """Each chunk scanned in place from the carry the later chunk returned, as the fused backward runs it."""
    errors = torch.randn(3, time, 64)
    feedback = torch.linspace(0, 1, 64)  # contains exactly 0 and 1
    got = errors.transpose(0, 1).contiguous()
    carry = None
    for end in range(time, 0, -chunk):
        part = got[max(0, end - chunk) : end]
        carry = reverse_scan_(part, feedback.expand(part.shape[0], 1, -1), carry)
    torch.testing.assert_close(got.transpose(0, 1), plain_loop_scan(errors, feedback), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(reverse_diagonal_scan(errors, feedback), plain_loop_scan(errors, feedback),
                               rtol=1e-5, atol=1e-5)


def test_no_feedback_leaves_the_errors():
    errors = torch.randn(5, 2, 3)
    got = errors.clone()
    assert NoFeedback().scan_(got, step_jacobians=None) is None
    assert torch.equal(got, errors)


def test_feedback_zero_is_identity_and_one_is_reverse_cumsum():
    errors = torch.randn(2, 9, 2)
    g = reverse_diagonal_scan(errors, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(g[..., 0], errors[..., 0])
    torch.testing.assert_close(g[..., 1], errors[..., 1].flip(1).cumsum(1).flip(1))


def test_low_precision_input_accumulates_in_fp32():
    # 512 steps of +1 with a = 1: bf16 accumulation would stall at 256; fp32 gets 512 exactly.
    errors = torch.ones(1, 512, 1, dtype=torch.bfloat16)
    g = reverse_diagonal_scan(errors, torch.ones(1))
    assert g.dtype == torch.bfloat16
    assert g[0, 0, 0].item() == 512.0
