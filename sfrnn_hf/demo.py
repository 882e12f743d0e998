"""`make demo`: train a small GRU language model on Penn Treebank (one sentence a sequence) with Diagonal State
Feedbacks on CPU for a few minutes, report validation perplexity, save the checkpoint and tokenizer, load them back
through `AutoModelForCausalLM` / `AutoTokenizer` and generate.

    python -m sfrnn_hf.demo [--minutes 3.5] [--output-dir outputs/demo]
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import sfrnn_hf  # noqa: F401  (registers the sfrnn model type with the Auto classes)
from sfrnn_hf.train import run
from sfrnn_hf.training_config import load_config


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `seconds` have passed (checked after every optimizer step)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.5, help="training time budget (default 3.5)")
    parser.add_argument("--output-dir", default="outputs/demo")
    cli = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # The paper's PTB model (Embedding -> x = GRU(x) + x -> Linear, 1 x 256) on the paper's data protocol; only the
    # budget differs: a few minutes of CPU instead of 30 epochs (a constant, larger learning rate to make them count).
    experiment = load_config("ptb_gru_1x256", [
        "model.gradient_mode=dsf",
        "training.batch_size=64",
        "training.lr=3.0e-3",
        "training.scheduler=constant",
        "training.weight_decay=0.0",
        "training.max_steps=2000",  # the time budget stops it first
        "training.eval_strategy=no",  # one validation pass at the end
        "training.evaluate_test=false",
        "training.logging_steps=25",
        f"training.output_dir={cli.output_dir}",
    ])
    print(f"== sfrnn demo: GRU 1 x 256 language model on Penn Treebank (sentence level), gradient_mode=dsf, "
          f"CPU, {cli.minutes:g} minutes of training ==", flush=True)
    start = time.monotonic()
    trainer, results = run(experiment, callbacks=[TimeBudgetCallback(60 * cli.minutes)])
    sentences = results["global_step"] * experiment.training.batch_size
    print(f"\ntrained {results['global_step']} steps ({sentences} sentences, "
          f"{sentences / len(trainer.train_dataset):.2f} epochs) in {results['train_runtime_s']:.0f} s")
    print(f"validation perplexity (all 3370 PTB validation sentences): {results['validation_perplexity']:.1f}")
    print(f"checkpoint and tokenizer saved in {cli.output_dir}/")

    model = AutoModelForCausalLM.from_pretrained(cli.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(cli.output_dir)
    print(f"loaded back: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
          f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)")

    prompt = "the company said"
    inputs = tokenizer(prompt, return_tensors="pt")  # `<bos> the company said`
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].softmax(-1)
    top = next_token.topk(5)
    predictions = ", ".join(f"{tokenizer.decode([int(i)])!r} {p:.2f}" for p, i in zip(top.values, top.indices))
    print(f"\nnext-token predictions after {prompt!r}: {predictions}")
    torch.manual_seed(0)
    generated = model.generate(
        **inputs, max_new_tokens=20, do_sample=True, top_k=40, temperature=0.8, num_return_sequences=3,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    print("samples (model.generate, top-k 40, temperature 0.8):")
    for row in generated:
        print("  " + tokenizer.decode(row, skip_special_tokens=True))
    print(f"\ndemo done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
