"""The fused DSF op (`fused_sfrnn.py`) equals the DSF rule's definitions on outputs and on every gradient.

References: `reference_sfrnn.dsf_states` (the recompute form: autograd of `cell_step` over all positions) and
`references.reference_dsf_layer` (per-timestep autograd of torch's own cells, plain-loop scan). Every cell, masks
(none, right, left, arbitrary), float64 (rtol 1e-10), float32 (rtol 1e-5) and bf16 large matmuls (stated tolerance),
chunk lengths that do and do not divide the sequence.
"""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from references import reference_dsf_layer
from sfrnn_hf import SfrnnConfig
from sfrnn_hf import backends_sfrnn, recurrent_sfrnn, reference_sfrnn
from sfrnn_hf.cells_sfrnn import CELLS as REGISTERED_CELLS
from sfrnn_hf.cells_sfrnn import STEP_MATMULS, StepMatmul, cell_step, default_step_matmul, get_cell, \
    onednn_packed_matmul_serves, tanh_from_sigmoid_
from sfrnn_hf.fused_sfrnn import fused_dsf_recurrence
from sfrnn_hf.recurrence_sfrnn import kernel_states
from sfrnn_hf.recurrent_sfrnn import SfrnnRecurrentLayer
from sfrnn_hf.scan_sfrnn import ConstantFeedback, NoFeedback, reverse_scan_

CELLS = tuple(REGISTERED_CELLS)  # every registered cell, minGRU included
MASKS = (None, "right", "left", "arbitrary")


def make_layer(cell, d=5, dtype=torch.float64, scale=3.0):
    config = SfrnnConfig(vocab_size=7, hidden_size=d, num_hidden_layers=1, cell_type=cell)
    layer = SfrnnRecurrentLayer(config).to(dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, name).uniform_(-scale / d**0.5, scale / d**0.5)  # strong enough that the past matters
        layer.feedback.copy_(recurrent_sfrnn.linspace_feedback(config))
    return layer


def make_mask(kind, batch, time):
    if kind is None:
        return None
    mask = torch.ones(batch, time, dtype=torch.long)
    if kind == "right":
        mask[1, time - 3 :] = 0
        mask[2, 2:] = 0
    elif kind == "left":
        mask[1, :3] = 0
        mask[2, : time - 2] = 0
    else:  # arbitrary holes, a row that starts padded, and a fully padded row
        generator = torch.Generator().manual_seed(5)
        mask = (torch.rand(batch, time, generator=generator) > 0.4).long()
        mask[0, 0] = 0
        mask[-1] = 0
    return mask


def layer_weights(layer):
    return (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh)


def as_feedback(feedback):
    """A `Feedback` from a diagonal `(S,)` (DSF) or None (FT-BPTT)."""
    return NoFeedback() if feedback is None else ConstantFeedback(feedback)


def fused_dsf_states(cell, inputs, initial, weights, mask, feedback, **options):
    """The fused op's states, feedback given as a diagonal or None."""
    return fused_dsf_recurrence(cell, inputs, initial, weights, mask, as_feedback(feedback), **options)[0]


def dsf_states(cell, inputs, initial, weights, mask, feedback):
    """The reference op's states, feedback given as a diagonal or None."""
    return reference_sfrnn.dsf_states(cell, inputs, initial, weights, mask, as_feedback(feedback))[0]


def outputs_and_grads(states_fn, layer, inputs, readout):
    """Forward, then the gradients of `sum(states * readout)` for the inputs and the weights (those of a cell without
    recurrent weights, minGRU, are empty and left out)."""
    params = [inputs, *(w for w in layer_weights(layer) if w.numel())]
    states = states_fn()
    grads = torch.autograd.grad((states * readout).sum(), params)
    return states.detach(), grads


def check(cell, mask_kind, dtype, feedback_on=True, chunk=4, batch=4, time=11, rtol=1e-10, atol=1e-12,
          reference="recompute", step_matmul=None):
    layer = make_layer(cell, dtype=dtype)
    inputs = torch.randn(batch, time, layer.hidden_size, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, batch, time)
    readout = torch.randn(batch, time, layer.state_size, dtype=dtype)
    feedback = layer.feedback if feedback_on else None
    initial = torch.zeros(batch, layer.state_size, dtype=dtype)
    got = outputs_and_grads(
        lambda: fused_dsf_states(cell, inputs, initial, layer_weights(layer), mask, feedback, chunk=chunk,
                                 step_matmul=step_matmul),
        layer, inputs, readout)
    if reference == "recompute":
        want = outputs_and_grads(lambda: dsf_states(cell, inputs, initial, layer_weights(layer), mask, feedback),
                                 layer, inputs, readout)
    else:
        want = outputs_and_grads(lambda: reference_dsf_layer(layer, inputs, mask, feedback), layer, inputs, readout)
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg="states")
    names = ["inputs"] + [n for n, w in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), layer_weights(layer))
                          if w.numel()]
    for name, g, w in zip(names, got[1], want[1]):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=name)


# ----- the cell math written gate by gate equals cell_step and its autograd --------------------------------------

def saved_step(cell, input_projection, state, weight_hh, bias_hh, step_matmul="addmm"):
    """`(gates, new_state)` of the cell's `step_saving_gates` for a given input projection `x W_ih^T + b_ih`
    `(..., G*d)`: it goes through `step_weights` as the input of an identity `weight_ih` (exact), so that whatever
    the cell folds or rescales is applied to it as to a real one."""
    spec = get_cell(cell)
    *lead, width = input_projection.shape
    rows, d = input_projection[..., 0].numel(), state.shape[-1] // spec.state_vectors
    identity, zero = torch.eye(width, dtype=state.dtype), torch.zeros(width, dtype=state.dtype)
    step_weights = spec.step_weights((identity, weight_hh, zero, bias_hh), rows, rows, step_matmul)
    projection = step_weights.input(input_projection)
    gates = state.new_empty(*lead, spec.saved_gates * d) if spec.saved_gates else None
    new_state = torch.empty_like(state)
    spec.step_saving_gates(projection, state, step_weights, gates, new_state)
    return gates, new_state


@pytest.mark.parametrize("cell", CELLS)
def test_step_saving_gates_equals_cell_step(cell):
    layer = make_layer(cell)
    x = torch.randn(2, 3, layer.hidden_size, dtype=torch.float64)  # any leading shape
    state = torch.randn(2, 3, layer.state_size, dtype=torch.float64)
    w_ih, w_hh, b_ih, b_hh = (t.detach() for t in layer_weights(layer))
    want = cell_step(cell, x @ w_ih.T + b_ih, state, w_hh, b_hh)
    _, new_state = saved_step(cell, x @ w_ih.T + b_ih, state, w_hh, b_hh)
    torch.testing.assert_close(new_state, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cell", CELLS)
def test_one_step_gradients_equal_autograd_of_cell_step(cell):
    """`one_step_grad` then the cell's `accumulate_weight_grads_` give, for rows of one-step evaluations with the
    previous state held constant, the gradients autograd gives through `cell_step`: of the input projection and of
    every weight, whatever the cell's weight layout."""
    layer = make_layer(cell)
    spec = get_cell(cell)
    d = layer.hidden_size
    weights = [w.detach().clone().requires_grad_() for w in layer_weights(layer)]
    w_ih, w_hh, b_ih, b_hh = weights
    x = torch.randn(4, d, dtype=torch.float64)
    state = torch.randn(4, layer.state_size, dtype=torch.float64)
    grad = torch.randn(4, layer.state_size, dtype=torch.float64)
    input_projection = (x @ w_ih.T + b_ih).detach().requires_grad_()
    new_state = cell_step(cell, input_projection, state, w_hh, b_hh)
    want_pre, *want = torch.autograd.grad(new_state, [input_projection, w_ih, w_hh, b_ih, b_hh], grad,
                                          allow_unused=True, materialize_grads=True)
    want[0], want[2] = want_pre.T @ x, want_pre.sum(0)  # through x W_ih^T + b_ih
    gates, out = saved_step(cell, input_projection.detach(), state, w_hh.detach(), b_hh.detach())
    grad_pre, extra = spec.one_step_grad(grad, gates, state, out)
    torch.testing.assert_close(grad_pre, want_pre, rtol=1e-12, atol=1e-13)
    got = [torch.zeros_like(w) for w in weights]
    spec.accumulate_weight_grads_(got, grad_pre, extra, x, state[:, :d])
    for name, g, w in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), got, want):
        assert w.numel() == 0 or w.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_from_sigmoid_is_within_two_ulp_of_one(dtype):
    x = torch.cat([torch.linspace(-20, 20, 100_001, dtype=dtype), torch.tensor([0.0, 1e-30, -1e-30], dtype=dtype)])
    got = tanh_from_sigmoid_(torch.sigmoid(2 * x))
    error = (got.double() - torch.tanh(x.double())).abs().max().item()
    assert error <= 2 * torch.finfo(dtype).eps, error
    assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("kind", STEP_MATMULS)
def test_step_matmul_kinds_equal_the_plain_matmul(kind):
    if kind == "onednn_packed" and not onednn_packed_matmul_serves(torch.device("cpu"), torch.float32):
        pytest.skip("torch without oneDNN")
    weight, bias = torch.randn(48, 16), torch.randn(48)
    x, add = torch.randn(3, 5, 16), torch.randn(3, 5, 48)
    matmul = StepMatmul(weight, bias, rows=15, kind=kind)
    assert matmul.kind == kind
    torch.testing.assert_close(matmul(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul(x[..., :16], add=add), x @ weight.T + bias + add, rtol=1e-5, atol=1e-5)
    strided = torch.randn(15, 32)[:, :16]  # the LSTM's h is a strided view of its [h, c] state
    torch.testing.assert_close(StepMatmul(weight, None, 15, kind)(strided), strided @ weight.T, rtol=1e-5, atol=1e-5)


def test_step_matmul_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="'blas'"):
        StepMatmul(torch.ones(4, 4), kind="blas")
    with pytest.raises(ValueError, match="torch.float64"):
        StepMatmul(torch.ones(4, 4, dtype=torch.float64), kind="onednn_packed")


def test_the_default_step_matmul_is_onednn_for_fp32_cpu_weights_only():
    cpu = torch.device("cpu")
    assert default_step_matmul(cpu, torch.float64) == "addmm"
    assert default_step_matmul(torch.device("cuda"), torch.float32) == "addmm"
    want = "onednn_packed" if torch.backends.mkldnn.is_available() else "addmm"
    assert default_step_matmul(cpu, torch.float32) == want


# ----- the fused op against the references ------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_fused_equals_recompute_float64(cell, mask_kind):
    check(cell, mask_kind, torch.float64)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", ["right", "arbitrary"])
def test_fused_equals_torch_cell_reference_float64(cell, mask_kind):
    check(cell, mask_kind, torch.float64, reference="torch_cells")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", [None, "left", "arbitrary"])
def test_fused_ft_bptt_equals_recompute(cell, mask_kind):
    check(cell, mask_kind, torch.float64, feedback_on=False)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("step_matmul", STEP_MATMULS)
def test_fused_equals_recompute_float32(cell, mask_kind, step_matmul):
    if step_matmul == "onednn_packed" and not onednn_packed_matmul_serves(torch.device("cpu"), torch.float32):
        pytest.skip("torch without oneDNN")
    check(cell, mask_kind, torch.float32, rtol=1e-5, atol=1e-5, step_matmul=step_matmul)


@pytest.mark.parametrize("chunk, time", [(1, 5), (3, 9), (4, 2), (64, 11), (5, 70)])
def test_chunking_does_not_change_the_result(chunk, time):
    check("gru", "arbitrary", torch.float64, chunk=chunk, time=time)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_with_initial_state_held_constant(cell):
    layer = make_layer(cell)
    inputs = torch.randn(3, 6, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(3, layer.state_size, dtype=torch.float64, requires_grad=True)
    readout = torch.randn(3, 6, layer.state_size, dtype=torch.float64)
    mask = make_mask("left", 3, 6)
    params = [inputs, *(w for w in layer_weights(layer) if w.numel())]
    got = torch.autograd.grad((fused_dsf_states(cell, inputs, initial, layer_weights(layer), mask, layer.feedback,
                                                chunk=4) * readout).sum(), params)
    want = torch.autograd.grad((dsf_states(cell, inputs, initial, layer_weights(layer), mask, layer.feedback)
                                * readout).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mask_kind", [None, "right", "arbitrary"])
def test_gates_from_fused_kernel_states_equal_the_loop(cell, mask_kind):
    """The GPU forward's form (states from torch's fused kernel, gates recomputed batched), run here on CPU."""
    layer = make_layer(cell, dtype=torch.float32)
    inputs = torch.randn(3, 9, layer.hidden_size, requires_grad=True)
    mask = make_mask(mask_kind, 3, 9)
    readout = torch.randn(3, 9, layer.state_size)
    initial = torch.zeros(3, layer.state_size)
    weights = layer_weights(layer)

    got = outputs_and_grads(lambda: fused_dsf_states(cell, inputs, initial, weights, mask, layer.feedback,
                                                     state_kernel=kernel_states, chunk=4), layer, inputs, readout)
    want = outputs_and_grads(lambda: dsf_states(cell, inputs, initial, weights, mask, layer.feedback),
                             layer, inputs, readout)
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_large_matmuls_stay_close(cell):
    """bf16 operands for the projection and gradient matmuls (fp32 states, scan and accumulators): every output and
    gradient within 2% of the fp32 result in relative Frobenius norm (bf16 has an 8-bit mantissa: 0.4% per operand)."""
    layer = make_layer(cell, d=32, dtype=torch.float32, scale=1.0)
    inputs = torch.randn(4, 40, 32, requires_grad=True)
    mask = make_mask("arbitrary", 4, 40)
    readout = torch.randn(4, 40, layer.state_size)
    initial = torch.zeros(4, layer.state_size)
    weights = layer_weights(layer)
    got = outputs_and_grads(lambda: fused_dsf_states(cell, inputs, initial, weights, mask, layer.feedback,
                                                     matmul_dtype=torch.bfloat16, chunk=16), layer, inputs, readout)
    want = outputs_and_grads(lambda: dsf_states(cell, inputs, initial, weights, mask, layer.feedback),
                             layer, inputs, readout)
    names = ["states", "inputs"] + [n for n, w in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                                                      layer_weights(layer)) if w.numel()]
    for name, g, w in zip(names, (got[0], *got[1]), (want[0], *want[1])):
        assert g.dtype == torch.float32, name
        error = ((g - w).norm() / w.norm()).item()
        assert error < 2e-2, (name, error)
        assert error > 0 or name.startswith("bias"), name  # bf16 really was used for the matmuls


def test_time_varying_decay_scan_equals_plain_loop():
    """The backward's chunk scan with a per-step diagonal (the diag_jacobian mode's), each chunk given its own slice
    and the carry it returns, equals the plain loop over the whole sequence."""
    errors = torch.randn(11, 3, 4, dtype=torch.float64)
    decay = torch.rand(11, 3, 4, dtype=torch.float64)
    want = errors.clone()
    for t in range(9, -1, -1):
        want[t] = errors[t] + decay[t + 1] * want[t + 1]
    got = errors.clone()
    carry = None
    for end in range(11, 0, -4):
        start = max(0, end - 4)
        carry = reverse_scan_(got[start:end], decay[start:end], carry)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


# ----- dispatch ---------------------------------------------------------------------------------------------------

def test_cpu_training_runs_the_fused_backend_in_float64_and_float32(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference op ran although the fused backend is the CPU default")

    monkeypatch.setattr(backends_sfrnn, "dsf_states", fail)
    for dtype in (torch.float64, torch.float32):
        layer = make_layer("gru", dtype=dtype)
        out, _ = layer(torch.randn(3, 5, layer.hidden_size, dtype=dtype), mask=make_mask("left", 3, 5))
        out.sum().backward()
        assert layer.weight_hh.grad is not None
        assert layer.dsf_backend(torch.device("cpu")).name == "fused"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["dsf", "ft_bptt", "diag_jacobian", "calibrated"])
def test_every_backend_equals_the_reference_through_the_layer(cell, mode):
    """`config.dsf_backend` picks the op; every CPU-runnable op gives the reference's states, gradients and
    calibration statistics (arbitrary mask)."""
    layer = make_layer(cell)
    layer.config.gradient_mode = "dsf_calibrated" if mode == "calibrated" else mode
    x = torch.randn(3, 7, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = make_mask("arbitrary", 3, 7)
    results = {}
    for backend in ("reference", "fused", "fused_kernel"):
        layer.config.dsf_backend = backend
        out, _ = layer(x, mask=mask)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer_weights(layer)], allow_unused=True)
        statistics = layer.pending_calibration
        layer.pending_calibration = None
        results[backend] = (out, grads, statistics)
        assert layer.dsf_backend(x.device).name == backend
    want_out, want_grads, want_statistics = results["reference"]
    assert (want_statistics is not None) == (mode == "calibrated")
    for backend in ("fused", "fused_kernel"):
        out, grads, statistics = results[backend]
        torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
        for g, w in zip(grads, want_grads):
            if w is not None and w.numel():
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        if want_statistics is not None:
            torch.testing.assert_close(statistics[0], want_statistics[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(statistics[1], want_statistics[1])


def test_a_bad_backend_is_refused_when_set():
    layer = make_layer("lstm")
    with pytest.raises(StrictDataclassError, match="dsf_backend.*fast"):
        layer.config.dsf_backend = "fast"
    with pytest.raises(StrictDataclassError, match="dsf_backend.*fast"):
        SfrnnConfig(dsf_backend="fast")


def test_the_backend_is_resolved_once_per_device(monkeypatch):
    calls = []
    resolve = recurrent_sfrnn.resolve_dsf_backend
    monkeypatch.setattr(recurrent_sfrnn, "resolve_dsf_backend", lambda *a: calls.append(a) or resolve(*a))
    layer = make_layer("gru")
    x = torch.randn(2, 4, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        layer(x)[0].sum().backward()
    assert len(calls) == 1


def test_the_backend_and_its_step_matmul_are_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(recurrent_sfrnn, "_logged_backends", set())
    layer = make_layer("lstm", dtype=torch.float32)
    x = torch.randn(2, 4, layer.hidden_size, requires_grad=True)
    with caplog.at_level("INFO", logger="sfrnn_hf.recurrent_sfrnn"):
        for _ in range(2):
            layer(x)[0].sum().backward()
    logged = [record.getMessage() for record in caplog.records if "DSF backend" in record.getMessage()]
    assert logged == [f"sfrnn DSF backend: fused on cpu (config.dsf_backend='auto'), per-step matmul "
                      f"{default_step_matmul(torch.device('cpu'), torch.float32)} for torch.float32"]


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_bf16_runs_and_keeps_fp32_states(cell):
    layer = make_layer(cell, d=16, dtype=torch.float32, scale=1.0)
    x = torch.randn(2, 7, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, final = layer(x.to(torch.bfloat16), mask=make_mask("arbitrary", 2, 7), need_final_state=True)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    out.float().square().sum().backward()
    for tensor in (x.grad, layer.weight_ih.grad, layer.weight_hh.grad, layer.bias_ih.grad, layer.bias_hh.grad):
        assert tensor is not None and torch.isfinite(tensor).all()
