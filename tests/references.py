"""Slow, obviously correct references for the tests, written with torch's own cells (`nn.GRUCell`, `nn.LSTMCell`,
`nn.RNNCell`; for minGRU and IndRNN, which torch lacks, `MinGRUCell` and `IndRNNCell` below, from the papers'
equations) sharing the model's weight tensors: nothing here calls the package's cell math or scan."""

import torch
import torch.nn.functional as F
from torch import nn



class MinGRUCell(nn.Module):
    """minGRU as Feng et al. 2024 write it (Section 3.2): `z_t = sigmoid(Linear_z(x_t))`, `h~_t = Linear_h(x_t)`,
    `h_t = (1 - z_t) * h_{t-1} + z_t * h~_t`; `weight_ih` stacks `[W_z; W_h]`. No recurrent weights."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, x, h):
        d = self.hidden_size
        z = torch.sigmoid(x @ self.weight_ih[:d].T + self.bias_ih[:d])
        candidate = x @ self.weight_ih[d:].T + self.bias_ih[d:]
        return (1 - z) * h + z * candidate


class IndRNNCell(nn.Module):
    """IndRNN as Li et al. 2018 write it (eq. 2), with tanh: `h_t = tanh(W x_t + u (.) h_{t-1} + b)`; `weight_ih` is
    `W`, `weight_hh` the vector `u`, `bias_ih` is `b` (no `bias_hh`)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()

    def forward(self, x, h):
        return torch.tanh(x @ self.weight_ih.T + self.weight_hh * h + self.bias_ih)


TORCH_CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn": nn.RNNCell, "mingru": MinGRUCell,
               "indrnn": IndRNNCell}
TORCH_RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def torch_cell_sharing_weights(layer):
    """A torch cell whose parameters ARE the layer's parameters (gradients land on the layer)."""
    cell = TORCH_CELLS[layer.cell_type](layer.hidden_size, layer.hidden_size)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(cell, name, getattr(layer, name))
    return cell


def torch_rnn_copy(layer):
    """An `nn.GRU` / `nn.LSTM` / `nn.RNN` holding copies of the layer's weights (same names, `_l0` added)."""
    rnn = TORCH_RNNS[layer.cell_type](layer.hidden_size, layer.hidden_size, batch_first=True)
    rnn = rnn.to(layer.weight_ih.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, name + "_l0").copy_(getattr(layer, name))
    return rnn


def cell_state_step(cell, x_t, state):
    """One step of a torch cell on the layer-state layout (`[h, c]` for the LSTM)."""
    if isinstance(cell, nn.LSTMCell):
        h, c = cell(x_t, state.chunk(2, dim=-1))
        return torch.cat([h, c], dim=-1)
    return cell(x_t, state)


def plain_loop_scan(errors, feedback):
    """g_t = e_t + a * g_{t+1}, one step at a time."""
    out = torch.zeros_like(errors)
    carry = torch.zeros_like(errors[:, 0])
    for t in reversed(range(errors.shape[1])):
        carry = errors[:, t] + feedback * carry
        out[:, t] = carry
    return out


def reference_dsf_layer(layer, inputs, mask, feedback):
    """DSF by definition: per-timestep autograd of the one-step cell with the previous state held constant, and the
    state gradient rewritten by the plain loop (feedback None: no rewrite, i.e. FT-BPTT). Returns `(B, T, S)`."""
    cell = torch_cell_sharing_weights(layer)
    state = inputs.new_zeros(inputs.shape[0], layer.state_size)
    outputs = []
    for t in range(inputs.shape[1]):
        held = state.detach()
        new = cell_state_step(cell, inputs[:, t], held)
        if mask is not None:
            new = torch.where(mask[:, t, None].bool(), new, held)
        outputs.append(new)
        state = new
    states = torch.stack(outputs, dim=1)
    if feedback is not None:
        states.register_hook(lambda errors: plain_loop_scan(errors, feedback))
    return states


def reference_exact_layer(layer, inputs, mask):
    """Exact BPTT by definition: autograd through the gated loop of torch cells. Returns `(B, T, S)`."""
    cell = torch_cell_sharing_weights(layer)
    state = inputs.new_zeros(inputs.shape[0], layer.state_size)
    outputs = []
    for t in range(inputs.shape[1]):
        new = cell_state_step(cell, inputs[:, t], state)
        if mask is not None:
            new = torch.where(mask[:, t, None].bool(), new, state)
        outputs.append(new)
        state = new
    return torch.stack(outputs, dim=1)


def causal_lm_cross_entropy(logits, labels):
    """Next-token cross-entropy in the logits' own dtype, mean over the positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def reference_causal_lm_logits(model, input_ids, mask, layer_fn):
    """The model's wiring re-done by hand around `layer_fn(recurrent_layer, inputs, mask) -> (B, T, S)`."""
    return model.lm_head(reference_hidden_states(model.model, input_ids, mask, layer_fn))


def reference_hidden_states(base, input_ids, mask, layer_fn):
    """`SfrnnModel`'s wiring (embeddings, blocks, final norm) re-done by hand around `layer_fn`. Returns `(B, T, d)`."""
    x = base.embeddings(input_ids)
    for block in base.layers:
        branch = x if block.recurrent_norm is None else block.recurrent_norm(x)
        branch = layer_fn(block.recurrent, branch, mask)[..., : block.recurrent.output_size]
        if block.output_projection is not None:
            branch = block.output_projection(branch)
        x = x + branch
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x))
    if base.norm_f is not None:
        x = base.norm_f(x)
    return x


def padded_batch(vocab_size, batch, time, padding):
    """Token ids, labels (-100 at pads) and mask; `padding` in {None, "right", "left"}."""
    input_ids = torch.randint(0, vocab_size, (batch, time))
    mask = torch.ones(batch, time, dtype=torch.long)
    if padding is not None:
        lengths = torch.tensor([time, time - 3, 2][:batch])
        for row, length in enumerate(lengths):
            if padding == "right":
                mask[row, length:] = 0
            else:
                mask[row, : time - length] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, labels, (None if padding is None else mask)
