"""On a CUDA device: the DSF backends (cuDNN forward, gates recomputed batched, Triton or torch backward) equal the
reference op on outputs and every gradient; diag_jacobian and the calibrated feedback equal the CPU fused path;
bf16 autocast runs. Skipped without CUDA."""

import copy

import pytest
import torch

from test_fused_dsf import CELLS, layer_weights, make_layer, make_mask
from sfrnn_hf.cells_sfrnn import get_cell
from sfrnn_hf.triton_sfrnn import TRITON_AVAILABLE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", [None, "right", "arbitrary"])
def test_cuda_backends_equal_the_reference(cell, mask_kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layer = make_layer(cell, d=64, dtype=torch.float32, scale=2.0).cuda()
    x = torch.randn(4, 50, 64, device="cuda", requires_grad=True)
    mask = make_mask(mask_kind, 4, 50)
    mask = None if mask is None else mask.cuda()
    readout = torch.randn(4, 50, layer.output_size, device="cuda")
    backends = ["reference", "auto", "fused_kernel"]
    if TRITON_AVAILABLE and get_cell(cell).has_triton_backward:
        backends.append("triton")
    weights = [w for w in layer_weights(layer) if w.numel()]
    results = {}
    for backend in backends:
        layer.config.dsf_backend = backend
        out, _ = layer(x, mask=mask)
        results[backend] = (out, *torch.autograd.grad((out * readout).sum(), [x, *weights]))
    for backend in backends[1:]:
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_autocast_bf16_runs(cell):
    layer = make_layer(cell, d=64, dtype=torch.float32, scale=1.0).cuda()
    x = torch.randn(4, 30, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = layer(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.float32
    for tensor in (x.grad, *(w.grad for w in layer_weights(layer) if w.numel())):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("variant", ["diag_jacobian", "calibrated"])
def test_cuda_diag_jacobian_and_calibrated_feedback_equal_the_cpu_path(cell, variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layer = make_layer(cell, d=64, dtype=torch.float32, scale=2.0)
    if variant == "diag_jacobian":
        layer.config.gradient_mode = "diag_jacobian"
    else:
        layer.config.gradient_mode, layer.config.feedback_momentum = "dsf_calibrated", 0.0
    x = torch.randn(4, 50, 64)
    mask = make_mask("arbitrary", 4, 50)
    readout = torch.randn(4, 50, layer.output_size)
    results = {}
    for device in ("cpu", "cuda"):
        moved = copy.deepcopy(layer).to(device)
        inputs = x.to(device).requires_grad_()
        out, _ = moved(inputs, mask=mask.to(device))
        grads = torch.autograd.grad((out * readout.to(device)).sum(),
                                    [inputs, *(w for w in layer_weights(moved) if w.numel())])
        assert moved.update_calibrated_feedback() == (variant == "calibrated")
        results[device] = [t.cpu() for t in (out, *grads, moved.feedback)]
    for got, want in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
