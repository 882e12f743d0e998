"""lm-evaluation-harness scores a word-level PTB checkpoint to the package's own perplexity: the default model
arguments (and `add_bos_token=False` too) with the task files in examples/lm_eval, on documents written by
`data.sentence_documents`, give a word perplexity equal to `exp(total NLL / predicted tokens)` of the sentence layout
(long sentences cut included). Skipped without the optional extra (`pip install -e ".[eval]"`)."""

import json
import math
import os

import pytest
import torch

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.data import CausalLMCollator, build_word_tokenizer, ptb_sentences, sentence_dataset, sentence_documents
from sfrnn_hf.training.train import token_nll_and_count

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

TASKS = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "lm_eval")
MAX_LENGTH = 12  # short enough that some sentences are cut (they then lose their <eos>)


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = build_word_tokenizer(ptb_sentences("train")[:400])
    torch.manual_seed(0)
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(tokenizer), hidden_size=16, pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # far from uniform: a wrong position or token would show
        model.model.layers[0].recurrent.weight_hh.mul_(3)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def package_perplexity(model, tokenizer, lines):
    """The sentence layout's corpus perplexity, as `sfrnn-train` evaluates it."""
    rows = sentence_dataset(lines, tokenizer, MAX_LENGTH)["input_ids"]
    batch = CausalLMCollator(tokenizer.pad_token_id)([{"input_ids": row} for row in rows])
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    stats = token_nll_and_count(logits.double(), batch["labels"])
    return math.exp(stats[:, 0].sum().item() / stats[:, 1].sum().item()), int(stats[:, 1].sum())


def write_documents(folder, documents):
    (folder / "ptb_lm_eval").mkdir()
    for split in ("validation", "test"):  # (the task files declare both splits; the test split is not scored here)
        (folder / "ptb_lm_eval" / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                                      for d in documents))


def harness_word_perplexity(folder, model_args, task="sfrnn_ptb_valid", include_path=TASKS):
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True{model_args}", tasks=[task],
        task_manager=TaskManager(include_path=include_path), batch_size=8, device="cpu",
    )
    return results["results"][task]["word_perplexity,none"]


def test_lm_eval_word_perplexity_equals_the_packages(tmp_path, checkpoint, monkeypatch):
    folder, model, tokenizer = checkpoint
    lines = ptb_sentences("valid")[:40]
    # some sentences are cut, some keep their <eos> (<bos> + words + <eos> fit in MAX_LENGTH)
    assert any(len(line.split()) >= MAX_LENGTH for line in lines)
    assert any(len(line.split()) + 2 <= MAX_LENGTH for line in lines)
    documents = sentence_documents(lines, tokenizer, MAX_LENGTH)
    write_documents(tmp_path, documents)
    monkeypatch.chdir(tmp_path)  # the task files name their data relative to where lm_eval runs
    want, predicted = package_perplexity(model, tokenizer, lines)
    assert predicted == sum(len(d.split()) for d in documents)  # a word is a predicted token

    # The tokenizer puts <bos> before what it encodes (a prompt starts like a training sentence), and the default
    # model arguments keep that behaviour: the task files still score one <bos> before each document.
    assert tokenizer("the company")["input_ids"][0] == tokenizer.bos_token_id
    assert harness_word_perplexity(folder, "") == pytest.approx(want, rel=1e-5)
    # The README's earlier `add_bos_token=False` gives the same: the documents are encoded without special tokens.
    assert harness_word_perplexity(folder, ",add_bos_token=False") == pytest.approx(want, rel=1e-5)


def test_a_rolling_task_scores_a_second_bos_with_the_default_model_args(tmp_path, checkpoint, monkeypatch):
    """Why the task files do not use `loglikelihood_rolling`: lm-eval encodes a rolling document with the tokenizer's
    defaults (here: <bos> first) and puts its own <bos> before it, so every document gains a prediction, <bos> after
    <bos>. `add_bos_token=False` avoids it. (What the README says about lm-eval's own rolling tasks.)"""
    folder, model, tokenizer = checkpoint
    lines = ptb_sentences("valid")[:40]
    write_documents(tmp_path, sentence_documents(lines, tokenizer, MAX_LENGTH))
    monkeypatch.chdir(tmp_path)
    rolling = tmp_path / "rolling"
    rolling.mkdir()
    (rolling / "rolling_ptb.yaml").write_text(
        "task: rolling_ptb\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: ptb_lm_eval/validation.jsonl\n"
        "test_split: validation\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    want, _ = package_perplexity(model, tokenizer, lines)
    doubled = harness_word_perplexity(folder, "", task="rolling_ptb", include_path=str(rolling))
    assert doubled != pytest.approx(want, rel=1e-3)
    assert harness_word_perplexity(folder, ",add_bos_token=False", task="rolling_ptb",
                                   include_path=str(rolling)) == pytest.approx(want, rel=1e-5)
