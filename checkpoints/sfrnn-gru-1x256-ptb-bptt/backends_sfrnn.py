"""Which op runs a DSF-family mode, and in which precision.

Every backend takes `(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype)` and returns
`(states, statistics)`: `reference` (`reference_sfrnn.dsf_states`), `fused`, `fused_kernel` and `triton`
(`fused_sfrnn.fused_dsf_recurrence` with their options). `resolve_dsf_backend` picks one per cell and device, from
`config.dsf_backend`; `dsf_layer_states` applies the precision policy and calls it.

Hub-exported file: imports only torch and its flat siblings.
"""

import functools
import os
from typing import Callable, NamedTuple

import torch

from .cells_sfrnn import get_cell
from .configuration_sfrnn import DSF_BACKENDS
from .fused_sfrnn import DSF_CHUNK, fused_dsf_recurrence
from .recurrence_sfrnn import kernel_states
from .reference_sfrnn import dsf_states
from .triton_sfrnn import TRITON_AVAILABLE, triton_dsf_pointwise_backward


class DsfBackend(NamedTuple):
    """A resolved DSF op: `name` (one of `DSF_BACKENDS` but "auto") and the op."""

    name: str
    op: Callable


def _reference_op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=None):
    return dsf_states(cell, inputs, initial_state, weights, mask, feedback)


# The fused op does not trace (Python loops over time writing into preallocated buffers); under torch.compile it runs
# outside the graph, a graph break that `fullgraph=True` refuses.
_fused_outside_graph = torch.compiler.disable(fused_dsf_recurrence)


def _fused_op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=None, **options):
    op = _fused_outside_graph if torch.compiler.is_compiling() else fused_dsf_recurrence
    return op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=matmul_dtype, **options)


def resolve_dsf_backend(requested: str, device: torch.device, cell) -> DsfBackend:
    """The DSF op for `config.dsf_backend` on `device` for `cell` (a `Cell` or its name). "auto": the measured
    fastest: on CPU `fused` (the loop forward saving the gates, the chunked torch backward); on CUDA `triton` (cuDNN
    forward, gates recomputed batched, scan and pointwise derivative in one Triton kernel) when Triton is installed and
    the cell has a Triton backward, else `fused_kernel` (the same with the torch backward); elsewhere (mps, xpu: not
    measured) `reference`."""
    if requested not in DSF_BACKENDS:
        raise ValueError(f"Unknown dsf_backend {requested!r}; expected one of {list(DSF_BACKENDS)}.")
    cell = get_cell(cell)
    name = requested
    if name == "auto":
        triton = TRITON_AVAILABLE and cell.has_triton_backward
        name = {"cpu": "fused", "cuda": "triton" if triton else "fused_kernel"}.get(device.type, "reference")
    if name == "triton" and not TRITON_AVAILABLE:
        raise ValueError("dsf_backend='triton' needs Triton installed (pip install triton); use 'fused_kernel'.")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"dsf_backend='triton' runs on CUDA only (or under TRITON_INTERPRET=1), not on "
                         f"{device.type}; use 'auto' or 'fused'.")
    if name == "triton" and not cell.has_triton_backward:
        raise ValueError(f"dsf_backend='triton': the {cell.name!r} cell has no Triton backward; use 'fused_kernel' "
                         f"(or 'auto', which picks it for this cell).")
    # GPU: the backward in long chunks (large matmuls); CPU: short, cache-sized chunks.
    chunk = 1024 if device.type == "cuda" else DSF_CHUNK
    ops = {
        "reference": _reference_op,
        "fused": functools.partial(_fused_op, chunk=chunk),
        "fused_kernel": functools.partial(_fused_op, chunk=chunk, state_kernel=kernel_states),
        "triton": functools.partial(_fused_op, chunk=chunk, state_kernel=kernel_states,
                                    pointwise_kernel=triton_dsf_pointwise_backward),
    }
    return DsfBackend(name, ops[name])


def _bf16_matmul_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16 / AMX through oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def dsf_layer_states(cell, inputs, initial_state, weights, mask, feedback, backend: DsfBackend):
    """States `(batch, time, S)` with the recurrence's values and the DSF backward, and the forward's
    `JacobianStatistics` (None unless the feedback records them), through `backend`. Shapes as `dsf_states`.

    Under torch.compile a feedback the reference traces (constant or none, no statistics) runs the reference op inside
    the graph; the others run the backend outside it.

    Precision: states, scans and gradient accumulators are in the weights' dtype promoted to at least fp32 (fp64 stays
    fp64). Under `torch.autocast(dtype=torch.bfloat16)` the large matmuls (input projection, weight and input
    gradients) take bf16 operands where the device runs them natively, the output is fp32; without autocast the output
    has the inputs' dtype.
    """
    device = inputs.device
    if torch.compiler.is_compiling() and not (feedback.per_step or feedback.record_statistics):
        backend = resolve_dsf_backend("reference", device, cell)
    autocast = torch.is_autocast_enabled(device.type)
    compute_dtype = torch.promote_types(weights[0].dtype, torch.float32)
    matmul_dtype = None
    if autocast and torch.get_autocast_dtype(device.type) == torch.bfloat16 and _bf16_matmul_supported(device):
        matmul_dtype = torch.bfloat16
    out_dtype = compute_dtype if autocast else inputs.dtype
    inputs, initial_state = inputs.to(compute_dtype), initial_state.to(compute_dtype)
    weights = tuple(w.to(compute_dtype) for w in weights)
    feedback = feedback.to(compute_dtype)
    with torch.autocast(device.type, enabled=False):
        states, statistics = backend.op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype)
    return states.to(out_dtype), statistics


__all__ = ["DsfBackend", "resolve_dsf_backend", "dsf_layer_states"]
