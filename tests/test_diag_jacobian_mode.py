"""gradient_mode="diag_jacobian": the scan decays by each step's own diag(J). Its gradients equal a per-timestep
reference built from torch's cells with the diagonals taken from autograd Jacobians; where the true Jacobian IS
diagonal (GRU and tanh RNN with diagonal recurrent blocks) they equal exact BPTT."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from references import cell_state_step, causal_lm_cross_entropy, padded_batch, torch_cell_sharing_weights
from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM, backends_sfrnn, fused_sfrnn, recurrence_sfrnn, recurrent_sfrnn
from sfrnn_hf.cells_sfrnn import CELLS
from sfrnn_hf.scan_sfrnn import CalibratedFeedback, DiagJacobianFeedback
from test_fused_dsf import layer_weights, make_layer, make_mask

WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def trained_weights(layer):
    """`(names, tensors)` of the layer's weights that hold numbers (minGRU's recurrent ones are empty)."""
    pairs = [(n, w) for n, w in zip(WEIGHT_NAMES, layer_weights(layer)) if w.numel()]
    return [n for n, _ in pairs], [w for _, w in pairs]


def autograd_jacobian_diagonals(cell, inputs, held, t):
    """`(batch, S)`: the diagonal of the autograd Jacobian of step t of the torch cell, row by row."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda s: cell_state_step(cell, inputs[b:b + 1, t].detach(), s[None])[0],
                                           held[b]).diagonal()
        for b in range(inputs.shape[0])]).detach()


def reference_diag_jacobian_layer(layer, inputs, mask):
    """Per-timestep autograd of the torch cell with the previous state held constant; the state gradient rewritten
    by a plain loop `g_t = e_t + d_{t+1} g_{t+1}`, `d_t` the diagonal of the autograd Jacobian of step t (1 where the
    mask holds the state)."""
    cell = torch_cell_sharing_weights(layer)
    batch, time, _ = inputs.shape
    state = inputs.new_zeros(batch, layer.state_size)
    outputs, decays = [], []
    for t in range(time):
        held = state.detach()
        new = cell_state_step(cell, inputs[:, t], held)
        diagonal = autograd_jacobian_diagonals(cell, inputs, held, t)
        if mask is not None:
            keep = mask[:, t, None].bool()
            new = torch.where(keep, new, held)
            diagonal = torch.where(keep, diagonal, torch.ones_like(diagonal))
        outputs.append(new)
        decays.append(diagonal)
        state = new
    states, decay = torch.stack(outputs, dim=1), torch.stack(decays, dim=1)

    def rewrite(errors):
        out, carry = torch.zeros_like(errors), torch.zeros_like(errors[:, 0])
        for t in reversed(range(time)):
            carry = errors[:, t] + (decay[:, t + 1] * carry if t + 1 < time else 0)
            out[:, t] = carry
        return out

    states.register_hook(rewrite)
    return states


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mask_kind", [None, "right", "left", "arbitrary"])
@pytest.mark.parametrize("chunk", [4, 64])  # diag(J) is computed per backward chunk: 4 splits the 9 steps unevenly
def test_diag_jacobian_gradients_equal_the_reference(cell, mask_kind, chunk, monkeypatch):
    monkeypatch.setattr(backends_sfrnn, "DSF_CHUNK", chunk)
    assert_diag_jacobian_layer_is_the_reference(cell, mask_kind)


def assert_diag_jacobian_layer_is_the_reference(cell, mask_kind, backend="auto"):
    """A `diag_jacobian` layer's gradients (inputs and every weight) against `reference_diag_jacobian_layer`."""
    layer = make_layer(cell)
    layer.config.gradient_mode = "diag_jacobian"
    layer.config.dsf_backend = backend
    inputs = torch.randn(4, 9, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, 4, 9)
    readout = torch.randn(4, 9, layer.output_size, dtype=torch.float64)
    names, weights = trained_weights(layer)
    params = [inputs, *weights]
    got = torch.autograd.grad((layer(inputs, mask=mask)[0] * readout).sum(), params)
    reference = reference_diag_jacobian_layer(layer, inputs, mask)[..., : layer.output_size]
    want = torch.autograd.grad((reference * readout).sum(), params)
    for name, g, w in zip(["inputs", *names], got, want):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_diagonal_recurrent_blocks_make_diag_jacobian_exact_bptt(cell):
    # Each unit then depends on its own past only: J_t is diagonal, so its diagonal is the whole Jacobian.
    config = SfrnnConfig(vocab_size=19, hidden_size=6, num_hidden_layers=2, cell_type=cell, block_type="prenorm",
                         intermediate_size=8)
    model = SfrnnForCausalLM(config).double()
    with torch.no_grad():
        for block in model.model.layers:
            weight_hh = block.recurrent.weight_hh.view(-1, 6, 6)
            weight_hh.copy_(torch.diag_embed(torch.randn(weight_hh.shape[0], 6, dtype=torch.float64) * 1.5))
    input_ids, labels, mask = padded_batch(19, 3, 10, "right")
    params = list(model.parameters())
    grads = {}
    for mode in ("bptt", "diag_jacobian", "dsf"):
        model.config.gradient_mode = mode
        loss = causal_lm_cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        grads[mode] = torch.autograd.grad(loss, params)
    for (name, _), got, want in zip(model.named_parameters(), grads["diag_jacobian"], grads["bptt"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    weight_hh_index = [n for n, _ in model.named_parameters()].index("model.layers.0.recurrent.weight_hh")
    assert not torch.allclose(grads["dsf"][weight_hh_index], grads["bptt"][weight_hh_index], rtol=1e-3)


DIAGONAL_CELLS = [name for name, cell in CELLS.items() if not cell.recurrent_gates]


@pytest.mark.parametrize("cell", DIAGONAL_CELLS)
@pytest.mark.parametrize("block_type", ["residual", "prenorm"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_diagonal_cells_diag_jacobian_is_exact_bptt(cell, block_type, padding):
    """A cell whose state enters through no matrix has a diagonal Jacobian (minGRU's `diag(1 - z_t)`, IndRNN's
    `diag((1 - h_t^2) u)`): the `diag_jacobian` rule is exact BPTT for every parameter of a 2-layer model, while the
    constant-feedback `dsf` is not."""
    config = SfrnnConfig(vocab_size=19, hidden_size=6, num_hidden_layers=2, cell_type=cell, block_type=block_type,
                         intermediate_size=8)
    model = SfrnnForCausalLM(config).double()
    input_ids, labels, mask = padded_batch(19, 3, 10, padding)
    params = [p for p in model.parameters() if p.numel()]
    grads = {}
    for mode in ("bptt", "diag_jacobian", "dsf"):
        model.config.gradient_mode = mode
        loss = causal_lm_cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        grads[mode] = torch.autograd.grad(loss, params)
    names = [n for n, p in model.named_parameters() if p.numel()]
    for name, got, want in zip(names, grads["diag_jacobian"], grads["bptt"]):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    weight_ih_index = names.index("model.layers.0.recurrent.weight_ih")
    assert not torch.allclose(grads["dsf"][weight_ih_index], grads["bptt"][weight_ih_index], rtol=1e-3)


def test_diag_jacobian_forward_is_the_dsf_forward():
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=19, hidden_size=8, num_hidden_layers=2, cell_type="lstm"))
    input_ids, labels, mask = padded_batch(19, 3, 10, "left")
    logits = {}
    for mode in ("dsf", "diag_jacobian"):
        model.config.gradient_mode = mode
        logits[mode] = model(input_ids=input_ids, labels=labels, attention_mask=mask, return_logits=True).logits
    assert torch.equal(logits["dsf"], logits["diag_jacobian"])


def batch_mean_diagonal(layer, inputs, mask):
    """Mean over the batch and the real steps of the autograd Jacobian diagonals (independent of the package)."""
    cell = torch_cell_sharing_weights(layer)
    state, total, count = inputs.new_zeros(inputs.shape[0], layer.state_size), 0, 0
    with torch.no_grad():
        for t in range(inputs.shape[1]):
            held = state
            diagonal = autograd_jacobian_diagonals(cell, inputs, held, t)
            new = cell_state_step(cell, inputs[:, t], held)
            keep = torch.ones(inputs.shape[0], 1, dtype=torch.bool) if mask is None else mask[:, t, None].bool()
            total = total + (diagonal * keep).sum(0)
            count = count + keep.sum()
            state = torch.where(keep, new, held)
    return total / count


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("chunk", [4, 64])  # the forward loop adds up the mean chunk by chunk
def test_calibrated_feedback_with_momentum_zero_is_the_batch_mean_of_diag_jacobian(cell, chunk, monkeypatch):
    monkeypatch.setattr(backends_sfrnn, "DSF_CHUNK", chunk)
    monkeypatch.setattr(fused_sfrnn, "DSF_CHUNK", chunk)
    layer = make_layer(cell, scale=1.0)
    layer.config.gradient_mode, layer.config.feedback_momentum = "dsf_calibrated", 0.0
    before = layer.feedback.clone()
    inputs = torch.randn(4, 9, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = make_mask("right", 4, 9)
    states = layer(inputs, mask=mask)[0]
    assert torch.equal(layer.feedback, before)  # a forward only records its statistics

    # This step's backward uses the feedback its forward saw (the linspace start).
    readout = torch.randn_like(states)
    got = torch.autograd.grad((states * readout).sum(), layer.weight_hh)[0]
    plain = make_layer(cell, scale=1.0)
    plain.load_state_dict({**layer.state_dict(), "feedback": before})
    want_grad = torch.autograd.grad((plain(inputs, mask=mask)[0] * readout).sum(), plain.weight_hh)[0]
    torch.testing.assert_close(got, want_grad, rtol=1e-10, atol=1e-12)

    # The optimizer step's update: the batch mean of diag(J), which the pure function gives too.
    want = batch_mean_diagonal(layer, inputs.detach(), mask)
    torch.testing.assert_close(recurrent_sfrnn.mean_diagonal_jacobian(layer, inputs, mask=mask), want, rtol=1e-10,
                               atol=1e-12)
    assert layer.update_calibrated_feedback()
    torch.testing.assert_close(layer.feedback, want.clamp(0, 1), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(layer.feedback, before)
    assert not layer.update_calibrated_feedback()  # nothing recorded since: nothing moves


@pytest.mark.parametrize("cell", list(CELLS))
def test_gpu_forward_form_calibrates_and_scans_like_the_reference(cell):
    """The CUDA path's form, run here on CPU: states from torch's fused kernel, gates recomputed batched, then the
    calibration sum over 4-step chunks after the forward (`diagonal_jacobian_sum`) and the diag_jacobian backward."""
    layer = make_layer(cell, scale=1.0)
    inputs = torch.randn(4, 9, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = make_mask("arbitrary", 4, 9)
    initial = torch.zeros(4, layer.state_size, dtype=torch.float64)
    weights = layer_weights(layer)

    kernel = recurrence_sfrnn.kernel_states
    _, (total, count) = fused_sfrnn.fused_dsf_recurrence(
        cell, inputs, initial, weights, mask, CalibratedFeedback(layer.feedback),
        state_kernel=kernel, chunk=4)
    assert count == mask.sum()
    torch.testing.assert_close(total / count, batch_mean_diagonal(layer, inputs.detach(), mask), rtol=1e-10,
                               atol=1e-12)

    readout = torch.randn(4, 9, layer.state_size, dtype=torch.float64)
    names, weights = trained_weights(layer)
    params = [inputs, *weights]
    states, _ = fused_sfrnn.fused_dsf_recurrence(cell, inputs, initial, layer_weights(layer), mask,
                                                 DiagJacobianFeedback(), state_kernel=kernel, chunk=4)
    got = torch.autograd.grad((states * readout).sum(), params)
    want = torch.autograd.grad((reference_diag_jacobian_layer(layer, inputs, mask) * readout).sum(), params)
    for name, g, w in zip(["inputs", *names], got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_calibrated_feedback_smooths_with_momentum_and_only_in_dsf_calibrated_training():
    layer = make_layer("gru", scale=1.0)
    layer.config.feedback_momentum = 0.5
    inputs = torch.randn(4, 9, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    start = layer.feedback.clone()
    for mode in ("bptt", "dsf", "ft_bptt", "diag_jacobian"):
        layer.config.gradient_mode = mode
        layer(inputs)
    with torch.no_grad():
        layer.config.gradient_mode = "dsf_calibrated"
        layer(inputs)
    assert not layer.update_calibrated_feedback()  # no estimate outside dsf_calibrated training
    assert torch.equal(layer.feedback, start)
    layer(inputs)
    assert layer.update_calibrated_feedback()
    want = (0.5 * start + 0.5 * batch_mean_diagonal(layer, inputs.detach(), None)).clamp(0, 1)
    torch.testing.assert_close(layer.feedback, want, rtol=1e-10, atol=1e-12)


def test_calibrated_feedback_survives_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    config = SfrnnConfig(vocab_size=19, hidden_size=8, num_hidden_layers=2, gradient_mode="dsf_calibrated",
                         feedback_momentum=0.0)
    model = SfrnnForCausalLM(config)
    input_ids, labels, mask = padded_batch(19, 3, 10, "right")
    model(input_ids=input_ids, labels=labels, attention_mask=mask).loss.backward()
    assert model.update_calibrated_feedback()
    calibrated = [block.recurrent.feedback.clone() for block in model.model.layers]
    assert not torch.allclose(calibrated[0], torch.linspace(0, 1, 8))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.gradient_mode == "dsf_calibrated"
    for block, want in zip(loaded.model.layers, calibrated):
        assert torch.equal(block.recurrent.feedback, want)


@pytest.mark.parametrize("field, value", [("feedback_type", "learned"), ("feedback_momentum", 1.0),
                                          ("feedback_momentum", -0.1)])
def test_invalid_calibration_settings_name_the_field(field, value):
    with pytest.raises((ValueError, StrictDataclassError), match=field):  # (an earlier release's field; a strict one)
        SfrnnConfig(**{field: value})


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mask_kind", [None, "right", "arbitrary"])
@pytest.mark.parametrize("backend", ["reference", "fused_kernel"])
def test_every_backend_runs_diag_jacobian_as_the_reference(cell, mask_kind, backend):
    """The reference op (`dsf_states`: diag(J_t) from gates recomputed batched) and the kernel-forward op."""
    assert_diag_jacobian_layer_is_the_reference(cell, mask_kind, backend)
