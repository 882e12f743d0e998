"""`make demo`: train a small GRU language model on Penn Treebank (one sentence a sequence) with Diagonal State
Feedbacks on CPU for a fixed number of steps (a few minutes), report validation perplexity, save the checkpoint and
tokenizer, load them back through `AutoModelForCausalLM` / `AutoTokenizer` and generate with
`pipeline("text-generation")`. A fixed step count and seed: the same machine gives the same numbers every run.

    python -m sfrnn_hf.training.demo [--steps 300] [--output-dir outputs/demo] [--eval-samples N]
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from .checkpoints import newest_intact
from .config import load_config
from .run_folder import earlier_run
from .train import run

PROMPT = "the company said"


def claim_demo_folder(output_dir: str, overrides: list) -> str:
    """Let the demo run again where an earlier one left files: resume (`--resume`) from its newest intact checkpoint,
    else start over (`sfrnn-train` clears the folder). Appends the override to `overrides`; returns what happens."""
    if not earlier_run(output_dir):
        return f"a fresh run in {output_dir}"
    overrides.append("training.resume_from_checkpoint=true")
    checkpoint, _ = newest_intact(output_dir)
    if checkpoint is not None:
        return f"{output_dir} holds an earlier demo run: resuming it from {checkpoint}"
    if os.path.isfile(os.path.join(output_dir, "results.json")):  # finished, its checkpoints gone: kept as it is
        return f"{output_dir} holds a finished demo run (no checkpoint left): keeping it"
    return f"{output_dir} holds an earlier demo run with no intact checkpoint: starting over (its files are replaced)"


def main(argv=None) -> dict:
    """Runs the demo; returns the training results (`sfrnn_hf.training.train.run`) with the generated `samples`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of 64 sentences (default 300)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="validation sentences to measure (default: all 3370)")
    cli = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # The paper's PTB model (Embedding -> x = GRU(x) + x -> Linear, 1 x 256) on the paper's data protocol; only the
    # length differs: a few minutes of CPU instead of 30 epochs (a constant, larger learning rate to make them count).
    overrides = [
        "model.gradient_mode=dsf",
        "training.batch_size=64",
        "training.learning_rate=3.0e-3",
        "training.scheduler=constant",
        "training.weight_decay=0.0",
        f"training.max_steps={cli.steps}",
        "training.eval_strategy=no",  # one validation pass at the end
        "training.evaluate_test=false",
        "training.logging_steps=25",
        f"training.output_dir={cli.output_dir}",
    ]
    if cli.eval_samples is not None:
        overrides.append(f"data.max_eval_samples={cli.eval_samples}")
    start_note = claim_demo_folder(cli.output_dir, overrides)
    experiment = load_config("ptb_gru_1x256", overrides)
    print(f"== sfrnn demo: GRU 1 x 256 language model on Penn Treebank (sentence level), gradient_mode=dsf, "
          f"CPU, {cli.steps} steps of 64 sentences ==\n{start_note}", flush=True)
    start = time.monotonic()
    trainer, results = run(experiment)
    if trainer is None:  # resumed a finished run
        print(f"\nthe earlier run had finished its {results['global_step']} steps: nothing to train; its results:")
    else:
        sentences = results["global_step"] * experiment.training.batch_size
        print(f"\ntrained {results['global_step']} steps ({sentences} sentences, "
              f"{sentences / len(trainer.train_dataset):.2f} epochs) in {results['train_runtime_s']:.0f} s")
    measured = cli.eval_samples or "all 3370"
    print(f"validation perplexity ({measured} PTB validation sentences): {results['validation_perplexity']:.2f}")
    print(f"checkpoint and tokenizer saved in {cli.output_dir}/")

    model = AutoModelForCausalLM.from_pretrained(cli.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(cli.output_dir)
    print(f"loaded back: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
          f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)")

    inputs = tokenizer(PROMPT, return_tensors="pt")  # `<bos> the company said`
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].softmax(-1)
    top = next_token.topk(5)
    predictions = ", ".join(f"{tokenizer.decode([int(i)]).strip()!r} {p:.2f}" for p, i in zip(top.values, top.indices))
    print(f"\nnext-token predictions after {PROMPT!r}: {predictions}")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    torch.manual_seed(0)
    samples = [out["generated_text"] for out in generator(
        PROMPT, max_new_tokens=20, do_sample=True, top_k=40, temperature=0.8, num_return_sequences=3)]
    print('samples (pipeline("text-generation"), top-k 40, temperature 0.8):')
    for sample in samples:
        print("  " + sample)
    print(f"\ndemo done in {time.monotonic() - start:.0f} s")
    return {**results, "samples": samples}


if __name__ == "__main__":
    main()
