"""Write the Penn Treebank documents that lm-evaluation-harness scores to reproduce an sfrnn word-level PTB
checkpoint's perplexity (tasks `sfrnn_ptb_valid`, `sfrnn_ptb_test` in this folder).

    python examples/lm_eval/write_ptb_documents.py runs/ptb_gru_1x256          # -> ptb_lm_eval/{validation,test}.jsonl
    lm_eval --model hf \\
        --model_args pretrained=runs/ptb_gru_1x256,trust_remote_code=True \\
        --tasks sfrnn_ptb_valid,sfrnn_ptb_test --include_path examples/lm_eval --batch_size 32

Each line of a split is one document: its tokens after `<bos>`, `<eos>` included, cut at `--max-length` tokens with
the `<bos>` (65 in the paper's protocol), as `sfrnn_hf.training.data.sentence_dataset` cuts them. The tasks score a document as the
continuation of an empty context: lm-eval encodes it without special tokens and puts the tokenizer's `<bos>` before
it once.
"""

import argparse
import json
import os

from transformers import AutoTokenizer

import sfrnn_hf  # noqa: F401  (registers the sfrnn model type, so the checkpoint's tokenizer loads silently)
from sfrnn_hf.training.data import ptb_sentences, sentence_documents

SPLITS = {"validation": "valid", "test": "test"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an sfrnn checkpoint folder with its word-level tokenizer")
    parser.add_argument("--max-length", type=int, default=65, help="the checkpoint's data.max_length (default 65)")
    parser.add_argument("--out", default="ptb_lm_eval")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    os.makedirs(args.out, exist_ok=True)
    for split, ptb_split in SPLITS.items():
        documents = sentence_documents(ptb_sentences(ptb_split), tokenizer, args.max_length)
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path, "w") as handle:
            handle.writelines(json.dumps({"text": document}) + "\n" for document in documents)
        print(f"{path}: {len(documents)} documents")


if __name__ == "__main__":
    main()
