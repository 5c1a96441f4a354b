"""Every recipe under recipes/ takes real steps: trained on 2 ranks through the deepspeed launcher, checkpointed and
exported, each shrunk by overrides only (a tiny shard set in its real format, 2 images a rank, one step, a few test
images). A recipe that cannot start fails here, not on a cluster.

The shard sets come from small files in the formats the recipes name, through their converters: ImageNet's class
tree of JPEG photographs (data_prep.imagenet), CIFAR-10's and CIFAR-100's python batches (data_prep.cifar), RST's
Tiny Images pickle (data_prep.tiny_images), scikit-learn's digits for the digits and MNIST recipes (the MNIST
shards have the same format: 1-channel PNGs). The finetune recipes start from the pretraining recipes' runs, which
run first in the same plan.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, VENV_BIN, launch_env

pytestmark = pytest.mark.launcher

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
FIRST = ["imagenet_r50_dat_pgd", "mnist_pretrain_dat_pgd"]  # the starts of the finetune recipes


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, imagenet_tree, digits_dir, semisup_digits) -> dict:
    from data_prep.cifar import main as cifar
    from data_prep.holdout import main as holdout
    from data_prep.imagenet import main as imagenet
    from data_prep.tiny_images import main as tiny_images
    from tests.test_data_prep import write_cifar10
    from tests.test_finetune import _write_cifar100
    from tests.test_semisup import _ti_file

    d = tmp_path_factory.mktemp("recipe_data")
    imagenet([str(imagenet_tree), str(d / "inet")])
    write_cifar10(d / "c10_batches", digits_dir)
    cifar([str(d / "c10_batches"), str(d / "c10")])
    holdout([str(d / "c10"), str(d / "c10_val"), "--n", "8", "--seed", "0"])  # for recipes that monitor "val"
    _write_cifar100(d / "c100_batches", digits_dir)
    cifar([str(d / "c100_batches"), str(d / "c100")])
    _ti_file(d / "ti.pickle", n=24)
    tiny_images([str(d / "ti.pickle"), str(d / "ti"), "--rst-labels"])
    return {"inet": d / "inet", "c10": d / "c10", "c10_val": d / "c10_val", "c100": d / "c100", "ti": d / "ti", "digits": digits_dir,
            "digits_pseudo": semisup_digits["pseudo"], "digits_l30": semisup_digits["labeled"]}  # fmt: skip


def shrink(recipe: str, data: dict, runs) -> list[str]:
    """The overrides that make ``recipe`` a one-step run on the tiny sets: everything else is the recipe's."""
    from dat_ds.config import load_config

    cfg = load_config(REPO / "recipes" / f"{recipe}.toml")
    micro = 2
    if cfg.smoothing.batch_unit == "pairs" and cfg.loss.objective in ("gaussian", "smoothadv"):
        micro = cfg.smoothing.noise_samples  # one image of N pairs
    o = [f'out_dir="{runs}"', "train.epochs=1", "train.max_steps_per_epoch=1", f"train.micro_batch_size={micro}",
         f"train.global_batch_size={2 * micro}", "data.workers=0", "data.eval_limit=4", "eval.batch_size=4",
         'log.wandb_mode="disabled"', "train.collective_timeout_s=120"]  # fmt: skip
    if recipe.startswith("imagenet_"):
        o += [f'data.shards="{data["inet"]}"', "data.image_size=64"]
    elif recipe.startswith("cifar100_"):
        o += [f'data.shards="{data["c100"]}"']
    elif recipe.startswith("cifar10"):
        o += [f'data.shards="{data["c10_val" if cfg.eval.split == "val" else "c10"]}"']
    elif recipe.startswith("mnist_semisup"):
        o += [
            f'data.shards="{data["digits_l30"]}"',
            f'unlabeled.shards="{data["digits_pseudo"]}"',
            "data.image_size=28",
        ]
    else:  # digits and MNIST recipes: the same shard format (1-channel PNGs)
        o += [f'data.shards="{data["digits"]}"'] + (
            ["data.image_size=28"] if recipe.startswith("mnist_") else []
        )
    if cfg.data.image_size > 64:
        o += ["data.image_size=64"]  # the 224-px transfer recipes: the same crop-and-resize path, smaller
    if cfg.unlabeled.shards and not recipe.startswith("mnist_"):
        o += [f'unlabeled.shards="{data["ti"]}"']
    if cfg.finetune.init_from:
        start = "mnist_pretrain_dat_pgd" if recipe.startswith("digits_") else "imagenet_r50_dat_pgd"
        o += [f'finetune.init_from="{runs / start}"']
    return o


def test_every_recipe_trains_checkpoints_and_exports(tmp_path, shard_sets):
    runs = tmp_path / "runs"
    order = FIRST + [r for r in RECIPES if r not in FIRST]
    plan = {"runs": [[str(REPO / "recipes" / f"{r}.toml"), shrink(r, shard_sets, runs)] for r in order],
            "out": str(tmp_path / "results.json")}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29631", "--module", "tests.recipe_smoke",
         str(tmp_path / "plan.json")],
        cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    results = (
        json.loads((tmp_path / "results.json").read_text()) if (tmp_path / "results.json").is_file() else {}
    )
    failed = [r for r, v in results.items() if v["status"] != "ok"]
    assert proc.returncode == 0 and not failed, (
        f"recipe {failed or '?'} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert sorted(results) == RECIPES
    for r, v in results.items():
        assert v["steps"] == 1 and v["epochs"] == 1, (r, v)
        assert v["checkpoints"] == ["epoch0001"] and v["exported"] and v["replicas_identical"], (r, v)
