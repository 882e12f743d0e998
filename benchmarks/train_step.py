"""Training-step benchmark: median time of a full step (forward, backward, optimizer) of one model in each gradient
mode, and the speed-up of DSF and FT-BPTT over exact BPTT (torch's fused kernels), all from one run.

    python benchmarks/train_step.py                                  # GRU, 3 x 512, batch 32, length 256
    python benchmarks/train_step.py --cell lstm --length 1024 --recurrent-only
"""

import argparse

import torch

from common import PeakMemory, machine_description, median_seconds
from sfrnn_hf import GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=["gru", "lstm", "rnn"])
    parser.add_argument("--block", default="residual", choices=["residual", "prenorm"])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=10000, help="PTB's word vocabulary by default")
    parser.add_argument("--recurrent-only", action="store_true",
                        help="time the recurrent stack alone: inputs_embeds in, no head, loss = mean of the output")
    parser.add_argument("--modes", nargs="+", default=list(GRADIENT_MODES), choices=list(GRADIENT_MODES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: autocast around forward and loss")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = SfrnnConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         cell_type=args.cell, block_type=args.block)
    model = SfrnnForCausalLM(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    embeds = torch.randn(args.batch, args.length, args.hidden, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if args.recurrent_only:
                loss = model.model(inputs_embeds=embeds).last_hidden_state.float().pow(2).mean()
            else:
                loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()

    print(machine_description(device))
    what = "recurrent stack (inputs_embeds)" if args.recurrent_only else f"full LM (vocab {args.vocab})"
    print(f"model: {args.cell} {args.layers} x {args.hidden} {args.block}, {what}, batch {args.batch}, "
          f"length {args.length}, {args.dtype}, median of {args.repeats} after {args.warmup} warm-up")
    seconds, peaks = {}, {}
    for mode in args.modes:
        model.config.gradient_mode = mode
        with PeakMemory(device) as memory:
            seconds[mode] = median_seconds(step, device, args.warmup, args.repeats)
        peaks[mode] = memory.peak_bytes
        print(f"  {mode:8s} {seconds[mode] * 1000:9.1f} ms/step   peak memory {peaks[mode] / 2**20:8.1f} MiB")
    if "bptt" in seconds:
        for mode in seconds:
            if mode != "bptt":
                print(f"  speed-up BPTT/{mode.upper()}: {seconds['bptt'] / seconds[mode]:.2f}x")


if __name__ == "__main__":
    main()
