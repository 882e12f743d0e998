"""One step of each recurrent cell: the single source of truth for the cell math.

Used by the looped forward, the batched one-step recompute of DSF (all positions at once, the previous states held
constant) and the generation step. The fused DSF path (`fused_sfrnn.py`) uses the same cells written out gate by gate,
`step_saving_gates` (forward, filling preallocated buffers) and `one_step_grad` (the explicit derivatives of one step
with the previous state held constant); tests check both against `cell_step` and its autograd. Layout and gate order are those of `torch.nn.GRU` (r, z, n), `nn.LSTM`
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


# ---------------------------------------------------------------------------------------------------------------------
# The same cells gate by gate, for the fused DSF path: a forward that saves the gate activations, and the derivative
# of one step with the previous state held constant. Every function takes any leading shape `(...)`, so it serves one
# time step `(batch, .)` and a chunk of steps `(time, batch, .)` alike.

# Width of the saved gate activations, in units of d: GRU [r, z, h_n, n] (h_n = W_hn h + b_hn, needed by dr);
# LSTM [i, f, g, o]; tanh RNN none (its derivative needs only the new state).
SAVED_GATES_PER_CELL = {"gru": 4, "lstm": 4, "rnn": 0}
# Whether the step's recurrent matmul takes the input projection as its bias (LSTM, RNN: the pre-activation is
# `x W_ih^T + b_ih + b_hh + h W_hh^T`, one addmm); the GRU keeps `h W_hh^T + b_hh` apart, its n gate needs `r * h_n`.
FOLDS_INPUT_PROJECTION = {"gru": False, "lstm": True, "rnn": True}


def recurrent_matmul_target(cell_type, gates, new_state):
    """The buffer a step's recurrent matmul writes into, before `step_saving_gates`: GRU `gates[..., :3d]`
    (`h W_hh^T + b_hh`), LSTM `gates` and RNN `new_state` (the whole pre-activation)."""
    if cell_type == "gru":
        return gates[..., : 3 * new_state.shape[-1]]
    return gates if cell_type == "lstm" else new_state


def step_saving_gates(cell_type, input_projection, state, gates, new_state):
    """One step of the cell, in place in preallocated buffers (no autograd; the mask is applied by the caller).

    On entry the step's recurrent matmul is in `recurrent_matmul_target(...)`:
        GRU: `gates[..., :3d]` = h W_hh^T + b_hh, and input_projection `(..., 3d)` = x W_ih^T + b_ih;
        LSTM: `gates` `(..., 4d)` = x W_ih^T + b_ih + h W_hh^T + b_hh; RNN: `new_state` likewise `(..., d)`
        (input_projection unused: `FOLDS_INPUT_PROJECTION`).
    On exit `gates` `(..., SAVED_GATES_PER_CELL * d)` holds the activations (GRU [r, z, h_n, n], LSTM [i, f, g, o];
    None for the RNN) and `new_state` `(..., S)` the new state (must not alias `state` `(..., S)`).
    Equals `cell_step(cell_type, input_projection, state, W_hh, b_hh)` to rounding (tested).
    """
    if cell_type == "gru":
        d = state.shape[-1]
        candidate = gates[..., 3 * d :]
        gates[..., : 2 * d].add_(input_projection[..., : 2 * d]).sigmoid_()  # r, z
        torch.addcmul(input_projection[..., 2 * d :], gates[..., :d], gates[..., 2 * d : 3 * d], out=candidate)
        candidate.tanh_()  # n = tanh(x_n + r * h_n)
        torch.lerp(candidate, state, gates[..., d : 2 * d], out=new_state)  # h' = n + z * (h - n)
    elif cell_type == "lstm":
        d = state.shape[-1] // 2
        gates[..., 2 * d : 3 * d].tanh_()  # g
        gates[..., : 2 * d].sigmoid_()  # i, f
        gates[..., 3 * d :].sigmoid_()  # o
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = new_state[..., d:]
        torch.mul(f, state[..., d:], out=c_new).addcmul_(i, g)  # c' = f * c + i * g
        torch.tanh(c_new, out=new_state[..., :d]).mul_(o)  # h' = o * tanh(c')
    elif cell_type == "rnn":
        new_state.tanh_()
    else:
        raise ValueError(f"Unknown cell_type {cell_type!r}; expected one of {sorted(CELL_STEPS)}.")


def _tanh_grad(grad, output, out=None):
    """`grad * (1 - output^2)`, the derivative through `output = tanh(x)`, in one pass (into `out` if given)."""
    if out is None:
        return torch.ops.aten.tanh_backward(grad, output)
    return torch.ops.aten.tanh_backward.grad_input(grad, output, grad_input=out)


def _sigmoid_grad(grad, output, out=None):
    """`grad * output * (1 - output)`, the derivative through `output = sigmoid(x)`, in one pass."""
    if out is None:
        return torch.ops.aten.sigmoid_backward(grad, output)
    return torch.ops.aten.sigmoid_backward.grad_input(grad, output, grad_input=out)


def one_step_grad(cell_type, grad, gates, previous, new_state):
    """The gradient of one step with the previous state held constant, written out (no autograd).

    Args:
        grad: `(..., S)` the gradient reaching the new state (already zero at padded positions).
        gates: `(..., SAVED_GATES_PER_CELL * d)` from `step_saving_gates` (None for the RNN).
        previous, new_state: `(..., S)` the states before and after the step.
    Returns:
        `(grad_input_projection, grad_hidden_candidate)`: `(..., G*d)` the gradient of the pre-activations, which is
        also the gradient of the input projection `x W_ih^T + b_ih`; the hidden projection `h W_hh^T + b_hh` gets the
        same except, for the GRU, its n block, `grad_hidden_candidate = dn * r` `(..., d)` (None for LSTM and RNN).
    """
    out_shape = grad.shape[:-1]
    if cell_type == "gru":  # h' = n + z (h - n), n = tanh(x_n + r h_n), r = sigmoid(.), z = sigmoid(.)
        d = grad.shape[-1]
        r, z, hidden_n, n = gates.chunk(4, dim=-1)
        out = grad.new_empty(out_shape + (3 * d,))
        dr, dz, dn = out.chunk(3, dim=-1)
        _tanh_grad(torch.addcmul(grad, grad, z, value=-1), n, out=dn)  # dh'/dn = 1 - z
        _sigmoid_grad(torch.sub(previous, n).mul_(grad), z, out=dz)  # dh'/dz = h - n
        _sigmoid_grad(torch.mul(dn, hidden_n), r, out=dr)  # d n_pre / dr = h_n
        return out, dn * r
    if cell_type == "lstm":  # c' = f c + i g, h' = o tanh(c')
        d = grad.shape[-1] // 2
        i, f, g, o = gates.chunk(4, dim=-1)
        grad_h, grad_c = grad[..., :d], grad[..., d:]
        tanh_c = torch.tanh(new_state[..., d:])
        out = grad.new_empty(out_shape + (4 * d,))
        di, df, dg, do = out.chunk(4, dim=-1)
        dc = _tanh_grad(grad_h * o, tanh_c).add_(grad_c)  # dL/dc' = grad_c + grad_h o (1 - tanh(c')^2)
        _sigmoid_grad(grad_h.mul(tanh_c), o, out=do)
        _sigmoid_grad(dc * previous[..., d:], f, out=df)
        _sigmoid_grad(dc * g, i, out=di)
        _tanh_grad(dc * i, g, out=dg)
        return out, None
    if cell_type == "rnn":  # h' = tanh(.)
        return _tanh_grad(grad, new_state), None
    raise ValueError(f"Unknown cell_type {cell_type!r}; expected one of {sorted(CELL_STEPS)}.")


def diagonal_jacobian(cell_type, gates, previous, new_state, weight_hh):
    """`diag(d state' / d state)` of one step, from the saved gates (`step_saving_gates`): elementwise in the gate
    activations and the diagonals of the blocks of `weight_hh`, O(S) per step.

    GRU: `z + (1 - z)(1 - n^2)(r W_n,ii + h_n r (1 - r) W_r,ii) + (h - n) z (1 - z) W_z,ii`;
    LSTM ([h, c]): the h half `tanh(c') o (1 - o) W_o,ii + o (1 - tanh(c')^2) dc'_i/dh_i` with
    `dc'_i/dh_i = c f (1 - f) W_f,ii + g i (1 - i) W_i,ii + i (1 - g^2) W_g,ii`, the c half `f`;
    tanh RNN: `(1 - h'^2) W_ii`.
    Shapes: gates `(..., SAVED_GATES_PER_CELL * d)`, previous / new_state `(..., S)`, weight_hh `(G*d, d)`;
    returns `(..., S)`. A padded step (state held) has Jacobian 1: the caller applies the mask.
    """
    d = weight_hh.shape[1]
    blocks = weight_hh.view(-1, d, d).diagonal(dim1=1, dim2=2)  # (G, d): diag of each gate's block
    # Each `x * s (1 - s)` is one `_sigmoid_grad` pass and each `x * (1 - t^2)` one `_tanh_grad` pass.
    if cell_type == "gru":
        r, z, hidden_n, n = gates.chunk(4, dim=-1)
        through_n = _sigmoid_grad(hidden_n * blocks[0], r).addcmul_(r, blocks[2])  # r W_n + h_n r (1 - r) W_r
        _tanh_grad(through_n, n, out=through_n)
        jacobian = through_n.addcmul_(through_n, z, value=-1)  # (1 - z) * through_n
        jacobian.add_(_sigmoid_grad(torch.sub(previous, n).mul_(blocks[1]), z)).add_(z)
        return jacobian
    if cell_type == "lstm":
        i, f, g, o = gates.chunk(4, dim=-1)
        c_previous, tanh_c = previous[..., d:], torch.tanh(new_state[..., d:])
        jacobian = torch.empty_like(new_state)
        dh_dh, dc_dc = jacobian[..., :d], jacobian[..., d:]
        dc_dh = _sigmoid_grad(c_previous * blocks[1], f).add_(_sigmoid_grad(g * blocks[0], i))
        dc_dh.add_(_tanh_grad(i * blocks[2], g))
        _sigmoid_grad(tanh_c * blocks[3], o, out=dh_dh).add_(_tanh_grad(dc_dh.mul_(o), tanh_c))
        dc_dc.copy_(f)
        return jacobian
    if cell_type == "rnn":
        return _tanh_grad(blocks[0].expand_as(new_state), new_state)
    raise ValueError(f"Unknown cell_type {cell_type!r}; expected one of {sorted(CELL_STEPS)}.")


__all__ = ["cell_step", "diagonal_jacobian", "lstm_gates", "step_saving_gates", "one_step_grad", "recurrent_matmul_target",
           "GATES_PER_CELL", "STATES_PER_CELL", "SAVED_GATES_PER_CELL", "FOLDS_INPUT_PROJECTION"]
