"""The reverse diagonal scan of DSF: `g_t = e_t + a * g_{t+1}`, `g_T = e_T`.

An anti-causal, exponentially discounted sum of future errors: `g_t = sum_{k >= t} a^(k - t) * e_k`, a linear
time-invariant system run in reverse time. Elementwise over the state: O(S) per step, never a d x d matmul.

Hub-exported file: imports only torch.
"""

import torch

# Chunk length of the chunked form: a (C, C) Toeplitz of powers per channel, C * S * B work per step.
SCAN_CHUNK = 16


def reverse_diagonal_scan_reference(errors: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """The obviously correct plain loop, for tests.

    Args:
        errors: `(batch, time, state)` incoming state gradients `e_t`.
        feedback: `(state,)` the diagonal `a`.
    Returns:
        `(batch, time, state)` the rewritten gradients `g_t`, in at least fp32.
    """
    errors = errors.to(_accumulation_dtype(errors.dtype))
    feedback = feedback.to(errors.dtype)
    out = torch.empty_like(errors)
    carry = torch.zeros_like(errors[:, 0])
    for t in reversed(range(errors.shape[1])):
        carry = errors[:, t] + feedback * carry
        out[:, t] = carry
    return out


def _accumulation_dtype(dtype):
    """At least fp32 (bf16 / fp16 gradients are accumulated in fp32; fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _scan_loop(errors: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """In-place sequential scan on a copy in the accumulation dtype: fastest on CPU (one multiply-add per step)."""
    out = errors.to(_accumulation_dtype(errors.dtype), copy=True)
    for t in range(out.shape[1] - 2, -1, -1):
        out[:, t].addcmul_(feedback, out[:, t + 1])
    return out


def _scan_chunked(errors: torch.Tensor, feedback: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """Chunked form: inside each chunk of C steps a batched product with the per-channel Toeplitz matrix of powers
    `L[i, j] = a^(j - i)` (j >= i), then one sequential pass over the T / C chunks for the carries.
    Exact for `a` in [0, 1] (0^0 = 1), no logarithms, so no NaN at a = 0."""
    batch, time, width = errors.shape
    padded = -time % chunk
    e = errors.to(_accumulation_dtype(errors.dtype))
    feedback = feedback.to(e.dtype)
    if padded:
        e = torch.nn.functional.pad(e, (0, 0, 0, padded))
    n_chunks = e.shape[1] // chunk
    e = e.view(batch, n_chunks, chunk, width)
    steps = torch.arange(chunk, device=e.device)
    distance = steps[None, :] - steps[:, None]  # (C, C): j - i
    powers = feedback[None, None, :] ** distance.clamp(min=0)[:, :, None]  # (C, C, S)
    powers = powers * (distance >= 0)[:, :, None]
    local = torch.einsum("ijs,bnjs->bnis", powers, e)  # within-chunk sums
    # carry into chunk n from chunk n+1: g_(start of n+1), discounted by a^(C - i) at step i of chunk n.
    decay_to_next = feedback[None, :] ** (chunk - steps)[:, None]  # (C, S)
    out = torch.empty_like(local, memory_format=torch.contiguous_format)
    carry = torch.zeros(batch, width, device=e.device, dtype=e.dtype)
    for n in range(n_chunks - 1, -1, -1):
        out[:, n] = local[:, n] + decay_to_next * carry[:, None, :]
        carry = out[:, n, 0]
    return out.view(batch, n_chunks * chunk, width)[:, :time]


def reverse_diagonal_scan(errors: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """`g_t = e_t + feedback * g_{t+1}` over the time axis, accumulated in at least fp32, returned in `errors.dtype`.

    Args:
        errors: `(batch, time, state)`.
        feedback: `(state,)`, values in [0, 1].

    Example:
        >>> e = torch.randn(2, 5, 3); a = torch.tensor([0.0, 0.5, 1.0])
        >>> g = reverse_diagonal_scan(e, a)   # g[:, :, 0] == e[:, :, 0]; g[:, :, 2] == reversed cumsum of e
    """
    feedback = feedback.to(device=errors.device, dtype=_accumulation_dtype(errors.dtype))
    scan = _scan_loop if errors.device.type == "cpu" else _scan_chunked
    return scan(errors, feedback).to(errors.dtype)


__all__ = ["reverse_diagonal_scan", "reverse_diagonal_scan_reference"]
