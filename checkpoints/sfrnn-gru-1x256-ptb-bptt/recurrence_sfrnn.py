"""The recurrence without DSF: the forward of every gradient mode, and the whole of `bptt`, eval and generation.

`run_recurrence` runs a cell over a sequence through the fastest correct path: torch's fused kernel (cuDNN / oneDNN)
when the cell has one and padding is only at the end of rows, else the loop of the cell's step; differentiable
(exact BPTT) when grad is enabled. The masks: a padded position leaves the state unchanged.

Hub-exported file: imports only torch and its flat siblings.
"""

import torch
import torch.nn.functional as F

from .cells_sfrnn import cell_step, get_cell


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of `mask` `(batch, time)` is ones followed by zeros (padding only at the end).

    Reads the mask's values (a host sync on an accelerator), except for one column: right-padded by construction.
    Under `torch.compile` the values cannot be read: False (not known), so the caller takes a path correct for any
    mask."""
    if mask.shape[1] == 1:
        return True
    if torch.compiler.is_compiling():
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool(torch.equal(mask.bool(), positions[None, :] < lengths))


def effective_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to apply: None when `mask` `(batch, time)` holds no padding (the fused kernels then run unmasked).
    Telling reads the mask (a host sync on an accelerator), so the mask is kept as given for one column (a decode
    step, where applying it is elementwise anyway) and under `torch.compile` (no data-dependent branch in a graph)."""
    if mask is None or mask.shape[1] == 1 or torch.compiler.is_compiling():
        return mask
    return None if bool(mask.all()) else mask


def _hold_state_after_end(states, initial_state, mask):
    """Right-padded rows: replace the states computed past each row's end by the row's last real state, which is
    what the gated recurrence holds there. states `(batch, time, width)`, initial_state `(batch, width)`."""
    lengths = mask.sum(dim=1)
    last_index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    last = states.gather(1, last_index)
    last = torch.where((lengths > 0).view(-1, 1, 1), last, initial_state[:, None, : states.shape[-1]])
    return torch.where(mask.bool().unsqueeze(-1), states, last)


def fused_recurrence(cell, inputs, initial_state, weights):
    """Torch's fused kernel for the whole sequence (autograd through it when enabled: exact BPTT), or None when torch
    has none for the cell.

    inputs `(batch, time, d)`, initial_state `(batch, S)`, weights `(weight_ih, weight_hh, bias_ih, bias_hh)`.
    Returns `h` for every step `(batch, time, d)` and the final state `(batch, S)`.
    """
    if inputs.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast would send the LSTM to oneDNN in bf16, which CPUs without native bf16 cannot run
        # ("unsupported datatype"); the recurrence runs in the weights' dtype, the layers around it stay autocast.
        with torch.autocast("cpu", enabled=False):
            dtype = weights[0].dtype
            return fused_recurrence(cell, inputs.to(dtype), initial_state.to(dtype), weights)
    # cuDNN keeps its workspace for the backward only when told so.
    return get_cell(cell).fused_sequence(inputs, initial_state, list(weights), train=torch.is_grad_enabled())


def looped_recurrence(cell, input_projection, initial_state, weight_hh, bias_hh, mask=None):
    """The gated recurrence as a loop of the cell's step (any mask; every state, `[h, c]` included).

    input_projection `(batch, time, G*d)`, initial_state `(batch, S)`, mask `(batch, time)` or None.
    Returns the states `(batch, time, S)`.
    """
    cell = get_cell(cell)
    state = initial_state
    states = []
    for t in range(input_projection.shape[1]):
        step_mask = None if mask is None else mask[:, t]
        state = cell_step(cell, input_projection[:, t], state, weight_hh, bias_hh, step_mask)
        states.append(state)
    return torch.stack(states, dim=1)


def run_recurrence(cell, inputs, initial_state, weights, mask=None, all_states=False, need_final_state=True):
    """The gated recurrence through the fastest correct path. Differentiable when grad is enabled (exact BPTT).

    Torch's fused kernel whenever the cell has one and padding is only at the end of rows (the states past a row's
    end are then replaced by its last real state); the loop of the cell's step otherwise.

    Args:
        cell: a `Cell` or its name. inputs: `(batch, time, d)`; initial_state: `(batch, S)`; mask: `(batch, time)`
            of 0/1 or None.
        all_states: return the whole state `(batch, time, S)` (the LSTM's `[h, c]`) instead of `h` alone.
        need_final_state: whether the final state is read (a cache); if not, a padded LSTM skips computing `c`.
    Returns:
        `(outputs, final_state)`: `(batch, time, d or S)` and `(batch, S)` (None when not needed and not free).
    """
    cell = get_cell(cell)
    mask = effective_mask(mask)
    fused = None
    if mask is None or is_right_padded(mask):
        fused = fused_recurrence(cell, inputs, initial_state, weights)
    if fused is None:
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        states = looped_recurrence(cell, F.linear(inputs, weight_ih, bias_ih), initial_state, weight_hh, bias_hh, mask)
        width = states.shape[-1] if all_states else inputs.shape[-1]
        return states[..., :width], states[:, -1]
    outputs, final_state = fused
    if outputs.shape[-1] != initial_state.shape[-1] and (all_states or (mask is not None and need_final_state)):
        outputs = cell.complete_states(inputs, outputs, initial_state, weights)
    if mask is not None:
        outputs = _hold_state_after_end(outputs, initial_state, mask)
        final_state = outputs[:, -1] if outputs.shape[-1] == initial_state.shape[-1] else None
    width = outputs.shape[-1] if all_states else inputs.shape[-1]
    return outputs[..., :width], final_state


def kernel_states(cell, inputs, initial_state, weights, mask):
    """Every state `(batch, time, S)` from torch's fused kernel (no graph): the fused op's `state_kernel`."""
    return run_recurrence(cell, inputs, initial_state, weights, mask, all_states=True)[0]


__all__ = ["run_recurrence", "fused_recurrence", "looped_recurrence", "kernel_states", "effective_mask",
           "is_right_padded"]
