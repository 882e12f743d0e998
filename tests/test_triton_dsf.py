"""The Triton DSF backward kernels equal the torch path (scan + `one_step_grad`), run on CPU by Triton's interpreter
(`TRITON_INTERPRET=1`). Skipped where Triton is not installed."""

import pytest
import torch

pytest.importorskip("triton")

from test_fused_dsf import layer_weights, make_layer, make_mask  # noqa: E402
from sfrnn_hf import triton_sfrnn  # noqa: E402
from sfrnn_hf.cells_sfrnn import CELLS  # noqa: E402
from sfrnn_hf.fused_sfrnn import fused_dsf_recurrence  # noqa: E402
from sfrnn_hf.scan_sfrnn import Feedback  # noqa: E402

TRITON_CELLS = [name for name, cell in CELLS.items() if cell.triton_code is not None]
DIAG_JACOBIAN = "diag_jacobian"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Kernels built under the interpreter for this test (they are built on first use, then cached)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_sfrnn._kernels.cache_clear()
    yield
    triton_sfrnn._kernels.cache_clear()


@pytest.mark.parametrize("cell", TRITON_CELLS)
@pytest.mark.parametrize("mask_kind, decay", [(None, "feedback"), ("arbitrary", "feedback"), ("left", None),
                                              (None, DIAG_JACOBIAN), ("arbitrary", DIAG_JACOBIAN),
                                              ("left", DIAG_JACOBIAN)])
def test_triton_backward_equals_torch_backward(cell, mask_kind, decay):
    """DSF's constant feedback, FT-BPTT (none) and diag_jacobian (diag(J_t) computed inside the kernel) against the
    torch backward (chunks of 3 steps: the carry and the decay cross chunk borders)."""
    layer = make_layer(cell, d=20, dtype=torch.float32, scale=2.0)
    inputs = torch.randn(3, 7, 20, requires_grad=True)
    mask = make_mask(mask_kind, 3, 7)
    readout = torch.randn(3, 7, layer.state_size)
    initial = torch.randn(3, layer.state_size)
    feedback = {"feedback": Feedback.constant(layer.feedback), None: Feedback.none(),
                DIAG_JACOBIAN: Feedback.diag_jacobian()}[decay]
    params = [inputs, *layer_weights(layer)]
    results = []
    for kernel in (None, triton_sfrnn.triton_dsf_pointwise_backward):
        states, _ = fused_dsf_recurrence(cell, inputs, initial, layer_weights(layer), mask, feedback, chunk=3,
                                         pointwise_kernel=kernel)
        results.append(torch.autograd.grad((states * readout).sum(), params))
    for got, want in zip(results[1], results[0]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
