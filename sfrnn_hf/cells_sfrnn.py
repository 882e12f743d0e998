"""One step of each recurrent cell: the single source of truth for the cell math.

Used by the looped forward, the batched one-step recompute of DSF (all positions at once, the previous states held
constant) and the generation step. Layout and gate order are those of `torch.nn.GRU` (r, z, n), `nn.LSTM`
(i, f, g, o) and `nn.RNN` (tanh), so the fused torch kernels compute the same function.

A layer's state is one tensor `(..., S)`: `S = d` for GRU and RNN, `S = 2d` for the LSTM, whose state is `[h, c]`.

Hub-exported file: imports only torch.
"""

import torch
import torch.nn.functional as F

GATES_PER_CELL = {"gru": 3, "lstm": 4, "rnn": 1}
STATES_PER_CELL = {"gru": 1, "lstm": 2, "rnn": 1}


def gru_step(input_projection, state, weight_hh, bias_hh):
    """input_projection `(..., 3d)` = x W_ih^T + b_ih; state `(..., d)`; returns `(..., d)`."""
    hidden_projection = F.linear(state, weight_hh, bias_hh)
    x_r, x_z, x_n = input_projection.chunk(3, dim=-1)
    h_r, h_z, h_n = hidden_projection.chunk(3, dim=-1)
    reset = torch.sigmoid(x_r + h_r)
    update = torch.sigmoid(x_z + h_z)
    candidate = torch.tanh(x_n + reset * h_n)
    return candidate + update * (state - candidate)


def lstm_gates(input_projection, h, weight_hh, bias_hh):
    """The LSTM's gates from `(..., 4d)` and `h` `(..., d)`: `(forget, write, output)`, each `(..., d)`, such that
    `c' = forget * c + write` and `h' = output * tanh(c')`."""
    i, f, g, o = (input_projection + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)
    return torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g), torch.sigmoid(o)


def lstm_step(input_projection, state, weight_hh, bias_hh):
    """input_projection `(..., 4d)`; state `(..., 2d)` = [h, c]; returns `(..., 2d)` = [h', c']."""
    h, c = state.chunk(2, dim=-1)
    forget, write, output = lstm_gates(input_projection, h, weight_hh, bias_hh)
    c_new = forget * c + write
    return torch.cat([output * torch.tanh(c_new), c_new], dim=-1)


def rnn_step(input_projection, state, weight_hh, bias_hh):
    """input_projection `(..., d)`; state `(..., d)`; returns `(..., d)`."""
    return torch.tanh(input_projection + F.linear(state, weight_hh, bias_hh))


CELL_STEPS = {"gru": gru_step, "lstm": lstm_step, "rnn": rnn_step}


def cell_step(cell_type, input_projection, state, weight_hh, bias_hh, mask=None):
    """One step of `cell_type` for any leading shape, gated by `mask` (`(...)`, 1 = real token, 0 = padding):
    `state' = m * f(x, state) + (1 - m) * state`, so a padded position leaves the state untouched."""
    new_state = CELL_STEPS[cell_type](input_projection, state, weight_hh, bias_hh)
    if mask is None:
        return new_state
    return torch.where(mask.unsqueeze(-1).bool(), new_state, state)


__all__ = ["cell_step", "lstm_gates", "GATES_PER_CELL", "STATES_PER_CELL"]
