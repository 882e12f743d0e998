"""A/B of two checkouts on the recurrent-stack step: one worker process per tree (its own venv and package), driven
alternately so only one runs at a time and both see the same machine state; each step is `layer.py`'s forward +
backward of the recurrent stack (3 x 512, batch 32, fp32). Prints the median time per tree, mode and length and the
BPTT/DSF ratio, and per mode the paired ratio of the second tree's time to the first's (median over the rounds).
BPTT runs torch's own kernel in both trees, so its difference between the trees shows the noise.

    python benchmarks/ab_trees.py main=../sfrnn-main branch=../sfrnn-branch --cell gru --lengths 256 1024 --repeats 6

(each NAME=PATH a checkout of this repository, e.g. made with `git worktree add ../sfrnn-main main`).
With `--compare-gradients` it times nothing and checks instead that both trees compute the same arithmetic: the logits
and every parameter gradient of a small 2-layer prenorm model, bit for bit, for every cell x mode x backend that
both trees have (fp32 and fp64, the same seed).
"""

import argparse
import itertools
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


def save_gradients(path):
    """`{(cell, mode, backend, dtype): [logits, every parameter's gradient]}` of this tree, to `path`."""
    import torch

    from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM

    results = {}
    for cell, mode, backend, dtype in itertools.product(CELL_TYPES, ("bptt", "dsf", "ft_bptt", "diag_jacobian"),
                                                        ("reference", "fused", "fused_kernel"),
                                                        (torch.float32, torch.float64)):
        torch.manual_seed(0)
        config = SfrnnConfig(vocab_size=13, hidden_size=8, num_hidden_layers=2, cell_type=cell, gradient_mode=mode,
                             dsf_backend=backend, block_type="prenorm")
        model = SfrnnForCausalLM(config).to(dtype)
        ids = torch.randint(0, 13, (3, 11))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        output = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), return_logits=True)
        output.loss.backward()
        results[(cell, mode, backend, str(dtype))] = [output.logits.detach()] + [
            torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    torch.save(results, path)


def compare_gradients(trees):
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as folder:
        saved = {}
        for name, path in trees.items():
            saved[name] = f"{folder}/{name}.pt"
            subprocess.run([f"{path}/.venv/bin/python", __file__, "--save-gradients", saved[name]], cwd=path,
                           check=True, env={**os.environ, "PYTHONPATH": path})
        first, second = (torch.load(saved[name]) for name in trees)
    common = sorted(set(first) & set(second))
    differ = [key for key in common if len(first[key]) != len(second[key])
              or not all(torch.equal(a, b) for a, b in zip(first[key], second[key]))]
    print(f"bit-identical in both trees: {len(common) - len(differ)} of {len(common)} cell x mode x backend x dtype "
          f"({len(first)} and {len(second)} in each tree)")
    for key in differ:
        print("differs:", *key)
    return 1 if differ else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="two name=path, each a checkout with its own .venv")
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-gradients", action="store_true", help="check the arithmetic instead of timing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-gradients", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.cell, args.threads)
    if args.save_gradients:
        return save_gradients(args.save_gradients)
    if len(args.trees) != 2 or not all("=" in tree for tree in args.trees):
        parser.error(f"expected two name=path trees, got {args.trees}")
    trees = dict(tree.split("=", 1) for tree in args.trees)
    if args.compare_gradients:
        return compare_gradients(trees)
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
    sys.exit(main())
