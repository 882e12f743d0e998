"""The fused DSF op: the recurrence saving its gates, and the DSF backward walking time in reverse chunks.

Forward (`recurrence_saving_gates`): no autograd graph; the input projection is one matmul per chunk of steps, and
each step is one `h W_hh^T` matmul plus the cell's pointwise math (`cells_sfrnn.step_saving_gates`) written into
preallocated, time-major buffers of the states and the gate activations.

Backward (`dsf_backward`): for chunks of `DSF_CHUNK` steps, from the last to the first, on cache-sized slices:
(1) the reverse diagonal scan `g_t = e_t + a * g_{t+1}` inside the chunk, started from the carry of the later chunk;
(2) the one-step gradient of the cell with the previous state held constant (`cells_sfrnn.one_step_grad`);
(3) the weight gradients accumulated and the input gradient written, as large matmuls. No per-step autograd graph.

`FusedDsfRecurrence` ties both into an `autograd.Function`; the readable definition of the same rule is
`recurrent_sfrnn.dsf_states` (the recompute form), against which this op is tested.

Internal layout is time-major `(time, batch, .)`: a step and a chunk of steps are contiguous slices, so a chunk
flattens to `(steps * batch, .)` rows for the gradient matmuls.

Hub-exported file: imports only torch and its flat siblings.
"""

import torch

from .cells_sfrnn import (
    FOLDS_INPUT_PROJECTION,
    diagonal_jacobian,
    SAVED_GATES_PER_CELL,
    STATES_PER_CELL,
    one_step_grad,
    recurrent_matmul_target,
    step_saving_gates,
)

# The `feedback` that asks for the time-varying decay diag(J_t) (gradient_mode "diag_jacobian") instead of a constant.
DIAG_JACOBIAN = "diag_jacobian"

# Steps per backward chunk: 64 steps of batch 32 at d = 512 keep a chunk's gate slices (a few MB) in the L2/L3 cache.
DSF_CHUNK = 64


def _matmul(a, b, matmul_dtype):
    """`a @ b` with the operands in `matmul_dtype` (bf16 for the large matmuls when asked), result in `a.dtype`."""
    if matmul_dtype is None or matmul_dtype == a.dtype:
        return a @ b
    return (a.to(matmul_dtype) @ b.to(matmul_dtype)).to(a.dtype)


def _input_projection(cell_type, inputs, weight_ih, bias_ih, bias_hh, matmul_dtype):
    """`x W_ih^T + b_ih` (+ b_hh where the cell folds it into the recurrent matmul's bias) for every position.
    inputs `(time, batch, d)` contiguous -> `(time, batch, G*d)`."""
    time, batch, d = inputs.shape
    bias = bias_ih + bias_hh if FOLDS_INPUT_PROJECTION[cell_type] else bias_ih
    flat = inputs.reshape(time * batch, d)
    if matmul_dtype is None or matmul_dtype == inputs.dtype:
        projection = torch.addmm(bias, flat, weight_ih.t())
    else:
        projection = _matmul(flat, weight_ih.t(), matmul_dtype).add_(bias)
    return projection.view(time, batch, -1)


def _accumulate_matmul_(out, a, b, matmul_dtype):
    """`out += a @ b` (out is the fp32/fp64 accumulator)."""
    if matmul_dtype is None or matmul_dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a.to(matmul_dtype) @ b.to(matmul_dtype))


def recurrence_saving_gates(cell_type, inputs, initial_state, weight_ih, weight_hh, bias_ih, bias_hh, mask=None,
                            matmul_dtype=None, diagonal_jacobian_sum=None):
    """The gated recurrence, no graph, saving every state and gate activation.

    Args:
        inputs: `(time, batch, d)` time-major and contiguous.
        initial_state: `(batch, S)`.
        weight_ih, weight_hh: `(G*d, d)`; bias_ih, bias_hh: `(G*d,)`.
        mask: `(time, batch, 1)` bool or None; a False position holds the previous state.
        matmul_dtype: dtype of the input-projection matmul's operands (None: the inputs' dtype).
        diagonal_jacobian_sum: None, or an `(S,)` accumulator to which each chunk of steps adds its diag(J_t) summed
            over the batch and the real steps, while its gates are still in cache (a calibrated feedback's estimate).
    Returns:
        states `(time, batch, S)`, gates `(time, batch, SAVED_GATES_PER_CELL * d)` (None for the RNN).
    """
    time, batch, d = inputs.shape
    states = inputs.new_empty(time, batch, STATES_PER_CELL[cell_type] * d)
    saved = SAVED_GATES_PER_CELL[cell_type]
    gates = inputs.new_empty(time, batch, saved * d) if saved else None
    folds = FOLDS_INPUT_PROJECTION[cell_type]
    weight_hh_t = weight_hh.t()
    if diagonal_jacobian_sum is not None:  # room for the first chunk's previous states
        first_previous = inputs.new_empty(min(DSF_CHUNK, time), batch, states.shape[-1])
    state = initial_state
    for t in range(time):
        if t % DSF_CHUNK == 0:  # the input projection chunk by chunk: a cache-sized buffer, not a fresh large one
            input_projection = _input_projection(cell_type, inputs[t : t + DSF_CHUNK], weight_ih, bias_ih, bias_hh,
                                                 matmul_dtype)
        step_gates = None if gates is None else gates[t]
        target = recurrent_matmul_target(cell_type, step_gates, states[t])
        step_projection = input_projection[t % DSF_CHUNK]
        # `h` contiguous: the LSTM's h is a strided half of [h, c].
        torch.addmm(step_projection if folds else bias_hh, state[:, :d].contiguous(), weight_hh_t, out=target)
        step_saving_gates(cell_type, step_projection, state, step_gates, states[t])
        if mask is not None:
            states[t] = torch.where(mask[t], states[t], state)
        state = states[t]
        if diagonal_jacobian_sum is not None and (t % DSF_CHUNK == DSF_CHUNK - 1 or t == time - 1):
            add_diagonal_jacobian_sum_(diagonal_jacobian_sum, cell_type, gates, initial_state, states, weight_hh,
                                       mask, t - t % DSF_CHUNK, t + 1, first_previous)
    return states, gates


def reverse_scan_chunk_(grad, carry, decay):
    """In place on one chunk of steps: `g_t = e_t + decay_{t+1} * g_{t+1}`.

    Args:
        grad: `(steps, batch, S)` the incoming errors `e` of the chunk's steps; becomes `g`.
        carry: `(batch, S)` what the later chunk passes back, `decay_{end} * g_{end}` (None after the last step).
        decay: `(S,)` a constant diagonal (DSF's feedback), or `(steps, batch, S)` one per step of this chunk,
            `decay[i]` scaling the chunk's `g_i` into `g_{i-1}` (e.g. each step's diagonal Jacobian).
    Returns:
        the carry for the earlier chunk, `decay_0 * g_0` `(batch, S)`.
    """
    steps = grad.shape[0]
    constant = decay.dim() == 1
    if carry is not None:
        grad[steps - 1].add_(carry)
    for i in range(steps - 2, -1, -1):
        grad[i].addcmul_(decay if constant else decay[i + 1], grad[i + 1])
    return grad[0] * (decay if constant else decay[0])


def previous_states(states, initial_state, start, end, buffer):
    """The states before steps `start .. end - 1`: a view of `states` `(time, batch, S)`, or, for a chunk at the
    start of the sequence, `[initial_state, states[: end - 1]]` written into `buffer` `(>= end - start, batch, S)`."""
    if start > 0:
        return states[start - 1 : end - 1]
    previous = buffer[: end - start]
    previous[0] = initial_state
    previous[1:] = states[: end - 1]
    return previous


def chunk_diagonal_jacobian(cell_type, gates, previous, states, weight_hh, mask, start, end):
    """diag(J_t) `(end - start, batch, S)` of steps `start .. end - 1` (`cells_sfrnn.diagonal_jacobian`), 1 where
    `mask` `(time, batch, 1)` holds the state: a cache-sized slice, computed where the gates are already in cache."""
    decay = diagonal_jacobian(cell_type, None if gates is None else gates[start:end], previous, states[start:end],
                              weight_hh)
    return decay if mask is None else decay.masked_fill_(~mask[start:end], 1.0)


def add_diagonal_jacobian_sum_(total, cell_type, gates, initial_state, states, weight_hh, mask, start, end, buffer):
    """`total` `(S,)` += the sum over the batch and the real steps among `start .. end - 1` of diag(J_t).
    `buffer` `(>= end - start, batch, S)` is scratch for the chunk's previous states."""
    previous = previous_states(states, initial_state, start, end, buffer)
    decay = chunk_diagonal_jacobian(cell_type, gates, previous, states, weight_hh, None, start, end)
    if mask is not None:
        decay.masked_fill_(~mask[start:end], 0.0)  # padded steps do not count
    total.add_(decay.sum(dim=(0, 1)))


def diagonal_jacobian_sum(cell_type, gates, initial_state, states, weight_hh, mask=None, chunk=DSF_CHUNK):
    """The calibrated feedback's estimate before the division: the sum of diag(J_t) over the batch and the real steps,
    per state entry `(S,)`, chunk by chunk (no `(time, batch, S)` temporary), and how many positions it sums
    (`real_steps`). Shapes as `recurrence_saving_gates` returns them."""
    time, batch, width_state = states.shape
    total = states.new_zeros(width_state)
    buffer = states.new_empty(min(chunk, time), batch, width_state)
    for start in range(0, time, chunk):
        add_diagonal_jacobian_sum_(total, cell_type, gates, initial_state, states, weight_hh, mask, start,
                                   min(time, start + chunk), buffer)
    return total, real_steps(mask, time, batch)


def real_steps(mask, time, batch):
    """How many (step, row) positions are real tokens: `time * batch` without a mask (a 0-dim tensor either way)."""
    return torch.tensor(time * batch) if mask is None else mask.sum()


def dsf_backward(cell_type, grad_states, inputs, initial_state, states, gates, weights, mask, decay, needs,
                 matmul_dtype=None, chunk=DSF_CHUNK, pointwise_kernel=None):
    """The DSF backward, chunk by chunk from the end of the sequence.

    Args:
        grad_states: `(time, batch, S)` (any strides) the gradient reaching each state from outside the recurrence.
        inputs: `(time, batch, d)` contiguous; initial_state `(batch, S)`; states `(time, batch, S)`; gates as saved.
        weights: `(weight_ih, weight_hh, bias_ih, bias_hh)`.
        mask: `(time, batch, 1)` bool or None.
        decay: the scan's diagonal: `(S,)` constant, `DIAG_JACOBIAN` (each step's own diag(J_t), computed chunk
            by chunk from the gates), or None: no scan (FT-BPTT).
        needs: five bools, whether the gradient of inputs, weight_ih, weight_hh, bias_ih, bias_hh is wanted.
        pointwise_kernel: None (the scan and `one_step_grad` chunk by chunk in torch), or a kernel doing both for the
            whole sequence, any decay above, signature of `triton_sfrnn.triton_dsf_pointwise_backward`.
    Returns:
        `(grad_inputs (time, batch, d), grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh)`, None where not
        needed; accumulated in the states' dtype (fp32 / fp64).
    """
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    time, batch, width_state = states.shape
    d = inputs.shape[-1]
    dtype = states.dtype
    need_x, need_wih, need_whh, need_bih, need_bhh = needs
    grad_x = torch.empty_like(inputs) if need_x else None
    grad_wih = torch.zeros_like(weight_ih, dtype=dtype) if need_wih else None
    grad_whh = torch.zeros_like(weight_hh, dtype=dtype) if need_whh else None
    grad_bih = torch.zeros_like(bias_ih, dtype=dtype) if need_bih else None
    grad_bhh = torch.zeros_like(bias_hh, dtype=dtype) if need_bhh else None
    weight_ih_c = weight_ih.to(dtype) if need_x else None
    grad = states.new_empty(min(chunk, time), batch, width_state) if pointwise_kernel is None else None
    first_previous = states.new_empty(min(chunk, time), batch, width_state)
    time_varying = isinstance(decay, str)
    if pointwise_kernel is not None:
        grad_pre_all, grad_hidden_all = pointwise_kernel(cell_type, grad_states, gates, states, initial_state, mask,
                                                         decay, weight_hh)
    carry = None
    for end in range(time, 0, -chunk):
        start = max(0, end - chunk)
        steps = end - start
        previous = previous_states(states, initial_state, start, end, first_previous)
        if pointwise_kernel is not None:
            grad_pre = grad_pre_all[start:end]
            grad_hidden_candidate = None if grad_hidden_all is None else grad_hidden_all[start:end]
        else:
            g = grad[:steps]
            g.copy_(grad_states[start:end])
            if time_varying:
                chunk_decay = chunk_diagonal_jacobian(cell_type, gates, previous, states, weight_hh, mask, start, end)
                carry = reverse_scan_chunk_(g, carry, chunk_decay)
            elif decay is not None:
                carry = reverse_scan_chunk_(g, carry, decay)
            if mask is not None:
                g.mul_(mask[start:end])
            grad_pre, grad_hidden_candidate = one_step_grad(
                cell_type, g, None if gates is None else gates[start:end], previous, states[start:end]
            )
        rows = steps * batch
        grad_pre = grad_pre.view(rows, -1)
        bias_grad = grad_pre.sum(0) if need_bih or need_bhh else None
        if need_wih:
            _accumulate_matmul_(grad_wih, grad_pre.t(), inputs[start:end].reshape(rows, d), matmul_dtype)
        if need_bih:
            grad_bih.add_(bias_grad)
        if need_whh or need_bhh:
            h_previous = previous[..., :d].reshape(rows, d).contiguous()
            if grad_hidden_candidate is None:
                if need_whh:
                    _accumulate_matmul_(grad_whh, grad_pre.t(), h_previous, matmul_dtype)
                if need_bhh:
                    grad_bhh.add_(bias_grad)
            else:  # GRU: [dr, dz] as for the input projection, dn * r for the n block
                grad_hidden_candidate = grad_hidden_candidate.view(rows, d)
                if need_whh:
                    _accumulate_matmul_(grad_whh[: 2 * d], grad_pre[:, : 2 * d].t(), h_previous, matmul_dtype)
                    _accumulate_matmul_(grad_whh[2 * d :], grad_hidden_candidate.t(), h_previous, matmul_dtype)
                if need_bhh:
                    grad_bhh[: 2 * d].add_(bias_grad[: 2 * d])
                    grad_bhh[2 * d :].add_(grad_hidden_candidate.sum(0))
        if need_x:
            if matmul_dtype is None or matmul_dtype == dtype:
                torch.mm(grad_pre, weight_ih_c, out=grad_x[start:end].view(rows, d))
            else:
                grad_x[start:end] = _matmul(grad_pre, weight_ih_c, matmul_dtype).view(steps, batch, d)
    return grad_x, grad_wih, grad_whh, grad_bih, grad_bhh


def gates_from_states(cell_type, inputs, initial_state, states, weights, matmul_dtype=None):
    """The gate activations of every step, recomputed batched from known states (two large matmuls, no loop): for a
    forward that yields states without gates (cuDNN). inputs `(time, batch, d)`, states `(time, batch, S)`.
    Returns `(time, batch, SAVED_GATES_PER_CELL * d)` (None for the RNN)."""
    if SAVED_GATES_PER_CELL[cell_type] == 0:
        return None
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    time, batch, d = inputs.shape
    previous = torch.cat([initial_state.unsqueeze(0), states[:-1]], dim=0)
    input_projection = _input_projection(cell_type, inputs, weight_ih, bias_ih, bias_hh, matmul_dtype)
    gates = states.new_empty(time, batch, SAVED_GATES_PER_CELL[cell_type] * d)
    scratch = torch.empty_like(previous)
    target = recurrent_matmul_target(cell_type, gates, scratch)
    recurrent = _matmul(previous[..., :d].reshape(time * batch, d), weight_hh.t(), matmul_dtype).view(target.shape)
    target.copy_(recurrent).add_(input_projection if FOLDS_INPUT_PROJECTION[cell_type] else bias_hh)
    step_saving_gates(cell_type, input_projection, previous, gates, scratch)
    return gates


class FusedDsfRecurrence(torch.autograd.Function):
    """States of the recurrence `(batch, time, S)` with the DSF backward (feedback None: FT-BPTT).

    Inputs are `(inputs (batch, time, d), initial_state (batch, S), weight_ih, weight_hh, bias_ih, bias_hh,
    mask (batch, time) or None, feedback (S,) or None)` in one floating dtype (fp32 or fp64), then the options
    `cell_type`, `forward_states` (None: the fused loop; else a function returning the time-major states, e.g. the
    cuDNN kernel, the gates being then recomputed batched), `matmul_dtype` (bf16 for the large matmuls, or None),
    `chunk`. The initial state is held constant (no gradient), as in every DSF layer of this package.
    """

    @staticmethod
    def forward(ctx, inputs, initial_state, weight_ih, weight_hh, bias_ih, bias_hh, mask, feedback, cell_type,
                forward_states=None, matmul_dtype=None, chunk=DSF_CHUNK, pointwise_kernel=None, calibration=None):
        weights = (weight_ih, weight_hh, bias_ih, bias_hh)
        with torch.autocast(inputs.device.type, enabled=False):
            inputs_tm = inputs.transpose(0, 1).contiguous()
            mask_tm = None if mask is None else mask.transpose(0, 1).unsqueeze(-1).bool()
            initial_state = initial_state.detach()
            # The calibrated feedback's estimate: diag(J) summed over the real steps, per state entry, and their count.
            if forward_states is None:
                total = None if calibration is None else inputs_tm.new_zeros(initial_state.shape[-1])
                states, gates = recurrence_saving_gates(cell_type, inputs_tm, initial_state, *weights, mask_tm,
                                                        matmul_dtype, total)
                if calibration is not None:
                    calibration.append((total, real_steps(mask_tm, *inputs_tm.shape[:2])))
            else:
                states = forward_states()
                gates = gates_from_states(cell_type, inputs_tm, initial_state, states, weights, matmul_dtype)
                if calibration is not None:
                    calibration.append(diagonal_jacobian_sum(cell_type, gates, initial_state, states, weight_hh,
                                                             mask_tm, chunk))
        time_varying = isinstance(feedback, str)  # DIAG_JACOBIAN: the decay is computed from the gates
        ctx.save_for_backward(inputs_tm, initial_state, states, gates, *weights, mask_tm,
                              None if time_varying else feedback)
        ctx.options = (cell_type, matmul_dtype, chunk, pointwise_kernel, time_varying)
        return states.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_states):
        inputs_tm, initial_state, states, gates, weight_ih, weight_hh, bias_ih, bias_hh, mask_tm, feedback = (
            ctx.saved_tensors
        )
        cell_type, matmul_dtype, chunk, pointwise_kernel, time_varying = ctx.options
        needs = (ctx.needs_input_grad[0],) + tuple(ctx.needs_input_grad[2:6])
        decay = DIAG_JACOBIAN if time_varying else None if feedback is None else feedback.to(states.dtype)
        with torch.autocast(inputs_tm.device.type, enabled=False):
            grad_x, grad_wih, grad_whh, grad_bih, grad_bhh = dsf_backward(
                cell_type, grad_states.transpose(0, 1), inputs_tm, initial_state, states, gates,
                (weight_ih, weight_hh, bias_ih, bias_hh), mask_tm, decay, needs, matmul_dtype, chunk, pointwise_kernel,
            )
        if grad_x is not None:
            grad_x = grad_x.transpose(0, 1)
        return grad_x, None, grad_wih, grad_whh, grad_bih, grad_bhh, None, None, None, None, None, None, None, None


def fused_dsf_states(cell_type, inputs, initial_state, weights, mask, feedback, forward_states=None,
                     matmul_dtype=None, chunk=DSF_CHUNK, pointwise_kernel=None, calibration=None):
    """States `(batch, time, S)` with the values of the recurrence and the DSF backward, through the fused op.

    Args:
        inputs: `(batch, time, d)`; initial_state `(batch, S)`; weights `(weight_ih, weight_hh, bias_ih, bias_hh)`,
            all in one dtype (fp32 or fp64; the caller casts).
        mask: `(batch, time)` of 0/1 or None. feedback: `(S,)` (DSF), None (FT-BPTT) or `DIAG_JACOBIAN` (the scan
            decays by each step's own diag(J_t), from the saved gates).
        calibration: None, or a list to which the forward appends the estimate of a calibrated feedback: diag(J_t)
            summed over the batch and the real steps `(S,)`, and the number of those positions (0-dim).
    Example:
        >>> states = fused_dsf_states("gru", x, torch.zeros(b, d), (w_ih, w_hh, b_ih, b_hh), None, feedback)
        >>> states.sum().backward()   # DSF gradients in w_ih.grad ... and x.grad
    """
    return FusedDsfRecurrence.apply(inputs, initial_state, *weights, mask, feedback, cell_type, forward_states,
                                    matmul_dtype, chunk, pointwise_kernel, calibration)


__all__ = ["fused_dsf_states", "FusedDsfRecurrence", "diagonal_jacobian_sum", "add_diagonal_jacobian_sum_",
           "chunk_diagonal_jacobian", "DIAG_JACOBIAN", "recurrence_saving_gates", "dsf_backward", "gates_from_states",
           "previous_states", "reverse_scan_chunk_", "DSF_CHUNK"]
