"""Starting a run from another run's weights (dat_ds/init_from.py): head swap, input size and channel changes,
refusals that name the tensors, freezing, the head's LR, BatchNorm in eval mode, and a real 2-rank finetune that
resumes its own checkpoint, not the pretraining."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dat_ds.config import ConfigError, load_config
from tests.conftest import REPO, read_metrics, run_launcher

RECIPE = REPO / "recipes/digits_finetune_mnist_dat_pgd.toml"


def _digits_tensors(digits_dir: Path, size: int, classes: int):
    from dat_ds.data.shards import SampleReader, load_index
    from dat_ds.data.transforms import decode

    index = load_index(digits_dir)
    r = SampleReader(index.split("train"))
    xs, ys = [], []
    for i in range(400):
        s = r[i]
        if s.label < classes:
            xs.append(decode(s.image, channels=1, augment="none", train=False, image_size=8, rng=None))
            ys.append(s.label)
    x = torch.stack(xs).float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False), torch.tensor(ys)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, digits_dir) -> Path:
    """A finished 'pretraining' run folder: dat_mnist_cnn trained here for 20 SGD steps on real digit scans
    upscaled to 28 px, classes 0-6 only (7 outputs), exported as a dat-ds run exports it."""
    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model

    run = tmp_path_factory.mktemp("pretrain") / "mnistlike"
    run.mkdir()
    cfg = load_config(RECIPE, [f'data.shards="{digits_dir}"', 'finetune.init_from=""'])
    torch.manual_seed(0)
    model = build_model(cfg.model, 7, 1, [0.13], [0.31])
    x, y = _digits_tensors(digits_dir, 28, 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    export_safetensors(
        model.eval(), cfg, SimpleNamespace(num_classes=7, channels=1), run / "model.safetensors"
    )
    return run


def _cfg(digits_dir, source, *more):
    return load_config(
        RECIPE,
        [f'data.shards="{digits_dir}"', f'finetune.init_from="{source}"', "finetune.reset_head=false", *more],
    )


def test_head_swap_and_resolution_change_load_and_predict(digits_dir, source_run):
    from dat_ds.init_from import apply_init, plan_init
    from dat_ds.models import build_model

    cfg = _cfg(digits_dir, source_run)
    plan = plan_init(cfg, 10, 1)
    assert plan.new == ["fc.weight", "fc.bias"] and sorted(plan.dropped) == ["fc.bias", "fc.weight"]
    src = load_file(str(source_run / "model.safetensors"))
    assert sorted(plan.loaded) == sorted(k for k in src if not k.startswith("fc."))
    assert plan.mean == pytest.approx((0.13,)) and plan.std == pytest.approx(
        (0.31,)
    )  # the source's statistics

    torch.manual_seed(5)
    model = build_model(cfg.model, 10, 1, plan.mean, plan.std)
    fresh_fc = model.net.fc.weight.detach().clone()
    apply_init(model.net, plan)
    own = model.net.state_dict()
    for k in plan.loaded:
        assert torch.equal(own[k], src[k]), k
    assert torch.equal(model.net.fc.weight, fresh_fc), "the new head keeps its seeded initialisation"
    x, y = _digits_tensors(digits_dir, 8, 10)  # 8 px, the finetune's native size
    assert model.eval()(x).shape == (len(y), 10)

    # reset_head: the head starts afresh even where the class counts match
    plan = plan_init(
        load_config(RECIPE, [f'data.shards="{digits_dir}"', f'finetune.init_from="{source_run}"']), 7, 1
    )
    assert plan.new == ["fc.weight", "fc.bias"] and "fc.weight" not in plan.loaded


def test_input_channels_are_adapted_not_refused(digits_dir, source_run):
    from dat_ds.init_from import apply_init, plan_init
    from dat_ds.models import build_model

    with pytest.raises(ConfigError, match='input_stats = "data"'):
        plan_init(_cfg(digits_dir, source_run), 10, 3)  # the source's 1-channel statistics cannot serve 3
    cfg = _cfg(digits_dir, source_run, 'finetune.input_stats="data"')
    plan = plan_init(cfg, 10, 3)
    assert plan.adapted == ["features.0.0.weight"] and plan.mean is None
    model = build_model(cfg.model, 10, 3, [0.5] * 3, [0.25] * 3)
    apply_init(model.net, plan)
    src = load_file(str(source_run / "model.safetensors"))["features.0.0.weight"]
    w = model.net.features[0][0].weight
    assert w.shape[1] == 3 and torch.allclose(
        w.sum(1, keepdim=True), src, atol=1e-6
    )  # a gray image: same output


def test_a_mismatch_beyond_the_head_is_refused_naming_the_tensors(tmp_path, digits_dir, source_run):
    from dat_ds.init_from import plan_init

    tensors = load_file(str(source_run / "model.safetensors"))
    tensors["features.0.1.weight"] = torch.ones(16)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(ConfigError) as e:
        plan_init(_cfg(digits_dir, bad, 'finetune.input_stats="data"'), 10, 1)
    assert "features.0.1.weight [16] -> [32]" in str(e.value)
    with pytest.raises(ConfigError) as e:  # another architecture: its tensors are named, both ways
        plan_init(_cfg(digits_dir, source_run, 'model.name="dat_digits_cnn"'), 10, 1)
    assert "not in the source: features.1.0.weight" in str(e.value) and "features.2.0.weight" in str(e.value)


def test_only_safetensors_are_read(tmp_path, digits_dir, source_run):
    from dat_ds.init_from import plan_init

    pt = tmp_path / "model.pt"
    torch.save(load_file(str(source_run / "model.safetensors")), pt)
    with pytest.raises(ConfigError, match="never unpickles"):
        plan_init(_cfg(digits_dir, pt), 10, 1)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((source_run / "model.safetensors").read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        plan_init(_cfg(digits_dir, torn), 10, 1)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "epoch0001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has not finished"):
        plan_init(_cfg(digits_dir, unfinished), 10, 1)


def test_freezing_and_the_head_lr_shape_the_optimizer(digits_dir, source_run):
    from dat_ds.init_from import apply_init, plan_init
    from dat_ds.models import build_model
    from dat_ds.optim import build_optimizer

    cfg = _cfg(digits_dir, source_run, 'finetune.freeze=["features.0*"]', "finetune.head_lr_scale=10")
    plan = plan_init(cfg, 10, 1)
    assert plan.frozen == ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    model = build_model(cfg.model, 10, 1, plan.mean, plan.std)
    apply_init(model.net, plan)
    opt = build_optimizer(model, cfg.optim, 128, "net.fc", 10.0)
    in_groups = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(id(named[f"net.{k}"]) not in in_groups for k in plan.frozen), (
        "frozen parameters are in no group"
    )
    assert in_groups[id(model.net.fc.weight)] == pytest.approx(
        10 * in_groups[id(model.net.features[2][0].weight)]
    )
    assert in_groups[id(model.net.fc.bias)] == pytest.approx(1.0)  # 0.1 x 10
    with pytest.raises(ConfigError, match=r"\['nope\*'\] match no module"):
        plan_init(_cfg(digits_dir, source_run, 'finetune.freeze=["nope*"]'), 10, 1)


def test_batchnorm_in_eval_mode_keeps_its_statistics(digits_dir):
    from dat_ds.config import ModelConfig
    from dat_ds.models import build_model

    model = build_model(ModelConfig(name="dat_mnist_cnn"), 10, 1, [0.3], [0.4])
    model.bn_eval = True
    model.train()
    bn = model.net.features[0][1]
    before = bn.running_mean.clone()
    x, _ = _digits_tensors(digits_dir, 8, 10)
    model(x)
    assert model.training and not bn.training and torch.equal(bn.running_mean, before)


@pytest.mark.launcher
def test_a_finetune_trains_freezes_and_resumes_itself_not_the_pretraining(tmp_path, digits_dir, source_run):
    """2 ranks through the deepspeed launcher: a 7-class 28 px model finetuned on 10-class 8 px digits with its
    first layer frozen; then, with the pretrained file gone, `--resume auto` continues the finetune."""
    source = tmp_path / "pretrain"
    source.mkdir()
    (source / "model.safetensors").write_bytes((source_run / "model.safetensors").read_bytes())
    common = [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', 'name="ft"', f'finetune.init_from="{source}"',
              'finetune.freeze=["features.0*"]', "finetune.head_lr_scale=10", "train.max_steps_per_epoch=3",
              "data.eval_limit=60", "eval.pgd_steps=2"]  # fmt: skip
    first = run_launcher(tmp_path, RECIPE.name, [*common, "train.epochs=1"], port=29671)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "ft"
    rec = json.loads((run / "init.json").read_text())
    assert rec["new"] == ["fc.weight", "fc.bias"] and len(rec["source_sha256"]) == 64
    assert rec["frozen"] == ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    assert "init: " in first.stdout and "3 parameters frozen" in first.stdout
    src = load_file(str(source / "model.safetensors"))
    out = load_file(str(run / "model.safetensors"))
    for k in rec["frozen"]:
        assert torch.equal(out[k], src[k]), f"{k} is frozen: bit-identical after training"
    assert not torch.equal(out["features.2.0.weight"], src["features.2.0.weight"]), "the rest trains"
    assert out["fc.weight"].shape == (10, 128)

    (
        source / "model.safetensors"
    ).unlink()  # the pretraining moved on: the finetune's checkpoint is what resumes
    second = run_launcher(
        tmp_path, RECIPE.name, [*common, "train.epochs=2"], port=29672, extra=["--resume", "auto"]
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "init: " not in second.stdout
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    out2 = load_file(str(run / "model.safetensors"))
    for k in rec["frozen"]:
        assert torch.equal(out2[k], src[k])
    assert not torch.equal(out2["features.2.0.weight"], out["features.2.0.weight"]), "epoch 2 trained on"


def _write_cifar100(root: Path, digits_dir: Path) -> None:
    """CIFAR-100's python format (``train``, ``test`` with fine_labels), filled with real digit scans."""
    import io
    import pickle

    import numpy as np
    from PIL import Image

    from data_prep.digits import digits_samples

    train, test = digits_samples()
    root.mkdir()

    def batch(samples):
        imgs = [np.asarray(Image.open(io.BytesIO(s.image)).resize((32, 32))) for s in samples]
        data = np.stack([np.stack([i, i, i]) for i in imgs]).reshape(len(imgs), -1)
        return {b"data": data, b"fine_labels": [s.label * 10 + j % 10 for j, s in enumerate(samples)]}

    (root / "train").write_bytes(pickle.dumps(batch(train[:60])))
    (root / "test").write_bytes(pickle.dumps(batch(test[:20])))


def test_imagenet_to_cifar_recipe_pairs_check(tmp_path, digits_dir, capsys):
    """The Fig. 2 pairs: each CIFAR finetune names the ImageNet pretraining run, drops its 1000-class head for a
    10- or 100-class one and passes --check at the paper's node size; its scratch twin differs only in the start
    and in the LR (Salman et al. 2020's finetuning 0.01; from scratch 0.1)."""
    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model
    from dat_ds.train import main
    from data_prep.cifar import main as cifar_main
    from data_prep.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from tests.test_data_prep import write_cifar10

    pre = load_config(REPO / "recipes/imagenet_r50_dat_pgd.toml")
    run = tmp_path / "runs" / pre.name
    run.mkdir(parents=True)
    model = build_model(pre.model, 1000, 3, IMAGENET_MEAN, IMAGENET_STD)
    export_safetensors(model, pre, SimpleNamespace(num_classes=1000, channels=3), run / "model.safetensors")
    write_cifar10(tmp_path / "c10src", digits_dir)
    cifar_main([str(tmp_path / "c10src"), str(tmp_path / "c10")])
    _write_cifar100(tmp_path / "c100src", digits_dir)
    cifar_main([str(tmp_path / "c100src"), str(tmp_path / "c100")])
    for classes in (10, 100):
        ft = load_config(REPO / f"recipes/cifar{classes}_r50_finetune_dat_pgd.toml")
        scratch = load_config(REPO / f"recipes/cifar{classes}_r50_scratch_dat_pgd.toml")
        assert Path(ft.finetune.init_from).name == pre.name and ft.model.name == pre.model.name
        assert not scratch.finetune.init_from
        assert (ft.optim.lr, scratch.optim.lr) == (0.01, 0.1)

        def rest(c):
            d = {k: v for k, v in c.to_dict().items() if k not in ("name", "finetune")}
            d["optim"] = {k: v for k, v in d["optim"].items() if k != "lr"}
            return d

        assert rest(ft) == rest(scratch)
        small = ["--set", f'data.shards="{tmp_path / f"c{classes}"}"', "--set",
                 f'finetune.init_from="{run}"', "--set", "train.micro_batch_size=2", "--set",
                 "train.global_batch_size=12"]  # fmt: skip
        recipe = str(REPO / f"recipes/cifar{classes}_r50_finetune_dat_pgd.toml")
        assert main([recipe, "--check", "--world-size", "6", *small]) == 0
        out = capsys.readouterr().out
        assert "2 new ['fc.bias', 'fc.weight']" in out and "0 adapted" in out, out
