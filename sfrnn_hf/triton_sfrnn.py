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

# Channels per program: 32 keeps batch * d / 32 programs (512 at B = 32, d = 512) to fill a large GPU.
CHANNEL_TILE = 32


if TRITON_AVAILABLE:  # the kernels use triton.language annotations, so they exist only with Triton

    def _dsf_pointwise(grad, grad_time_stride, grad_row_stride, gates, states, initial, mask, feedback, diagonals,
                       out_pre, out_hidden, time, batch, d, CELL: tl.constexpr, HAS_MASK: tl.constexpr,
                       DECAY: tl.constexpr, TILE: tl.constexpr):
        """CELL 0 = GRU, 1 = LSTM, 2 = RNN. DECAY 0 = none (FT-BPTT), 1 = the constant `feedback` (S,), 2 = each step's
        diag(J_t) (`cells_sfrnn.diagonal_jacobian`), computed from the gates this program reads anyway and the block
        diagonals of weight_hh, `diagonals` (G, d). Layouts (time-major, contiguous except grad): gates (T, B, 4d),
        states (T, B, S), initial (B, S), mask (T, B) float, out_pre (T, B, G*d), out_hidden (T, B, d) (GRU)."""
        row = tl.program_id(0)
        j = tl.program_id(1) * TILE + tl.arange(0, TILE)
        valid = j < d
        if CELL == 0:
            S = d
            G = 3
        elif CELL == 1:
            S = 2 * d
            G = 4
        else:
            S = d
            G = 1
        carry = tl.full([TILE], 0.0, tl.float32)
        carry_c = tl.full([TILE], 0.0, tl.float32)
        # The decay from g_{t+1} to g_t: the constant feedback, or diag(J_{t+1}) kept from the previous iteration.
        a = tl.full([TILE], 0.0, tl.float32)
        a_c = tl.full([TILE], 0.0, tl.float32)
        if DECAY == 1:
            a = tl.load(feedback + j, mask=valid, other=0.0)
            if CELL == 1:
                a_c = tl.load(feedback + d + j, mask=valid, other=0.0)
        if DECAY == 2:  # torch's block order: GRU (r, z, n), LSTM (i, f, g, o), RNN (h)
            w0 = tl.load(diagonals + j, mask=valid, other=0.0)
            if CELL != 2:
                w1 = tl.load(diagonals + d + j, mask=valid, other=0.0)
                w2 = tl.load(diagonals + 2 * d + j, mask=valid, other=0.0)
            if CELL == 1:
                w3 = tl.load(diagonals + 3 * d + j, mask=valid, other=0.0)
        for step in range(time):
            t = time - 1 - step
            g_offset = t * grad_time_stride + row * grad_row_stride + j
            e = tl.load(grad + g_offset, mask=valid, other=0.0).to(tl.float32)
            if DECAY == 0:
                carry = e
            else:
                carry = e + a * carry
            m = 1.0
            if HAS_MASK:
                m = tl.load(mask + t * batch + row)
            g = carry * m
            state_offset = (t * batch + row) * S + j
            previous_offset = (t - 1) * batch * S + row * S + j
            gate_offset = (t * batch + row) * 4 * d + j
            pre_offset = (t * batch + row) * G * d + j
            if CELL == 0:
                r = tl.load(gates + gate_offset, mask=valid, other=0.0)
                z = tl.load(gates + gate_offset + d, mask=valid, other=0.0)
                hidden_n = tl.load(gates + gate_offset + 2 * d, mask=valid, other=0.0)
                n = tl.load(gates + gate_offset + 3 * d, mask=valid, other=0.0)
                if t > 0:
                    previous = tl.load(states + previous_offset, mask=valid, other=0.0)
                else:
                    previous = tl.load(initial + row * S + j, mask=valid, other=0.0)
                dn = g * (1.0 - z) * (1.0 - n * n)
                dz = g * (previous - n) * z * (1.0 - z)
                dr = dn * hidden_n * r * (1.0 - r)
                tl.store(out_pre + pre_offset, dr, mask=valid)
                tl.store(out_pre + pre_offset + d, dz, mask=valid)
                tl.store(out_pre + pre_offset + 2 * d, dn, mask=valid)
                tl.store(out_hidden + (t * batch + row) * d + j, dn * r, mask=valid)
                if DECAY == 2:
                    through_n = (1.0 - z) * (1.0 - n * n) * (r * w2 + hidden_n * r * (1.0 - r) * w0)
                    a = z + through_n + (previous - n) * z * (1.0 - z) * w1
            elif CELL == 1:
                e_c = tl.load(grad + g_offset + d, mask=valid, other=0.0).to(tl.float32)
                if DECAY == 0:
                    carry_c = e_c
                else:
                    carry_c = e_c + a_c * carry_c
                g_c = carry_c * m
                i = tl.load(gates + gate_offset, mask=valid, other=0.0)
                f = tl.load(gates + gate_offset + d, mask=valid, other=0.0)
                cand = tl.load(gates + gate_offset + 2 * d, mask=valid, other=0.0)
                o = tl.load(gates + gate_offset + 3 * d, mask=valid, other=0.0)
                c_new = tl.load(states + state_offset + d, mask=valid, other=0.0)
                if t > 0:
                    c_previous = tl.load(states + previous_offset + d, mask=valid, other=0.0)
                else:
                    c_previous = tl.load(initial + row * S + d + j, mask=valid, other=0.0)
                tanh_c = 1.0 - 2.0 / (tl.exp(2.0 * c_new) + 1.0)  # tanh(c_new), overflow-safe
                dc = g_c + g * o * (1.0 - tanh_c * tanh_c)
                tl.store(out_pre + pre_offset, dc * cand * i * (1.0 - i), mask=valid)
                tl.store(out_pre + pre_offset + d, dc * c_previous * f * (1.0 - f), mask=valid)
                tl.store(out_pre + pre_offset + 2 * d, dc * i * (1.0 - cand * cand), mask=valid)
                tl.store(out_pre + pre_offset + 3 * d, g * tanh_c * o * (1.0 - o), mask=valid)
                if DECAY == 2:
                    dc_dh = c_previous * f * (1.0 - f) * w1 + cand * i * (1.0 - i) * w0 + i * (1.0 - cand * cand) * w2
                    a = tanh_c * o * (1.0 - o) * w3 + o * (1.0 - tanh_c * tanh_c) * dc_dh
                    a_c = f
            else:
                h = tl.load(states + state_offset, mask=valid, other=0.0)
                tl.store(out_pre + pre_offset, g * (1.0 - h * h), mask=valid)
                if DECAY == 2:
                    a = (1.0 - h * h) * w0
            if DECAY == 2:
                if HAS_MASK:  # a padded step holds the state: Jacobian 1
                    a = a * m + (1.0 - m)
                    a_c = a_c * m + (1.0 - m)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compiled (or, under TRITON_INTERPRET=1, interpreted) kernels, built on first use."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("Triton is not installed: use the torch path of fused_sfrnn.")
    return {"pointwise": triton.jit(_dsf_pointwise)}


def triton_dsf_pointwise_backward(cell, grad_states, gates, states, initial_state, mask, feedback, weight_hh=None,
                                  tile=CHANNEL_TILE):
    """The scan and the one-step derivative for the whole sequence, in one kernel: the `pointwise_kernel` of
    `fused_sfrnn.dsf_backward`.

    Args:
        cell: a `cells_sfrnn.Cell` with a `triton_code` (its branch in `_dsf_pointwise`).
        grad_states: `(time, batch, S)`, last dim contiguous (any time / batch strides).
        gates: `(time, batch, 4d)` (None for the RNN); states `(time, batch, S)`; initial_state `(batch, S)`: fp32.
        mask: `(time, batch, 1)` bool or None.
        feedback: a `scan_sfrnn.Feedback`: the constant diagonal `(S,)`, none (FT-BPTT), or each step's own diag(J_t),
            computed in the kernel from the gates and the diagonals of `weight_hh` `(G*d, d)`.
    Returns:
        `(grad_pre (time, batch, G*d), extra)` as the cell's `one_step_grad` (extra: the GRU's `dn * r`
        `(time, batch, d)`, else None).
    """
    if cell.triton_code is None:
        raise ValueError(f"The {cell.name!r} cell has no Triton backward (triton_code None): use dsf_backend 'fused_kernel'.")
    time, batch, width = states.shape
    d = width // cell.state_vectors
    if grad_states.stride(-1) != 1:
        grad_states = grad_states.contiguous()
    out_pre = torch.empty(time, batch, cell.gates * d, dtype=torch.float32, device=states.device)
    out_hidden = (torch.empty(time, batch, cell.extra_gradient_width * d, dtype=torch.float32, device=states.device)
                  if cell.extra_gradient_width else None)
    mask_float = None if mask is None else mask.reshape(time, batch).float().contiguous()
    dummy = states  # unused pointer arguments must still be tensors
    if feedback.kernel_variant is None:
        raise ValueError(f"The Triton backward has no variant for {feedback!r}: its pointwise part runs in torch "
                         f"(fused_sfrnn.torch_pointwise_backward).")
    diagonals = None
    if feedback.kernel_variant == "per_step":
        if weight_hh is None:
            raise ValueError("A diag_jacobian feedback needs weight_hh (the diagonals of its gate blocks).")
        diagonals = cell.recurrent_diagonals(weight_hh).float().contiguous()  # (G, d)
    constant = feedback.diagonal.float().contiguous() if feedback.kernel_variant == "constant" else None
    mode = 2 if diagonals is not None else 1 if constant is not None else 0
    grid = (batch, triton.cdiv(d, tile))
    _kernels()["pointwise"][grid](
        grad_states, grad_states.stride(0), grad_states.stride(1), gates if gates is not None else dummy,
        states, initial_state.contiguous(), mask_float if mask_float is not None else dummy,
        constant if constant is not None else dummy, diagonals if diagonals is not None else dummy,
        out_pre, out_hidden if out_hidden is not None else dummy, time, batch, d,
        CELL=cell.triton_code, HAS_MASK=mask is not None, DECAY=mode, TILE=tile,
    )
    return out_pre, out_hidden


__all__ = ["TRITON_AVAILABLE", "triton_dsf_pointwise_backward", "CHANNEL_TILE"]
