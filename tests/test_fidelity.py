"""The gradient-fidelity diagnostic: exact where DSF is exact, equal to FT-BPTT where the feedback is 0, and its
time-distance decomposition sums to the exact and DSF state gradients."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from references import padded_batch, reference_exact_layer
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.fidelity import (
    feedback_match,
    gradient_fidelity,
    parameter_gradients,
    state_gradient_contributions,
    state_gradient_fidelity,
)
from sfrnn_hf.reference_sfrnn import DiagonalStateFeedback
from sfrnn_hf.scan_sfrnn import ConstantFeedback, NoFeedback, reverse_diagonal_scan


class LinearDiagonalLM(nn.Module):
    """h_t = lam * h_{t-1} + W x_t, a linear readout: the true Jacobian is diag(lam), so DSF with a = lam is exact."""

    def __init__(self, vocab=13, width=6):
        super().__init__()
        self.config = SimpleNamespace(gradient_mode="bptt")
        self.embeddings = nn.Embedding(vocab, width)
        self.lam = nn.Parameter(torch.rand(width) * 0.8 + 0.1)
        self.weight = nn.Parameter(torch.randn(width, width))
        self.head = nn.Linear(width, vocab)

    def recurrence(self, x):
        state, states = x.new_zeros(x.shape[0], x.shape[2]), []
        for t in range(x.shape[1]):
            state = self.lam * state + x[:, t] @ self.weight.T
            states.append(state)
        return torch.stack(states, 1)

    def forward(self, input_ids, labels):
        x = self.embeddings(input_ids)
        if self.config.gradient_mode == "bptt":
            states = self.recurrence(x)
        else:
            with torch.no_grad():
                values = self.recurrence(x)
            previous = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1)
            feedback = ConstantFeedback(self.lam.detach()) if self.config.gradient_mode == "dsf" else NoFeedback()
            states = DiagonalStateFeedback.apply(values, self.lam * previous + x @ self.weight.T, feedback)
        logits = self.head(states)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


def test_linear_diagonal_recurrence_with_matching_feedback_has_cosine_one():
    model = LinearDiagonalLM()
    batches = [dict(input_ids=ids, labels=ids) for ids in torch.randint(0, 13, (3, 4, 20))]
    result = gradient_fidelity(model, batches)
    for name, entry in result["parameters"]["dsf"].items():
        assert entry["cosine"] == pytest.approx(1.0, abs=1e-6), name
        assert entry["norm_ratio"] == pytest.approx(1.0, abs=1e-5), name
    assert result["parameters"]["ft_bptt"]["weight"]["cosine"] < 0.999  # not vacuous
    assert model.config.gradient_mode == "bptt"  # restored


def test_zero_feedback_dsf_equals_ft_bptt():
    config = SfrnnConfig(vocab_size=17, hidden_size=8, num_hidden_layers=2, feedback_min=0.0, feedback_max=0.0)
    model = SfrnnForCausalLM(config)
    batches = []
    for _ in range(2):
        ids, labels, mask = padded_batch(17, 3, 12, "right")
        batches.append(dict(input_ids=ids, labels=labels, attention_mask=mask))
    result = gradient_fidelity(model, batches)
    assert result["parameters"]["dsf"] == result["parameters"]["ft_bptt"]
    assert result["layers"]["dsf"] == result["layers"]["ft_bptt"]
    assert set(result["layers"]["dsf"]) == {"layers.0", "layers.1"}


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_time_distance_terms_sum_to_the_exact_and_dsf_state_gradients(cell):
    config = SfrnnConfig(vocab_size=17, hidden_size=5, cell_type=cell)
    layer = SfrnnForCausalLM(config).double().model.layers[0].recurrent
    with torch.no_grad():
        layer.weight_hh.mul_(3)
    inputs = torch.randn(2, 9, 5, dtype=torch.float64)
    _, _, mask = padded_batch(17, 2, 9, "left")
    errors = torch.randn(2, 9, layer.state_size, dtype=torch.float64)
    exact_terms, dsf_terms = state_gradient_contributions(layer, inputs, mask, errors, max_distance=8)

    # exact: g_t = e_t + g_{t+1} J_{t+1}, each J by autograd of one step of the gated torch cell
    with torch.no_grad():
        states = reference_exact_layer(layer, inputs, mask)
    total = torch.zeros_like(errors)
    running = errors.clone()
    for t in reversed(range(9)):
        total[:, t] = running[:, t]
        if t > 0:
            held = states[:, t - 1].detach().requires_grad_()
            step = reference_exact_layer_step(layer, inputs[:, t], held, mask[:, t])
            running[:, t - 1] += torch.autograd.grad(step, held, total[:, t])[0]
    torch.testing.assert_close(exact_terms.sum(0), total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dsf_terms.sum(0), reverse_diagonal_scan(errors, layer.feedback), rtol=1e-10, atol=1e-12)


def reference_exact_layer_step(layer, x_t, state, mask_t):
    from references import cell_state_step, torch_cell_sharing_weights

    new = cell_state_step(torch_cell_sharing_weights(layer), x_t, state)
    return torch.where(mask_t[:, None].bool(), new, state)


def test_state_gradient_fidelity_reports_every_layer():
    config = SfrnnConfig(vocab_size=17, hidden_size=8, num_hidden_layers=2, cell_type="lstm")
    model = SfrnnForCausalLM(config)
    ids, labels, mask = padded_batch(17, 3, 12, "right")
    result = state_gradient_fidelity(model, dict(input_ids=ids, labels=labels, attention_mask=mask), max_distance=5)
    assert set(result) == {"layers.0", "layers.1"}
    for entry in result.values():
        assert entry["distance"] == list(range(6))
        assert entry["cosine"][0] == pytest.approx(1.0)  # distance 0: both are e_t
        assert -1 <= entry["total_cosine_dsf"] <= 1 and -1 <= entry["total_cosine_ft_bptt"] <= 1


@pytest.mark.parametrize("trained_mode", ["dsf", "dsf_calibrated"])
def test_calibrated_fidelity_mode_is_dsf_with_the_batch_mean_diagonal_jacobian(trained_mode):
    """`dsf_calibrated` is the DSF gradient with the feedback set to the batch's mean autograd Jacobian diagonal; the
    model's own feedback and config are untouched by the measurement, also when it trains a calibrated feedback."""
    from test_diag_jacobian_mode import batch_mean_diagonal

    config = SfrnnConfig(vocab_size=17, hidden_size=6, cell_type="gru", gradient_mode=trained_mode)
    model = SfrnnForCausalLM(config).double()
    layer = model.model.layers[0].recurrent
    ids, labels, mask = padded_batch(17, 3, 10, "right")
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    before = layer.feedback.clone()

    got = parameter_gradients(model, batch, "dsf_calibrated")
    assert torch.equal(layer.feedback, before) and model.config.gradient_mode == trained_mode
    assert layer.pending_calibration is None  # measuring records no calibration statistics

    inputs = model.model.embeddings(ids).detach()  # a one-layer residual model: the layer sees the embeddings
    want_feedback = batch_mean_diagonal(layer, inputs, mask).clamp(0, 1)
    reference = SfrnnForCausalLM(SfrnnConfig(**{**config.to_dict(), "gradient_mode": "dsf"})).double()
    reference.load_state_dict({**model.state_dict(), "model.layers.0.recurrent.feedback": want_feedback})
    want = parameter_gradients(reference, batch, "dsf")
    plain = parameter_gradients(model, batch, "dsf")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.allclose(got["model.layers.0.recurrent.weight_hh"], plain["model.layers.0.recurrent.weight_hh"])

    result = gradient_fidelity(model, [batch], modes=("dsf", "dsf_calibrated"))
    assert set(result["parameters"]) == {"dsf", "dsf_calibrated"}
    assert torch.equal(layer.feedback, before) and model.config.gradient_mode == trained_mode


def test_feedback_match_compares_the_feedback_with_the_measured_memory():
    from test_diag_jacobian_mode import batch_mean_diagonal

    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=17, hidden_size=6, cell_type="gru")).double()
    layer = model.model.layers[0].recurrent
    ids, labels, mask = padded_batch(17, 3, 10, "left")
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    memory = batch_mean_diagonal(layer, model.model.embeddings(ids).detach(), mask).clamp(0, 1)

    report = feedback_match(model, batch)["layers.0"]
    assert report["diag_jacobian_mean"] == pytest.approx(memory.mean().item(), rel=1e-9)
    assert report["mean_abs_difference"] == pytest.approx((layer.feedback - memory).abs().mean().item(), rel=1e-9)
    assert report["feedback_mean"] == pytest.approx(0.5)  # the model's linspace, untouched by the measurement
    with torch.no_grad():
        layer.feedback.copy_(memory)
    matched = feedback_match(model, batch)["layers.0"]
    assert matched["mean_abs_difference"] < 1e-12 and matched["correlation"] == pytest.approx(1.0)
