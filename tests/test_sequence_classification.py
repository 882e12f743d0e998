"""SfrnnForSequenceClassification: registered with AutoModelForSequenceClassification (remote code included); the head
reads each row's last real state, so left- and right-padded rows give the logits of the row alone; its gradients in
every mode are those of a hand-wired reference built on torch's cells; every mode trains; the loss follows
transformers' `problem_type` / `num_labels` semantics."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from references import reference_dsf_layer, reference_exact_layer, reference_hidden_states
from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM, SfrnnForSequenceClassification

VOCAB = 17


def classifier(cell="gru", block="residual", num_labels=3, **kw):
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, cell_type=cell, block_type=block,
                         num_labels=num_labels, **kw)
    return SfrnnForSequenceClassification(config).double()


def padded(rows, side):
    """Rows of ids padded with id 0 on `side` ("left" / "right"): `(input_ids, attention_mask)`."""
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span], mask[i, span] = row, 1
    return input_ids, mask


def test_registered_with_the_auto_class():
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_labels=4)
    model = AutoModelForSequenceClassification.from_config(config)
    assert type(model) is SfrnnForSequenceClassification and model.score.out_features == 4


@pytest.mark.parametrize("cell, block", [("gru", "residual"), ("lstm", "prenorm"), ("rnn", "residual")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_the_logits_of_the_row_alone(cell, block, side):
    model = classifier(cell, block).eval()
    rows = [torch.randint(1, VOCAB, (length,)) for length in (9, 4, 1)]
    input_ids, mask = padded(rows, side)
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-12, atol=1e-12, msg=f"row {i}")
        # the head must read the last real state, not the last position: pad tokens there would change it
        assert not torch.allclose(model(input_ids=input_ids).logits, batched)


def test_a_row_without_real_tokens_is_an_error():
    model = classifier()
    with pytest.raises(ValueError, match=r"rows \[1\] hold no real token"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))


REFERENCE_LAYERS = {
    "bptt": reference_exact_layer,
    "dsf": lambda layer, x, mask: reference_dsf_layer(layer, x, mask, layer.feedback.to(x.dtype)),
    "ft_bptt": lambda layer, x, mask: reference_dsf_layer(layer, x, mask, None),
}


@pytest.mark.parametrize("mode", list(REFERENCE_LAYERS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_gradients_in_every_mode_are_the_references(mode, side):
    model = classifier("gru", "prenorm", gradient_mode=mode).train()
    rows = [torch.randint(1, VOCAB, (length,)) for length in (7, 5, 2)]
    input_ids, mask = padded(rows, side)
    labels = torch.tensor([2, 0, 1])
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params)

    hidden = reference_hidden_states(model.model, input_ids, mask, REFERENCE_LAYERS[mode])
    last = [max(t for t in range(mask.shape[1]) if mask[i, t]) for i in range(len(rows))]
    reference_logits = model.score(torch.stack([hidden[i, t] for i, t in enumerate(last)]))
    reference_grads = torch.autograd.grad(F.cross_entropy(reference_logits, labels), params, allow_unused=True)
    for (name, _), got, want in zip(model.named_parameters(), grads, reference_grads):
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got), rtol=1e-10,
                                   atol=1e-12, msg=f"{mode} {name}")


@pytest.mark.parametrize("mode", ["bptt", "dsf", "ft_bptt", "diag_jacobian"])
def test_every_mode_trains_on_a_task_that_needs_memory(mode):
    """Label: the first token of a left-padded row, read at its last token 5-8 steps later."""
    model = classifier("gru", num_labels=3, gradient_mode=mode).float().train()
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (int(n),), generator=generator) for n in torch.randint(5, 9, (48,),
                                                                                         generator=generator)]
    labels = torch.randint(0, 3, (48,), generator=generator)
    for row, label in zip(rows, labels):
        row[0] = label  # ids 0-2 open the row and name its class
    input_ids, mask = padded(rows, "left")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (mode, losses[0], losses[-1])


def test_loss_follows_the_problem_type():
    input_ids = torch.randint(0, VOCAB, (4, 6))
    regression = classifier(num_labels=1)
    labels = torch.randn(4, dtype=torch.float64)
    out = regression(input_ids=input_ids, labels=labels)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], labels))

    single = classifier(num_labels=3)
    labels = torch.tensor([0, 2, 1, 2])
    out = single(input_ids=input_ids, labels=labels)
    assert single.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    multi = classifier(num_labels=3)
    labels = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    out = multi(input_ids=input_ids, labels=labels)
    assert multi.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))

    chosen = classifier(num_labels=2, problem_type="regression")  # a set problem_type is kept
    labels = torch.randn(4, 2, dtype=torch.float64)
    out = chosen(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, labels))


def test_a_causal_lm_checkpoint_starts_a_classifier(tmp_path):
    lm = SfrnnForCausalLM(SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2))
    lm.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert type(model) is SfrnnForSequenceClassification
    torch.testing.assert_close(model.model.layers[1].recurrent.weight_hh, lm.model.layers[1].recurrent.weight_hh)


REMOTE_USER = textwrap.dedent("""
    import sys
    sys.modules["sfrnn_hf"] = None  # the package is not installed for this user
    import torch
    from transformers import AutoModelForSequenceClassification

    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert "sfrnn_hf" not in type(model).__module__, type(model).__module__
    inputs = torch.load(out)
    with torch.no_grad():
        inputs["logits"] = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
    torch.save(inputs, out)
""")


def test_saved_classifier_loads_as_remote_code_without_the_package(tmp_path):
    model = classifier("lstm", "prenorm").float().eval()
    model.save_pretrained(tmp_path / "model")
    assert model.config.auto_map["AutoModelForSequenceClassification"] == (
        "modeling_sfrnn.SfrnnForSequenceClassification")
    input_ids, mask = padded([torch.randint(1, VOCAB, (n,)) for n in (6, 3)], "left")
    torch.save({"ids": input_ids, "mask": mask}, tmp_path / "io.pt")
    (tmp_path / "remote_user.py").write_text(REMOTE_USER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(tmp_path / "remote_user.py"), str(tmp_path / "model"),
                           str(tmp_path / "io.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "io.pt")["logits"], model(input_ids=input_ids,
                                                                         attention_mask=mask).logits)
