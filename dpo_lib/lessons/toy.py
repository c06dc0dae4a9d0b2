"""A discrete "bandit" toy for preference learning: a few actions, a softmax policy, exact sums.

Everything is a tensor over the ``K`` actions (last dimension), float64 unless said otherwise:

* a policy is ``softmax(logits)``; the reference ``ref_probs`` is usually uniform;
* the KL-regularised objective ``J(pi) = E_pi[r] - beta KL(pi || pi_ref)`` is an exact sum, its
  maximiser ``pi* ∝ pi_ref exp(r / beta)`` and its value ``beta log Z`` are closed forms;
* a preference data set is a ``[N, 2]`` LongTensor of ``(chosen, rejected)`` action indices, e.g.
  ``make_pairs("ab bc ac")``; :func:`train_toy` trains one softmax per (loss, tau, seed) on
  mini-batches drawn with replacement, all in one tensor, with ``torch.optim.Adam``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.losses import preference_loss

#: The losses defined on a margin alone (rpo and simpo also need per-token log-probs).
TOY_LOSS_TYPES = ("dpo", "cdpo", "ipo")

ACTION_NAMES = "abcdefgh"


# --------------------------------------------------------------------------------------------
# Policies and the KL-regularised objective
# --------------------------------------------------------------------------------------------

def uniform(num_actions: int) -> torch.Tensor:
    """The uniform policy ``[K]`` (float64)."""
    return torch.full((num_actions,), 1.0 / num_actions, dtype=torch.float64)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_y p(y) log(p(y) / q(y))`` over the last dimension ``[..., K] -> [...]``
    (terms with ``p(y) = 0`` count 0)."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p)).sum(-1)


def objective(probs: torch.Tensor, rewards: torch.Tensor, ref_probs: torch.Tensor,
              beta: float) -> torch.Tensor:
    """``J(pi) = sum_y pi(y) r(y) - beta KL(pi || pi_ref)``; ``probs [..., K] -> [...]``."""
    return (probs * rewards).sum(-1) - beta * kl(probs, ref_probs)


def log_partition(rewards: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """``log Z = log sum_y pi_ref(y) exp(r(y) / beta)`` (a scalar for ``[K]`` inputs)."""
    return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=-1)


def optimal_policy(rewards: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """The maximiser of :func:`objective`: ``pi*(y) = pi_ref(y) exp(r(y) / beta) / Z``, ``[K]``."""
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=-1)


def implicit_rewards(probs: torch.Tensor, ref_probs: torch.Tensor, beta) -> torch.Tensor:
    """``beta log(pi(y) / pi_ref(y))`` per action, ``[..., K]``: the reward DPO reads off a policy."""
    return beta * (torch.log(probs) - torch.log(ref_probs))


def bradley_terry(rewards: torch.Tensor) -> torch.Tensor:
    """``P[i, j] = sigmoid(r_i - r_j)``: the probability that ``i`` is preferred to ``j``, ``[K, K]``."""
    return torch.sigmoid(rewards[:, None] - rewards[None, :])


# --------------------------------------------------------------------------------------------
# Preference data and population losses
# --------------------------------------------------------------------------------------------

def make_pairs(spec: str) -> torch.Tensor:
    """``"ab bc ac"`` -> ``[[0, 1], [1, 2], [0, 2]]``: (chosen, rejected) pairs, ``[N, 2]`` long."""
    pairs = [[ACTION_NAMES.index(w), ACTION_NAMES.index(l)] for w, l in spec.split()]
    return torch.tensor(pairs, dtype=torch.long)


def pair_margins(logits: torch.Tensor, ref_probs: torch.Tensor,
                 chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``h = log pi(w)/pi_ref(w) - log pi(l)/pi_ref(l)`` for ``logits [..., K]`` and index tensors
    ``chosen``, ``rejected`` of shape ``[..., N]`` (or ``[N]``); returns ``[..., N]``."""
    log_ratio = torch.log_softmax(logits, -1) - torch.log(ref_probs).to(logits.dtype)
    shape = log_ratio.shape[:-1] + chosen.shape[-1:]
    return (log_ratio.gather(-1, chosen.expand(shape))
            - log_ratio.gather(-1, rejected.expand(shape)))


def population_loss(logits: torch.Tensor, ref_probs: torch.Tensor, pref: torch.Tensor,
                    beta: float, loss_type: str = "dpo", pair_weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Expected loss over all ordered pairs ``i != j`` with soft labels.

    ``pref [K, K]`` holds ``p(i > j)``; a pair ``{i, j}`` (weight ``pair_weights[i, j]``, default 1
    for every ``i < j``) contributes ``p(i>j) loss(h_ij) + p(j>i) loss(h_ji)``. For ``dpo`` that
    is the cross-entropy ``-p log sigmoid(beta h) - (1-p) log sigmoid(-beta h)``; for ``ipo`` the
    squared loss ``p (h - 1/(2 beta))^2 + (1-p) (-h - 1/(2 beta))^2``. ``logits [K] -> scalar``.
    """
    num = logits.shape[-1]
    i, j = torch.triu_indices(num, num, offset=1)
    weights = torch.ones(len(i), dtype=logits.dtype) if pair_weights is None else pair_weights[i, j]
    h = pair_margins(logits, ref_probs, i, j)
    zeros = torch.zeros_like(h)
    forward, _, _ = preference_loss(h, zeros, zeros, zeros, beta, loss_type)
    backward, _, _ = preference_loss(-h, zeros, zeros, zeros, beta, loss_type)
    p = pref[i, j].to(logits.dtype)
    return (weights * (p * forward + (1 - p) * backward)).sum() / weights.sum()


def ipo_fixed_point(pairs: torch.Tensor, ref_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """The policy minimising the IPO loss averaged over the data set ``pairs [N, 2]``.

    With ``u = log pi - log pi_ref`` the loss ``sum_n (u_w - u_l - 1/(2 tau))^2`` is linear least
    squares in ``u``; the minimum-norm solution (``u`` is defined up to a constant, fixed by
    normalising) gives ``pi ∝ pi_ref exp(u)``. Actions absent from the data keep ``u = 0``.
    Returns ``[K]`` float64.
    """
    num = ref_probs.shape[-1]
    design = torch.zeros(len(pairs), num, dtype=torch.float64)
    design[torch.arange(len(pairs)), pairs[:, 0]] += 1.0
    design[torch.arange(len(pairs)), pairs[:, 1]] -= 1.0
    target = torch.full((len(pairs), 1), 1.0 / (2.0 * tau), dtype=torch.float64)
    u = (torch.linalg.pinv(design) @ target).squeeze(-1)
    return torch.softmax(torch.log(ref_probs.double()) + u, dim=-1)


# --------------------------------------------------------------------------------------------
# Training on sampled mini-batches, vectorised over losses x taus x seeds
# --------------------------------------------------------------------------------------------

@dataclass
class ToyRun:
    """The result of :func:`train_toy`.

    ``logits`` is ``[R, n_loss, n_tau, n_seed, K]`` (float32) recorded at ``steps [R]`` (step 0 is
    the initial policy); ``probs`` is its softmax.
    """
    loss_types: tuple
    taus: tuple
    steps: torch.Tensor
    logits: torch.Tensor
    ref_probs: torch.Tensor
    pairs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    def final_probs(self) -> torch.Tensor:
        """``[n_loss, n_tau, n_seed, K]`` at the last step."""
        return self.probs[-1]

    def rewards(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-set mean implicit rewards ``tau log(pi/pi_ref)`` of the chosen and of the rejected
        actions, each ``[R, n_loss, n_tau, n_seed]``."""
        taus = torch.tensor(self.taus, dtype=torch.float32).view(1, 1, -1, 1, 1)
        per_action = taus * (torch.log_softmax(self.logits, -1)
                             - torch.log(self.ref_probs).float())
        return (per_action[..., self.pairs[:, 0]].mean(-1),
                per_action[..., self.pairs[:, 1]].mean(-1))

    def index(self, loss_type: str, tau: float) -> tuple[int, int]:
        return self.loss_types.index(loss_type), list(self.taus).index(tau)


def train_toy(pairs: torch.Tensor, taus, loss_types=("dpo", "ipo"), seeds: int = 10,
              steps: int = 18_000, lr: float = 0.01, batch_size: int = 9,
              ref_probs: torch.Tensor | None = None, label_smoothing: float = 0.0,
              record_every: int = 100, seed: int = 0) -> ToyRun:
    """Train a softmax policy over ``K`` actions on preference ``pairs [N, 2]`` for every
    (loss type, tau, seed) at once.

    All ``n_loss * n_tau * n_seed`` policies are rows of one ``[n_loss, n_tau, n_seed, K]`` logits
    tensor (float32), initialised to ``log ref_probs`` (default: uniform over the actions in
    ``pairs``); the loss summed over rows gives each row its own gradient, and Adam is per
    coordinate, so this is the same as separate runs. Each step draws ``batch_size`` pairs with
    replacement per row (one ``torch.Generator`` seeded with ``seed``), takes the batch-mean
    :func:`dpo_lib.core.losses.preference_loss` with ``beta = tau`` and makes one Adam step
    (default betas and eps=1e-8). ``label_smoothing`` applies to ``cdpo`` rows. Runs on one
    CPU thread (restored afterwards); 18,000 steps of 2 x 4 x 10 policies take seconds.
    """
    for loss_type in loss_types:
        if loss_type not in TOY_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} has no toy form (rpo and simpo need answer "
                             f"lengths); valid: {', '.join(TOY_LOSS_TYPES)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tensors of a few hundred numbers: threads only cost
    try:
        return _train(pairs, taus, loss_types, seeds, steps, lr, batch_size, ref_probs,
                      label_smoothing, record_every, seed)
    finally:
        torch.set_num_threads(threads)


def _train(pairs, taus, loss_types, seeds, steps, lr, batch_size, ref_probs, label_smoothing,
           record_every, seed) -> ToyRun:
    num = int(pairs.max()) + 1 if ref_probs is None else ref_probs.shape[-1]
    ref_probs = uniform(num) if ref_probs is None else ref_probs.double()
    ref_logps = torch.log(ref_probs).float()
    n_loss, n_tau = len(loss_types), len(taus)
    logits = ref_logps.repeat(n_loss, n_tau, seeds, 1).clone().requires_grad_(True)
    beta = torch.tensor(taus, dtype=torch.float32).view(n_tau, 1, 1)
    optimizer = torch.optim.Adam([logits], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    pairs = pairs.long()
    history, recorded = [logits.detach().clone()], [0]
    block = 500
    for start in range(0, steps, block):
        draws = torch.randint(len(pairs), (min(block, steps - start), n_loss, n_tau, seeds,
                                           batch_size), generator=generator)
        for offset, idx in enumerate(draws):
            chosen, rejected = pairs[idx, 0], pairs[idx, 1]            # [n_loss, n_tau, S, B]
            log_ratio = torch.log_softmax(logits, -1) - ref_logps       # [n_loss, n_tau, S, K]
            chosen_lr = log_ratio.gather(-1, chosen)
            rejected_lr = log_ratio.gather(-1, rejected)
            zeros = torch.zeros_like(chosen_lr)
            total = 0.0
            for k, loss_type in enumerate(loss_types):
                losses, _, _ = preference_loss(
                    chosen_lr[k], rejected_lr[k], zeros[k], zeros[k], beta, loss_type,
                    label_smoothing if loss_type == "cdpo" else 0.0)
                total = total + losses.mean(-1).sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            step = start + offset + 1
            if step % record_every == 0 or step == steps:
                history.append(logits.detach().clone())
                recorded.append(step)
    return ToyRun(tuple(loss_types), tuple(taus), torch.tensor(recorded), torch.stack(history),
                  ref_probs, pairs)
