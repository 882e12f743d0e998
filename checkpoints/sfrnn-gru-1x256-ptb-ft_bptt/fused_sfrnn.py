"""The fused DSF op: the recurrence saving its gates, and the DSF backward walking time in reverse chunks.

Same signature as the reference (`reference_sfrnn.dsf_states`) and tested against it on outputs and all gradients:
`fused_dsf_recurrence(cell, inputs, initial_state, weights, mask, feedback) -> (states, statistics)`.

Forward, two ways: the loop (`recurrence_saving_gates`: the input projection one matmul per chunk of steps, each step
the cell's `step_saving_gates` into preallocated time-major buffers of states and gates), or torch's fused kernel for
the states (cuDNN / oneDNN, `state_kernel`) with the gates then recomputed batched (`gates_from_states`).

Backward (`dsf_backward`): for chunks of `chunk` steps, from the last to the first, on cache-sized slices:
(1) the reverse scan `g_t = e_t + a_{t+1} * g_{t+1}` inside the chunk, started from the carry of the later chunk
(`scan_sfrnn.reverse_scan_`; the decay per the `Feedback`); (2) the cell's one-step gradient with the previous state
held constant; (3) the weight gradients accumulated and the input gradient written, as large matmuls. A
`pointwise_kernel` (Triton) may do (1) and (2) for the whole sequence instead. No per-step autograd graph.

Internal layout is time-major `(time, batch, .)`: a step and a chunk of steps are contiguous slices, so a chunk
flattens to `(steps * batch, .)` rows for the gradient matmuls.

Hub-exported file: imports only torch and its flat siblings.
"""

from typing import Callable, NamedTuple

import torch

from .cells_sfrnn import get_cell
from .scan_sfrnn import JacobianStatistics

# Steps per backward chunk on CPU: 64 steps of batch 32 at d = 512 keep a chunk's gate slices (a few MB) in cache.
DSF_CHUNK = 64


def _matmul(a, b, matmul_dtype):
    """`a @ b` with the operands in `matmul_dtype` (bf16 for the large matmuls when asked), result in `a.dtype`."""
    if matmul_dtype is None or matmul_dtype == a.dtype:
        return a @ b
    return (a.to(matmul_dtype) @ b.to(matmul_dtype)).to(a.dtype)


def _input_projection(step_weights, inputs, matmul_dtype):
    """`x W_ih^T + bias` (`step_weights.input`) at every position: inputs `(time, batch, d)` contiguous ->
    `(time, batch, G*d)`."""
    time, batch, d = inputs.shape
    flat, projection = inputs.reshape(time * batch, d), step_weights.input
    if matmul_dtype is None or matmul_dtype == inputs.dtype:
        out = projection(flat)
    else:
        out = _matmul(flat, projection.weight.t(), matmul_dtype).add_(projection.bias)
    return out.view(time, batch, -1)


def _empty_gates(cell, like, time, batch, d):
    return like.new_empty(time, batch, cell.saved_gates * d) if cell.saved_gates else None


def previous_states(states, initial_state, start, end, buffer):
    """The states before steps `start .. end - 1`: a view of `states` `(time, batch, S)`, or, for a chunk at the
    start of the sequence, `[initial_state, states[: end - 1]]` written into `buffer` `(>= end - start, batch, S)`."""
    if start > 0:
        return states[start - 1 : end - 1]
    previous = buffer[: end - start]
    previous[0] = initial_state
    previous[1:] = states[: end - 1]
    return previous


def chunk_diagonal_jacobian(cell, gates, previous, states, weight_hh, mask, start, end):
    """diag(J_t) `(end - start, batch, S)` of steps `start .. end - 1` (`cell.diagonal_jacobian`), 1 where `mask`
    `(time, batch, 1)` holds the state: a cache-sized slice, computed where the gates are already in cache."""
    decay = cell.diagonal_jacobian(None if gates is None else gates[start:end], previous, states[start:end], weight_hh)
    return decay if mask is None else decay.masked_fill_(~mask[start:end], 1.0)


def _add_jacobian_sum_(total, cell, gates, initial_state, states, weight_hh, mask, start, end, buffer):
    """`total` `(S,)` += diag(J_t) summed over the batch and the real steps among `start .. end - 1`."""
    previous = previous_states(states, initial_state, start, end, buffer)
    decay = chunk_diagonal_jacobian(cell, gates, previous, states, weight_hh, None, start, end)
    if mask is not None:
        decay.masked_fill_(~mask[start:end], 0.0)  # padded steps do not count
    total.add_(decay.sum(dim=(0, 1)))


def _real_positions(mask, time, batch):
    """How many (step, row) positions are real tokens (a 0-dim tensor)."""
    return torch.tensor(time * batch) if mask is None else mask.sum()


def jacobian_statistics(cell, gates, initial_state, states, weight_hh, mask=None, chunk=DSF_CHUNK):
    """diag(J_t) summed over the batch and the real steps `(S,)`, chunk by chunk (no `(time, batch, S)` temporary),
    and the number of those positions. Shapes as `recurrence_saving_gates` returns them."""
    cell = get_cell(cell)
    time, batch, width_state = states.shape
    total = states.new_zeros(width_state)
    buffer = states.new_empty(min(chunk, time), batch, width_state)
    for start in range(0, time, chunk):
        _add_jacobian_sum_(total, cell, gates, initial_state, states, weight_hh, mask, start, min(time, start + chunk),
                           buffer)
    return JacobianStatistics(total, _real_positions(mask, time, batch))


def recurrence_saving_gates(cell, inputs, initial_state, weights, mask=None, matmul_dtype=None, statistics=False,
                            step_matmul=None):
    """The gated recurrence, no graph, saving every state and gate activation.

    Args:
        inputs: `(time, batch, d)` time-major and contiguous; initial_state `(batch, S)`.
        weights: `(weight_ih, weight_hh, bias_ih, bias_hh)`.
        mask: `(time, batch, 1)` bool or None; a False position holds the previous state.
        matmul_dtype: dtype of the input-projection matmul's operands (None: the inputs' dtype).
        statistics: also sum diag(J_t) over the real positions, chunk by chunk while the gates are in cache.
        step_matmul: the per-step `cells_sfrnn.StepMatmul` kind (None: `default_step_matmul`).
    Returns:
        states `(time, batch, S)`, gates `(time, batch, saved_gates * d)` (None if the cell saves none), and the
        `JacobianStatistics` (None unless asked).
    """
    cell = get_cell(cell)
    time, batch, d = inputs.shape
    step_weights = cell.step_weights(weights, batch, min(DSF_CHUNK, time) * batch, step_matmul)
    states = inputs.new_empty(time, batch, cell.state_vectors * d)
    gates = _empty_gates(cell, inputs, time, batch, d)
    total = inputs.new_zeros(states.shape[-1]) if statistics else None
    if statistics:  # room for the first chunk's previous states
        first_previous = inputs.new_empty(min(DSF_CHUNK, time), batch, states.shape[-1])
    state = initial_state
    for t in range(time):
        if t % DSF_CHUNK == 0:  # the input projection chunk by chunk: a cache-sized buffer, not a fresh large one
            input_projection = _input_projection(step_weights, inputs[t : t + DSF_CHUNK], matmul_dtype)
        cell.step_saving_gates(input_projection[t % DSF_CHUNK], state, step_weights,
                               None if gates is None else gates[t], states[t])
        if mask is not None:
            states[t] = torch.where(mask[t], states[t], state)
        state = states[t]
        if statistics and (t % DSF_CHUNK == DSF_CHUNK - 1 or t == time - 1):
            _add_jacobian_sum_(total, cell, gates, initial_state, states, weights[1], mask, t - t % DSF_CHUNK, t + 1,
                               first_previous)
    return states, gates, JacobianStatistics(total, _real_positions(mask, time, batch)) if statistics else None


def gates_from_states(cell, inputs, initial_state, states, weights, matmul_dtype=None):
    """The gate activations of every step, recomputed batched from known states (the cell's `step_saving_gates`
    over all positions at once: two large matmuls, no loop), for a forward that yields states without gates (torch's
    fused kernels). inputs `(time, batch, d)`, states `(time, batch, S)`. Returns `(time, batch, saved_gates * d)`
    (None if the cell saves none)."""
    cell = get_cell(cell)
    if not cell.saved_gates:
        return None
    time, batch, d = inputs.shape
    step_weights = cell.step_weights(weights, time * batch, time * batch)
    previous = torch.cat([initial_state.unsqueeze(0), states[:-1]], dim=0)
    gates = _empty_gates(cell, inputs, time, batch, d)
    input_projection = _input_projection(step_weights, inputs, matmul_dtype)
    cell.step_saving_gates(input_projection, previous, step_weights, gates, torch.empty_like(previous))
    return gates


class DsfOptions(NamedTuple):
    """How the fused op runs one call (`fused_dsf_recurrence`'s keyword arguments, kept whole on the autograd ctx).

    state_kernel: None (the loop forward saving the gates), or `(cell, inputs, initial_state, weights, mask) ->
        (batch, time, S)`, torch's fused kernel; the gates are then recomputed batched.
    matmul_dtype: operands' dtype of the large matmuls (bf16 under autocast), or None.
    chunk: steps per backward chunk.
    pointwise_kernel: the backward's scan and one-step derivative: None for `torch_pointwise_backward`, or a kernel
        for the whole sequence with the same arguments (`triton_sfrnn.triton_dsf_pointwise_backward`).
    step_matmul: the loop forward's per-step matmul (`cells_sfrnn.STEP_MATMULS`; None: `default_step_matmul`).
    """

    state_kernel: Callable | None = None
    matmul_dtype: torch.dtype | None = None
    chunk: int = DSF_CHUNK
    pointwise_kernel: Callable | None = None
    step_matmul: str | None = None


class GradsWanted(NamedTuple):
    """Which gradients the backward computes (autograd's `needs_input_grad` of the op's tensor inputs)."""

    inputs: bool
    weight_ih: bool
    weight_hh: bool
    bias_ih: bool
    bias_hh: bool


def torch_pointwise_backward(cell, grad_states, gates, states, initial_state, mask, feedback, weight_hh,
                             chunk=DSF_CHUNK):
    """The backward's pointwise part in torch: the feedback's reverse scan and the cell's one-step derivative with the
    previous state held constant, chunk by chunk from the end of the sequence (cache-sized slices, each consumed by
    the caller before the next is computed).

    Args as `triton_sfrnn.triton_dsf_pointwise_backward`: grad_states `(time, batch, S)` (any strides), gates as
    saved, states `(time, batch, S)`, initial_state `(batch, S)`, mask `(time, batch, 1)` bool or None, feedback a
    `Feedback` in the states' dtype, weight_hh for a per-step decay.
    Yields:
        `(start, end, grad_pre (end - start, batch, G*d), extra)` as `cell.one_step_grad` returns them.
    """
    time, batch, width_state = states.shape
    grad = states.new_empty(min(chunk, time), batch, width_state)
    first_previous = states.new_empty(min(chunk, time), batch, width_state)
    carry = None
    for end in range(time, 0, -chunk):
        start = max(0, end - chunk)
        previous = previous_states(states, initial_state, start, end, first_previous)
        g = grad[: end - start]
        g.copy_(grad_states[start:end])
        carry = feedback.scan_(g, lambda: chunk_diagonal_jacobian(cell, gates, previous, states, weight_hh, mask,
                                                                  start, end), carry)
        if mask is not None:
            g.mul_(mask[start:end])
        grad_pre, extra = cell.one_step_grad(g, None if gates is None else gates[start:end], previous,
                                             states[start:end])
        yield start, end, grad_pre, extra


def _kernel_in_chunks(kernel, cell, grad_states, gates, states, initial_state, mask, feedback, weight_hh, chunk):
    """A whole-sequence pointwise kernel's result in the chunks `torch_pointwise_backward` yields."""
    all_pre, all_extra = kernel(cell, grad_states, gates, states, initial_state, mask, feedback, weight_hh)
    for end in range(states.shape[0], 0, -chunk):
        start = max(0, end - chunk)
        yield start, end, all_pre[start:end], None if all_extra is None else all_extra[start:end]


def dsf_backward(cell, grad_states, inputs, initial_state, states, gates, weights, mask, feedback,
                 wanted: GradsWanted, options: DsfOptions = DsfOptions()):
    """The DSF backward: the pointwise part (`torch_pointwise_backward`, or `options.pointwise_kernel`), then, per
    chunk of steps, the gradients as large matmuls (`cell.accumulate_weight_grads_`, and `grad_pre W_ih` for the
    inputs).

    Args:
        grad_states: `(time, batch, S)` (any strides) the gradient reaching each state from outside the recurrence.
        inputs: `(time, batch, d)` contiguous; initial_state `(batch, S)`; states `(time, batch, S)`; gates as saved.
        weights: `(weight_ih, weight_hh, bias_ih, bias_hh)`. mask: `(time, batch, 1)` bool or None.
        feedback: the `Feedback` in the states' dtype. wanted: which gradients to compute.
    Returns:
        `(grad_inputs (time, batch, d), grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh)`, None where not
        wanted; accumulated in the states' dtype (fp32 / fp64).
    """
    time, batch, width_state = states.shape
    d, dtype, matmul_dtype = inputs.shape[-1], states.dtype, options.matmul_dtype
    grad_x = torch.empty_like(inputs) if wanted.inputs else None
    weight_grads = tuple(torch.zeros_like(w, dtype=dtype) if want else None for w, want in zip(weights, wanted[1:]))
    weight_ih = weights[0].to(dtype) if wanted.inputs else None
    pointwise_args = (cell, grad_states, gates, states, initial_state, mask, feedback, weights[1])
    if options.pointwise_kernel is None or feedback.kernel_variant is None:  # (the kernel has no variant for it)
        pointwise = torch_pointwise_backward(*pointwise_args, options.chunk)
    else:
        pointwise = _kernel_in_chunks(options.pointwise_kernel, *pointwise_args, options.chunk)
    first_previous = states.new_empty(min(options.chunk, time), batch, width_state)
    for start, end, grad_pre, extra in pointwise:
        rows = (end - start) * batch
        previous = previous_states(states, initial_state, start, end, first_previous)
        grad_pre = grad_pre.reshape(rows, -1)
        cell.accumulate_weight_grads_(weight_grads, grad_pre, None if extra is None else extra.reshape(rows, -1),
                                      inputs[start:end].reshape(rows, d), previous[..., :d].reshape(rows, d),
                                      matmul_dtype)
        if wanted.inputs:
            if matmul_dtype is None or matmul_dtype == dtype:
                torch.mm(grad_pre, weight_ih, out=grad_x[start:end].view(rows, d))
            else:
                grad_x[start:end] = _matmul(grad_pre, weight_ih, matmul_dtype).view(end - start, batch, d)
    return (grad_x, *weight_grads)


class FusedDsfRecurrence(torch.autograd.Function):
    """`(states (batch, time, S), statistics total (S,), count)` with the DSF backward.

    Tensor inputs `(inputs (batch, time, d), initial_state (batch, S), weight_ih, weight_hh, bias_ih, bias_hh,
    mask (batch, time) or None)` in one floating dtype (fp32 or fp64); then `cell`, `feedback` (a `Feedback`) and
    `options` (`DsfOptions`). The initial state is held constant (no gradient), as in every DSF layer of this package.
    The statistics (empty when not asked) are not differentiable.
    """

    @staticmethod
    def forward(ctx, inputs, initial_state, weight_ih, weight_hh, bias_ih, bias_hh, mask, cell, feedback, options):
        weights = (weight_ih, weight_hh, bias_ih, bias_hh)
        with torch.autocast(inputs.device.type, enabled=False):
            inputs_tm = inputs.transpose(0, 1).contiguous()
            mask_tm = None if mask is None else mask.transpose(0, 1).unsqueeze(-1).bool()
            initial_state = initial_state.detach()
            if options.state_kernel is None:
                states, gates, statistics = recurrence_saving_gates(cell, inputs_tm, initial_state, weights, mask_tm,
                                                                    options.matmul_dtype, feedback.record_statistics,
                                                                    options.step_matmul)
            else:
                states = options.state_kernel(cell, inputs, initial_state, weights, mask).transpose(0, 1).contiguous()
                gates = gates_from_states(cell, inputs_tm, initial_state, states, weights, options.matmul_dtype)
                statistics = (jacobian_statistics(cell, gates, initial_state, states, weight_hh, mask_tm,
                                                  options.chunk) if feedback.record_statistics else None)
        if statistics is None:
            statistics = JacobianStatistics(states.new_empty(0), states.new_zeros(()))
        ctx.save_for_backward(inputs_tm, initial_state, states, gates, *weights, mask_tm)
        ctx.cell, ctx.feedback, ctx.options = cell, feedback, options
        ctx.mark_non_differentiable(*statistics)
        return states.transpose(0, 1), *statistics

    @staticmethod
    def backward(ctx, grad_states, _grad_total, _grad_count):
        inputs_tm, initial_state, states, gates, *weights, mask_tm = ctx.saved_tensors
        wanted = GradsWanted(ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])
        with torch.autocast(inputs_tm.device.type, enabled=False):
            grad_x, *weight_grads = dsf_backward(ctx.cell, grad_states.transpose(0, 1), inputs_tm, initial_state,
                                                 states, gates, weights, mask_tm, ctx.feedback.to(states.dtype),
                                                 wanted, ctx.options)
        grad_x = None if grad_x is None else grad_x.transpose(0, 1)
        return grad_x, None, *weight_grads, None, None, None, None  # nothing for initial_state, mask and the rest


def fused_dsf_recurrence(cell, inputs, initial_state, weights, mask, feedback, *, matmul_dtype=None, state_kernel=None,
                         chunk=DSF_CHUNK, pointwise_kernel=None, step_matmul=None):
    """States `(batch, time, S)` with the recurrence's values and the DSF backward, and the `JacobianStatistics`
    of the forward (None unless `feedback.record_statistics`).

    Args:
        cell: a `Cell` or its name. inputs `(batch, time, d)`; initial_state `(batch, S)`; weights
            `(weight_ih, weight_hh, bias_ih, bias_hh)`, all in one dtype (fp32 or fp64; the caller casts).
        mask: `(batch, time)` of 0/1 or None. feedback: a `scan_sfrnn.Feedback`.
        matmul_dtype: operands' dtype of the large matmuls (bf16 under autocast), or None.
    Backend options (fixed when the backend is resolved): `state_kernel`, `chunk`, `pointwise_kernel`,
        `step_matmul`, as `DsfOptions` says.
    Example:
        >>> states, _ = fused_dsf_recurrence("gru", x, torch.zeros(b, d), (w_ih, w_hh, b_ih, b_hh), None,
        ...                                  ConstantFeedback(torch.linspace(0, 1, d)))
        >>> states.sum().backward()   # DSF gradients in w_ih.grad ... and x.grad
    """
    options = DsfOptions(state_kernel, matmul_dtype, chunk, pointwise_kernel, step_matmul)
    states, total, count = FusedDsfRecurrence.apply(inputs, initial_state, *weights, mask, get_cell(cell), feedback,
                                                    options)
    return states, JacobianStatistics(total, count) if feedback.record_statistics else None


__all__ = ["fused_dsf_recurrence", "FusedDsfRecurrence", "DsfOptions", "GradsWanted", "torch_pointwise_backward", "jacobian_statistics", "chunk_diagonal_jacobian",
           "recurrence_saving_gates", "dsf_backward", "gates_from_states", "previous_states", "DSF_CHUNK"]
