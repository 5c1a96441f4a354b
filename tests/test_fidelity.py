"""The paper's method as its authors ran it (docs/fidelity.md).

Each paper-scale recipe resolves to the values of the fidelity table (the test reads the table), and the training
step those values configure is checked against the official DAT code's step, written out here from its formulas
(dat-2022/dat ``attack.py``, ``main.py``, ``lamb.py``): the same parameter gradients, the same BatchNorm running
statistics, the same LAMB update.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
import tomllib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dat_ds.config import RunConfig, load_config
from tests.conftest import REPO

DOC = REPO / "docs" / "fidelity.md"
HEADER = "| setting | recipes | paper | reference code | dat-ds default | dat-ds option | why |"


# ------------------------------------------------------------------------------------ the table and the recipes


def _recipe_list(text: str, label: str) -> list[str]:
    para = text.split(label, 1)[1].split("\n\n", 1)[0]
    return re.findall(r"`([a-z0-9_]+)`", para)


def fidelity_rows(text: str) -> list[dict]:
    """Rows of every fidelity table whose setting is a recipe key: key, recipe patterns, expected value."""
    rows, in_table = [], False
    for line in text.splitlines():
        if line.strip() == HEADER:
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 7, f"a fidelity row needs 7 cells: {line}"
        key = re.fullmatch(r"`([a-z_]+\.[a-z0-9_]+)`", cells[0])
        if not key:
            continue  # a documented difference that is not a recipe value
        value = re.match(r"`([^`]+)`", cells[4])
        assert value, f"{cells[0]}: the dat-ds default must be a TOML value in backticks"
        rows.append(
            {
                "key": key.group(1),
                "patterns": re.findall(r"`([^`]+)`", cells[1]),
                "value": tomllib.loads(f"v = {value.group(1)}")["v"],
                "line": line,
            }
        )
    return rows


def resolved(cfg: RunConfig, key: str):
    section, name = key.split(".")
    v = getattr(getattr(cfg, section), name)
    return list(v) if isinstance(v, tuple) else v


def mismatches(rows: list[dict], configs: dict[str, RunConfig]) -> list[str]:
    out = []
    for row in rows:
        hit = [r for r in configs if any(fnmatch.fnmatchcase(r, p) for p in row["patterns"])]
        if not hit:
            out.append(f"{row['key']}: {row['patterns']} names no paper-scale recipe")
        for r in hit:
            got, want = resolved(configs[r], row["key"]), row["value"]
            same = (
                math.isclose(got, want, rel_tol=1e-12, abs_tol=0)
                if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool)
                else got == want
            )
            if not same:
                out.append(f"{r}: {row['key']} = {got!r}, docs/fidelity.md says {want!r}")
    return out


@pytest.fixture(scope="module")
def table():
    text = DOC.read_text()
    paper = _recipe_list(text, "Paper-scale recipes")
    siblings = _recipe_list(text, "Siblings")
    configs = {r: load_config(REPO / "recipes" / f"{r}.toml") for r in paper}
    return text, paper, siblings, configs, fidelity_rows(text)


def test_every_paper_scale_recipe_resolves_to_the_fidelity_table(table):
    text, paper, siblings, configs, rows = table
    assert not mismatches(rows, configs), "\n".join(mismatches(rows, configs))
    # the table is the whole story: every CIFAR/ImageNet recipe is listed, and each paper-scale one is covered
    on_disk = {p.stem for p in (REPO / "recipes").glob("*.toml") if p.stem.startswith(("imagenet_", "cifar"))}
    listed = set(paper) | set(siblings) | set(_recipe_list(text, "Not the paper's"))
    assert on_disk == listed, (
        f"recipes missing from docs/fidelity.md: {on_disk - listed}; gone: {listed - on_disk}"
    )
    for r in paper:
        n = sum(any(fnmatch.fnmatchcase(r, p) for p in row["patterns"]) for row in rows)
        assert n >= 18, f"{r}: only {n} rows of docs/fidelity.md check it"
    for r in siblings:
        assert (
            f"recipes/{r}.toml" in (REPO / "recipes" / f"{r}.toml").read_text()
            or (REPO / "recipes" / f"{r}.toml").is_file()
        )


def test_the_table_test_catches_a_drifted_recipe(table):
    """The check reads values, not just keys: the recipes as they were before 3 December fail it."""
    _, _, _, configs, rows = table
    drifted = dict(configs)
    old = configs["imagenet_r50_dat_pgd"]
    drifted["imagenet_r50_dat_pgd"] = old.replace(
        attack=old.attack.__class__(**{**vars(old.attack), "bn_mode": "train"})
    )
    fgsm = configs["imagenet_r50_dat_fgsm"]
    drifted["imagenet_r50_dat_fgsm"] = fgsm.replace(
        loss=fgsm.loss.__class__(**{**vars(fgsm.loss), "clean_weight": 1.0})
    )
    found = mismatches(rows, drifted)
    assert any("imagenet_r50_dat_pgd: attack.bn_mode = 'train'" in m for m in found)
    assert any("imagenet_r50_dat_fgsm: loss.clean_weight = 1.0" in m for m in found)


# ---------------------------------------------------------- the official training step, written out from its code


class _Net(nn.Module):
    """Conv-BN-ReLU, pooling, linear: BatchNorm in the path, as in the paper's networks."""

    def __init__(self):
        super().__init__()
        # no bias before the BatchNorm: its gradient would be zero up to rounding, where LALR's zero-gradient
        # guard (docs/fidelity.md) departs from the official LAMB on purpose; the paper's networks have none
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def _official_pgd_step(net, x, y, eps, step, steps):
    """``attack.py`` ``PGD.attack`` (mean 0, std 1) then ``main.py``'s loss: eta ~ U(-eps, eps) unclamped,
    ``net.eval()``; each step: gradient at inp + eta, adv = clamp(inp + eta + step sign g, 0, 1),
    eta = clip(adv - inp, eps); finally clamp(inp + eta, 0, 1); ``net.train()``; CE(adv).backward(),
    CE(clean).backward()."""
    eta = torch.FloatTensor(*x.shape).uniform_(-eps, eps)
    net.eval()
    for _ in range(steps):
        adv = (x + eta).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(adv), y), adv)
        adv = torch.clamp(adv.detach() + g.sign() * step, 0, 1)
        eta = torch.clamp(adv - x, -eps, eps)
    adv_inp = torch.clamp(x + eta, 0, 1)
    net.train()
    F.cross_entropy(net(adv_inp), y).backward()
    F.cross_entropy(net(x), y).backward()


def _official_fgsm_step(net, x, y, eps):
    """``main.py``'s ``--fast`` branch: noise ~ U(-eps, eps); in1 = clamp(x + noise, 0, 1) in train mode; the
    noise's gradient; noise = clamp(noise + 1.25 eps sign g, -eps, eps); zero_grad; CE(clamp(x + noise, 0, 1))
    .backward() alone."""
    noise = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
    net.train()
    loss = F.cross_entropy(net((x + noise).clamp(0, 1)), y)
    loss.backward()
    g = noise.grad
    noise = torch.clamp(noise.detach() + 1.25 * eps * g.sign(), -eps, eps)
    net.zero_grad()
    F.cross_entropy(net((x + noise).clamp(0, 1)), y).backward()


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[:, :, :2] = torch.where(x[:, :, :2] > 0.5, 1.0, 0.0)  # saturated pixels, where clamping matters
    return x, torch.randint(0, 10, (16,), generator=g)


def _dat_step(net, x, y, cfg):
    from dat_ds.objectives import dat

    net.train()
    out = dat(net, net, x, y, cfg)
    out.loss.backward()


def _grads_and_stats(net):
    return [p.grad.clone() for p in net.parameters()], [b.clone() for b in net.buffers()]


@pytest.mark.parametrize("recipe", ["imagenet_r50_dat_pgd", "cifar10_preact18_dat_pgd"])
def test_dat_pgd_step_equals_the_official_one(recipe):
    """Gradients and BatchNorm statistics after one step of the faithful recipe's objective equal the official
    code's: the attack runs in eval mode (its forwards leave the running statistics alone), the random start is
    not clamped, and the loss is CE(adv) + CE(clean)."""
    cfg = load_config(REPO / "recipes" / f"{recipe}.toml", ["attack.eps=0.1", "attack.step_size=0.03"])
    x, y = _batch()
    torch.manual_seed(0)
    ref = _Net()
    ours = copy.deepcopy(ref)
    torch.manual_seed(7)
    _official_pgd_step(ref, x, y, 0.1, 0.03, cfg.attack.steps)
    torch.manual_seed(7)
    _dat_step(ours, x, y, cfg)
    (g_ref, s_ref), (g_ours, s_ours) = _grads_and_stats(ref), _grads_and_stats(ours)
    for a, b in zip(g_ref, g_ours, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(s_ref, s_ours, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert int(ours.bn.num_batches_tracked) == 2, "two train-mode forwards: adversarial and clean"
    # the old recipes' train-mode attack fails this: its K attack forwards move the running statistics
    old = load_config(
        REPO / "recipes" / f"{recipe}.toml",
        ["attack.eps=0.1", "attack.step_size=0.03", 'attack.bn_mode="train"', "attack.start_in_box=true"],
    )
    torch.manual_seed(0)
    before = _Net()
    torch.manual_seed(7)
    _dat_step(before, x, y, old)
    assert int(before.bn.num_batches_tracked) == 2 + cfg.attack.steps
    assert not torch.allclose(before.bn.running_mean, ours.bn.running_mean)


@pytest.mark.parametrize("recipe", ["imagenet_r50_dat_fgsm", "cifar10_ti500k_preact18_dat_fgsm"])
def test_dat_fgsm_step_equals_the_official_fast_branch(recipe):
    """The faithful DAT-FGSM recipe's gradient is that of CE(x_adv) alone, x_adv from the official --fast
    branch's attack (train-mode BatchNorm, unclamped start): equal to the official step's."""
    cfg = load_config(REPO / "recipes" / f"{recipe}.toml", ["attack.eps=0.1"])
    x, y = _batch()
    torch.manual_seed(0)
    ref = _Net()
    ours = copy.deepcopy(ref)
    torch.manual_seed(7)
    _official_fgsm_step(ref, x, y, 0.1)
    torch.manual_seed(7)
    _dat_step(ours, x, y, cfg)
    for a, b in zip(_grads_and_stats(ref)[0], _grads_and_stats(ours)[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # with the clean term (the FGSM recipes before 3 December) the gradient is another one
    with_clean = load_config(REPO / "recipes" / f"{recipe}.toml", ["attack.eps=0.1", "loss.clean_weight=1.0"])
    torch.manual_seed(0)
    other = _Net()
    torch.manual_seed(7)
    _dat_step(other, x, y, with_clean)
    assert not torch.allclose(other.fc.weight.grad, ref.fc.weight.grad, atol=1e-4)


def _official_lamb_step(params, state, lr, wd, betas=(0.9, 0.999), eps=1e-6):
    """cybertronai's LAMB as the official ``lamb.py`` (adam=False): no bias correction, ||theta|| clamped to
    [0, 10], weight decay inside the step, trust ratio 1 where a norm is 0."""
    for p in params:
        st = state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        g = p.grad
        st["m"].mul_(betas[0]).add_(g, alpha=1 - betas[0])
        st["v"].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        w_norm = p.data.pow(2).sum().sqrt().clamp(0, 10)
        step = st["m"] / st["v"].sqrt().add(eps) + wd * p.data
        s_norm = step.pow(2).sum().sqrt()
        ratio = 1.0 if w_norm == 0 or s_norm == 0 else w_norm / s_norm
        p.data.add_(step * (-lr * ratio))


@pytest.mark.parametrize("recipe", ["imagenet_r50_dat_pgd_lalr", "cifar10_preact18_dat_pgd"])
def test_lalr_of_the_faithful_recipes_is_the_official_lamb(recipe):
    from dat_ds.optim import build_optimizer

    cfg = load_config(REPO / "recipes" / f"{recipe}.toml")
    torch.manual_seed(0)
    ref = _Net()
    ours = copy.deepcopy(ref)
    with torch.no_grad():
        ours.fc.weight.mul_(40)  # one tensor whose norm exceeds c_u = 10: the clamp matters
        ref.fc.weight.mul_(40)
    opt = build_optimizer(ours, cfg.optim, cfg.train.global_batch_size)
    state: dict = {}
    x, y = _batch()
    for k in range(4):
        for net in (ref, ours):
            net.zero_grad()
            F.cross_entropy(net(x * (k + 1) / 4), y).backward()
        _official_lamb_step(list(ref.parameters()), state, cfg.optim.lr, cfg.optim.weight_decay)
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-7)
    # Adam's bias correction (dat-ds's option) is a different update
    biased = build_optimizer(copy.deepcopy(ref), cfg.optim.__class__(**{**vars(cfg.optim), "bias_correction": True}),
                             cfg.train.global_batch_size)  # fmt: skip
    assert biased.param_groups[0]["bias_correction"] and not opt.param_groups[0]["bias_correction"]


# ------------------------------------------------------------------------------ the other families' options


def test_smoothadv_radius_follows_salmans_warm_up(monkeypatch):
    """Epoch e attacks with min(eps, (e + 1) eps / warmup): the radius the objective hands the attack."""
    import dat_ds.objectives as obj

    cfg = load_config(REPO / "recipes/cifar10_preact18_smooth_s025_n2.toml", ['loss.objective="smoothadv"'])
    s = cfg.smoothing
    assert (s.attack_eps, s.attack_steps, s.attack_warmup_epochs) == (0.25, 10, 10)
    seen = []

    def spy(model, x, y, noise, *, eps, steps):
        seen.append((eps, steps))
        return x

    monkeypatch.setattr(obj, "smooth_adv_l2", spy)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = _batch()
    for epoch in (0, 1, 4, 9, 10, 50):
        obj.smoothadv(net, net, x, y, cfg, epoch=epoch)
    assert [e for e, _ in seen] == pytest.approx([0.025, 0.05, 0.125, 0.25, 0.25, 0.25])
    assert {k for _, k in seen} == {10}


def test_smoothadv_steps_clamp_to_the_box_then_scale_into_the_ball():
    """Salman et al.'s PGD_L2 order: a step, clamp to [0,1], then renorm: the result is in both sets, and for a
    point near the box's corner it differs from projecting onto the ball first."""
    from dat_ds.attacks import smooth_adv_l2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.tensor([[0.99, 0.99, 0.5, 0.5]]).view(1, 1, 2, 2)
    y = torch.tensor([0])
    noise = torch.zeros(2, 1, 2, 2)
    x_adv = smooth_adv_l2(net, x, y, noise, eps=0.5, steps=1)
    d = x_adv - x
    assert d.norm() <= 0.5 + 1e-6 and (x_adv >= 0).all() and (x_adv <= 1).all()


def test_official_models_and_inputs():
    import timm

    import dat_ds.models  # noqa: F401 - registers the networks
    from dat_ds.config import ModelConfig
    from dat_ds.models import build_model, input_stats

    official = timm.create_model("dat_preact_resnet18", num_classes=10)
    assert official.bn is None and sum(isinstance(m, nn.BatchNorm2d) for m in official.modules()) == 16
    r50 = timm.create_model("resnet50", zero_init_last=False)
    assert all(bool((m.bn3.weight == 1).all()) for m in r50.modules() if hasattr(m, "bn3"))
    mean, std = input_stats(ModelConfig(input_norm="none"), 3, [0.5] * 3, [0.2] * 3)
    model = build_model(ModelConfig(name="dat_preact_resnet18", input_norm="none"), 10, 3, mean, std)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model.net(x))


def test_pairs_batching_counts_image_noise_pairs(digits_dir):
    """smoothing.batch_unit = "pairs": a micro-batch of 16 pairs at N = 4 reads 4 images, an epoch takes N times
    the steps, and the objective sees 16 noisy rows."""
    from dat_ds.objectives import gaussian
    from dat_ds.training.plan import make_plan
    from dat_ds.training.step import train_batches

    common = [f'data.shards="{digits_dir}"', 'loss.objective="gaussian"', "smoothing.noise_samples=4",
              "train.micro_batch_size=16", "train.global_batch_size=32"]  # fmt: skip
    images = load_config(REPO / "recipes/digits_dat_pgd.toml", common)
    pairs = load_config(REPO / "recipes/digits_dat_pgd.toml", [*common, 'smoothing.batch_unit="pairs"'])
    p_img, p_pairs = make_plan(images, 2), make_plan(pairs, 2)
    assert (images.images_per_micro, pairs.images_per_micro) == (16, 4)
    assert p_pairs.steps_per_epoch == 1437 // 8 and p_img.steps_per_epoch == 1437 // 32
    x, y = next(iter(train_batches(pairs, p_pairs, 0, 0, 0, 8, False)))
    assert x.shape[0] == 4
    rows = []
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    gaussian(lambda v: rows.append(len(v)) or net(v), net, x.float() / 255, y, pairs)
    assert rows == [16]
    with pytest.raises(Exception, match="multiple of smoothing.noise_samples=3"):
        load_config(REPO / "recipes/digits_dat_pgd.toml", [*common, "smoothing.noise_samples=3",
                                                          'smoothing.batch_unit="pairs"'])  # fmt: skip
