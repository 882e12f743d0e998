"""Training-step benchmark: median time of a full step (forward, backward, optimizer) of one model in each gradient
mode, and the speed-up of DSF and FT-BPTT over exact BPTT (torch's fused kernels), all from one run. The modes are
interleaved inside every repeat (in reversed order every other repeat), so background load hits all of them alike.

    python benchmarks/train_step.py                                  # GRU, 3 x 512, batch 32, length 256, PTB vocab
    python benchmarks/train_step.py --cell lstm --length 1024 --recurrent-only
    python benchmarks/train_step.py --dtypes float32 bfloat16
    python benchmarks/train_step.py --layers 1 --hidden 512 --batch 128 --length 128 --vocab 53 --json cost.json
"""

import argparse
import json

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=CELL_TYPES)
    parser.add_argument("--block", default="residual", choices=["residual", "prenorm"])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=10000, help="PTB's word vocabulary by default")
    parser.add_argument("--recurrent-only", action="store_true",
                        help="time the recurrent stack alone: inputs_embeds in, no head, loss = mean of the output")
    parser.add_argument("--modes", nargs="+", default=list(GRADIENT_MODES), choices=list(GRADIENT_MODES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="bfloat16: autocast around forward and loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every mode's times, peak memory and paired ratio here")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = SfrnnConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         cell_type=args.cell, block_type=args.block)
    model = SfrnnForCausalLM(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    embeds = torch.randn(args.batch, args.length, args.hidden, device=device, requires_grad=True)

    def step_in(mode, autocast):
        def step():
            model.config.gradient_mode = mode
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                if args.recurrent_only:
                    loss = model.model(inputs_embeds=embeds).last_hidden_state.float().pow(2).mean()
                else:
                    loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
        return step

    print(machine_description(device))
    what = "recurrent stack (inputs_embeds)" if args.recurrent_only else f"full LM (vocab {args.vocab})"
    print(f"model: {args.cell} {args.layers} x {args.hidden} {args.block}, {what}, batch {args.batch}, "
          f"length {args.length}, optimizer step included, median of {args.repeats} interleaved repeats after "
          f"{args.warmup} warm-up")
    report = {"machine": machine_description(device), "model": vars(args) | {"what": what}, "runs": []}
    for dtype in args.dtypes:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        timings = interleaved_timings({mode: step_in(mode, autocast) for mode in args.modes}, device, args.warmup,
                                      args.repeats)
        seconds, peaks, best = timings.median, timings.peak, timings.best
        for mode in args.modes:
            ratio = ""
            if "bptt" in seconds:
                median, fastest, paired = timings.ratios("bptt", mode)
                ratio = f"  BPTT/{mode}: {median:.2f}x (best runs {fastest:.2f}x, paired {paired:.2f}x)"
            print(f"  {dtype:9s} {mode:8s} median {seconds[mode] * 1000:9.1f} ms/step, best {best[mode] * 1000:9.1f}"
                  f"   peak memory {peaks[mode] / 2**20:8.1f} MiB{ratio}")
            report["runs"].append({
                "dtype": dtype, "mode": mode, "median_s": seconds[mode], "best_s": best[mode],
                "repeats_s": timings.runs[mode], "peak_memory_mib": peaks[mode] / 2**20,
                "paired_bptt_over_mode": timings.paired_ratio("bptt", mode) if "bptt" in seconds else None})
        print(f"  ({load_line()})")
        report["load"] = load_line()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
