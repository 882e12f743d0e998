"""Recurrent-stack benchmark: forward + backward of the recurrent stack of an sfrnn model (inputs_embeds in, no
embedding, no head; loss = mean of the squared last hidden state), for each gradient mode, cell, length and dtype.

The modes are interleaved inside every repeat, in reversed order every other repeat (bptt, dsf, ft_bptt, ft_bptt, dsf,
bptt, ...), so background load hits all of them alike; reported: the median and the best time per mode after warm-up,
the peak memory of one step, and the ratio to exact BPTT through torch's fused kernels (`bptt`) from the same run,
three ways: of the medians, of the best runs, and paired (the median over repeats of the ratio within a repeat).
`dsf+lora` is DSF with a PEFT LoRA (rank 8) on weight_ih and weight_hh (`--lora`), compared with plain `dsf`;
`dsf_calibrated` is DSF whose forward also gathers the diag(J) statistics its diagonal is re-estimated from.

    python benchmarks/layer.py                                       # GRU 3 x 512, batch 32, T in {256, 1024}, fp32
    python benchmarks/layer.py --cells gru lstm rnn --dtypes float32 bfloat16 --lora
"""

import argparse
import copy

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["gru"], choices=CELL_TYPES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="bfloat16: autocast around the forward")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=list(GRADIENT_MODES), choices=list(GRADIENT_MODES))
    parser.add_argument("--lora", action="store_true", help="also time dsf with a LoRA on the recurrent weights")
    parser.add_argument("--calibrated", action="store_true", help="also time dsf_calibrated (as in --modes)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=["weight_ih", "weight_hh"])
    return get_peft_model(copy.deepcopy(model), config)


def stack_step(model, embeds, mode, autocast):
    """One forward + backward of the recurrent stack."""
    def step():
        model.config.gradient_mode = mode
        model.zero_grad(set_to_none=True)
        embeds.grad = None
        with autocast:
            hidden = model(inputs_embeds=embeds).last_hidden_state
        hidden.float().pow(2).mean().backward()
    return step


def main():
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_description(device))
    print(f"recurrent stack: {args.layers} x {args.hidden}, batch {args.batch}, forward + backward, "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(load_line())
    print(f"{'cell':5s} {'T':>5s} {'dtype':9s} {'mode':14s} {'median ms':>9s} {'peak MiB':>9s} {'best ms':>9s}   "
          f"BPTT/mode time: {'medians':>7s}   {'best':>7s}   {'paired':>7s}")
    for cell in args.cells:
        torch.manual_seed(0)
        config = SfrnnConfig(vocab_size=16, hidden_size=args.hidden, num_hidden_layers=args.layers, cell_type=cell,
                             block_type="residual")
        base = SfrnnForCausalLM(config).model.to(device).train()
        models = {mode: base for mode in args.modes + ["dsf_calibrated"] * args.calibrated}
        if args.lora:
            peft_model = lora_model(base)
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # nonzero B, so the adapter's gradient path is exercised in full
                    torch.nn.init.normal_(param, std=0.01)
            models["dsf+lora"] = peft_model
        for length in args.lengths:
            embeds = torch.randn(args.batch, length, args.hidden, device=device, requires_grad=True)
            for dtype in args.dtypes:
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
                steps = {name: stack_step(model, embeds, name.split("+")[0], autocast) for name, model in models.items()}
                timings = interleaved_timings(steps, device, args.warmup, args.repeats)
                seconds = timings.median
                for name in steps:
                    ratios = ("   ".join(f"{r:8.2f}x" for r in timings.ratios("bptt", name))
                              if "bptt" in seconds else "")
                    print(f"{cell:5s} {length:5d} {dtype:9s} {name:14s} {seconds[name] * 1000:9.1f} "
                          f"{timings.peak[name] / 2**20:9.1f} {timings.best[name] * 1000:9.1f}   {ratios}")
                print(f"      ({load_line()})")
                if "dsf" in seconds:
                    for other, label in (("ft_bptt", "FT-BPTT / DSF"), ("dsf+lora", "DSF+LoRA / DSF"),
                                         ("diag_jacobian", "diag_jacobian / DSF"),
                                         ("dsf_calibrated", "calibrated / DSF")):
                        if other in seconds:
                            median, fastest, paired = timings.ratios(other, "dsf")
                            print(f"      {label} time: {median:.3f} (medians), {fastest:.3f} (best runs), "
                                  f"{paired:.3f} (paired)")


if __name__ == "__main__":
    main()
