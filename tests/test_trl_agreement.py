"""rpo and simpo against TRL 1.16 on one batch of the tiny model: log-probs and loss.

* rpo: TRL's ``DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, alpha])``. TRL's "sft" term
  is the chosen answers' NLL averaged over *every chosen token of the batch*; Pang et al. (and
  ``dpo_lib.core.losses``) average per answer, then over pairs. The test checks our log-probs against
  TRL's, and TRL's loss against DPO + alpha x that token-weighted NLL computed from ours, and shows
  how far the per-answer form is from it on this batch.
* simpo: TRL's ``CPOTrainer(loss_type="simpo", cpo_alpha=0)`` on its own tokenized batch; our
  token-mean log-probs of the same tokens and our loss against its.
"""
import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL agreement needs trl (the bench extra)")

from datasets import Dataset  # noqa: E402

from dpo_lib.core.layouts import PlainLayout  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402
from dpo_lib.core.batches import tokenize_pairs  # noqa: E402
from dpo_lib.core.data import load_split  # noqa: E402
from dpo_lib.core.losses import preference_loss  # noqa: E402
from dpo_lib.core.lora import add_lora  # noqa: E402
from dpo_lib.core.models import load_model, load_tokenizer  # noqa: E402


@pytest.fixture
def tiny_pairs():
    cfg = load_config("tiny")
    tokenizer = load_tokenizer(cfg)
    pairs, _ = load_split(cfg, "train", 4)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg), cfg)
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")}
                                 for p in pairs])
    return cfg, tokenizer, pairs, model, dataset


def _move_adapter(model, name="default"):
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name and f".{name}." in parameter_name:
                parameter.normal_(0, 0.02)


def test_rpo_agrees_with_trl_sigmoid_plus_sft(tiny_pairs, tmp_path):
    from trl import DPOConfig, DPOTrainer

    _, tokenizer, pairs, model, dataset = tiny_pairs
    alpha, beta = 0.5, 0.1
    config = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid", "sft"],
                       loss_weights=[1.0, alpha], per_device_train_batch_size=4,
                       per_device_eval_batch_size=4, max_length=192, report_to="none",
                       use_cpu=True)
    dpo = DPOTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=dataset,
                     processing_class=tokenizer)
    model = dpo.model
    _move_adapter(model)                       # TRL's reference is the starting adapter "ref"
    model.eval()
    trl_batch = next(iter(dpo.get_eval_dataloader()))
    examples, _ = tokenize_pairs(pairs, tokenizer, 192, 191)
    layout = PlainLayout()
    batch = layout.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        trl_loss = float(dpo._compute_loss(model, trl_batch, False))
        chosen, rejected, chosen_counts, _ = layout.logps(model, batch)
        model.set_adapter("ref")
        ref_chosen, ref_rejected = layout.logps(model, batch)[:2]
        model.set_adapter("default")
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        out = model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"],
                    labels=labels, fused_lm_head=True)
        trl_logps = out.log_probs[:, -(labels.shape[1] - 1):].sum(1)
    trl_chosen, trl_rejected = trl_logps.chunk(2)
    assert torch.allclose(chosen, trl_chosen, atol=1e-3) and \
        torch.allclose(rejected, trl_rejected, atol=1e-3)
    dpo_losses = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "dpo")[0]
    token_weighted_nll = -chosen.sum() / chosen_counts.sum()
    assert dpo_losses.mean().item() + alpha * token_weighted_nll.item() == \
        pytest.approx(trl_loss, abs=1e-4)
    ours = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "rpo",
                           chosen_token_mean_logps=chosen / chosen_counts, rpo_alpha=alpha)[0]
    # RPO's NLL per answer from neither library: torch's cross-entropy of the model's logits on
    # TRL's batch of chosen answers, averaged within each answer, then over the answers
    with torch.no_grad():
        logits = model(input_ids=trl_batch["input_ids"],
                       attention_mask=trl_batch["attention_mask"]).logits[:, :-1]
    token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                                  ignore_index=-100, reduction="none")
    counted = (labels[:, 1:] != -100).float()
    size = len(pairs)
    per_answer = (token_nll[:size].sum(1) / counted[:size].sum(1)).mean().item()
    token_mean = (token_nll[:size].sum() / counted[:size].sum()).item()
    trl_dpo_part = trl_loss - alpha * token_mean           # TRL's loss less its token-mean NLL
    assert ours.mean().item() == pytest.approx(trl_dpo_part + alpha * per_answer, abs=2e-4)
    print(f"TRL sigmoid+sft {trl_loss:.6f}; ours (per-answer NLL) {ours.mean().item():.6f}; "
          f"answer lengths {chosen_counts.tolist()}")


def test_simpo_agrees_with_trl_cpo_simpo(tiny_pairs, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    _, tokenizer, _, model, dataset = tiny_pairs
    beta, gamma = 2.0, 1.0
    config = CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=beta,
                       simpo_gamma=gamma, per_device_train_batch_size=4,
                       per_device_eval_batch_size=4, max_length=192, report_to="none",
                       use_cpu=True, remove_unused_columns=False)
    cpo = CPOTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=dataset,
                     processing_class=tokenizer)
    model = cpo.model
    _move_adapter(model)
    model.eval()
    cpo_batch = next(iter(cpo.get_eval_dataloader()))
    length = max(cpo_batch["chosen_input_ids"].shape[1], cpo_batch["rejected_input_ids"].shape[1])

    def padded(key, value):
        tensor = cpo_batch[key]
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)
    batch = {f"{side}_{part}": padded(f"{side}_{part}", value)
             for side in ("chosen", "rejected")
             for part, value in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0),
                                 ("labels", -100))}
    with torch.no_grad():
        trl_chosen, trl_rejected = cpo.concatenated_forward(model, cpo_batch)[:2]
        trl_losses = cpo.cpo_loss(trl_chosen, trl_rejected)[0]
        chosen, rejected, chosen_counts, rejected_counts = PlainLayout().logps(model, batch)
    chosen, rejected = chosen / chosen_counts, rejected / rejected_counts
    assert torch.allclose(chosen, trl_chosen.float(), atol=1e-4)
    assert torch.allclose(rejected, trl_rejected.float(), atol=1e-4)
    ours = preference_loss(chosen, rejected, None, None, beta, "simpo", simpo_gamma=gamma)[0]
    assert torch.allclose(ours, trl_losses.float(), atol=1e-5)
