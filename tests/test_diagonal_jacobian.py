"""diag(d state'/d state) of each cell, written from the saved gates, equals the diagonal of the autograd Jacobian
of `cell_step` (random weights strong enough that every term matters)."""

import pytest
import torch

from sfrnn_hf.cells_sfrnn import CELLS, cell_step
from test_fused_dsf import layer_weights, make_layer, saved_step


@pytest.mark.parametrize("cell", list(CELLS))
def test_diagonal_jacobian_equals_autograd(cell):
    layer = make_layer(cell, d=6)
    spec = CELLS[cell]
    d, size = layer.hidden_size, layer.state_size
    w_ih, w_hh, b_ih, b_hh = (t.detach() for t in layer_weights(layer))
    x = torch.randn(4, d, dtype=torch.float64)
    state = torch.randn(4, size, dtype=torch.float64)
    input_projection = x @ w_ih.T + b_ih

    gates, new_state = saved_step(cell, input_projection, state, w_hh, b_hh)
    got = spec.diagonal_jacobian(gates, state, new_state, w_hh)

    for row in range(4):
        jacobian = torch.autograd.functional.jacobian(
            lambda s: cell_step(cell, input_projection[row], s, w_hh, b_hh), state[row])
        torch.testing.assert_close(got[row], jacobian.diagonal(), rtol=1e-12, atol=1e-13)
        off_diagonal = (jacobian - torch.diag(jacobian.diagonal())).abs().max()
        if spec.recurrent_gates:
            assert off_diagonal > 1e-3  # a full Jacobian: the diagonal is an approximation of it
        else:
            assert off_diagonal == 0  # gates from the input only (minGRU): the Jacobian is diagonal
