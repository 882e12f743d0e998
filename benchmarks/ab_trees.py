"""A/B of two checkouts on the recurrent-stack step: one worker process per tree (its own venv and package), driven
alternately so only one runs at a time and both see the same machine state; each step is `layer.py`'s forward +
backward of the recurrent stack (3 x 512, batch 32, fp32). Prints the median time per tree, mode and length and the
BPTT/DSF ratio, and per mode the paired ratio of the second tree's time to the first's (median over the rounds).
BPTT runs torch's own kernel in both trees, so its difference between the trees shows the noise.

    python benchmarks/ab_trees.py main=../sfrnn-main branch=../sfrnn-branch --cell gru --lengths 256 1024 --repeats 6

(each NAME=PATH a checkout of this repository, e.g. made with `git worktree add ../sfrnn-main main`).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(cell, threads):
    import torch

    from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=16, hidden_size=512, num_hidden_layers=3, cell_type=cell, block_type="residual")
    model = SfrnnForCausalLM(config).model.train()
    embeds = {}
    for line in sys.stdin:
        mode, length = line.split()
        if length not in embeds:
            torch.manual_seed(int(length))
            embeds[length] = torch.randn(32, int(length), 512, requires_grad=True)
        inputs = embeds[length]
        start = time.perf_counter()
        model.config.gradient_mode = mode
        model.zero_grad(set_to_none=True)
        inputs.grad = None
        model(inputs_embeds=inputs).last_hidden_state.pow(2).mean().backward()
        print(time.perf_counter() - start, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="two name=path, each a checkout with its own .venv")
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.cell, args.threads)
    if len(args.trees) != 2 or not all("=" in tree for tree in args.trees):
        parser.error(f"expected two name=path trees, got {args.trees}")
    trees = dict(tree.split("=", 1) for tree in args.trees)
    # PYTHONPATH: each worker imports its own tree's package, even where two trees share one venv.
    workers = {name: subprocess.Popen([f"{path}/.venv/bin/python", __file__, "--worker", "--cell",
                                       args.cell, "--threads", str(args.threads)],
                                      cwd=path, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env={**os.environ, "PYTHONPATH": path})
               for name, path in trees.items()}

    def run(tree, mode, length):
        workers[tree].stdin.write(f"{mode} {length}\n")
        workers[tree].stdin.flush()
        return float(workers[tree].stdout.readline())

    plan = [(length, mode) for length in args.lengths for mode in ("bptt", "dsf")]
    times = {}
    for repeat in range(args.repeats + 1):  # round 0 warms up
        flip = repeat % 2 == 0
        for length, mode in plan[::-1] if flip else plan:
            for tree in list(trees)[::-1] if flip else trees:
                seconds = run(tree, mode, length)
                if repeat:
                    times.setdefault((tree, length, mode), []).append(seconds)
        print(f"round {repeat} done {time.strftime('%T')} load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    print(f"{args.cell}: median ms over {args.repeats} repeats, BPTT/DSF ratio of the medians")
    for length in args.lengths:
        for tree in trees:
            bptt, dsf = (statistics.median(times[(tree, length, mode)]) for mode in ("bptt", "dsf"))
            print(f"T={length:5d} {tree:8s} bptt {bptt * 1e3:8.1f}  dsf {dsf * 1e3:8.1f}  ratio {bptt / dsf:.2f}x")
        first, second = trees
        for mode in ("bptt", "dsf"):  # per round, the two trees ran back to back: their ratio cancels slow drifts
            paired = [b / a for a, b in zip(times[(first, length, mode)], times[(second, length, mode)])]
            print(f"T={length:5d} {mode:4s} {second}/{first} time, median of the per-round ratios "
                  f"{statistics.median(paired):.3f} (min {min(paired):.3f}, max {max(paired):.3f})")


if __name__ == "__main__":
    main()
