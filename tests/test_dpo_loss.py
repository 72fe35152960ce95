"""The preference losses (with and without a reference model) and their gradients equal the
published formulas, written out here element by element in plain Python floats."""
import math

import pytest
import torch

from engine.dpo_loss import preference_loss, reference_free_loss, reward_metrics, reward_sums, sequence_logps

BETA = 0.5
# (policy chosen, policy rejected, reference chosen, reference rejected): margins of both signs,
# and for the hinge loss pairs on both sides of its kink (beta d = 1).
PAIRS = [(-10.0, -12.0, -11.0, -11.5), (-5.0, -4.0, -5.5, -3.0), (-20.0, -26.0, -21.0, -23.0),
         (-3.0, -3.1, -3.0, -3.0), (-7.0, -2.0, -9.0, -1.0)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def margin(pc, pr, rc, rr) -> float:
    return (pc - pr) - (rc - rr)


# loss(d) and dloss/dd from the papers: DPO (Rafailov et al.) with conservative label smoothing
# eps, IPO (Azar et al.), hinge / SLiC (Zhao et al.).
FORMULAS = {
    ("sigmoid", 0.0): (lambda d: -math.log(sigmoid(BETA * d)), lambda d: -BETA * sigmoid(-BETA * d)),
    ("sigmoid", 0.2): (lambda d: -0.8 * math.log(sigmoid(BETA * d)) - 0.2 * math.log(sigmoid(-BETA * d)),
                       lambda d: -0.8 * BETA * sigmoid(-BETA * d) + 0.2 * BETA * sigmoid(BETA * d)),
    ("ipo", 0.0): (lambda d: (d - 1 / (2 * BETA)) ** 2, lambda d: 2 * (d - 1 / (2 * BETA))),
    ("hinge", 0.0): (lambda d: max(0.0, 1 - BETA * d), lambda d: -BETA if BETA * d < 1 else 0.0),
}


@pytest.mark.parametrize("loss_type, smoothing", sorted(FORMULAS))
def test_loss_and_gradients_match_the_formulas(loss_type, smoothing):
    columns = [torch.tensor(c, dtype=torch.float64) for c in zip(*PAIRS)]
    policy_chosen, policy_rejected = (c.clone().requires_grad_() for c in columns[:2])
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, columns[2], columns[3], BETA, loss_type, smoothing)
    losses.sum().backward()
    loss_of, slope_of = FORMULAS[(loss_type, smoothing)]
    for i, pair in enumerate(PAIRS):
        d = margin(*pair)
        assert losses[i].item() == pytest.approx(loss_of(d), rel=1e-12, abs=1e-12)
        # d rises with the chosen log-prob and falls with the rejected one.
        assert policy_chosen.grad[i].item() == pytest.approx(slope_of(d), rel=1e-12, abs=1e-12)
        assert policy_rejected.grad[i].item() == pytest.approx(-slope_of(d), rel=1e-12, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(BETA * (pair[0] - pair[2]))
        assert rejected_rewards[i].item() == pytest.approx(BETA * (pair[1] - pair[3]))
    if loss_type == "hinge":  # the test data covers both sides of the kink
        assert {BETA * margin(*p) < 1 for p in PAIRS} == {True, False}


# Reference-free: (policy chosen, policy rejected, chosen tokens, rejected tokens), summed
# log-probs of responses of different lengths, mean token margins of both signs.
TOKEN_PAIRS = [(-10.0, -12.0, 5.0, 4.0), (-5.0, -4.0, 10.0, 2.0), (-20.0, -26.0, 40.0, 13.0),
               (-3.0, -3.1, 30.0, 31.0), (-0.2, -9.0, 2.0, 3.0)]
GAMMA = 0.3


def log_odds(a: float) -> float:
    return a - math.log(1 - math.exp(a))


def simpo_terms(pc, pr, nc, nr, eps):
    """SimPO (Meng et al. 2024) with label smoothing eps: loss, d/d pc, d/d pr."""
    m = BETA * (pc / nc - pr / nr) - GAMMA
    slope = -(1 - eps) * sigmoid(-m) + eps * sigmoid(m)  # d loss / d m
    loss = -(1 - eps) * math.log(sigmoid(m)) - eps * math.log(sigmoid(-m))
    return loss, slope * BETA / nc, -slope * BETA / nr


def orpo_terms(pc, pr, nc, nr, eps):
    """ORPO (Hong et al. 2024): chosen mean NLL - lambda log sigmoid(log odds ratio)."""
    a_w, a_l = pc / nc, pr / nr
    z = log_odds(a_w) - log_odds(a_l)
    odds_slope = -BETA * sigmoid(-z)  # d(-lambda log sigmoid z) / dz; d log_odds(a) / da = 1 / (1 - e^a)
    loss = -a_w - BETA * math.log(sigmoid(z))
    return loss, (-1 + odds_slope / (1 - math.exp(a_w))) / nc, -odds_slope / (1 - math.exp(a_l)) / nr


@pytest.mark.parametrize("loss_type, smoothing, terms", [("simpo", 0.0, simpo_terms), ("simpo", 0.2, simpo_terms),
                                                         ("orpo", 0.0, orpo_terms)])
def test_reference_free_losses_and_gradients_match_the_formulas(loss_type, smoothing, terms):
    columns = [torch.tensor(c, dtype=torch.float64) for c in zip(*TOKEN_PAIRS)]
    policy_chosen, policy_rejected = (c.clone().requires_grad_() for c in columns[:2])
    losses, chosen_rewards, rejected_rewards = reference_free_loss(
        policy_chosen, policy_rejected, columns[2], columns[3], BETA, loss_type, GAMMA, smoothing)
    losses.sum().backward()
    for i, (pc, pr, nc, nr) in enumerate(TOKEN_PAIRS):
        loss, d_chosen, d_rejected = terms(pc, pr, nc, nr, smoothing)
        assert losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert policy_chosen.grad[i].item() == pytest.approx(d_chosen, rel=1e-12, abs=1e-12)
        assert policy_rejected.grad[i].item() == pytest.approx(d_rejected, rel=1e-12, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(BETA * pc / nc)
        assert rejected_rewards[i].item() == pytest.approx(BETA * pr / nr)


def test_orpo_stays_finite_for_a_nearly_certain_response():
    """log(1 - exp(a)) at a mean token log-prob of -1e-9 in fp32 (the sequence log-probs' dtype),
    where exp(a) rounds to 1 and log1p(-exp(a)) is -inf: the expm1 form keeps it finite."""
    assert torch.log1p(-torch.exp(torch.tensor(-1e-9))).isinf()
    chosen = torch.tensor([-4e-9], requires_grad=True)
    losses, _, _ = reference_free_loss(chosen, torch.tensor([-8.0]), torch.tensor([4.0]), torch.tensor([4.0]), BETA,
                                       "orpo")
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


def test_reward_metrics_are_means_over_pairs():
    chosen, rejected = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, -1.0, 0.5])
    metrics = reward_metrics(reward_sums(chosen, rejected), 3)
    assert metrics == pytest.approx({"rewards/chosen": -0.5 / 3, "rewards/rejected": -0.5 / 3,
                                     "margin": 0.0, "accuracy": 1 / 3})  # a tie is not ranked right


def test_sequence_logps_sum_only_masked_token_log_probs():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    log_probs = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = torch.stack([log_probs[0, 2:4].sum(), log_probs[1, 1:].sum()])
    torch.testing.assert_close(sequence_logps(token_loss, mask).double(), expected)


def test_unknown_loss_type():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss(one, one, one, one, 0.1, "kto")
    with pytest.raises(ValueError, match="unknown reference-free loss 'sigmoid'"):
        reference_free_loss(one, one, one, one, 0.1, "sigmoid")
