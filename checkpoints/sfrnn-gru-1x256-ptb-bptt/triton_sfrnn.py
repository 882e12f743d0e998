"""Triton kernels for the DSF backward on GPU (optional: everything here has a pure-torch equal in `fused_sfrnn.py`).

`triton_dsf_pointwise_backward`: one program per (batch row, tile of channels) walks time in reverse, carries the scan
`g_t = e_t + a * g_{t+1}` in registers (`a` the constant feedback, or diag(J_{t+1}) computed in the kernel from the
gates it reads anyway: gradient_mode "diag_jacobian"), and applies the cell's one-step derivative with the
previous state held constant (the same formulas as `cells_sfrnn.one_step_grad`), writing the pre-activation gradients
`(time, batch, G*d)` (and the GRU's `dn * r`). The three large gradient matmuls follow in torch (`fused_sfrnn`).
This is the Triton backend's only scan; it is tested against the torch backward under Triton's CPU interpreter
(tests/test_triton_dsf.py).

Kernels are compiled on first use, so `TRITON_INTERPRET=1` set before that runs them on CPU tensors (tests).

Hub-exported file: imports only torch at top level; triton inside `try:`.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pure-torch fallback everywhere
    triton = tl = None
    TRITON_AVAILABLE = False

# The derivative helpers of `_dsf_pointwise`, by the name a cell gives as its `triton_backward`.
TRITON_STEPS = ("gru", "lstm", "tanh_rnn")
# Channels per program: 32 keeps batch * d / 32 programs (512 at B = 32, d = 512) to fill a large GPU.
CHANNEL_TILE = 32


if TRITON_AVAILABLE:  # the kernels use triton.language annotations, so they exist only with Triton

    # Each cell's one-step derivative, named by the cell (`Cell.triton_backward`); jitted with the kernel on first use
    # (`_kernels`), so that TRITON_INTERPRET applies to them too. Pointers are at this (step, row):
    # gates `(SAVED_GATES * d,)`, state and previous `(S,)`, out_pre `(G * d,)`, out_hidden `(extra * d,)`. Each writes
    # the pre-activation gradients from the scanned `g` (and `g_c`, the second state vector's) and returns the decay
    # (`a`, `a_c`) into the previous step, diag(J_t), when PER_STEP (the formulas of `Cell.diagonal_jacobian`, with
    # `w0..w3` the diagonals of the blocks of weight_hh).

    def _four_blocks(pointer, j, valid, d):
        """The four `d`-wide blocks at `pointer` (the saved gates of a GRU or an LSTM step), at channels `j`."""
        return (tl.load(pointer + j, mask=valid, other=0.0), tl.load(pointer + d + j, mask=valid, other=0.0),
                tl.load(pointer + 2 * d + j, mask=valid, other=0.0), tl.load(pointer + 3 * d + j, mask=valid, other=0.0))

    def _gru_backward(g, g_c, gates, state, previous, out_pre, out_hidden, j, valid, d, w0, w1, w2, w3,
                      PER_STEP: tl.constexpr):
        r, z, hidden_n, n = _four_blocks_jit(gates, j, valid, d)
        h_previous = tl.load(previous + j, mask=valid, other=0.0)
        dn = g * (1.0 - z) * (1.0 - n * n)
        dz = g * (h_previous - n) * z * (1.0 - z)
        dr = dn * hidden_n * r * (1.0 - r)
        tl.store(out_pre + j, dr, mask=valid)
        tl.store(out_pre + d + j, dz, mask=valid)
        tl.store(out_pre + 2 * d + j, dn, mask=valid)
        tl.store(out_hidden + j, dn * r, mask=valid)
        a = g * 0.0
        if PER_STEP:
            through_n = (1.0 - z) * (1.0 - n * n) * (r * w2 + hidden_n * r * (1.0 - r) * w0)
            a = z + through_n + (h_previous - n) * z * (1.0 - z) * w1
        return a, a

    def _lstm_backward(g, g_c, gates, state, previous, out_pre, out_hidden, j, valid, d, w0, w1, w2, w3,
                       PER_STEP: tl.constexpr):
        i, f, cand, o = _four_blocks_jit(gates, j, valid, d)
        c_new = tl.load(state + d + j, mask=valid, other=0.0)
        c_previous = tl.load(previous + d + j, mask=valid, other=0.0)
        tanh_c = 1.0 - 2.0 / (tl.exp(2.0 * c_new) + 1.0)  # tanh(c_new), overflow-safe
        dc = g_c + g * o * (1.0 - tanh_c * tanh_c)
        tl.store(out_pre + j, dc * cand * i * (1.0 - i), mask=valid)
        tl.store(out_pre + d + j, dc * c_previous * f * (1.0 - f), mask=valid)
        tl.store(out_pre + 2 * d + j, dc * i * (1.0 - cand * cand), mask=valid)
        tl.store(out_pre + 3 * d + j, g * tanh_c * o * (1.0 - o), mask=valid)
        a = g * 0.0
        a_c = g * 0.0
        if PER_STEP:
            dc_dh = c_previous * f * (1.0 - f) * w1 + cand * i * (1.0 - i) * w0 + i * (1.0 - cand * cand) * w2
            a = tanh_c * o * (1.0 - o) * w3 + o * (1.0 - tanh_c * tanh_c) * dc_dh
            a_c = f
        return a, a_c

    def _tanh_rnn_backward(g, g_c, gates, state, previous, out_pre, out_hidden, j, valid, d, w0, w1, w2, w3,
                           PER_STEP: tl.constexpr):
        h = tl.load(state + j, mask=valid, other=0.0)
        tl.store(out_pre + j, g * (1.0 - h * h), mask=valid)
        a = g * 0.0
        if PER_STEP:
            a = (1.0 - h * h) * w0
        return a, a

    def _dsf_pointwise(grad, grad_time_stride, grad_row_stride, gates, states, initial, mask, feedback, diagonals,
                       out_pre, out_hidden, time, batch, d, STEP: tl.constexpr, STATE_VECTORS: tl.constexpr,
                       GATES: tl.constexpr, SAVED_GATES: tl.constexpr, EXTRA: tl.constexpr, BLOCKS: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_FEEDBACK: tl.constexpr, PER_STEP: tl.constexpr,
                       TILE: tl.constexpr):
        """One program per (batch row, tile of channels) walks time in reverse. Its cell: the derivative helper
        `STEP` and the widths, in units of d, of the state (STATE_VECTORS), the pre-activations (GATES), the saved
        gates (SAVED_GATES), the extra gradient (EXTRA) and the diagonals of weight_hh (BLOCKS). Its decay: the
        constant `feedback` (S,) when HAS_FEEDBACK, each step's diag(J_t) from `diagonals` (BLOCKS, d) when
        PER_STEP, else none (FT-BPTT). Layouts (time-major, contiguous except grad): gates (T, B, SAVED_GATES*d),
        states (T, B, S), initial (B, S), mask (T, B) float, out_pre (T, B, GATES*d), out_hidden (T, B, EXTRA*d)."""
        row = tl.program_id(0)
        j = tl.program_id(1) * TILE + tl.arange(0, TILE)
        valid = j < d
        S = STATE_VECTORS * d
        zero = tl.full([TILE], 0.0, tl.float32)
        carry = zero
        carry_c = zero
        # The decay from g_{t+1} to g_t: the constant feedback, or diag(J_{t+1}) kept from the previous iteration.
        a = zero
        a_c = zero
        if HAS_FEEDBACK:
            a = tl.load(feedback + j, mask=valid, other=0.0)
            if STATE_VECTORS == 2:
                a_c = tl.load(feedback + d + j, mask=valid, other=0.0)
        w0 = zero
        w1 = zero
        w2 = zero
        w3 = zero
        if PER_STEP:  # torch's block order: GRU (r, z, n), LSTM (i, f, g, o), RNN (h)
            w0 = tl.load(diagonals + j, mask=valid, other=0.0)
            if BLOCKS > 1:
                w1 = tl.load(diagonals + d + j, mask=valid, other=0.0)
                w2 = tl.load(diagonals + 2 * d + j, mask=valid, other=0.0)
            if BLOCKS > 3:
                w3 = tl.load(diagonals + 3 * d + j, mask=valid, other=0.0)
        for step in range(time):
            t = time - 1 - step
            g_offset = t * grad_time_stride + row * grad_row_stride + j
            e = tl.load(grad + g_offset, mask=valid, other=0.0).to(tl.float32)
            if HAS_FEEDBACK or PER_STEP:
                carry = e + a * carry
            else:
                carry = e
            m = 1.0
            if HAS_MASK:
                m = tl.load(mask + t * batch + row)
            g = carry * m
            g_c = zero
            if STATE_VECTORS == 2:
                e_c = tl.load(grad + g_offset + d, mask=valid, other=0.0).to(tl.float32)
                if HAS_FEEDBACK or PER_STEP:
                    carry_c = e_c + a_c * carry_c
                else:
                    carry_c = e_c
                g_c = carry_c * m
            if t > 0:
                previous = states + (t - 1) * batch * S + row * S
            else:
                previous = initial + row * S
            position = t * batch + row
            step_gates = gates + position * SAVED_GATES * d
            state = states + position * S
            pre = out_pre + position * GATES * d
            hidden = out_hidden + position * EXTRA * d
            if STEP == "gru":
                step_a, step_a_c = _gru_backward_jit(g, g_c, step_gates, state, previous, pre, hidden, j, valid, d,
                                                 w0, w1, w2, w3, PER_STEP)
            elif STEP == "lstm":
                step_a, step_a_c = _lstm_backward_jit(g, g_c, step_gates, state, previous, pre, hidden, j, valid, d,
                                                  w0, w1, w2, w3, PER_STEP)
            else:  # "tanh_rnn" (`TRITON_STEPS`, checked by the caller)
                step_a, step_a_c = _tanh_rnn_backward_jit(g, g_c, step_gates, state, previous, pre, hidden, j, valid,
                                                      d, w0, w1, w2, w3, PER_STEP)
            if PER_STEP:
                a = step_a
                a_c = step_a_c
                if HAS_MASK:  # a padded step holds the state: Jacobian 1
                    a = a * m + (1.0 - m)
                    a_c = a_c * m + (1.0 - m)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compiled (or, under TRITON_INTERPRET=1, interpreted) kernels, built on first use."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("Triton is not installed: use the torch path of fused_sfrnn.")
    # The kernel calls its helpers by these global names, read when it is compiled (or interpreted).
    for helper in (_four_blocks, _gru_backward, _lstm_backward, _tanh_rnn_backward):
        globals()[f"{helper.__name__}_jit"] = triton.jit(helper)
    return {"pointwise": triton.jit(_dsf_pointwise)}


def triton_dsf_pointwise_backward(cell, grad_states, gates, states, initial_state, mask, feedback, weight_hh=None,
                                  tile=CHANNEL_TILE):
    """The scan and the one-step derivative for the whole sequence, in one kernel: the `pointwise_kernel` of
    `fused_sfrnn.dsf_backward`.

    Args:
        cell: a `cells_sfrnn.Cell` naming its derivative helper (`triton_backward`); its widths are the kernel's
            constants.
        grad_states: `(time, batch, S)`, last dim contiguous (any time / batch strides).
        gates: `(time, batch, saved_gates * d)` (None for the RNN); states `(time, batch, S)`; initial_state
            `(batch, S)`: fp32.
        mask: `(time, batch, 1)` bool or None.
        feedback: a `scan_sfrnn.Feedback` whose `kernel_variant` picks the kernel's inputs: the constant diagonal
            `(S,)`, none (FT-BPTT), or each step's own diag(J_t), computed in the kernel from the gates and
            `cell.recurrent_diagonals(weight_hh)`.
    Returns:
        `(grad_pre (time, batch, G*d), extra)` as the cell's `one_step_grad` (extra: the GRU's `dn * r`
        `(time, batch, d)`, else None).
    """
    if not cell.has_triton_backward:
        raise ValueError(f"The {cell.name!r} cell has no Triton backward (triton_backward None): use dsf_backend "
                         f"'fused_kernel'.")
    if cell.triton_backward not in TRITON_STEPS:
        raise ValueError(f"The {cell.name!r} cell names the Triton helper {cell.triton_backward!r}; the kernel has "
                         f"{list(TRITON_STEPS)}.")
    if feedback.kernel_variant is None:
        raise ValueError(f"The Triton backward has no variant for {feedback!r}: its pointwise part runs in torch "
                         f"(fused_sfrnn.torch_pointwise_backward).")
    time, batch, width = states.shape
    d = width // cell.state_vectors
    if grad_states.stride(-1) != 1:
        grad_states = grad_states.contiguous()
    out_pre = torch.empty(time, batch, cell.gates * d, dtype=torch.float32, device=states.device)
    out_hidden = (torch.empty(time, batch, cell.extra_gradient_width * d, dtype=torch.float32, device=states.device)
                  if cell.extra_gradient_width else None)
    mask_float = None if mask is None else mask.reshape(time, batch).float().contiguous()
    diagonals = None
    if feedback.kernel_variant == "per_step":
        if weight_hh is None:
            raise ValueError("A diag_jacobian feedback needs weight_hh (the diagonals of its gate blocks).")
        diagonals = cell.recurrent_diagonals(weight_hh).float().contiguous()  # (H, d)
    constant = feedback.diagonal.float().contiguous() if feedback.kernel_variant == "constant" else None
    dummy = states  # an absent input is still a pointer argument; the flags below keep the kernel from reading it
    grid = (batch, triton.cdiv(d, tile))
    _kernels()["pointwise"][grid](
        grad_states, grad_states.stride(0), grad_states.stride(1), dummy if gates is None else gates,
        states, initial_state.contiguous(), dummy if mask_float is None else mask_float,
        dummy if constant is None else constant, dummy if diagonals is None else diagonals,
        out_pre, dummy if out_hidden is None else out_hidden, time, batch, d,
        STEP=cell.triton_backward, STATE_VECTORS=cell.state_vectors, GATES=cell.gates, SAVED_GATES=cell.saved_gates,
        EXTRA=cell.extra_gradient_width, BLOCKS=1 if diagonals is None else diagonals.shape[0],
        HAS_MASK=mask is not None, HAS_FEEDBACK=constant is not None, PER_STEP=diagonals is not None, TILE=tile,
    )
    return out_pre, out_hidden


__all__ = ["TRITON_AVAILABLE", "TRITON_STEPS", "triton_dsf_pointwise_backward", "CHANNEL_TILE"]
