"""Decoding benchmark: tokens per second of cached greedy decoding (one cell step per layer per token) against the
same decoding without a cache (the whole sequence re-run for every token), for several context lengths, from one run.

    python benchmarks/generate.py                          # GRU 3 x 512, contexts 64 256 1024
    python benchmarks/generate.py --cell lstm --contexts 128 2048
"""

import argparse

import torch

from common import machine_description, median_seconds
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=CELL_TYPES)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         cell_type=args.cell, eos_token_id=None, pad_token_id=0)
    model = SfrnnForCausalLM(config).to(device).eval()
    print(machine_description(device))
    print(f"model: {args.cell} {args.layers} x {args.hidden}, vocab {args.vocab}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print(f"{'context':>8} {'cached ms/token':>16} {'uncached ms/token':>18} {'speed-up':>9}")
    for context in args.contexts:
        prompt = torch.randint(1, args.vocab, (args.batch, context), device=device)
        with torch.no_grad():
            state = model(input_ids=prompt, use_cache=True).past_key_values  # prefill excluded from both timings
            last = prompt[:, -1:]

            def cached():
                # The shared cache keeps advancing across repeats: the cost of a step does not depend on it.
                cache, token = state, last
                for _ in range(args.new_tokens):
                    logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
                    token = logits.argmax(-1, keepdim=True)

            def uncached():
                sequence = prompt
                for _ in range(args.new_tokens):
                    logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
                    sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)

            cached_s = median_seconds(cached, device, warmup=1, repeats=args.repeats) / args.new_tokens
            uncached_s = median_seconds(uncached, device, warmup=1, repeats=args.repeats) / args.new_tokens
        print(f"{context:>8} {cached_s * 1000:>16.2f} {uncached_s * 1000:>18.2f} {uncached_s / cached_s:>8.1f}x")


if __name__ == "__main__":
    main()
