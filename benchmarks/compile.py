"""torch.compile benchmark: eager against `torch.compile(model, fullgraph=True)` for the eval forward and one decode step
(one token continuing a state cache), and against `torch.compile(model)` for a training step (forward, backward, Adam)
in each gradient mode, whose recurrence runs outside the graph (eagerly) under compile.
Eager and compiled runs of each step are interleaved inside every repeat (order reversed every other repeat), and the
paired ratio (the median over repeats of eager time / compiled time, both timed back to back) is reported with the
medians, so that background load on shared cores hits both alike. Compilation time is printed separately.


    python benchmarks/compile.py                       # GRU 1 x 256, PTB vocab, batch 32, length 64 (the PTB protocol)
    python benchmarks/compile.py --cell lstm --modes bptt dsf --repeats 9
"""

import argparse
import time

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM

TRACEABLE_MODES = ("bptt", "dsf", "ft_bptt")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=CELL_TYPES)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--modes", nargs="+", default=list(TRACEABLE_MODES), choices=list(TRACEABLE_MODES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def timed_first_call(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def report(name, timings, compile_seconds):
    eager, compiled = timings.median["eager"], timings.median["compiled"]
    median, best, paired = timings.ratios("eager", "compiled")
    print(f"  {name:16s} eager {eager * 1000:8.2f} ms  compiled {compiled * 1000:8.2f} ms  eager/compiled: median "
          f"{median:.2f}x, best {best:.2f}x, paired {paired:.2f}x   (compile {compile_seconds:.0f} s)", flush=True)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         cell_type=args.cell)
    model = SfrnnForCausalLM(config).to(device)
    compiled = torch.compile(model, fullgraph=True)
    compiled_training = torch.compile(model)  # a training forward's recurrence runs outside the graph
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    print(machine_description(device))
    print(f"model: {args.cell} {args.layers} x {args.hidden}, vocab {args.vocab}, batch {args.batch}, length "
          f"{args.length}; median of {args.repeats} interleaved repeats after {args.warmup} warm-up")

    model.eval()
    with torch.no_grad():
        def forward(module):
            return lambda: module(input_ids=input_ids, use_cache=False)
        seconds = timed_first_call(forward(compiled))
        report("eval forward", interleaved_timings({"eager": forward(model), "compiled": forward(compiled)}, device,
                                                   args.warmup, args.repeats), seconds)

        cache = model(input_ids=input_ids, use_cache=True).past_key_values  # a consumed prompt
        token = input_ids[:, -1:]

        def decode(module):  # the shared cache keeps advancing: a step's cost does not depend on it
            return lambda: module(input_ids=token, past_key_values=cache, use_cache=True)
        seconds = timed_first_call(decode(compiled))
        report("decode step", interleaved_timings({"eager": decode(model), "compiled": decode(compiled)}, device,
                                                  args.warmup, args.repeats), seconds)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for mode in args.modes:
        model.config.gradient_mode = mode

        def train_step(module):
            def step():
                optimizer.zero_grad(set_to_none=True)
                module(input_ids=input_ids, labels=input_ids).loss.backward()
                optimizer.step()
            return step
        seconds = timed_first_call(train_step(compiled_training))
        report(f"train {mode}", interleaved_timings({"eager": train_step(model),
                                                     "compiled": train_step(compiled_training)},
                                                    device, args.warmup, args.repeats), seconds)
    print(f"  ({load_line()})")


if __name__ == "__main__":
    main()
