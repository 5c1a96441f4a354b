"""Every threat model keeps its invariants: ||delta||_inf <= eps, x_adv in [0,1], weights' .grad untouched."""

import pytest
import torch
import torch.nn.functional as F

from dat_ds.attacks import bn_mode, fgsm, pgd
from dat_ds.models import NormalizedModel, SmallCNN


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = NormalizedModel(SmallCNN(num_classes=10, in_chans=1, width=8), [0.3], [0.4])
    return m.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=g)
    x[:4] = 0.0  # corners of the box: the projection must clamp
    x[4:8] = 1.0
    return x, torch.randint(0, 10, (32,), generator=g)


ATTACKS = {
    "pgd": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=7),
    "pgd_restarts": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=3, restarts=3),
    "pgd_no_rand": lambda m, x, y, eps: pgd(m, x, y, eps=eps, step_size=eps / 4, steps=5, rand_init=False),
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps=eps, step_size=1.25 * eps),
}


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("eps", [2 / 255, 0.2])
def test_invariants(model, batch, name, eps):
    x, y = batch
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad.clone() for p in model.parameters()]
    x_adv = ATTACKS[name](model, x, y, eps)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p.grad), "the attack changed a parameter gradient"


def test_no_grad_created_on_fresh_params(model, batch):
    x, y = batch
    pgd(model, x, y, eps=0.1, step_size=0.02, steps=3)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_raises_the_loss(model, batch):
    x, y = batch
    with torch.no_grad():
        model.net.fc.weight.mul_(30)  # a confident model, so the loss surface has somewhere to climb
    clean = F.cross_entropy(model(x), y)
    noise = F.cross_entropy(model((x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)), y)
    adv = F.cross_entropy(model(pgd(model, x, y, eps=0.2, step_size=0.05, steps=10)), y)
    assert adv > max(clean, noise) + 0.3


def test_restarts_never_weaker(model, batch):
    x, y = batch
    torch.manual_seed(3)
    one = (model(pgd(model, x, y, eps=0.1, step_size=0.03, steps=3)).argmax(1) == y).float().mean()
    torch.manual_seed(3)
    five = (
        (model(pgd(model, x, y, eps=0.1, step_size=0.03, steps=3, restarts=5)).argmax(1) == y).float().mean()
    )
    assert five <= one


def test_bn_mode_restores_and_eval_keeps_running_stats(model, batch):
    x, y = batch
    model.train()
    bn = model.net.features[0][1]
    stats = bn.running_mean.clone()
    with bn_mode(model, "eval"):
        assert not model.training
        pgd(model, x, y, eps=0.1, step_size=0.03, steps=3)
    assert model.training and torch.equal(stats, bn.running_mean)
    with bn_mode(model, "train"):
        pgd(model, x, y, eps=0.1, step_size=0.03, steps=3)
    assert not torch.equal(stats, bn.running_mean)
