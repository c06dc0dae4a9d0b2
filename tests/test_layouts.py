"""The layouts (dpo_lib.core.layouts): the packed layout and the chunked output layer give the
plain layout's log-probs and gradients."""
import pytest
import torch

from dpo_lib.training import train as trainer
from dpo_lib.core import layouts
from dpo_lib.core.config import load_config
from dpo_lib.core.batches import tokenize_pairs
from dpo_lib.core.layouts import PackedLayout, PlainLayout
from dpo_lib.core.data import load_preference_pairs
from dpo_lib.core.logps import head_logps, response_logps, sequence_logps
from dpo_lib.core.models import load_model, load_tokenizer
from dpo_lib.core.lora import add_lora


def _pair(prompt, chosen, rejected):
    return {"prompt_input_ids": prompt, "chosen_input_ids": prompt + chosen,
            "chosen_labels": [-100] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected,
            "rejected_labels": [-100] * len(prompt) + rejected}


def test_layout_of_a_packed_pair():
    batch = PackedLayout().collate([_pair([5, 6, 7], [8, 9], [10, 11, 12]),
                                    _pair([5], [8], [9])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [5, 8, 9, 0, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist()[0] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 3, 4, 3, 4, 5]
    # chosen 8 <- position 2 (last prompt token), 9 <- 3; rejected 10 <- 2, 11 <- 5, 12 <- 6
    assert batch["chosen_rows"].tolist() == [[2, 3], [0, 0]]
    assert batch["chosen_targets"].tolist() == [[8, 9], [8, -100]]
    assert batch["rejected_rows"].tolist()[0] == [2, 5, 6]
    mask = layouts.attention_mask_4d(batch["segment_ids"], torch.float32)[0, 0]
    assert mask[6].tolist() == [True, True, True, False, False, True, True, False]   # r1 sees p, r0, r1
    assert mask[4].tolist() == [True, True, True, True, True, False, False, False]   # c1 sees p, c0, c1
    padded = layouts.attention_mask_4d(batch["segment_ids"], torch.float32)[1, 0]
    assert padded[5].tolist() == [False] * 5 + [True, False, False]                 # padding: itself only


def test_response_logps_equals_sequence_logps_shifted():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
    expected = sequence_logps(logits, labels)
    assert torch.allclose(response_logps(logits[:, :-1], labels[:, 1:]), expected)
    with pytest.raises(ValueError, match="targets"):
        response_logps(logits, labels[:, 1:])


def test_prompt_mismatch_is_an_error():
    bad = _pair([5, 6], [7], [8])
    bad["rejected_input_ids"] = [5, 9, 8]
    with pytest.raises(ValueError, match="rejected sequence does not start"):
        PackedLayout().collate([bad], 0)


# one chunk, its softmax kept for backward; 3 rows a chunk, none kept (the output layer applied
# again in backward); 3 rows a chunk, only the first kept (the short last one, 11 elements, would
# fit what is left of the budget, but only a first run of chunks is kept)
@pytest.mark.parametrize("chunk_elements, saved", [(2 ** 24, 2 ** 28), (11 * 3, 0), (11 * 3, 44)])
def test_head_logps_equals_response_logps_of_the_logits(monkeypatch, chunk_elements, saved):
    monkeypatch.setattr("dpo_lib.core.logps.CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr("dpo_lib.core.logps.SAVED_SOFTMAX_ELEMENTS", saved)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    targets = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 5, 6, 10]])
    ours = head_logps(hidden, head, targets)
    (g_hidden, g_weight, g_bias) = torch.autograd.grad(ours.sum() * 1.5, (hidden, head.weight,
                                                                          head.bias))
    expected = response_logps(head(hidden), targets)
    e_hidden, e_weight, e_bias = torch.autograd.grad(expected.sum() * 1.5, (hidden, head.weight,
                                                                            head.bias))
    torch.testing.assert_close(ours, expected)
    for a, b in ((g_hidden, e_hidden), (g_weight, e_weight), (g_bias, e_bias)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(head_logps(hidden, head, targets, average=True),
                               response_logps(head(hidden), targets, average=True))


def test_head_logps_backward_twice_gives_the_same_gradients(monkeypatch):
    """The kept softmax is turned into the gradient in place; a second backward through the same
    graph (retain_graph) recomputes it instead of reading the used-up chunk."""
    monkeypatch.setattr("dpo_lib.core.logps.CHUNK_ELEMENTS", 11 * 3)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (1, 7), generator=generator)
    total = head_logps(hidden[None], head, targets).sum()
    first, = torch.autograd.grad(total, hidden, retain_graph=True)
    second, = torch.autograd.grad(total, hidden)
    expected, = torch.autograd.grad(response_logps(head(hidden[None]), targets).sum(), hidden)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def tiny_model_and_pairs(n_pairs: int, attention: str):
    """The tiny profile's config, tokenizer, ``n_pairs`` tokenized held-out pairs and a LoRA model
    with the given attention implementation."""
    cfg = load_config("tiny")
    tokenizer = load_tokenizer(cfg)
    pairs, _ = load_preference_pairs("bundled", split="test", limit=n_pairs, order="file")
    examples, _ = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    model = add_lora(load_model(cfg), cfg)
    model.config._attn_implementation = attention
    return cfg, tokenizer, examples, model


@pytest.mark.parametrize("attention,chunked", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_logps_and_gradients_equal_the_plain_forward(attention, chunked):
    cfg, tokenizer, examples, model = tiny_model_and_pairs(6, attention)
    with torch.no_grad():                              # non-zero LoRA B, so that LoRA A gets gradients
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    results = {}
    for name, layout in (("plain", PlainLayout()), ("packed", PackedLayout(chunked))):
        model.zero_grad()
        values = layout.logps(model, layout.collate(examples, 0))
        (values[0] - 0.5 * values[1]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = [v.detach() for v in values], grads
    (plain, plain_grads), (packed, packed_grads) = results["plain"], results["packed"]
    for a, b in zip(plain, packed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], atol=1e-5, rtol=1e-3)
    fraction = layouts.packed_token_fraction(examples)
    assert 0.5 < fraction < 1.0
    print(f"{attention}: packed tokens = {fraction:.2f} of the plain pass's")


@pytest.mark.parametrize("stage", ["preference", "sft"])
def test_training_with_the_speed_switches_matches_plain(tmp_path, stage):
    """Three steps in tiny: the same loss curve with the packed forward and the chunked output
    layer as without (SFT: the chunked output layer only). In random order: grouped by length,
    each layout groups by its own rows' length and the two runs see other batches."""
    losses = {}
    for fast in (False, True):
        cfg = load_config("tiny", overrides={
            "train.stage": stage, "train.preference_steps": 3, "train.sft_steps": 3,
            "train.eval_every": 0, "train.save_every": 0, "train.shared_prompt": fast,
            "train.chunked_head": fast, "train.group_by_length": False,
            "train.output_dir": str(tmp_path / f"run-{fast}")})
        rows = trainer.train(cfg, progress=False).metrics
        keys = ("loss", "logps/chosen", "logps/rejected") if stage == "preference" else ("loss",)
        losses[fast] = [[row[k] for k in keys] for row in rows if "loss" in row]
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]),
                               atol=1e-4, rtol=1e-4)


def test_head_logps_with_an_fp32_norm_before_a_bf16_head_under_autocast():
    """Autocast hands an fp32 final norm's output to a bf16 output layer; backward runs outside
    autocast and must compute the same logits (and not fail on the mixed dtypes)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 11).to(torch.bfloat16)
    targets = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 5, 6, 10]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head_logps(hidden, head, targets)
    ours.sum().backward()
    expected = response_logps(head(hidden.detach().bfloat16()).float(), targets)
    torch.testing.assert_close(ours, expected, atol=1e-2, rtol=1e-2)
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and head.weight.grad.dtype == torch.bfloat16


def test_chunked_head_on_the_plain_layout_and_in_nf4():
    cfg = load_config("tiny", overrides={"model.quantization": "nf4"})
    tokenizer = load_tokenizer(cfg)
    pairs, _ = load_preference_pairs("bundled", split="test", limit=4)
    examples, _ = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    model = add_lora(load_model(cfg), cfg).eval()
    batch = PlainLayout().collate(examples, 0)
    with torch.no_grad():
        plain = PlainLayout().logps(model, batch)
        chunked = PlainLayout(chunked_head=True).logps(model, batch)
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_packing_refuses_attention_that_ignores_the_mask(implementation, tmp_path,
                                                         monkeypatch):
    """flash_attention_2 takes no 4-D mask: the packed answers would see each other. Refused in
    the forward and, before any pass, when a run asks for shared_prompt."""
    cfg, tokenizer, examples, model = tiny_model_and_pairs(2, implementation)
    assert model.config._attn_implementation == implementation
    batch = PackedLayout().collate(examples, 0)
    with pytest.raises(ValueError, match=f"shared_prompt.*'{implementation}'.*shared_prompt=false"):
        PackedLayout().logps(model, batch)
    cfg = cfg.with_overrides({"train.shared_prompt": True, "train.output_dir": str(tmp_path)})
    base = model.get_base_model()
    monkeypatch.setattr("dpo_lib.core.models.load_model", lambda cfg: base)
    with pytest.raises(ValueError, match=f"'{implementation}'"):       # before any pass
        trainer.train(cfg, progress=False)
