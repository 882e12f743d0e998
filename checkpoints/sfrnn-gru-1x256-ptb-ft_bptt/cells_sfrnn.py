"""The recurrent cells: everything the engine knows about a cell, in that cell's own definition.

A cell is one object (`CELLS[name]`): its widths, its step (the single source of its math, used by the looped
forward, the batched one-step recompute of DSF and the generation step), torch's fused kernel if one exists (its flags
by name), the step written into preallocated buffers saving its gate activations, the derivative of one step with the
previous state held constant, its diagonal Jacobian, and its code in the Triton backward kernel. The engine
(`fused_sfrnn`, `recurrent_sfrnn`, `triton_sfrnn`) asks the cell; it never branches on a cell's name. A new cell is
one new `Cell` subclass registered in `CELLS` (`MinGRU` is the example).

A layer's weights are always the tuple `(weight_ih, weight_hh, bias_ih, bias_hh)`; their shapes, initialisation and
gradients are the cell's (`parameter_shapes`, `init_range`, `accumulate_weight_grads_`). By default they have the layout
and gate order of `torch.nn.GRU` (r, z, n), `nn.LSTM` (i, f, g, o) and `nn.RNN` (tanh), so torch's fused kernels
compute the same function: `weight_ih (G*d, d)`, `bias_ih (G*d,)`, `weight_hh (H*d, d)`, `bias_hh (H*d,)` with
`G = cell.gates`, `H = cell.recurrent_gates`; `IndRNN` shows another layout (a vector `weight_hh`). Its state is one tensor `(..., S)`,
`S = cell.state_vectors * d` (the LSTM's is `[h, c]`); `h` is always the first `d` entries.

The loop forward runs on `step_weights` (prepared once per sequence): its input projection and recurrent matmul are
`StepMatmul`s, whose kind is chosen in one place, `default_step_matmul`: oneDNN on a prepacked weight for fp32 on
CPU, `addmm` elsewhere.

Every function takes any leading shape `(...)`, so it serves one time step `(batch, .)` and a chunk of steps
`(time, batch, .)` alike. The hand-written forms (`step_saving_gates`, `one_step_grad`, `diagonal_jacobian`) are tested
against `step` and its autograd for every registered cell.

Hub-exported file: imports only torch.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


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


def tanh_from_sigmoid_(sigmoid_of_double):
    """In place, `sigmoid(2x)` -> `tanh(x) = 2 sigmoid(2x) - 1` (exact identity): one sigmoid pass then serves gates
    of both kinds. Absolute error within 2 ulp of 1 (tested); where the result enters additively (the LSTM's
    `c' = f c + i g`) that is the precision that matters."""
    return sigmoid_of_double.mul_(2.0).sub_(1.0)


# ----- the loop forward's matmuls ---------------------------------------------------------------------------------

STEP_MATMULS = ("addmm", "onednn_packed")


# Read once at import: torch.compile refuses to trace `torch.backends.mkldnn.is_available`.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_packed_matmul_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear on a prepacked weight runs `x W^T` for a weight on `device` in `dtype`: fp32 on CPU,
    torch built with oneDNN."""
    return _ONEDNN_LINEAR and device.type == "cpu" and dtype == torch.float32


def default_step_matmul(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul kind the loop forward uses for weights on `device` in `dtype` (the one place this is chosen):
    oneDNN on a prepacked weight where it serves (on this project's CPU the LSTM's per-step matmul took 784 us against
    addmm's 1159: docs/performance.md), else `addmm`."""
    return "onednn_packed" if onednn_packed_matmul_serves(device, dtype) else "addmm"


class StepMatmul:
    """`x W^T + bias + add` for a weight fixed over the sequence, prepared once: the loop forward's input projection
    (one per chunk of steps) and recurrent matmul (one per step).

    Args:
        weight: `(n, k)`; bias: `(n,)` or None.
        rows: the rows `x` will have (oneDNN packs the weight for it).
        kind: one of `STEP_MATMULS`, or None for `default_step_matmul` of the weight's device and dtype.
            "onednn_packed" is oneDNN's linear on the weight reordered once into its blocked layout, what inductor's
            CPU fusion uses.
    Call: `x (..., k)`, `add` broadcastable to `(..., n)` or None -> a new tensor `(..., n)`.
    """

    def __init__(self, weight, bias=None, rows: int = 1, kind: str | None = None):
        kind = default_step_matmul(weight.device, weight.dtype) if kind is None else kind
        if kind not in STEP_MATMULS:
            raise ValueError(f"Unknown step matmul {kind!r}; expected one of {list(STEP_MATMULS)}.")
        if kind == "onednn_packed" and not onednn_packed_matmul_serves(weight.device, weight.dtype):
            raise ValueError(f"Step matmul 'onednn_packed' needs an fp32 CPU weight and torch built with oneDNN; "
                             f"got a {weight.dtype} weight on {weight.device.type}. Use 'addmm'.")
        self.kind, self.weight, self.bias = kind, weight, bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows) if kind != "addmm" else None

    def __call__(self, x, add=None):
        lead, width = x.shape[:-1], self.weight.shape[0]
        x = x.reshape(-1, x.shape[-1])
        if add is not None:
            add = add.reshape(-1, width)
        if self.kind == "addmm":
            if add is None:
                out = x @ self.weight.t() if self.bias is None else torch.addmm(self.bias, x, self.weight.t())
            else:
                out = torch.addmm(add if self.bias is None else add + self.bias, x, self.weight.t())
        elif add is None:
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), add.contiguous(), self.packed, self.bias,
                                                             "add")
        return out.view(*lead, width)


def accumulate_matmul_(out, a, b, matmul_dtype=None):
    """`out += a @ b` (out is the fp32/fp64 accumulator); the operands in `matmul_dtype` when given (bf16)."""
    if matmul_dtype is None or matmul_dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a.to(matmul_dtype) @ b.to(matmul_dtype))


class StepWeights(NamedTuple):
    """What a cell's loop forward runs on, prepared once per sequence by `Cell.step_weights`: the input projection
    `x W_ih^T + bias` `(..., G*d)` (its bias holds `b_hh` too where the cell folds it in) and the recurrent matmul
    (of `W_hh`, carrying `b_hh` unless folded; None for a cell without one), both `StepMatmul`s, unless the cell's
    recurrence is no matmul (then `recurrent` is its weight as its `step_saving_gates` reads it)."""

    input: StepMatmul
    recurrent: "StepMatmul | torch.Tensor | None"


class Cell:
    """One recurrent cell. Subclasses set the widths and write the methods below.

    Attributes:
        name: the `config.cell_type` value; title: its name in prose (model cards).
        gates: `G`, the blocks of `weight_ih` (`x W_ih^T + b_ih` is `(..., G*d)`).
        recurrent_gates: `H`, the blocks of `weight_hh` (0: the gates do not read the state through a matrix; with
            the default `parameter_shapes` the Jacobian is then diagonal).
        state_vectors: the state is `state_vectors * d` wide.
        saved_gates: width, in units of d, of the activations `step_saving_gates` saves for the backward.
        folds_hidden_bias: whether `b_hh` is added to the input projection (the recurrent matmul then takes the
            input projection as its bias: one addmm for the whole pre-activation).
        extra_gradient_width: width, in units of d, of the `extra` that `one_step_grad` returns (0: None).
        triton_backward: the name of the cell's derivative helper in `triton_sfrnn`'s backward kernel (None: the
            torch backward serves it).
    """

    name: str
    title: str
    gates: int
    recurrent_gates: int
    state_vectors: int = 1
    saved_gates: int = 0
    folds_hidden_bias: bool = False
    extra_gradient_width: int = 0
    triton_backward: str | None = None

    def __repr__(self):
        return f"{type(self).__name__}()"

    @property
    def has_triton_backward(self) -> bool:
        """Whether the Triton backward kernel has this cell's branch (the `triton` DSF backend serves it)."""
        return self.triton_backward is not None

    # ----- the parameters --------------------------------------------------------------------------------------

    def parameter_shapes(self, d: int) -> dict:
        """The layer's parameters `{name: shape}` for width `d`, in creation and initialisation order: by default the
        layout of torch's RNNs, `weight_ih (G*d, d)`, `weight_hh (H*d, d)`, `bias_ih (G*d,)`, `bias_hh (H*d,)`. The
        engine passes them as the tuple `(weight_ih, weight_hh, bias_ih, bias_hh)`; only the cell reads their shapes."""
        return {"weight_ih": (self.gates * d, d), "weight_hh": (self.recurrent_gates * d, d),
                "bias_ih": (self.gates * d,), "bias_hh": (self.recurrent_gates * d,)}

    def init_range(self, name: str, d: int) -> tuple:
        """`(low, high)` of the uniform init of parameter `name`: torch's RNN init `U(-1/sqrt(d), 1/sqrt(d))`."""
        return -1.0 / d**0.5, 1.0 / d**0.5

    def recurrent_diagonals(self, weight_hh):
        """`(H, d)`: the diagonal of each gate's `(d, d)` block of `weight_hh` `(H*d, d)`: what `diagonal_jacobian`
        (and its Triton form) reads of the recurrent weights."""
        d = weight_hh.shape[1]
        return weight_hh.view(-1, d, d).diagonal(dim1=1, dim2=2)

    # ----- the math, with autograd ------------------------------------------------------------------------------

    def step(self, input_projection, state, weight_hh, bias_hh):
        """One step: input_projection `(..., G*d)` = x W_ih^T + b_ih, state `(..., S)` -> new state `(..., S)`."""
        raise NotImplementedError

    def fused_sequence(self, inputs, initial_state, weights, train):
        """Torch's fused kernel over a whole sequence: inputs `(batch, time, d)`, initial_state `(batch, S)`,
        weights `(weight_ih, weight_hh, bias_ih, bias_hh)`; `train`: keep what the kernel's backward needs.
        Returns `h` `(batch, time, d)` and the final state `(batch, S)`, or None when torch has no kernel for the
        cell (the engine then loops `step`)."""
        return None

    def complete_states(self, inputs, outputs, initial_state, weights):
        """The whole state `(batch, time, S)` from the fused kernel's `h` `(batch, time, d)`: `h` itself unless the
        state holds more."""
        return outputs

    # ----- the fused DSF path: no autograd, preallocated buffers --------------------------------------------------

    def step_weights(self, weights, rows: int, chunk_rows: int, step_matmul: str | None = None) -> StepWeights:
        """The weights `(weight_ih, weight_hh, bias_ih, bias_hh)` prepared for `step_saving_gates`: the recurrent
        matmul for `rows` rows a step, the input projection for `chunk_rows` a call; `step_matmul`: the `StepMatmul`
        kind (None: `default_step_matmul`)."""
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        folded = self.folds_hidden_bias
        recurrent = (StepMatmul(weight_hh, None if folded else bias_hh, rows, step_matmul) if self.recurrent_gates
                     else None)
        return StepWeights(StepMatmul(weight_ih, bias_ih + bias_hh if folded else bias_ih, chunk_rows, step_matmul),
                           recurrent)

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        """One step, recurrent matmul included, written into `gates` `(..., saved_gates * d)` (None when nothing is
        saved) and `new_state` `(..., S)` (must not alias `state`). input_projection `(..., G*d)` is
        `x W_ih^T + bias` from `step_weights`. Equals `step` to rounding (tested)."""
        raise NotImplementedError

    def one_step_grad(self, grad, gates, previous, new_state):
        """The gradient of one step with the previous state held constant, written out.

        grad `(..., S)` reaches the new state; gates as saved; previous / new_state `(..., S)`.
        Returns `(grad_pre, extra)`: `grad_pre` `(..., G*d)` is the gradient of the input projection
        `x W_ih^T + b_ih`; `extra` is what `hidden_projection_grads` needs beyond it (None if nothing)."""
        raise NotImplementedError

    def hidden_projection_grads(self, grad_pre, extra):
        """The gradient of the hidden projection `h W_hh^T + b_hh` as `[(rows of weight_hh, grad (..., rows))]`:
        by default the same as the input projection's (every gate sees `x W_ih^T` and `h W_hh^T` summed)."""
        return [(slice(None), grad_pre)] if self.recurrent_gates else []

    def accumulate_weight_grads_(self, grads, grad_pre, extra, inputs, h_previous, matmul_dtype=None):
        """Add the weight gradients of one-step evaluations to `grads`, the accumulators of `(weight_ih, weight_hh,
        bias_ih, bias_hh)` (None where not wanted): rows `grad_pre` `(rows, G*d)` and `extra` from `one_step_grad`,
        `inputs` `(rows, d)`, `h_previous` `(rows, d)` the previous states' `h`. By default as large matmuls:
        `grad_pre^T x` and, per block of `hidden_projection_grads`, `block_grad^T h`."""
        grad_wih, grad_whh, grad_bih, grad_bhh = grads
        if grad_wih is not None:
            accumulate_matmul_(grad_wih, grad_pre.t(), inputs, matmul_dtype)
        if grad_bih is not None:
            grad_bih.add_(grad_pre.sum(0))
        if grad_whh is None and grad_bhh is None:
            return
        for block, block_grad in self.hidden_projection_grads(grad_pre, extra):
            if grad_whh is not None:
                accumulate_matmul_(grad_whh[block], block_grad.t(), h_previous, matmul_dtype)
            if grad_bhh is not None:
                grad_bhh[block].add_(block_grad.sum(0))

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """`diag(d state' / d state)` `(..., S)` of one step from the saved gates and the diagonals of the blocks of
        `weight_hh`. A padded step (state held) has Jacobian 1: the caller applies the mask."""
        raise NotImplementedError


class GRU(Cell):
    """`nn.GRU`: r, z from `x W_i + h W_h`; `n = tanh(x_n + r * h_n)`; `h' = n + z (h - n)`. Saves [r, z, h_n, n]
    (h_n = W_hn h + b_hn, needed by dr). The hidden projection of n is `r * h_n`, not `h_n`: its own gradient."""

    name, title, gates, recurrent_gates, saved_gates, extra_gradient_width = "gru", "GRU", 3, 3, 4, 1
    triton_backward = "gru"

    def step(self, input_projection, state, weight_hh, bias_hh):
        hidden_projection = F.linear(state, weight_hh, bias_hh)
        x_r, x_z, x_n = input_projection.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden_projection.chunk(3, dim=-1)
        reset = torch.sigmoid(x_r + h_r)
        update = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
        return candidate + update * (state - candidate)

    def fused_sequence(self, inputs, initial_state, weights, train):
        outputs, h_n = torch.gru(inputs, initial_state.unsqueeze(0).contiguous(), list(weights), has_biases=True,
                                 num_layers=1, dropout=0.0, train=train, bidirectional=False, batch_first=True)
        return outputs, h_n[0]

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        d = state.shape[-1]
        hidden = step_weights.recurrent(state)  # h W_hh^T + b_hh
        reset_update, hidden_n, candidate = gates[..., : 2 * d], gates[..., 2 * d : 3 * d], gates[..., 3 * d :]
        torch.add(input_projection[..., : 2 * d], hidden[..., : 2 * d], out=reset_update).sigmoid_()  # r, z
        hidden_n.copy_(hidden[..., 2 * d :])
        torch.addcmul(input_projection[..., 2 * d :], gates[..., :d], hidden_n, out=candidate)
        candidate.tanh_()  # n = tanh(x_n + r * h_n)
        torch.lerp(candidate, state, gates[..., d : 2 * d], out=new_state)  # h' = n + z * (h - n)

    def one_step_grad(self, grad, gates, previous, new_state):
        d = grad.shape[-1]
        r, z, hidden_n, n = gates.chunk(4, dim=-1)
        out = grad.new_empty(grad.shape[:-1] + (3 * d,))
        dr, dz, dn = out.chunk(3, dim=-1)
        _tanh_grad(torch.addcmul(grad, grad, z, value=-1), n, out=dn)  # dh'/dn = 1 - z
        _sigmoid_grad(torch.sub(previous, n).mul_(grad), z, out=dz)  # dh'/dz = h - n
        _sigmoid_grad(torch.mul(dn, hidden_n), r, out=dr)  # d n_pre / dr = h_n
        return out, dn * r

    def hidden_projection_grads(self, grad_pre, extra):
        d = extra.shape[-1]
        return [(slice(0, 2 * d), grad_pre[..., : 2 * d]), (slice(2 * d, 3 * d), extra)]

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """`z + (1 - z)(1 - n^2)(r W_n,ii + h_n r (1 - r) W_r,ii) + (h - n) z (1 - z) W_z,ii`."""
        blocks = self.recurrent_diagonals(weight_hh)
        r, z, hidden_n, n = gates.chunk(4, dim=-1)
        through_n = _sigmoid_grad(hidden_n * blocks[0], r).addcmul_(r, blocks[2])  # r W_n + h_n r (1 - r) W_r
        _tanh_grad(through_n, n, out=through_n)
        jacobian = through_n.addcmul_(through_n, z, value=-1)  # (1 - z) * through_n
        return jacobian.add_(_sigmoid_grad(torch.sub(previous, n).mul_(blocks[1]), z)).add_(z)


class LSTM(Cell):
    """`nn.LSTM`: `c' = f c + i g`, `h' = o tanh(c')`, state `[h, c]`. Saves [i, f, g, o]."""

    name, title, gates, recurrent_gates, state_vectors, saved_gates, folds_hidden_bias = "lstm", "LSTM", 4, 4, 2, 4, True
    triton_backward = "lstm"

    @staticmethod
    def forget_and_write(input_projection, h, weight_hh, bias_hh):
        """`(forget, write, output)`, each `(..., d)`, such that `c' = forget * c + write`, `h' = output * tanh(c')`."""
        i, f, g, o = (input_projection + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)
        return torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g), torch.sigmoid(o)

    def step(self, input_projection, state, weight_hh, bias_hh):
        h, c = state.chunk(2, dim=-1)
        forget, write, output = self.forget_and_write(input_projection, h, weight_hh, bias_hh)
        c_new = forget * c + write
        return torch.cat([output * torch.tanh(c_new), c_new], dim=-1)

    def fused_sequence(self, inputs, initial_state, weights, train):
        h0, c0 = (part.unsqueeze(0).contiguous() for part in initial_state.chunk(2, dim=-1))
        outputs, h_n, c_n = torch.lstm(inputs, (h0, c0), list(weights), has_biases=True, num_layers=1, dropout=0.0,
                                       train=train, bidirectional=False, batch_first=True)
        return outputs, torch.cat([h_n[0], c_n[0]], dim=-1)

    def complete_states(self, inputs, outputs, initial_state, weights):
        """`[h, c]`: with every `h_{t-1}` known the gates are one batched evaluation, and `c_t = forget_t c_{t-1} +
        write_t` an elementwise scan."""
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        h0, c0 = initial_state.chunk(2, dim=-1)
        h_previous = torch.cat([h0.unsqueeze(1), outputs[:, :-1]], dim=1)
        forget, write, _ = self.forget_and_write(F.linear(inputs, weight_ih, bias_ih), h_previous, weight_hh, bias_hh)
        c, cells = c0, []
        for t in range(inputs.shape[1]):
            c = torch.addcmul(write[:, t], forget[:, t], c)
            cells.append(c)
        return torch.cat([outputs, torch.stack(cells, dim=1)], dim=-1)

    def step_weights(self, weights, rows, chunk_rows, step_matmul=None):
        """g's rows doubled (exact in floating point), so that one sigmoid over all four gates gives i, f, o and
        `sigmoid(2 g_pre)`, from which `tanh(g_pre)` is one more pass (`tanh_from_sigmoid_`)."""
        d = weights[1].shape[1]
        scale = weights[0].new_ones(4 * d)
        scale[2 * d : 3 * d] = 2.0
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        doubled = (weight_ih * scale[:, None], weight_hh * scale[:, None], bias_ih * scale, bias_hh * scale)
        return super().step_weights(doubled, rows, chunk_rows, step_matmul)

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        d = state.shape[-1] // 2
        torch.sigmoid(step_weights.recurrent(state[..., :d], add=input_projection), out=gates)  # i, f, o, sigma(2 g)
        i, f, g, o = gates.chunk(4, dim=-1)
        tanh_from_sigmoid_(g)
        c_new = new_state[..., d:]
        torch.mul(f, state[..., d:], out=c_new).addcmul_(i, g)  # c' = f * c + i * g
        torch.tanh(c_new, out=new_state[..., :d]).mul_(o)  # h' = o * tanh(c')

    def one_step_grad(self, grad, gates, previous, new_state):
        d = grad.shape[-1] // 2
        i, f, g, o = gates.chunk(4, dim=-1)
        grad_h, grad_c = grad[..., :d], grad[..., d:]
        tanh_c = torch.tanh(new_state[..., d:])
        out = grad.new_empty(grad.shape[:-1] + (4 * d,))
        di, df, dg, do = out.chunk(4, dim=-1)
        # Each product is written into its own gate's slice, then differentiated there (one buffer, no temporaries).
        dc = _tanh_grad(torch.mul(grad_h, o, out=dg), tanh_c).add_(grad_c)  # grad_c + grad_h o (1 - tanh(c')^2)
        _sigmoid_grad(torch.mul(grad_h, tanh_c, out=do), o, out=do)
        _sigmoid_grad(torch.mul(dc, previous[..., d:], out=df), f, out=df)
        _tanh_grad(torch.mul(dc, i, out=dg), g, out=dg)
        _sigmoid_grad(dc.mul_(g), i, out=di)
        return out, None

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """The h half `tanh(c') o (1 - o) W_o,ii + o (1 - tanh(c')^2) dc'_i/dh_i` with
        `dc'_i/dh_i = c f (1 - f) W_f,ii + g i (1 - i) W_i,ii + i (1 - g^2) W_g,ii`; the c half `f`."""
        blocks = self.recurrent_diagonals(weight_hh)
        d = blocks.shape[1]
        i, f, g, o = gates.chunk(4, dim=-1)
        c_previous, tanh_c = previous[..., d:], torch.tanh(new_state[..., d:])
        jacobian = torch.empty_like(new_state)
        dh_dh, dc_dc = jacobian[..., :d], jacobian[..., d:]
        dc_dh = _sigmoid_grad(c_previous * blocks[1], f).add_(_sigmoid_grad(g * blocks[0], i))
        dc_dh.add_(_tanh_grad(i * blocks[2], g))
        _sigmoid_grad(tanh_c * blocks[3], o, out=dh_dh).add_(_tanh_grad(dc_dh.mul_(o), tanh_c))
        dc_dc.copy_(f)
        return jacobian


class TanhRNN(Cell):
    """`nn.RNN` (tanh): `h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`. Saves nothing: the derivative needs `h'` only."""

    name, title, gates, recurrent_gates, folds_hidden_bias = "rnn", "tanh RNN", 1, 1, True
    triton_backward = "tanh_rnn"

    def step(self, input_projection, state, weight_hh, bias_hh):
        return torch.tanh(input_projection + F.linear(state, weight_hh, bias_hh))

    def fused_sequence(self, inputs, initial_state, weights, train):
        outputs, h_n = torch.rnn_tanh(inputs, initial_state.unsqueeze(0).contiguous(), list(weights), has_biases=True,
                                      num_layers=1, dropout=0.0, train=train, bidirectional=False, batch_first=True)
        return outputs, h_n[0]

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        torch.tanh(step_weights.recurrent(state, add=input_projection), out=new_state)

    def one_step_grad(self, grad, gates, previous, new_state):
        return _tanh_grad(grad, new_state), None

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """`(1 - h'^2) W_ii`."""
        return _tanh_grad(self.recurrent_diagonals(weight_hh)[0].expand_as(new_state), new_state)


class MinGRU(Cell):
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): `z = sigmoid(x W_z + b_z)`, `h~ = x W_h + b_h`,
    `h' = (1 - z) h + z h~`. The gates do not read `h`: no recurrent weights (`weight_hh` is `(0, d)`), and the
    Jacobian `diag(1 - z)` is diagonal, so `diag_jacobian` gradients are exact. Saves [z, h~]."""

    name, title, gates, recurrent_gates, saved_gates = "mingru", "minGRU", 2, 0, 2

    def step(self, input_projection, state, weight_hh, bias_hh):
        x_z, candidate = input_projection.chunk(2, dim=-1)
        # lerp takes one dtype: under autocast the projection is bf16, the state stays in its own dtype
        return torch.lerp(state, candidate.to(state.dtype), torch.sigmoid(x_z).to(state.dtype))

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        d = state.shape[-1]
        torch.sigmoid(input_projection[..., :d], out=gates[..., :d])
        gates[..., d:].copy_(input_projection[..., d:])
        torch.lerp(state, gates[..., d:], gates[..., :d], out=new_state)

    def one_step_grad(self, grad, gates, previous, new_state):
        d = grad.shape[-1]
        z, candidate = gates[..., :d], gates[..., d:]
        out = grad.new_empty(grad.shape[:-1] + (2 * d,))
        _sigmoid_grad(torch.sub(candidate, previous).mul_(grad), z, out=out[..., :d])  # dh'/dz = h~ - h
        torch.mul(grad, z, out=out[..., d:])  # dh'/dh~ = z
        return out, None

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """`1 - z`."""
        return 1.0 - gates[..., : new_state.shape[-1]]


class IndRNN(Cell):
    """IndRNN (Li et al. 2018, "Independently Recurrent Neural Network"), tanh: `h' = tanh(x W_ih^T + b_ih + u * h)`.
    The recurrent weight is a vector, `weight_hh = u` `(d,)` (no `bias_hh`: `(0,)`), so each unit reads only its own
    past and the Jacobian `diag((1 - h'^2) u)` is diagonal: `diag_jacobian` gradients are exact. Saves nothing."""

    name, title, gates, recurrent_gates = "indrnn", "IndRNN", 1, 0

    def parameter_shapes(self, d):
        return {"weight_ih": (d, d), "weight_hh": (d,), "bias_ih": (d,), "bias_hh": (0,)}

    def init_range(self, name, d):
        """`u ~ U(0, 1)` (a contracting, non-negative recurrence); torch's RNN init for the rest."""
        return (0.0, 1.0) if name == "weight_hh" else super().init_range(name, d)

    def recurrent_diagonals(self, weight_hh):
        return weight_hh.unsqueeze(0)

    def step(self, input_projection, state, weight_hh, bias_hh):
        return torch.tanh(input_projection + weight_hh * state)

    def step_weights(self, weights, rows, chunk_rows, step_matmul=None):
        weight_ih, weight_hh, bias_ih, _ = weights
        return StepWeights(StepMatmul(weight_ih, bias_ih, chunk_rows, step_matmul), weight_hh)

    def step_saving_gates(self, input_projection, state, step_weights, gates, new_state):
        torch.addcmul(input_projection, step_weights.recurrent, state, out=new_state).tanh_()

    def one_step_grad(self, grad, gates, previous, new_state):
        return _tanh_grad(grad, new_state), None

    def accumulate_weight_grads_(self, grads, grad_pre, extra, inputs, h_previous, matmul_dtype=None):
        """`d u = sum_rows grad_pre * h` (elementwise: no matmul); the input projection's as every cell's."""
        super().accumulate_weight_grads_((grads[0], None, grads[2], None), grad_pre, extra, inputs, h_previous,
                                         matmul_dtype)
        if grads[1] is not None:
            grads[1].add_((grad_pre * h_previous).sum(0))

    def diagonal_jacobian(self, gates, previous, new_state, weight_hh):
        """`(1 - h'^2) u`."""
        return _tanh_grad(weight_hh.expand_as(new_state), new_state)


CELLS = {cell.name: cell for cell in (GRU(), LSTM(), TanhRNN(), MinGRU(), IndRNN())}


def get_cell(cell: "str | Cell") -> Cell:
    """The registered cell of a `config.cell_type` name (a `Cell` passes through)."""
    if isinstance(cell, Cell):
        return cell
    try:
        return CELLS[cell]
    except KeyError:
        raise ValueError(f"Unknown cell_type {cell!r}; expected one of {sorted(CELLS)}.") from None


def cell_step(cell_type, input_projection, state, weight_hh, bias_hh, mask=None):
    """One step of a cell (name or `Cell`) for any leading shape, gated by `mask` (`(...)`, 1 = real token,
    0 = padding): `state' = m * f(x, state) + (1 - m) * state`, so a padded position leaves the state untouched."""
    new_state = get_cell(cell_type).step(input_projection, state, weight_hh, bias_hh)
    if mask is None:
        return new_state
    return torch.where(mask.unsqueeze(-1).bool(), new_state, state)


__all__ = ["Cell", "CELLS", "StepMatmul", "StepWeights", "STEP_MATMULS", "default_step_matmul", "tanh_from_sigmoid_",
           "GRU", "LSTM", "TanhRNN", "MinGRU", "IndRNN", "get_cell", "cell_step",
           "accumulate_matmul_"]
