"""The Triton DSF backward kernels equal the torch path (scan + `one_step_grad`), run on CPU by Triton's interpreter
(`TRITON_INTERPRET=1`). Skipped where Triton is not installed."""

import pytest
import torch

pytest.importorskip("triton")

from test_fused_dsf import layer_weights, make_layer, make_mask  # noqa: E402
from sfrnn_hf import reference_sfrnn, triton_sfrnn  # noqa: E402
from sfrnn_hf.cells_sfrnn import CELLS  # noqa: E402
from sfrnn_hf.fused_sfrnn import fused_dsf_recurrence  # noqa: E402
from sfrnn_hf.scan_sfrnn import ConstantFeedback, DiagJacobianFeedback, Feedback, NoFeedback  # noqa: E402

TRITON_CELLS = [name for name, cell in CELLS.items() if cell.has_triton_backward]
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
    feedback = {"feedback": ConstantFeedback(layer.feedback), None: NoFeedback(),
                DIAG_JACOBIAN: DiagJacobianFeedback()}[decay]
    params = [inputs, *layer_weights(layer)]
    results = []
    for kernel in (None, triton_sfrnn.triton_dsf_pointwise_backward):
        states, _ = fused_dsf_recurrence(cell, inputs, initial, layer_weights(layer), mask, feedback, chunk=3,
                                         pointwise_kernel=kernel)
        results.append(torch.autograd.grad((states * readout).sum(), params))
    for got, want in zip(results[1], results[0]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_auto_backend_on_cuda_runs_every_cell(cell):
    """`dsf_backend="auto"` resolved for CUDA (here with Triton installed) gives each cell a backend whose backward
    runs (Triton only for a cell with a Triton branch, else the torch backward) and equals the reference op. The
    CUDA resolution is forced; its op runs on CPU tensors, the Triton kernel under the interpreter."""
    layer = make_layer(cell, d=6, dtype=torch.float32, scale=2.0)
    backend = layer.dsf_backend(torch.device("cuda"))
    assert backend.name == ("triton" if cell in TRITON_CELLS else "fused_kernel")
    inputs = torch.randn(3, 7, 6, requires_grad=True)
    mask, initial = make_mask("right", 3, 7), torch.randn(3, layer.state_size)
    readout = torch.randn(3, 7, layer.state_size)
    params = [inputs, *(w for w in layer_weights(layer) if w.numel())]
    results = []
    for op in (backend.op, reference_sfrnn.dsf_states):
        states, _ = op(cell, inputs, initial, layer_weights(layer), mask, ConstantFeedback(layer.feedback))
        results.append(torch.autograd.grad((states * readout).sum(), params))
    for got, want in zip(*results):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", [name for name in CELLS if name not in TRITON_CELLS])
def test_triton_backend_for_a_cell_without_a_kernel_is_refused_when_resolved(cell):
    """Asking for `triton` where the cell has no Triton branch fails at resolution, naming the cell and the
    alternative, not at the first backward."""
    layer = make_layer(cell)
    layer.config.dsf_backend = "triton"
    with pytest.raises(ValueError, match=f"'{cell}' cell has no Triton backward.*fused_kernel"):
        layer.dsf_backend(torch.device("cuda"))


class HalfFeedback(Feedback):
    """A feedback type defined only here, with no Triton variant: every step halves the state gradient it passes."""

    gradient_mode = "half"

    def decay(self, steps, step_jacobians):
        return torch.tensor(0.5).expand(steps, 1, 1)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["reference", "fused", "fused_kernel", "triton"])
def test_a_new_feedback_is_one_class(cell, backend):
    """A `Feedback` subclass runs on every backend (the Triton one falls back to the torch pointwise part, having no
    variant for it) and gives the gradients of the constant feedback it equals."""
    if backend == "triton" and cell not in TRITON_CELLS:
        pytest.skip("no Triton backward for this cell")
    layer = make_layer(cell, d=6, dtype=torch.float32, scale=2.0)
    layer.config.dsf_backend = backend
    op = layer.dsf_backend(torch.device("cpu")).op
    inputs = torch.randn(3, 7, 6, requires_grad=True)
    mask, initial = make_mask("arbitrary", 3, 7), torch.randn(3, layer.state_size)
    readout = torch.randn(3, 7, layer.state_size)
    params = [inputs, *(w for w in layer_weights(layer) if w.numel())]
    results = []
    for states_fn, feedback in ((op, HalfFeedback()),
                                (reference_sfrnn.dsf_states, ConstantFeedback(torch.full((layer.state_size,), 0.5)))):
        states, _ = states_fn(cell, inputs, initial, layer_weights(layer), mask, feedback)
        results.append(torch.autograd.grad((states * readout).sum(), params))
    for got, want in zip(*results):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
