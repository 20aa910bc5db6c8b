"""multi_positive_nce against a literal float64 transcription of the spec formula."""

from __future__ import annotations

import math

import pytest
import torch

from radflash.errors import InputError
from radflash.training.losses import multi_positive_nce
from tests.tolerances import tolerance


def _loss_loop(cos: torch.Tensor, owner: list[int], tau: float) -> float:
    """The spec, term by term, in plain Python floats."""
    k_n, j_n = cos.shape
    e = [[math.exp(float(cos[k, j]) / tau) for j in range(j_n)] for k in range(k_n)]
    rows, cols = [], []
    for k in range(k_n):
        g = owner[k]
        rows.append(-math.log(e[k][g] / sum(e[k])))
        others = sum(e[m][g] for m in range(k_n) if owner[m] != g)
        cols.append(-math.log(e[k][g] / (e[k][g] + others)))
    return 0.5 * (sum(rows) / k_n + sum(cols) / k_n)


@pytest.mark.parametrize(("owner", "n_images"), [
    ([0, 1, 2, 3], 4),  # one sentence per image
    ([0, 0, 0, 1, 1, 2, 2, 2, 2, 2], 3),  # many sentences per image
    ([0, 0, 2, 2, 2], 4),  # images 1 and 3 have no sentence: columns only
    ([1], 5),
    ([4, 0, 4, 1, 0, 3, 3, 3, 2, 4, 1], 7),  # unordered owners, images 5 and 6 without sentences
])
@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_matches_literal_formula(owner: list[int], n_images: int, tau: float) -> None:
    cos = torch.rand(len(owner), n_images, dtype=torch.float64) * 2 - 1
    expected = _loss_loop(cos, owner, tau)
    # The loss is a difference of log-sum-exps of logits up to 1/τ: near a small loss the error is
    # absolute, u·(1/τ) per term (cancellation), over sums of up to max(K, J) terms.
    terms = max(len(owner), n_images)
    got = multi_positive_nce(cos, torch.tensor(owner), tau)
    assert float(got) == tolerance(torch.float64, terms=terms, magnitude=1 / tau).approx(expected)
    got32 = multi_positive_nce(cos.float(), torch.tensor(owner), torch.tensor(tau))
    assert float(got32) == tolerance(torch.float32, terms=terms, magnitude=1 / tau).approx(expected)


def test_image_without_sentences_is_only_a_negative() -> None:
    cos = torch.rand(3, 3, dtype=torch.float64)
    owner = torch.tensor([0, 0, 1])
    base = multi_positive_nce(cos, owner, 0.1)
    # raising a sentence's similarity to the sentence-less image 2 can only raise the loss
    bumped = cos.clone()
    bumped[0, 2] += 0.5
    assert multi_positive_nce(bumped, owner, 0.1) > base
    # dropping column 2 entirely lowers the row denominators and leaves the column terms alone
    assert multi_positive_nce(cos[:, :2], owner, 0.1) < base


def test_stable_at_tiny_temperature() -> None:
    cos = torch.rand(6, 4) * 2 - 1
    owner = torch.tensor([0, 1, 1, 2, 3, 3])
    loss = multi_positive_nce(cos, owner, 1e-3)  # exp(1/1e-3) overflows without logsumexp
    assert torch.isfinite(loss)


def test_gradients_in_cos_and_tau() -> None:
    cos = (torch.rand(5, 3, dtype=torch.float64) * 2 - 1).requires_grad_()
    log_tau = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)
    owner = torch.tensor([0, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda c, t: multi_positive_nce(c, owner, t.exp()), (cos, log_tau))


def test_perfect_alignment_gives_small_loss() -> None:
    owner = torch.tensor([0, 0, 1, 2])
    cos = -torch.ones(4, 3)
    cos[torch.arange(4), owner] = 1.0
    assert float(multi_positive_nce(cos, owner, 0.05)) < 1e-6


@pytest.mark.parametrize(("cos", "owner"), [
    (torch.zeros(3), torch.tensor([0, 0, 0])),
    (torch.zeros(3, 2), torch.tensor([0, 1])),
    (torch.zeros(2, 2), torch.tensor([0, 2])),
    (torch.zeros(2, 2), torch.tensor([0.0, 1.0])),
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),
])
def test_bad_shapes_are_input_errors(cos: torch.Tensor, owner: torch.Tensor) -> None:
    with pytest.raises(InputError):
        multi_positive_nce(cos, owner, 0.1)
