"""dpo_lib.core.losses: hand-computed values, gradients (autograd and finite differences), log-probs."""
import math

import pytest
import torch

from dpo_lib.core import losses
from dpo_lib.core.logps import sequence_logps
from dpo_lib.core.losses import preference_loss, preference_metrics


def _pair(h_policy_chosen=-1.0, h_policy_rejected=-2.0, ref_chosen=-1.5, ref_rejected=-1.5):
    return [torch.tensor([v], dtype=torch.float64)
            for v in (h_policy_chosen, h_policy_rejected, ref_chosen, ref_rejected)]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1.0 for the default pair
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_matches_hand_value(beta):
    loss, chosen, rejected = preference_loss(*_pair(), beta=beta, loss_type="dpo")
    assert loss.item() == pytest.approx(-math.log(_sigmoid(beta * 1.0)), rel=1e-12)
    assert chosen.item() == pytest.approx(beta * 0.5)
    assert rejected.item() == pytest.approx(beta * -0.5)


def test_cdpo_matches_hand_value_and_reduces_to_dpo():
    beta, eps = 0.5, 0.1
    loss, _, _ = preference_loss(*_pair(), beta=beta, loss_type="cdpo", label_smoothing=eps)
    expected = -(1 - eps) * math.log(_sigmoid(beta)) - eps * math.log(_sigmoid(-beta))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    cdpo0, _, _ = preference_loss(*_pair(), beta=beta, loss_type="cdpo", label_smoothing=0.0)
    dpo, _, _ = preference_loss(*_pair(), beta=beta, loss_type="dpo")
    assert cdpo0.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_ipo_matches_hand_value():
    loss, chosen, rejected = preference_loss(*_pair(), beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((1.0 - 5.0) ** 2)        # 1/(2*0.1) = 5
    assert (chosen - rejected).item() == pytest.approx(0.1 * 1.0)


def test_dpo_is_stable_for_large_margins():
    logps = [torch.tensor([v], dtype=torch.float32) for v in (0.0, -200.0, 0.0, 0.0)]
    loss, _, _ = preference_loss(*logps, beta=1.0, loss_type="dpo")
    assert torch.isfinite(loss).all() and loss.item() < 1e-30
    loss_bad, _, _ = preference_loss(*[logps[1], logps[0], logps[2], logps[3]], beta=1.0)
    assert loss_bad.item() == pytest.approx(200.0)


@pytest.mark.parametrize("loss_type,eps", [("dpo", 0.0), ("cdpo", 0.2), ("ipo", 0.0)])
def test_gradients_match_formula_autograd_and_finite_differences(loss_type, eps):
    beta = 0.7
    torch.manual_seed(0)
    values = torch.randn(4, 5, dtype=torch.float64)
    values.requires_grad_(True)
    out, _, _ = preference_loss(*values, beta=beta, loss_type=loss_type, label_smoothing=eps)
    out.sum().backward()
    with torch.no_grad():
        h = (values[0] - values[2]) - (values[1] - values[3])
        if loss_type == "ipo":
            dl_dh = 2 * (h - 1 / (2 * beta))
        else:  # d/dh of -(1-eps) log s(bh) - eps log s(-bh)
            dl_dh = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
    # h depends on the four inputs with signs +, -, -, +
    for row, sign in zip(range(4), (1, -1, -1, 1)):
        assert torch.allclose(values.grad[row], sign * dl_dh, atol=1e-12)
    # finite differences on the chosen policy log-prob
    step = 1e-6
    base = values.detach().clone()
    for k in range(5):
        plus, minus = base.clone(), base.clone()
        plus[0, k] += step
        minus[0, k] -= step
        f = lambda v: preference_loss(*v, beta=beta, loss_type=loss_type,
                                      label_smoothing=eps)[0].sum().item()
        numeric = (f(plus) - f(minus)) / (2 * step)
        assert numeric == pytest.approx(values.grad[0, k].item(), abs=1e-7)


def test_beta_can_be_a_tensor_per_row():
    logps = [torch.zeros(2, 3) for _ in range(4)]
    logps[0] = logps[0] + 1.0
    beta = torch.tensor([[0.1], [1.0]])
    out, chosen, _ = preference_loss(*logps, beta=beta, loss_type="ipo")
    assert out.shape == (2, 3)
    assert torch.allclose(out[0], torch.full((3,), (1 - 5.0) ** 2))
    assert torch.allclose(out[1], torch.full((3,), (1 - 0.5) ** 2))
    assert torch.allclose(chosen[:, 0], beta[:, 0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dpo, cdpo, ipo, rpo, simpo"):
        preference_loss(*_pair(), beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="cdpo"):
        preference_loss(*_pair(), beta=0.1, loss_type="dpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="0.5"):
        preference_loss(*_pair(), beta=0.1, loss_type="cdpo", label_smoothing=0.5)
    with pytest.raises(ValueError, match="positive"):
        preference_loss(*_pair(), beta=0.0, loss_type="ipo")
    assert losses.default_average("ipo") and not losses.default_average("dpo")
    assert losses.default_average("simpo") and not losses.default_average("rpo")
    with pytest.raises(ValueError, match="chosen_token_mean_logps"):
        preference_loss(*_pair(), beta=0.1, loss_type="rpo")
    with pytest.raises(ValueError, match="reference"):
        preference_loss(_pair()[0], _pair()[1], None, None, beta=0.1, loss_type="dpo")


def test_rewards_are_detached_and_loss_keeps_graph():
    logps = [torch.randn(3, requires_grad=True) for _ in range(4)]
    loss, chosen, rejected = preference_loss(*logps, beta=0.1)
    assert loss.requires_grad and not chosen.requires_grad and not rejected.requires_grad


# ------------------------------------------------------------------------------------------
# sequence_logps
# ------------------------------------------------------------------------------------------

def _loop_logps(logits, labels, average):
    """The direct definition: a Python loop over rows and positions."""
    out = []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            total += torch.log_softmax(logits[b, t].double(), -1)[target].item()
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


def _example(dtype=torch.float32, seed=0, batch=3, length=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    labels = torch.randint(vocab, (batch, length), generator=g)
    labels[:, :2] = -100        # a prompt of two tokens
    labels[1, 5:] = -100        # padding in row 1
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_a_direct_loop(average):
    logits, labels = _example()
    got = sequence_logps(logits, labels, average=average)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), _loop_logps(logits, labels, average), atol=1e-5)


def test_sequence_logps_chunked_path_and_gradient(monkeypatch):
    logits, labels = _example(length=9, vocab=13)
    reference = logits.clone().requires_grad_(True)
    shifted = torch.log_softmax(reference[:, :-1], -1)
    mask = labels[:, 1:] != -100
    naive = (shifted.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask)
    naive.sum(-1).pow(2).sum().backward()
    monkeypatch.setattr("dpo_lib.core.logps.CHUNK_ELEMENTS", 13 * 3)     # three positions per chunk
    ours = logits.clone().requires_grad_(True)
    got = sequence_logps(ours, labels)
    got.pow(2).sum().backward()
    assert torch.allclose(got, naive.sum(-1).detach(), atol=1e-5)
    assert torch.allclose(ours.grad, reference.grad, atol=1e-5)
    assert ours.grad[:, -1].abs().max() == 0      # the last position predicts nothing


def test_sequence_logps_gradcheck_float64():
    logits, labels = _example(dtype=torch.float64, batch=2, length=5, vocab=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels, average=True), (logits,))


def test_sequence_logps_bf16_is_computed_in_fp32():
    logits, labels = _example(dtype=torch.bfloat16)
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float32
    expected = _loop_logps(logits.float(), labels, average=False)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    logits.requires_grad_(True)
    sequence_logps(logits, labels).sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_sequence_logps_fully_masked_row_and_shape_errors():
    logits, labels = _example()
    labels[2] = -100
    assert sequence_logps(logits, labels, average=True)[2].item() == 0.0
    assert sequence_logps(logits, labels)[2].item() == 0.0
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        sequence_logps(logits[0], labels[0])


def test_preference_metrics_names_and_values():
    losses_ = torch.tensor([0.5, 1.5])
    chosen, rejected = torch.tensor([0.2, -0.1]), torch.tensor([-0.3, 0.1])
    metrics = preference_metrics(losses_, chosen, rejected, torch.tensor([-10.0, -20.0]),
                                 torch.tensor([-12.0, -22.0]), average=False)
    assert metrics == pytest.approx({
        "loss": 1.0, "rewards/chosen": 0.05, "rewards/rejected": -0.1,
        "rewards/margins": 0.15, "rewards/accuracies": 0.5, "logps/chosen": -15.0,
        "logps/rejected": -17.0, "logps/token_averaged": 0.0})
    assert "eval_rewards/margins" in preference_metrics(losses_, chosen, rejected, chosen,
                                                        rejected, average=True, prefix="eval_")


# rpo: the default pair (h = 1) with the chosen answer's token-mean log-prob -0.25
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_rpo_is_dpo_plus_alpha_times_the_chosen_nll_per_token(alpha):
    beta, mean = 0.5, torch.tensor([-0.25], dtype=torch.float64)
    loss, chosen, rejected = preference_loss(*_pair(), beta=beta, loss_type="rpo",
                                             chosen_token_mean_logps=mean, rpo_alpha=alpha)
    assert loss.item() == pytest.approx(-math.log(_sigmoid(beta * 1.0)) + alpha * 0.25, rel=1e-12)
    assert chosen.item() == pytest.approx(beta * 0.5) and rejected.item() == pytest.approx(-beta * 0.5)


# simpo: token means -1.0 (chosen) and -2.0 (rejected); no reference
def test_simpo_matches_hand_value_and_needs_no_reference():
    beta, gamma = 2.0, 0.5
    chosen_mean, rejected_mean = _pair()[:2]
    loss, chosen, rejected = preference_loss(chosen_mean, rejected_mean, None, None, beta=beta,
                                             loss_type="simpo", simpo_gamma=gamma)
    assert loss.item() == pytest.approx(-math.log(_sigmoid(beta * 1.0 - gamma)), rel=1e-12)
    assert chosen.item() == pytest.approx(-2.0) and rejected.item() == pytest.approx(-4.0)
    # a reference, if given, changes nothing
    with_reference, _, _ = preference_loss(*_pair(), beta=beta, loss_type="simpo",
                                           simpo_gamma=gamma)
    assert with_reference.item() == loss.item()


def test_rpo_and_simpo_gradients_match_formula_and_finite_differences():
    beta, alpha, gamma = 0.7, 0.3, 0.4
    torch.manual_seed(1)
    values = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    # rows: policy chosen, policy rejected, reference chosen, reference rejected, chosen token mean
    rpo, _, _ = preference_loss(*values[:4], beta=beta, loss_type="rpo",
                                chosen_token_mean_logps=values[4], rpo_alpha=alpha)
    simpo, _, _ = preference_loss(values[0], values[1], None, None, beta=beta, loss_type="simpo",
                                  simpo_gamma=gamma)
    grad_rpo = torch.autograd.grad(rpo.sum(), values)[0]
    grad_simpo = torch.autograd.grad(simpo.sum(), values)[0]
    with torch.no_grad():
        h = (values[0] - values[2]) - (values[1] - values[3])
        d_rpo = -beta * torch.sigmoid(-beta * h)
        d_simpo = -beta * torch.sigmoid(-(beta * (values[0] - values[1]) - gamma))
    for row, sign in zip(range(4), (1, -1, -1, 1)):
        assert torch.allclose(grad_rpo[row], sign * d_rpo, atol=1e-12)
    assert torch.allclose(grad_rpo[4], torch.full((6,), -alpha, dtype=torch.float64))
    assert torch.allclose(grad_simpo[0], d_simpo, atol=1e-12)
    assert torch.allclose(grad_simpo[1], -d_simpo, atol=1e-12)
    step, base = 1e-6, values.detach().clone()

    def f(v):
        return preference_loss(v[0], v[1], None, None, beta=beta, loss_type="simpo",
                               simpo_gamma=gamma)[0].sum().item()
    for k in range(6):
        plus, minus = base.clone(), base.clone()
        plus[0, k] += step
        minus[0, k] -= step
        assert (f(plus) - f(minus)) / (2 * step) == pytest.approx(grad_simpo[0, k].item(), abs=1e-7)
