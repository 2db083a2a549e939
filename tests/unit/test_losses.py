"""Hand-computed values and naive-equivalence checks for vlpost.train.losses and vlpost.train.logprobs."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlpost.constants import IGNORE_INDEX
from vlpost.train import logprobs as LP
from vlpost.train import losses as L


def naive_token_logprobs(logits, labels):
    """Reference: full log_softmax of the shifted logits, gather, mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.clamp(min=0)[..., None])
    return logp.squeeze(-1) * mask, mask


def random_batch(seed=0, batch=3, steps=6, vocab=11, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, steps, vocab, generator=gen, dtype=dtype) * 3
    labels = torch.randint(0, vocab, (batch, steps), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # a prompt span
    labels[-1, -2:] = IGNORE_INDEX  # right padding
    return logits, labels


# ---------------------------------------------------------------- token log-probs


def test_token_logprobs_equals_naive_log_softmax_gather():
    logits, labels = random_batch()
    logps, mask = LP.token_logprobs(logits, labels)
    ref, ref_mask = naive_token_logprobs(logits, labels)
    assert logps.shape == (3, 5) and logps.dtype == torch.float32
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(logps.double(), ref, atol=1e-6, rtol=0)


def test_token_logprobs_gradient_equals_naive_and_chunking_is_invisible():
    logits, labels = random_batch(seed=1)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    grads = []
    for chunk_elements in (1, 2 * 11, LP.CHUNK_ELEMENTS):  # 1 row, 2 rows, whole sequence per chunk
        x = logits.clone().requires_grad_(True)
        (LP.token_logprobs(x, labels, chunk_elements=chunk_elements)[0] * weights).sum().backward()
        grads.append(x.grad)
    x = logits.clone().requires_grad_(True)
    (naive_token_logprobs(x, labels)[0].float() * weights).sum().backward()
    for grad in grads:
        torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(grads[0][:, -1] == 0)  # the last position predicts nothing


def test_token_logprobs_gradcheck_float64():
    logits, labels = random_batch(seed=3, batch=2, steps=4, vocab=5, dtype=torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: LP.token_logprobs(t, labels, chunk_elements=10)[0], (x,))


def test_token_logprobs_ignores_minus_100_labels():
    logits, labels = random_batch(seed=4)
    logps, mask = LP.token_logprobs(logits, labels)
    # labels[0, :3] ignored -> targets[0, :2] masked (labels[0, 0] is never predicted anyway)
    assert mask[0, :2].tolist() == [False, False] and mask[0, 2]
    assert mask[2, -2:].tolist() == [False, False]
    assert torch.all(logps[~mask] == 0)
    # logits at a position whose target is ignored cannot change anything, nor get a gradient
    x = logits.clone().requires_grad_(True)
    LP.token_logprobs(x, labels)[0].sum().backward()
    assert torch.all(x.grad[0, :2] == 0) and torch.all(x.grad[2, -3:] == 0)
    changed = logits.clone()
    changed[0, :2] += 100.0
    torch.testing.assert_close(LP.token_logprobs(changed, labels)[0], logps)


def test_token_logprobs_bfloat16_matches_float32_of_same_values_and_saves_no_float_copy():
    logits, labels = random_batch(seed=5, batch=2, steps=7, vocab=13, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = LP.token_logprobs(x, labels)
    ref, _ = naive_token_logprobs(logits.float(), labels)
    torch.testing.assert_close(logps.double(), ref, atol=1e-5, rtol=0)
    big = [t for t in saved if t.numel() >= x.numel() // 2]  # anything (B, T, V)-sized
    assert all(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in big)
    logps.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_token_logprobs_rejects_ids_outside_vocab():
    logits, labels = random_batch()
    labels[1, 3] = 11  # vocab is 11
    with pytest.raises(ValueError, match="outside"):
        LP.token_logprobs(logits, labels)


def test_sequence_logprobs_uniform_logits_by_hand():
    logits = torch.zeros(2, 5, 4)  # uniform over 4 tokens: each log-prob is -log 4
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 0, 0, -100, -100]])
    sums, counts = LP.sequence_logprobs(logits, labels)
    assert counts.tolist() == [3, 2]
    torch.testing.assert_close(sums, torch.tensor([-3 * math.log(4), -2 * math.log(4)]))


# ---------------------------------------------------------------- SFT


def test_sft_nll_equals_cross_entropy_on_shifted_tensors():
    logits, labels = random_batch(seed=6)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(LP.sft_nll(logits, labels), expected, atol=1e-6, rtol=1e-6)


def test_sft_nll_sum_accumulates_to_the_big_batch_token_mean():
    logits, labels = random_batch(seed=7, batch=4)
    labels[0, 1:5] = IGNORE_INDEX  # a short sample: 1 token; the others have 3-5
    big = LP.sft_nll(logits, labels)
    parts = [LP.sft_nll_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(4)]
    exact = sum(s for s, _ in parts) / sum(c for _, c in parts)
    torch.testing.assert_close(exact, big)
    per_micro_mean = sum(s / c for s, c in parts) / 4
    assert abs(float(per_micro_mean) - float(big)) > 1e-3  # the bias sft_nll_sum avoids


def test_selected_nll_sum_equals_sft_nll_sum_on_the_label_positions():
    logits, labels = random_batch(seed=5)
    logits.requires_grad_(True)
    mask, targets = LP.label_positions(labels)
    assert mask[:, -1].sum() == 0 and int(mask.sum()) == targets.numel() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    full, _ = LP.sft_nll_sum(logits, labels)
    (grad_full,) = torch.autograd.grad(full, logits)
    picked = LP.selected_nll_sum(logits[mask], targets, chunk_elements=22)  # 2 rows per chunk
    (grad_picked,) = torch.autograd.grad(picked, logits)
    naive = -torch.log_softmax(logits[mask].double(), -1).gather(-1, targets[:, None]).sum()
    assert picked.item() == pytest.approx(naive.item(), abs=1e-5) and picked.item() == pytest.approx(full.item(), abs=1e-5)
    assert torch.allclose(grad_picked, grad_full, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        LP.selected_nll_sum(logits[mask], targets + 100)


def per_sample_nll(logits, labels):
    """Reference: each row's summed NLL and trained-token count, with F.cross_entropy on the shifted tensors."""
    sums, counts = [], []
    for row_logits, row_labels in zip(logits, labels):
        targets = row_labels[1:]
        sums.append(F.cross_entropy(row_logits[:-1].double(), targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        counts.append(int((targets != IGNORE_INDEX).sum()))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_loss_reductions_against_per_sample_cross_entropy(reduction):
    logits, labels = random_batch(seed=8, batch=4, steps=9)
    labels[1, 1:7] = IGNORE_INDEX  # row 1: 2 trained tokens; the others 5-8: the reductions must differ
    mask, targets = LP.label_positions(labels)
    weights, normaliser = LP.loss_weights(labels, reduction=reduction)
    loss = LP.selected_nll_sum(logits[mask], targets, weights=weights) / normaliser
    sums, n = per_sample_nll(logits, labels)
    expected = {"token": sums.sum() / n.sum(),  # every token the same
                "sample": (sums / n).mean(),  # mean of the per-sample token means
                "square": (sums / n.sqrt()).sum() / n.sqrt().sum()}[reduction]  # InternVL 2.5
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    others = {"token": sums.sum() / n.sum(), "sample": (sums / n).mean()}
    for name, value in others.items():
        if name != reduction:
            assert abs(loss.item() - value.item()) > 1e-3, name  # the batch tells the reductions apart


def test_loss_weights_find_the_samples_of_a_packed_row():
    """Packed rows: samples are the segments where position_ids restart at 0 (padding has no trained tokens)."""
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9, 4, -100],   # samples of 2 and 4 trained tokens
                           [-100, -100, 3, -100, -100, -100, -100, -100, -100, -100]])  # 1 token, then padding
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 0, 0, 0, 0, 0, 0, 0]])
    weights, normaliser = LP.loss_weights(labels, positions, "sample")
    assert normaliser == 3 and weights.tolist() == pytest.approx([1 / 2] * 2 + [1 / 4] * 4 + [1.0])
    weights, normaliser = LP.loss_weights(labels, positions, "square")
    assert normaliser == pytest.approx(math.sqrt(2) + 2 + 1)
    assert weights.tolist() == pytest.approx([2 ** -0.5] * 2 + [0.5] * 4 + [1.0])
    weights, normaliser = LP.loss_weights(labels, None, "sample")  # unpacked: a row is one sample
    assert normaliser == 2 and weights.tolist() == pytest.approx([1 / 6] * 6 + [1.0])
    assert LP.loss_weights(labels, positions, "token") == (None, 7.0)
    with pytest.raises(ValueError, match="mean"):
        LP.loss_weights(labels, positions, "mean")


def test_loss_reduction_is_a_key_of_the_align_and_sft_configs():
    from vlpost.config import AlignConfig, SFTConfig, load_config
    from vlpost.train.dpo_config import DPOConfig
    from vlpost.train.sft_objective import SFTObjective

    for config in (AlignConfig, SFTConfig):
        assert load_config(config).train.loss_reduction == "token"  # the default keeps the token mean
        assert load_config(config, overrides=["--train.loss_reduction", "sample"]).train.loss_reduction == "sample"
        with pytest.raises(ValueError, match="train.loss_reduction"):
            load_config(config, overrides=["--train.loss_reduction", "mean"])
    with pytest.raises(BaseException):  # noqa: B017 (draccus exits with a usage error naming the key)
        load_config(DPOConfig, overrides=["--train.loss_reduction", "sample"])
    with pytest.raises(ValueError, match="train.loss_reduction"):
        SFTObjective("mean")


def test_sft_nll_with_no_target_tokens_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = LP.sft_nll(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


# ---------------------------------------------------------------- DPO and Bradley–Terry


def pair(margin, chosen=-10.0, rejected=-12.0):
    """(policy_c, policy_r, ref_c, ref_r) with (pc - rc) - (pr - rr) == margin."""
    t = lambda v: torch.tensor([v])  # noqa: E731
    return t(chosen + margin), t(rejected), t(chosen), t(rejected)


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    losses, chosen_r, rejected_r = L.dpo_loss(*pair(0.0), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-7)  # 0.693147...
    assert chosen_r.item() == 0 and rejected_r.item() == 0


def test_dpo_sigmoid_margin_one_by_hand():
    losses, chosen_r, rejected_r = L.dpo_loss(*pair(1.0), beta=0.1)
    hand = math.log(1 + math.exp(-0.1))  # -log sigmoid(0.1) = 0.644396660...
    assert losses.item() == pytest.approx(hand, abs=1e-6)
    assert hand == pytest.approx(0.6443966600735709)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == 0.0


def test_dpo_label_smoothing_and_robust_by_hand():
    eps, beta = 0.1, 0.1
    nll_pos, nll_neg = math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.1))  # -logsig(+-0.1)
    cdpo = L.dpo_loss(*pair(1.0), beta=beta, label_smoothing=eps)[0]
    assert cdpo.item() == pytest.approx((1 - eps) * nll_pos + eps * nll_neg, abs=1e-6)  # 0.6543...
    robust = L.dpo_loss(*pair(1.0), beta=beta, loss_type="robust", label_smoothing=eps)[0]
    assert robust.item() == pytest.approx(((1 - eps) * nll_pos - eps * nll_neg) / (1 - 2 * eps), abs=1e-6)


def test_ipo_by_hand():
    # margin 1, beta 0.1: (1 - 1/(2*0.1))^2 = (1 - 5)^2 = 16
    assert L.dpo_loss(*pair(1.0, -1.5, -2.0), beta=0.1, loss_type="ipo")[0].item() == pytest.approx(16.0)
    assert L.dpo_loss(*pair(5.0, -1.5, -2.0), beta=0.1, loss_type="ipo")[0].item() == pytest.approx(
        0.0, abs=1e-9
    )


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(*pair(1.0), beta=0.1, loss_type="hinge2")
    with pytest.raises(ValueError, match="ipo"):
        L.dpo_loss(*pair(1.0), beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_dpo_metrics_and_sft_term():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -3.0])
    losses, chosen_r, rejected_r = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # chosen rewards 0.5*[1, 0] = [0.5, 0]; rejected 0.5*[0, 2] = [0, 1]
    m = L.dpo_metrics(pc, pr, chosen_r, rejected_r)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx(0.5)
    assert m["rewards/margin"].item() == pytest.approx(-0.25)  # (0.5 + -1) / 2
    assert m["rewards/accuracy"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-1.5) and m["logps/rejected"].item() == pytest.approx(
        -2.0
    )
    total = L.dpo_with_sft(torch.tensor([1.0, 3.0]), torch.tensor(2.0), alpha=0.5)
    assert total.item() == pytest.approx(2.0 + 0.5 * 2.0)


def test_bt_loss_and_pairwise_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        L.bt_loss(chosen, rejected), torch.tensor([math.log(1 + math.exp(-1)), math.log(2)])
    )
    assert L.bt_loss(chosen, rejected, margin=1.0)[0].item() == pytest.approx(math.log(2))
    assert L.pairwise_accuracy(chosen, rejected).item() == 0.5  # the tie counts as wrong


# ---------------------------------------------------------------- advantages and reward shaping


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    unbiased_std = math.sqrt(4 * 0.5**2 / 3)  # sqrt(1/3), N-1 convention
    a = 0.5 / (unbiased_std + 1e-4)
    torch.testing.assert_close(L.group_advantages(rewards, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(
        L.group_advantages(rewards, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="groups of 3"):
        L.group_advantages(rewards, 3)


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    # group 1: 1 - (0+0+1)/3 = 2/3, 0 - 2/3; group 2: 3 - 5/3, 1 - 7/3, 2 - 2, 2 - 2
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0.0, 0.0])
    torch.testing.assert_close(L.rloo_advantages(rewards, 4), expected)


def test_overlong_penalty_piecewise():
    lengths = torch.tensor([10, 15, 17, 20, 25])
    # max 20, cache 5: 0 up to 15, (15 - L)/5 in (15, 20], -1 beyond
    torch.testing.assert_close(L.overlong_penalty(lengths, 20, 5), torch.tensor([0.0, 0.0, -0.4, -1.0, -1.0]))


def test_dynamic_sampling_mask():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    assert L.dynamic_sampling_mask(rewards, 4).tolist() == [True, False, True]


# ---------------------------------------------------------------- policy loss


def policy_inputs():
    """Two sequences, 2 and 3 completion tokens of T=4, advantages [1, -2]; off-mask values are garbage."""
    logps = torch.tensor([[-0.5, -1.0, 1e4, -1e4], [-0.2, -0.3, -0.4, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    return logps, torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize(
    ("aggregation", "hand"),
    [
        ("sequence_mean", -(1 + -2) / 2),  # mean over sequences of -A_i = 0.5
        ("token_mean", -(1 * 2 + -2 * 3) / 5),  # -(sum A_i n_i) / total tokens = 0.8
        ("constant_norm", -(1 * 2 + -2 * 3) / (2 * 5)),  # / (B * L_max=5) = 0.4
    ],
)
def test_policy_loss_at_ratio_one_is_minus_mean_advantage(aggregation, hand):
    logps, adv, mask = policy_inputs()
    loss, metrics = L.policy_loss(
        logps, logps.detach(), adv, mask, aggregation=aggregation, max_completion_length=5
    )
    assert loss.item() == pytest.approx(hand)
    assert metrics["ratio/mean"].item() == pytest.approx(1.0) and metrics["clip_fraction"].item() == 0.0
    loss.backward()
    assert torch.isfinite(logps.grad).all() and torch.all(logps.grad[mask == 0] == 0)


def test_constant_norm_needs_max_length():
    logps, adv, mask = policy_inputs()
    with pytest.raises(ValueError, match="max_completion_length"):
        L.policy_loss(logps, None, adv, mask, aggregation="constant_norm")


def one_token(ratio, advantage, **kw):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = L.policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


def test_ratio_above_clip_with_positive_advantage_is_clipped_with_zero_gradient():
    loss, grad, metrics = one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert metrics["clip_fraction/high"].item() == 1.0 and metrics["clip_fraction/low"].item() == 0.0
    loss, grad, _ = one_token(1.1, 1.0)  # inside the range: d(-rho A)/d logp = -rho A
    assert loss == pytest.approx(-1.1) and grad == pytest.approx(-1.1)
    loss, grad, metrics = one_token(1.5, -1.0)  # pessimistic min keeps the unclipped term
    assert (
        loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and metrics["clip_fraction"].item() == 0.0
    )
    loss, grad, metrics = one_token(0.5, -1.0)  # below 1 - eps with negative advantage: clipped at 0.8
    assert loss == pytest.approx(0.8) and grad == 0.0 and metrics["clip_fraction/low"].item() == 1.0


def test_clip_higher_is_asymmetric():
    assert one_token(1.25, 1.0)[0] == pytest.approx(-1.2)  # symmetric 0.2 clips
    loss, grad, _ = one_token(1.25, 1.0, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)  # room above 1.2
    assert one_token(0.75, -1.0, eps_low=0.2, eps_high=0.28)[0] == pytest.approx(0.8)  # low side still 0.2


def test_gspo_sequence_ratio_by_hand():
    logps = torch.tensor([[0.1, 0.3, 50.0]], requires_grad=True)  # third token is padding
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = L.policy_loss(
        logps, torch.zeros(1, 3), torch.tensor([1.0]), mask, ratio_level="sequence", eps_high=1.0
    )
    s = math.exp((0.1 + 0.3) / 2)  # exp(mean log-ratio) = 1.2214...
    assert loss.item() == pytest.approx(-s) and metrics["ratio/mean"].item() == pytest.approx(s)
    loss.backward()  # paper: d/dlogp_t of -s A = -s A / |y| for each completion token
    torch.testing.assert_close(logps.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))
    # with GSPO's default eps (3e-4 / 4e-4) the same sequence is clipped at 1.0004: no gradient
    logps.grad = None
    loss, metrics = L.policy_loss(logps, torch.zeros(1, 3), torch.tensor([1.0]), mask, ratio_level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0004) and torch.all(logps.grad == 0)
    assert metrics["clip_fraction/high"].item() == 1.0


def test_gspo_token_form_gradient_equals_paper_sequence_objective():
    gen = torch.Generator().manual_seed(8)
    old = torch.randn(4, 6, generator=gen) * 0.01 - 1
    base = old + torch.randn(4, 6, generator=gen) * 0.01
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3])
    ours = base.clone().requires_grad_(True)
    L.policy_loss(ours, old, adv, mask, ratio_level="sequence", eps_low=3e-3, eps_high=4e-3)[0].backward()
    paper = base.clone().requires_grad_(True)
    s = torch.exp(((paper - old) * mask).sum(-1) / mask.sum(-1))  # (B,), with gradient
    torch.min(s * adv, s.clamp(1 - 3e-3, 1 + 4e-3) * adv).mean().neg().backward()
    torch.testing.assert_close(ours.grad, paper.grad)


def test_k3_kl_zero_at_reference_and_hand_value():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[1, 0]])
    loss, metrics = L.policy_loss(logp, None, torch.tensor([0.0]), mask, ref_logps=logp.clone(), beta=0.5)
    assert loss.item() == 0.0 and metrics["kl"].item() == 0.0
    ref = torch.tensor([[-0.5, 9.0]])  # ref - logp = 0.5 on the completion token
    k3 = math.exp(0.5) - 0.5 - 1  # 0.148721...
    loss, metrics = L.policy_loss(logp, None, torch.tensor([0.0]), mask, ref_logps=ref, beta=0.1)
    assert metrics["kl"].item() == pytest.approx(k3) and loss.item() == pytest.approx(0.1 * k3)
    with pytest.raises(ValueError, match="ref_logps"):
        L.policy_loss(logp, None, torch.tensor([0.0]), mask, beta=0.1)


# ---------------------------------------------------------------- entropy


def test_entropy_by_hand_and_chunked_equals_naive():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e9, -1e9], [5.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    two_way = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # p = [1/4, 3/4]
    hand = (math.log(4) + two_way) / 2
    assert LP.entropy_from_logits(logits, mask).item() == pytest.approx(hand, abs=1e-6)
    big, _ = random_batch(seed=9)
    big_mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    log_p = torch.log_softmax(big, -1)
    naive = (-(log_p.exp() * log_p).sum(-1))[big_mask].mean()
    torch.testing.assert_close(LP.entropy_from_logits(big, big_mask, chunk_elements=1), naive)
