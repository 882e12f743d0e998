"""What padding costs a training step: a real, uniformly random PTB batch (the paper's protocol: 128 sentences,
`<bos> ... <eos>`, cut at 65, padded to the longest) against a batch holding the same real tokens without padding
(the sentences packed end to end into 128 equal rows). Full steps (forward, backward, Adam), interleaved; the padded
batch also with logits at every position (`return_logits=True`: the training step before the output layer ran at
labelled positions only), and with the `<pad>` and `<eos>` embedding rows decayed to 1e-42 .. 7e-38, as weight decay
and Adam leave rows the loss never reaches (the protocol run at step 6400; `flush_tiny_values`).

    python benchmarks/padding.py                          # GRU 1 x 256, PTB vocabulary, dsf and bptt
"""

import argparse
import copy
import random

import torch

from common import interleaved_timings, load_line, machine_description
from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM
from transformers import DataCollatorWithFlattening

from sfrnn_hf.training.data import build_word_tokenizer, ptb_sentences


def ptb_batches(batch: int, max_length: int, seed: int):
    """`(padded, dense, packed, tokenizer)`: a random batch of PTB sentences as model inputs padded on the
    right; the same tokens cut into `batch` rows of equal length, every position labelled (no boundaries: the cost
    floor); and the same sentences flattened into one row by `DataCollatorWithFlattening` (`position_ids` restart at
    each sentence, the state restarts with them)."""
    sentences = ptb_sentences("train")
    tokenizer = build_word_tokenizer(sentences)
    rows = random.Random(seed).sample(sentences, batch)
    ids = [[tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(s.split()), tokenizer.eos_token_id][:max_length]
           for s in rows]
    width = max(map(len, ids))
    input_ids = torch.full((batch, width), tokenizer.pad_token_id)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, sentence in enumerate(ids):
        input_ids[row, : len(sentence)] = torch.tensor(sentence)
        mask[row, : len(sentence)] = 1
    padded = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    stream = torch.tensor([token for sentence in ids for token in sentence])
    dense_ids = stream[: len(stream) // batch * batch].view(batch, -1)
    dense = {"input_ids": dense_ids, "labels": dense_ids}
    packed = DataCollatorWithFlattening()([{"input_ids": sentence} for sentence in ids])
    return padded, dense, packed, tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="gru", choices=CELL_TYPES)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=65)
    parser.add_argument("--modes", nargs="+", default=["dsf", "bptt"], choices=list(GRADIENT_MODES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    padded, dense, packed, tokenizer = ptb_batches(args.batch, args.max_length, args.seed)
    vocab = len(tokenizer)
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                         cell_type=args.cell)).train()
    decayed_model = copy.deepcopy(model)
    with torch.no_grad():  # the rows the loss never reaches, as weight decay and Adam leave them
        decayed = torch.where(torch.arange(args.hidden) % 3 == 0, -1.0, 1.0) * torch.logspace(-42, -37.15, args.hidden)
        decayed_model.get_input_embeddings().weight[[tokenizer.pad_token_id, tokenizer.eos_token_id]] = decayed
    trained = {name: (m, torch.optim.Adam(m.parameters(), lr=1e-4))
               for name, m in (("normal", model), ("decayed", decayed_model))}

    def step_on(mode, batch, full_logits=False, rows="normal"):
        on, optimizer = trained[rows]

        def step():
            on.config.gradient_mode = mode
            optimizer.zero_grad(set_to_none=True)
            on(**batch, return_logits=full_logits).loss.backward()
            optimizer.step()
        return step

    shape = tuple(padded["input_ids"].shape)
    real = int(padded["attention_mask"].sum())
    print(machine_description(torch.device("cpu")))
    print(f"model: {args.cell} {args.layers} x {args.hidden}, vocab {vocab}; random PTB batch {shape} "
          f"holding {real} real tokens ({1 - real / padded['input_ids'].numel():.0%} padding); dense "
          f"{tuple(dense['input_ids'].shape)}; packed {tuple(packed['input_ids'].shape)}; median of {args.repeats} "
          f"interleaved repeats")
    steps = {}
    for mode in args.modes:
        steps[f"{mode} padded"] = step_on(mode, padded)
        steps[f"{mode} padded, full logits"] = step_on(mode, padded, full_logits=True)
        steps[f"{mode} padded, decayed rows"] = step_on(mode, padded, rows="decayed")
        steps[f"{mode} packed"] = step_on(mode, packed)
        steps[f"{mode} dense"] = step_on(mode, dense)
    timings = interleaved_timings(steps, torch.device("cpu"), args.warmup, args.repeats)
    variants = ("padded", "padded, full logits", "padded, decayed rows", "packed")
    print("  ms per step (ratio to dense: medians, paired)")
    print(f"  {'mode':14s} {'dense':>9s}   " + "   ".join(f"{name:>27s}" for name in variants))
    for mode in args.modes:
        cells = []
        for name in variants:
            median, _, paired = timings.ratios(f"{mode} {name}", f"{mode} dense")
            cells.append(f"{timings.median[f'{mode} {name}'] * 1000:9.1f} ({median:.2f}x, {paired:.2f}x)")
        print(f"  {mode:14s} {timings.median[f'{mode} dense'] * 1000:9.1f}   " + "   ".join(f"{c:>27s}" for c in cells))
    print(f"  ({load_line()})")


if __name__ == "__main__":
    main()
