"""PEFT knows sfrnn's LoRA defaults: `LoraConfig(task_type="CAUSAL_LM")` with no targets adapts every layer's
recurrent matrices (the adapted forward differs from the base, equals the merged model's, and gradients reach the
LoRA factors in every mode); `"all-linear"` adds the recurrent matrices to PEFT's linear modules; a target that is no
LoRA-able part of the model gets an error saying what to use; other model types keep PEFT's own defaults."""

import ast
import copy
import re

import pytest
import torch

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.cells_sfrnn import CELLS

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

VOCAB = 19


def tiny(cell="gru", block="residual", layers=2):
    torch.manual_seed(0)
    return SfrnnForCausalLM(SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=layers, cell_type=cell,
                                        block_type=block)).double()


def wrapped_parameters(peft_model):
    """`{(layer index, parameter name)}` of the recurrent parameters PEFT wrapped."""
    found = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            found.add((int(name.split(".layers.")[1].split(".")[0]), module.parameter_name))
    return found


def lora_module_names(peft_model):
    return {name.split(".")[-1] for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and not isinstance(module, ParamWrapper)}


def batch():
    input_ids = torch.randint(0, VOCAB, (3, 9))
    return {"input_ids": input_ids, "labels": input_ids}


@pytest.mark.parametrize("cell, block", [("gru", "residual"), ("lstm", "prenorm")])
def test_lora_config_without_targets_adapts_the_recurrent_weights(cell, block):
    base = tiny(cell, block)
    # init_lora_weights=False: B is random, not PEFT's usual zeros, so the adapter changes the function.
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    assert wrapped_parameters(adapted) == {(i, n) for i in range(2) for n in ("weight_ih", "weight_hh")}
    assert lora_module_names(adapted) == set()  # no module by default
    inputs = batch()
    merged = copy.deepcopy(adapted).merge_and_unload()
    with torch.no_grad():
        adapted_logits = adapted.eval()(**inputs).logits
        assert (adapted_logits - base.eval()(**inputs).logits).abs().max() > 1e-3
        torch.testing.assert_close(adapted_logits, merged.eval()(**inputs).logits, rtol=1e-10, atol=1e-10)
    for mode in ("bptt", "dsf", "ft_bptt", "diag_jacobian"):
        adapted.config.gradient_mode = mode
        adapted.train().zero_grad()
        adapted(**inputs).loss.backward()
        factors = [(n, p.grad) for n, p in adapted.named_parameters() if "lora_" in n]
        assert len(factors) == 8 and all(g is not None and g.abs().max() > 0 for _, g in factors), mode
        assert all(p.grad is None for n, p in adapted.named_parameters() if "lora_" not in n)  # base frozen


def test_the_default_adapter_saves_and_loads(tmp_path):
    base = tiny()
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    adapted.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert sorted(loaded.peft_config["default"].target_parameters) == ["recurrent.weight_hh", "recurrent.weight_ih"]
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, adapted.eval()(**inputs).logits)


@pytest.mark.parametrize("block, modules", [("residual", set()), ("prenorm", {"output_projection", "up_proj",
                                                                             "down_proj"})])
def test_all_linear_is_the_linear_modules_and_the_recurrent_matrices(block, modules):
    adapted = get_peft_model(tiny(block=block), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    assert lora_module_names(adapted) == modules  # PEFT leaves the head out
    assert wrapped_parameters(adapted) == {(i, n) for i in range(2) for n in ("weight_ih", "weight_hh")}


def test_explicit_targets_are_kept():
    adapted = get_peft_model(tiny(block="prenorm"), LoraConfig(target_modules=["lm_head"],
                                                               target_parameters=["weight_hh"]))
    assert lora_module_names(adapted) == {"lm_head"} and wrapped_parameters(adapted) == {(0, "weight_hh"),
                                                                                         (1, "weight_hh")}


@pytest.mark.parametrize(
    "targets, message",
    [
        (dict(target_modules=["weight_hh"]), r"'weight_hh' is not a module .* target_parameters=\['recurrent.weight_ih'"),
        (dict(target_modules=["recurrent"]), r"'recurrent' is not a module .* target_parameters="),
        (dict(target_modules=["q_proj", "v_proj"]), r"'q_proj' names no module .* \['output_projection'"),
        (dict(target_parameters=["recurrent.bias_hh"]), r"'recurrent.bias_hh' is not a LoRA-able .* 'weight_hh'"),
    ],
)
def test_a_wrong_target_says_what_to_use(targets, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny(), LoraConfig(task_type="CAUSAL_LM", **targets))


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_defaults_adapt_the_matrices_each_cell_has(cell):
    # The reference: which recurrent parameters of a built model are non-empty matrices (IndRNN's weight_hh is a
    # vector, minGRU's is empty); the defaults adapt exactly those, and the adapted model trains.
    base = tiny(cell)
    matrices = {name.rsplit(".", 1)[1] for name, p in base.named_parameters()
                if ".recurrent.weight_" in name and p.dim() == 2 and p.numel()}
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False))
    assert wrapped_parameters(adapted) == {(i, n) for i in range(2) for n in matrices}
    adapted(**batch()).loss.backward()
    assert all(p.grad is not None for name, p in adapted.named_parameters() if "lora_" in name)
    for absent in {"weight_ih", "weight_hh"} - matrices:
        with pytest.raises(ValueError, match=f"'{absent}' is not a LoRA-able recurrent parameter of an {cell} model"):
            get_peft_model(tiny(cell), LoraConfig(target_modules=[], target_parameters=[absent]))
    # A recurrent weight named as a module: the advice is this cell's defaults, which adapt exactly `matrices`.
    with pytest.raises(ValueError, match="is not a module") as raised:
        get_peft_model(tiny(cell), LoraConfig(target_modules=["weight_hh"]))
    advised = re.search(r"target_parameters=(\[[^\]]*\])", str(raised.value)).group(1)
    assert {name.rsplit(".", 1)[1] for name in ast.literal_eval(advised)} == matrices


def test_other_model_types_keep_peft_defaults():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16))
    config = LoraConfig(task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    assert adapted.peft_config["default"].target_modules == {"c_attn"}
    assert not adapted.peft_config["default"].target_parameters
