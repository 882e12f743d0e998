"""The method's sanity identities: for a LINEAR diagonal recurrence the true Jacobian is diag(lambda), so the DSF
rule with feedback = lambda gives exactly the BPTT gradient (weights, inputs and lambda itself)."""

import torch

from sfrnn_hf.reference_sfrnn import DiagonalStateFeedback
from sfrnn_hf.scan_sfrnn import ConstantFeedback


def linear_recurrence_loop(lam, weight, inputs):
    """h_t = lam * h_{t-1} + W x_t, autograd through every step (exact BPTT). inputs (B, T, n) -> (B, T, d)."""
    state = inputs.new_zeros(inputs.shape[0], weight.shape[0])
    states = []
    for t in range(inputs.shape[1]):
        state = lam * state + inputs[:, t] @ weight.T
        states.append(state)
    return torch.stack(states, dim=1)


def linear_recurrence_dsf(lam, weight, inputs, feedback):
    """The DSF rule on the same recurrence: values from a no-graph run, one batched one-step evaluation with the
    previous states held constant, the state gradient rewritten by the package's DiagonalStateFeedback."""
    with torch.no_grad():
        states = linear_recurrence_loop(lam, weight, inputs)
    previous = torch.cat([states.new_zeros(states[:, :1].shape), states[:, :-1]], dim=1)
    one_step = lam * previous + inputs @ weight.T
    return DiagonalStateFeedback.apply(states, one_step, ConstantFeedback(feedback))


def test_dsf_with_matching_feedback_is_exact_bptt_for_a_linear_diagonal_recurrence():
    d, n = 7, 5
    lam = torch.rand(d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d, n, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(3, 40, n, dtype=torch.float64, requires_grad=True)
    readout = torch.randn(3, 40, d, dtype=torch.float64)

    exact = torch.autograd.grad((linear_recurrence_loop(lam, weight, inputs) * readout).sum(), [lam, weight, inputs])
    dsf = torch.autograd.grad(
        (linear_recurrence_dsf(lam, weight, inputs, lam.detach()) * readout).sum(), [lam, weight, inputs]
    )
    for got, want in zip(dsf, exact):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mismatched_feedback_is_not_exact():
    # The identity above is not vacuous: a different feedback gives a different gradient.
    d, n = 7, 5
    lam = torch.rand(d, dtype=torch.float64) * 0.5 + 0.4
    weight = torch.randn(d, n, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(3, 40, n, dtype=torch.float64)
    readout = torch.randn(3, 40, d, dtype=torch.float64)
    exact = torch.autograd.grad((linear_recurrence_loop(lam, weight, inputs) * readout).sum(), weight)[0]
    wrong = torch.autograd.grad((linear_recurrence_dsf(lam, weight, inputs, lam * 0.5) * readout).sum(), weight)[0]
    assert (wrong - exact).abs().max() > 1e-3
