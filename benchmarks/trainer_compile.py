"""A plain `transformers.Trainer` with `TrainingArguments(torch_compile=True)` on a tiny sfrnn model (GRU 1 x 16), batches
of 4 random rows of 3 to 20 tokens (each padded batch has its own length): prints each step's time. Compiling costs
the first steps; a step after them should cost what an eager step does.

    python benchmarks/trainer_compile.py [--mode dsf] [--steps 6]
"""

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import sfrnn_hf
from sfrnn_hf.training.data import CausalLMCollator


class StepTimes(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        print(f"step {state.global_step}: {time.monotonic() - self.start:.1f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="dsf")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output-dir", default="outputs/trainer_compile")
    cli = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(sfrnn_hf.SfrnnConfig(vocab_size=50, hidden_size=16,
                                                                  gradient_mode=cli.mode))
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(4, 50) for _ in range(rng.randint(3, 20))]} for _ in range(64)]
    args = TrainingArguments(cli.output_dir, use_cpu=True, max_steps=cli.steps, per_device_train_batch_size=4,
                             torch_compile=True, report_to=[], save_strategy="no", disable_tqdm=True)
    start = time.monotonic()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=CausalLMCollator(0),
            callbacks=[StepTimes()]).train()
    print(f"{cli.steps} steps in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
