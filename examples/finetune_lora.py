"""LoRA fine-tuning of a trained sfrnn checkpoint, then loading the adapter back and merging it.

    python examples/finetune_lora.py outputs/demo                        # e.g. the checkpoint `make demo` saves
    python examples/finetune_lora.py outputs/demo --targets weight_ih weight_hh lm_head --steps 100 --mode bptt

Targets (see `sfrnn_hf.training.train.lora_config`):
- `weight_ih`, `weight_hh`: the recurrent matrices (PEFT `target_parameters`; by default those the checkpoint's cell
  has): the adapter changes the recurrence itself and, in `dsf` mode, is trained by the DSF gradient;
- `output_projection`, `up_proj`, `down_proj`, `lm_head`: ordinary linear layers (`target_modules`).
The same run from the command line: `sfrnn-train ptb_gru_1x256 --lora CHECKPOINT training.max_steps=100`.
"""

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfrnn_hf import GRADIENT_MODES  # importing sfrnn_hf also registers the sfrnn model type
from sfrnn_hf.lora_targets import LINEAR_LORA_MODULES, RECURRENT_LORA_PARAMETERS
from sfrnn_hf.training.train import run
from sfrnn_hf.training.config import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trained sfrnn checkpoint folder (model + tokenizer)")
    parser.add_argument("--targets", nargs="+", choices=list(RECURRENT_LORA_PARAMETERS) + list(LINEAR_LORA_MODULES),
                        help="default: the recurrent matrices the checkpoint's cell has")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", default="dsf", choices=list(GRADIENT_MODES))
    parser.add_argument("--output-dir", default="outputs/lora")
    cli = parser.parse_args()

    targets = []
    if cli.targets:
        targets = [f"lora.target_parameters={[t for t in cli.targets if t in RECURRENT_LORA_PARAMETERS]}",
                   f"lora.target_modules={[t for t in cli.targets if t in LINEAR_LORA_MODULES]}"]
    experiment = load_config("ptb_gru_1x256", [
        f"model.from_pretrained={cli.checkpoint}", "lora.enabled=true", f"lora.r={cli.r}", f"lora.alpha={cli.alpha}",
        *targets,
        f"training.max_steps={cli.steps}", "training.batch_size=32", "training.scheduler=constant",
        "training.eval_strategy=no", "training.evaluate_test=false", "training.logging_steps=10",
        f"training.output_dir={cli.output_dir}", "data.max_eval_samples=500",
    ])
    # The checkpoint fixes the architecture and the tokenizer; the mode is free.
    experiment.model = {"from_pretrained": cli.checkpoint, "gradient_mode": cli.mode}
    trainer, results = run(experiment)
    print(f"validation perplexity after LoRA: {results['validation_perplexity']:.1f}")

    # Load the adapter onto a fresh base model, then merge it into an ordinary sfrnn model.
    tokenizer = AutoTokenizer.from_pretrained(cli.checkpoint)
    base = AutoModelForCausalLM.from_pretrained(cli.checkpoint)
    adapted = PeftModel.from_pretrained(base, cli.output_dir).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cli.checkpoint), cli.output_dir)
    merged = merged.merge_and_unload().eval()
    inputs = tokenizer("the company said", return_tensors="pt")
    with torch.no_grad():
        gap = (adapted(**inputs).logits - merged(**inputs).logits).abs().max().item()
    print(f"adapter in {cli.output_dir}; merged model ({type(merged).__name__}) in {results['merged_model']}; "
          f"adapted vs merged logits max |diff| {gap:.2e}")


if __name__ == "__main__":
    main()
