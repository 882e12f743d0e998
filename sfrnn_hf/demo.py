"""`make demo` placeholder until the training pipeline lands: builds a small DSF GRU language model and takes one step."""

import torch

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM


def main():
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=100, hidden_size=32, gradient_mode="dsf"))
    input_ids = torch.randint(0, 100, (4, 16))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    print(f"one DSF training step on random tokens: loss {loss.item():.3f} (the PTB demo comes with the training pipeline)")


if __name__ == "__main__":
    main()
