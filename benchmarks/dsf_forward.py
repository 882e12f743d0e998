"""Where one recurrent layer's training step spends its time, per time step: DSF's pieces against torch's fused BPTT.

One layer (d = 512, batch 32, fp32 by default), T steps, CPU. Each line is a median over repeats in which all the
pieces run interleaved (order reversed every other repeat, as in `layer.py`, so a slow spell of a shared machine hits
them alike), divided by the steps it covers (microseconds a step):

- `step matmul <kind>`: the recurrent matmul of one step alone (`cells_sfrnn.StepMatmul`), every kind.
- `sigmoid` / `tanh`: one pass over a step's pre-activations into a buffer already in cache.
- `weight-gradient` / `input-gradient matmul`: one of the backward's matmuls on a 64-step chunk, per step.
- `dsf forward <kind>`: the loop forward saving states and gates (`fused_sfrnn.recurrence_saving_gates`).
- `dsf forward kernel+gates`: torch's fused no-grad kernel for the states, then the gates recomputed batched
  (`state_kernel` + `gates_from_states`, the GPU's form).
- `dsf backward`: the chunked DSF backward (`fused_sfrnn.dsf_backward`), paper feedback.
- `torch forward (train)`, `torch backward`: exact BPTT through torch's fused kernel (oneDNN on CPU), split.
- `torch forward (no grad)`: the same kernel without saving anything (inference).

    python benchmarks/dsf_forward.py --cells lstm gru rnn --lengths 256
"""

import argparse

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf.cells_sfrnn import CELLS, STEP_MATMULS, StepMatmul, default_step_matmul, get_cell, onednn_packed_matmul_serves
from sfrnn_hf.fused_sfrnn import GradsWanted, dsf_backward, gates_from_states, recurrence_saving_gates
from sfrnn_hf.recurrence_sfrnn import kernel_states
from sfrnn_hf.scan_sfrnn import ConstantFeedback


def repeated(fn, times):
    def run():
        for _ in range(times):
            fn()
    return run


def pieces(cell_name, d, batch, length, dtype):
    """name -> a no-argument function timing one piece over `length` steps (or one step, for the step matmul)."""
    cell = get_cell(cell_name)
    torch.manual_seed(0)
    bound = d**-0.5
    weights = tuple(torch.empty(shape, dtype=dtype).uniform_(-bound, bound)
                    for shape in cell.parameter_shapes(d).values())
    inputs = torch.randn(length, batch, d, dtype=dtype)
    initial = torch.zeros(batch, cell.state_vectors * d, dtype=dtype)
    feedback = ConstantFeedback(torch.linspace(0, 1, cell.state_vectors * d, dtype=dtype))
    kinds = [kind for kind in STEP_MATMULS if kind == "addmm" or onednn_packed_matmul_serves(inputs.device, dtype)]
    out = {}
    h = torch.randn(batch, d, dtype=dtype)
    add = torch.randn(batch, weights[1].shape[0], dtype=dtype)
    for kind in kinds if weights[1].dim() == 2 and weights[1].numel() else ():  # cells with a recurrent matmul
        matmul = StepMatmul(weights[1], None, batch, kind)
        out[f"step matmul {kind}"] = (repeated(lambda m=matmul: m(h, add=add), 64), 64)
    pre, reused = torch.randn(batch, cell.gates * d, dtype=dtype), torch.empty(batch, cell.gates * d, dtype=dtype)
    out["sigmoid (B, G*d) into a reused buffer"] = (repeated(lambda: torch.sigmoid(pre, out=reused), 64), 64)
    out["tanh (B, G*d) into a reused buffer"] = (repeated(lambda: torch.tanh(pre, out=reused), 64), 64)
    rows = 64 * batch  # one backward chunk
    grad_pre, chunk_inputs = torch.randn(rows, cell.gates * d, dtype=dtype), torch.randn(rows, d, dtype=dtype)
    grad_weight = torch.zeros(cell.gates * d, d, dtype=dtype)
    out["weight-gradient matmul (addmm_)"] = (lambda: grad_weight.addmm_(grad_pre.t(), chunk_inputs), 64)
    out["input-gradient matmul (mm)"] = (lambda: grad_pre @ weights[0], 64)
    for kind in kinds:
        out[f"dsf forward {kind}"] = (lambda k=kind: recurrence_saving_gates(cell, inputs, initial, weights,
                                                                            step_matmul=k), length)
    batch_first = inputs.transpose(0, 1).contiguous()

    def kernel_and_gates():
        states = kernel_states(cell, batch_first, initial, weights, None).transpose(0, 1).contiguous()
        gates_from_states(cell, inputs, initial, states, weights)

    has_kernel = cell.fused_sequence(batch_first[:, :1], initial, weights, train=False) is not None
    if has_kernel:
        out["dsf forward kernel+gates"] = (kernel_and_gates, length)
    states, gates, _ = recurrence_saving_gates(cell, inputs, initial, weights)
    grad_states = torch.randn_like(states)
    out["dsf backward"] = (lambda: dsf_backward(cell, grad_states, inputs, initial, states, gates, weights, None,
                                                feedback, GradsWanted(*(True,) * 5)), length)
    if has_kernel:
        params = [w.clone().requires_grad_() for w in weights]
        x = batch_first.clone().requires_grad_()

        def torch_forward():
            return cell.fused_sequence(x, initial, params, train=True)[0]

        def torch_forward_backward():
            torch.autograd.grad(torch_forward(), [x, *params], torch.ones(batch, length, d, dtype=dtype))

        def torch_no_grad():
            with torch.no_grad():
                cell.fused_sequence(batch_first, initial, weights, train=False)

        out["torch forward (train)"] = (torch_forward, length)
        out["torch backward"] = (torch_forward_backward, length)  # forward + backward here; the forward is subtracted
        out["torch forward (no grad)"] = (torch_no_grad, length)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["lstm"], choices=list(CELLS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[256])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(machine_description(torch.device("cpu")))
    print(f"one layer, d = {args.hidden}, batch {args.batch}, {args.dtype}; default step matmul: "
          f"{default_step_matmul(torch.device('cpu'), dtype)}; median of {args.repeats} after {args.warmup} warm-up")
    print(load_line())
    for cell in args.cells:
        for length in args.lengths:
            timed_pieces = pieces(cell, args.hidden, args.batch, length, dtype)
            medians = interleaved_timings({name: fn for name, (fn, _) in timed_pieces.items()}, torch.device("cpu"),
                                          args.warmup, args.repeats).median
            timed = {name: medians[name] / steps for name, (_, steps) in timed_pieces.items()}
            if "torch backward" in timed:
                timed["torch backward"] -= timed["torch forward (train)"]
                timed["torch BPTT total"] = timed["torch forward (train)"] + timed["torch backward"]
            forwards = {name: t for name, t in timed.items() if name.startswith("dsf forward")}
            timed["dsf total (fastest forward)"] = min(forwards.values()) + timed["dsf backward"]
            print(f"\n{cell} T={length}: microseconds a step (GFLOP/s for the matmuls)")
            step_flop = 2 * args.batch * args.hidden * get_cell(cell).gates * args.hidden  # one (B, d) x (d, G*d)
            for name, seconds in timed.items():
                rate = f"  ({step_flop / seconds / 1e9:5.1f} GFLOP/s)" if "matmul" in name else ""
                print(f"  {name:40s} {seconds * 1e6:9.1f}{rate}")
            if "torch BPTT total" in timed:
                ratio = timed["torch BPTT total"] / timed["dsf total (fastest forward)"]
                print(f"  BPTT / DSF (one layer, this run): {ratio:.2f}x")


if __name__ == "__main__":
    main()
