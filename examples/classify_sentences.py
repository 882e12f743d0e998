"""Sequence classification with `transformers.Trainer`: is a Penn Treebank sentence in its original word order, or are
its words shuffled? The label is decided by the whole sentence, which the recurrent state has read by its last token.

    python examples/classify_sentences.py                                  # a fresh GRU 1 x 256, dsf, 300 steps
    python examples/classify_sentences.py --mode bptt --steps 100
    python examples/classify_sentences.py --from-pretrained outputs/demo   # start from a language model (make demo)

`AutoModelForSequenceClassification` builds `SfrnnForSequenceClassification` (a linear head on each row's last real
state); `DataCollatorWithPadding` pads the batch and gives the `attention_mask` that holds the state over padding.
"""

import argparse
import random

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, \
    TrainingArguments

from sfrnn_hf import GRADIENT_MODES, SfrnnConfig  # importing sfrnn_hf registers the sfrnn model type
from sfrnn_hf.training.data import build_word_tokenizer, ptb_sentences


def shuffled_or_not(sentences, seed):
    """Each sentence of 4 words or more, and a copy with its words shuffled: `{"text", "label"}` (1 = original)."""
    rng = random.Random(seed)
    rows = []
    for sentence in sentences:
        words = sentence.split()
        if len(words) < 4:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        rows += [{"text": sentence, "label": 1}, {"text": " ".join(shuffled), "label": 0}]
    return Dataset.from_list(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-pretrained", help="an sfrnn checkpoint folder (model + tokenizer) to start from")
    parser.add_argument("--mode", default="dsf", choices=list(GRADIENT_MODES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-sentences", type=int, default=20000)
    parser.add_argument("--eval-sentences", type=int, default=1000)
    parser.add_argument("--output-dir", default="outputs/classify")
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.from_pretrained:
        tokenizer = AutoTokenizer.from_pretrained(args.from_pretrained)
        model = AutoModelForSequenceClassification.from_pretrained(args.from_pretrained, num_labels=2)
    else:
        tokenizer = build_word_tokenizer(ptb_sentences("train"))
        config = SfrnnConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=1, num_labels=2,
                             pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForSequenceClassification.from_config(config)
    model.config.gradient_mode = args.mode
    model.config.id2label, model.config.label2id = {0: "shuffled", 1: "original"}, {"shuffled": 0, "original": 1}

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=64)

    splits = {"train": shuffled_or_not(ptb_sentences("train")[: args.train_sentences], seed=0),
              "validation": shuffled_or_not(ptb_sentences("valid")[: args.eval_sentences], seed=1)}
    splits = {name: data.map(tokenize, batched=True, remove_columns=["text"]) for name, data in splits.items()}

    def accuracy(prediction):
        return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}

    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=25, eval_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=splits["train"], eval_dataset=splits["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation accuracy after {args.steps} steps ({args.mode}): {metrics['eval_accuracy']:.3f} "
          f"(chance 0.5), loss {metrics['eval_loss']:.3f}")
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}: AutoModelForSequenceClassification.from_pretrained({args.output_dir!r})")


if __name__ == "__main__":
    main()
