"""The reference DSF op, `dsf_states`: the definition every fast op (`fused_sfrnn`, `triton_sfrnn`) is tested against
(fla's `naive.py` role), and the op torch.compile traces.

(1) the recurrence without a graph; (2) one batched evaluation of the cell over all positions with the previous
states held constant (the one-step gradients); (3) the state gradient rewritten by `DiagonalStateFeedback`, the
feedback's reverse scan.

Hub-exported file: imports only torch and its flat siblings.
"""

import torch
import torch.nn.functional as F

from .cells_sfrnn import cell_step, get_cell
from .fused_sfrnn import chunk_diagonal_jacobian, gates_from_states
from .recurrence_sfrnn import run_recurrence
from .scan_sfrnn import JacobianStatistics


class DiagonalStateFeedback(torch.autograd.Function):
    """The DSF rule. Forward: the states of the recurrence, unchanged. Backward: the incoming state gradient `e`
    rewritten by the feedback's reverse scan `g_t = e_t + a_{t+1} * g_{t+1}` and sent into the one-step evaluation.
    `feedback`: a `Feedback`; `jacobians`: each step's diag(J_t) `(batch, time, S)` when the feedback decays by them
    (`feedback.per_step`), else None."""

    @staticmethod
    def forward(ctx, states, one_step_states, feedback, jacobians=None):
        ctx.feedback, ctx.jacobians = feedback, jacobians
        return states.view_as(states)

    @staticmethod
    def backward(ctx, grad_states):
        grad = grad_states.transpose(0, 1).contiguous()  # time-major, scanned in place
        ctx.feedback.scan_(grad, lambda: ctx.jacobians.transpose(0, 1))
        return None, grad.transpose(0, 1), None, None


def step_jacobian_diagonals(cell, inputs, previous_states, states, weights, mask):
    """diag(J_t) of every step `(batch, time, S)`, 1 where `mask` holds the state: the gates recomputed batched from
    the states (`gates_from_states`), then the cell's `diagonal_jacobian`, as the fused op computes it per chunk.
    inputs `(batch, time, d)`, previous_states / states `(batch, time, S)`, mask `(batch, time)` or None."""
    inputs_tm, states_tm = inputs.transpose(0, 1).contiguous(), states.transpose(0, 1).contiguous()
    previous_tm = previous_states.transpose(0, 1)
    gates = gates_from_states(cell, inputs_tm, previous_states[:, 0], states_tm, weights)
    mask_tm = None if mask is None else mask.transpose(0, 1).unsqueeze(-1).bool()
    decay = chunk_diagonal_jacobian(cell, gates, previous_tm, states_tm, weights[1], mask_tm, 0, states.shape[1])
    return decay.transpose(0, 1)


def dsf_states(cell, inputs, initial_state, weights, mask, feedback):
    """The reference DSF op: states `(batch, time, S)` whose values are the recurrence's and whose backward is DSF,
    and the forward's `JacobianStatistics` (None unless `feedback.record_statistics`).

    (1) the recurrence without a graph; (2) one batched evaluation of the cell over all positions with the previous
    states held constant (the one-step gradients); (3) the state gradient rewritten by `DiagonalStateFeedback`.
    cell: a `Cell` or its name; inputs `(batch, time, d)`; initial_state `(batch, S)`; weights
    `(weight_ih, weight_hh, bias_ih, bias_hh)`; mask `(batch, time)` or None; feedback a `Feedback`.
    """
    cell = get_cell(cell)
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    with torch.no_grad():
        states, _ = run_recurrence(cell, inputs, initial_state, weights, mask, all_states=True)
    previous_states = torch.cat([initial_state.detach().unsqueeze(1), states[:, :-1]], dim=1)
    jacobians = statistics = None
    if feedback.per_step or feedback.record_statistics:
        with torch.no_grad():
            jacobians = step_jacobian_diagonals(cell, inputs, previous_states, states,
                                                tuple(w.detach() for w in weights), mask)
        if feedback.record_statistics:
            real = torch.ones_like(states[..., 0]) if mask is None else mask.to(states.dtype)
            statistics = JacobianStatistics((jacobians * real.unsqueeze(-1)).sum(dim=(0, 1)), real.sum())
    one_step_states = cell_step(cell, F.linear(inputs, weight_ih, bias_ih), previous_states, weight_hh, bias_hh, mask)
    jacobians = jacobians if feedback.per_step else None
    return DiagonalStateFeedback.apply(states, one_step_states, feedback, jacobians), statistics


__all__ = ["dsf_states", "DiagonalStateFeedback", "step_jacobian_diagonals"]
