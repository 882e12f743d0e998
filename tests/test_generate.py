"""generate() with the recurrent state cache: cached decoding equals uncached decoding, padding is exact, beam search,
sampling and continuation work, one token per forward after the prefill, PEFT wrappers generate the same, and bad
input gets a clear error. Weights are scaled so that a cache that restarts from zero changes the output."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sfrnn_hf import CELL_TYPES, SfrnnCache, SfrnnConfig, SfrnnForCausalLM, SfrnnModel

CELLS = CELL_TYPES
VOCAB = 40


def strong_state_model(cell, seed=0):
    torch.manual_seed(seed)
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, cell_type=cell,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = SfrnnForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embeddings.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
        for block in model.model.layers:
            block.recurrent.weight_hh.mul_(3.0)
    return model


def uncached_greedy(model, input_ids, steps):
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


def stateless_greedy(model, input_ids, steps):
    """What a cache that silently restarts from h = 0 would produce."""
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence[:, -1:], use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("cell", CELLS)
def test_cached_greedy_equals_uncached_greedy(cell):
    model = strong_state_model(cell)
    prompt = torch.randint(2, VOCAB, (3, 7))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(cached, uncached_greedy(model, prompt, 12))
    assert not torch.equal(cached, stateless_greedy(model, prompt, 12))  # the test can see a broken cache


@pytest.mark.parametrize("cell", CELLS)
def test_left_padded_batch_generates_each_rows_own_result(cell):
    model = strong_state_model(cell)
    rows = [torch.randint(2, VOCAB, (length,)) for length in (8, 5, 2)]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    batched = model.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batched[i, width:], alone[0, len(row):]), f"row {i}"


@pytest.mark.parametrize("cell", CELLS)
def test_right_padded_prefill_keeps_each_rows_last_real_state(cell):
    model = strong_state_model(cell)
    lengths = (9, 4, 1)
    input_ids = torch.randint(2, VOCAB, (3, 9))
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        cache = model(input_ids=input_ids, attention_mask=mask, use_cache=True).past_key_values
        for i, length in enumerate(lengths):
            alone = model(input_ids=input_ids[i:i + 1, :length], use_cache=True).past_key_values
            for layer in range(2):
                torch.testing.assert_close(cache.get_state(layer)[i], alone.get_state(layer)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_decoding_runs_one_token_per_forward_after_prefill(cell, monkeypatch):
    model = strong_state_model(cell)
    lengths = []
    original = SfrnnModel.forward

    def recording_forward(self, input_ids=None, **kwargs):
        lengths.append(input_ids.shape[1])
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(SfrnnModel, "forward", recording_forward)
    model.generate(torch.randint(2, VOCAB, (2, 30)), max_new_tokens=6, do_sample=False)
    assert lengths[0] == 30 and lengths[1:] == [1] * 5


class HostReads(TorchDispatchMode):
    """Records every operation that hands tensor values to Python: the ops behind `.item()`, `int()`, `bool()` and
    `if tensor:` (`_local_scalar_dense`), `torch.equal`, and data-dependent shapes (`nonzero`, `masked_select`, boolean
    indexing), plus `Tensor.tolist` (which bypasses the dispatcher). On an accelerator each is a host sync, so
    counting them on CPU finds every sync a GPU run would make, without a GPU."""

    VALUE_OPS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.nonzero.default",
                 "aten.masked_select.default", "aten.is_nonzero.default"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name == "aten.index.Tensor" and any(
            index is not None and index.dtype == torch.bool for index in args[1])
        if name in self.VALUE_OPS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_decode_steps_read_no_tensor_values_on_the_host(cell, monkeypatch):
    model = strong_state_model(cell)
    reads_per_forward = []
    original_forward, original_tolist = SfrnnForCausalLM.forward, torch.Tensor.tolist

    def recording_forward(self, *args, **kwargs):
        with HostReads() as recorder:
            monkeypatch.setattr(torch.Tensor, "tolist", lambda t: recorder.reads.append("tolist") or original_tolist(t))
            try:
                return original_forward(self, *args, **kwargs)
            finally:
                monkeypatch.setattr(torch.Tensor, "tolist", original_tolist)
                reads_per_forward.append(recorder.reads)

    monkeypatch.setattr(SfrnnForCausalLM, "forward", recording_forward)
    input_ids = torch.randint(2, VOCAB, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # a left-padded prompt: the prefill reads the mask and the ids (allowed, once)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert len(reads_per_forward) == 6
    assert reads_per_forward[0], "the prefill's id check must be seen: else the recorder sees nothing"
    assert reads_per_forward[1:] == [[]] * 5


@pytest.mark.parametrize("cell", CELLS)
def test_beam_search_and_sampling_shapes(cell):
    model = strong_state_model(cell)
    prompt = torch.randint(2, VOCAB, (2, 5))
    beams = model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 11)
    assert torch.equal(beams[::2, :5], prompt)
    # the best beam scores at least as high as greedy under the model
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)

    def log_prob(seqs):
        with torch.no_grad():
            logp = model(input_ids=seqs, use_cache=False).logits.log_softmax(-1)
        return logp[:, 4:-1].gather(-1, seqs[:, 5:, None]).sum((1, 2))

    assert (log_prob(beams[::2]) >= log_prob(greedy) - 1e-4).all()
    torch.manual_seed(7)
    samples = model.generate(prompt, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    again = model.generate(prompt, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert samples.shape == (6, 11) and torch.equal(samples, again)


@pytest.mark.parametrize("cell", CELLS)
def test_continuing_from_returned_cache_equals_one_long_generation(cell):
    model = strong_state_model(cell)
    prompt = torch.randint(2, VOCAB, (2, 6))
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.past_key_values, SfrnnCache)
    assert first.past_key_values.get_seq_length() == 10  # prompt + 4 fed back (the 5th token is not yet consumed)
    continued = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=5,
                               do_sample=False)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=10, do_sample=False))


def test_generation_through_a_peft_lora_wrapper():
    from peft import LoraConfig, get_peft_model

    model = strong_state_model("gru")
    prompt = torch.randint(2, VOCAB, (2, 6))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], target_parameters=["weight_hh"],
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    adapted = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, SfrnnForCausalLM)
    assert torch.equal(adapted, merged.generate(prompt, max_new_tokens=8, do_sample=False))
    assert not torch.equal(adapted, strong_state_model("gru").generate(prompt, max_new_tokens=8, do_sample=False))


def test_bad_input_to_generate_gets_a_clear_error():
    model = strong_state_model("gru")
    with pytest.raises(ValueError, match="Empty input"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match=f"id {VOCAB + 3}"):
        model.generate(torch.tensor([[2, VOCAB + 3]]), max_new_tokens=3)
    other = SfrnnForCausalLM(SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2)).eval()
    foreign = other.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="another model: hidden_size 8 \\(model: 16\\)"):
        model.generate(foreign.sequences, past_key_values=foreign.past_key_values, max_new_tokens=2)
