"""The DPO loss against the paper's formula on fixed log-probabilities."""
import math

import pytest
import torch

from aigc.train.common import dpo_loss


def test_dpo_loss_is_the_papers_formula():
    pc, pr = torch.tensor([-10.0, -12.0, -7.5]), torch.tensor([-11.0, -9.0, -7.5])
    rc, rr = torch.tensor([-10.5, -11.0, -8.0]), torch.tensor([-10.0, -10.0, -8.0])
    beta = 0.1
    s = dpo_loss(pc, pr, rc, rr, beta)
    expected = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert s.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert s.chosen_rewards.tolist() == pytest.approx([0.05, -0.1, 0.05])
    assert s.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1, 0.05])
    assert s.margins.tolist() == pytest.approx([0.15, -0.2, 0.0]) and s.accuracy == pytest.approx(1 / 3)
    # at the start (policy = reference) every margin is 0 and the loss is log 2
    assert dpo_loss(rc, rr, rc, rr, 0.5).loss.item() == pytest.approx(math.log(2))
    # the gradient pushes the chosen answer up and the rejected one down
    pc2, pr2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc2, pr2, rc, rr, beta).loss.backward()
    assert (pc2.grad < 0).all() and (pr2.grad > 0).all()
