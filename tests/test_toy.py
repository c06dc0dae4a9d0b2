"""dpo_lib.lessons.toy: closed forms of the KL-regularised bandit and the IPO end point of training."""
import math

import pytest
import torch

from dpo_lib.lessons import toy

REWARDS = torch.tensor([1.0, 0.4, 0.0, -0.7], dtype=torch.float64)
REF = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
BETA = 0.5


def test_optimal_policy_beats_random_policies_and_its_value_is_beta_log_z():
    best = toy.optimal_policy(REWARDS, REF, BETA)
    value = toy.objective(best, REWARDS, REF, BETA)
    assert value.item() == pytest.approx(BETA * toy.log_partition(REWARDS, REF, BETA).item())
    others = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((2000,))
    assert (toy.objective(others, REWARDS, REF, BETA) < value).all()
    # J(pi) = beta log Z - beta KL(pi || pi*) for every pi
    gap = BETA * toy.kl(others, best.expand_as(others))
    assert torch.allclose(toy.objective(others, REWARDS, REF, BETA), value - gap, atol=1e-12)


def test_reward_reparameterisation_and_bradley_terry_cancellation():
    best = toy.optimal_policy(REWARDS, REF, BETA)
    recovered = toy.implicit_rewards(best, REF, BETA) + BETA * toy.log_partition(REWARDS, REF, BETA)
    assert torch.allclose(recovered, REWARDS, atol=1e-12)
    implicit = toy.implicit_rewards(best, REF, BETA)
    assert torch.allclose(toy.bradley_terry(implicit), toy.bradley_terry(REWARDS), atol=1e-12)


def test_population_dpo_loss_with_soft_labels_is_minimised_at_the_rlhf_optimum():
    pref = toy.bradley_terry(REWARDS)
    best_logits = torch.log(toy.optimal_policy(REWARDS, REF, BETA)).requires_grad_(True)
    loss = toy.population_loss(best_logits, REF, pref, BETA, "dpo")
    (grad,) = torch.autograd.grad(loss, best_logits)
    assert grad.abs().max() < 1e-12
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-14,
                                  tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = toy.population_loss(logits, REF, pref, BETA, "dpo")
        value.backward()
        return value

    optimizer.step(closure)
    found = torch.softmax(logits.detach(), -1)
    assert torch.allclose(found, toy.optimal_policy(REWARDS, REF, BETA), atol=1e-6)


def test_pair_margins_shape_and_value():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    ref = toy.uniform(3)
    h = toy.pair_margins(logits, ref, torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert torch.allclose(h, torch.tensor([math.log(0.5 / 0.2), math.log(0.3 / 0.5)],
                                          dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_ipo_fixed_point_of_the_three_action_data_set(tau):
    pairs = toy.make_pairs("ab bc ac")
    assert pairs.tolist() == [[0, 1], [1, 2], [0, 2]]
    u = 1 / (3 * tau)       # hand solution: log pi(a)/pi(b) = log pi(b)/pi(c) = 1/(3 tau)
    hand = torch.softmax(torch.tensor([2 * u, u, 0.0], dtype=torch.float64), -1)
    assert torch.allclose(toy.ipo_fixed_point(pairs, toy.uniform(3), tau), hand, atol=1e-12)


def test_two_actions_ipo_reaches_sigmoid_half_over_tau_and_dpo_does_not_stop():
    taus = (0.25, 1.0)
    run = toy.train_toy(toy.make_pairs("ab"), taus=taus, loss_types=("dpo", "ipo"), seeds=1,
                        steps=3000, record_every=500)
    p_a = run.probs[..., 0]                                     # [R, loss, tau, seed]
    for j, tau in enumerate(taus):
        assert p_a[-1, 1, j, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5 / tau)), abs=1e-3)
        margin = run.logits[:, 0, j, 0, 0] - run.logits[:, 0, j, 0, 1]   # DPO's h over time
        assert (margin[1:] > margin[:-1]).all() and margin[-1] > 4 * 0.5 / tau


def test_ipo_three_action_end_point_matches_closed_form():
    pairs = toy.make_pairs("ab bc ac")
    taus = (0.5, 1.0)
    run = toy.train_toy(pairs, taus=taus, loss_types=("ipo",), seeds=10, steps=18_000,
                        record_every=18_000)
    final = run.final_probs()[0].double().mean(1)               # [tau, K]
    for j, tau in enumerate(taus):
        closed = toy.ipo_fixed_point(pairs, toy.uniform(3), tau)
        assert torch.allclose(final[j], closed, atol=0.01), (tau, final[j], closed)


def test_unseen_action_gets_no_gradient_under_a_softmax():
    run = toy.train_toy(toy.make_pairs("ab ba"), taus=(0.1,), ref_probs=toy.uniform(3),
                        seeds=4, steps=2000)
    logits = run.logits[..., :]                                 # [R, loss, tau, seed, K]
    assert torch.equal(logits[..., 2], logits[:1, ..., 2].expand_as(logits[..., 2]))
    total = logits[..., 0] + logits[..., 1]
    assert torch.allclose(total, total[:1].expand_as(total), atol=1e-5)
    assert (run.probs[..., 2] <= 1 / 3 + 1e-6).all()


def test_train_toy_refuses_unknown_loss():
    with pytest.raises(ValueError, match="dpo, cdpo, ipo"):
        toy.train_toy(toy.make_pairs("ab"), taus=(1.0,), loss_types=("slic",), steps=1)
