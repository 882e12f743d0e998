"""diag(d state'/d state) of each cell, written from the saved gates, equals the diagonal of the autograd Jacobian
of `cell_step` (random weights strong enough that every term matters)."""

import pytest
import torch

from sfrnn_hf.cells_sfrnn import (
    FOLDS_INPUT_PROJECTION,
    SAVED_GATES_PER_CELL,
    cell_step,
    diagonal_jacobian,
    recurrent_matmul_target,
    step_saving_gates,
)
from test_fused_dsf import layer_weights, make_layer


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_diagonal_jacobian_equals_autograd(cell):
    layer = make_layer(cell, d=6)
    d, size = layer.hidden_size, layer.state_size
    w_ih, w_hh, b_ih, b_hh = (t.detach() for t in layer_weights(layer))
    x = torch.randn(4, d, dtype=torch.float64)
    state = torch.randn(4, size, dtype=torch.float64)
    input_projection = x @ w_ih.T + b_ih

    gates = torch.empty(4, SAVED_GATES_PER_CELL[cell] * d, dtype=torch.float64) if cell != "rnn" else None
    new_state = torch.empty_like(state)
    folded = input_projection + b_hh if FOLDS_INPUT_PROJECTION[cell] else b_hh
    recurrent_matmul_target(cell, gates, new_state).copy_(state[..., :d] @ w_hh.T + folded)
    step_saving_gates(cell, input_projection, state, gates, new_state)
    got = diagonal_jacobian(cell, gates, state, new_state, w_hh)

    for row in range(4):
        jacobian = torch.autograd.functional.jacobian(
            lambda s: cell_step(cell, input_projection[row], s, w_hh, b_hh), state[row])
        torch.testing.assert_close(got[row], jacobian.diagonal(), rtol=1e-12, atol=1e-13)
        off_diagonal = jacobian - torch.diag(jacobian.diagonal())
        assert off_diagonal.abs().max() > 1e-3  # a full Jacobian: the diagonal is an approximation of it
