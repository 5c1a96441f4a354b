import json
import re

import pytest

from dat_ds.config import ConfigError, load_config
from dat_ds.engine import build_ds_config, gradient_accumulation
from dat_ds.train import main


def recipe(tmp_path, text: str):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown recipe key 'train.epoch'; did you mean 'epochs'"):
        load_config(recipe(tmp_path, '[data]\nshards="x"\n[train]\nepoch = 3\n'))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key 'optimizer'; did you mean 'optim'"):
        load_config(recipe(tmp_path, '[data]\nshards="x"\n[optimizer]\nlr = 3\n'))


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ('[train]\nepochs = "ten"', r"train.epochs must be an integer, got str 'ten'"),
        ("[optim]\nlr = true", r"optim.lr must be a number, got bool"),
        ('[attack]\nmethod = "cw"', r"attack.method='cw' is not one of \['pgd', 'fgsm', 'none'\]"),
        ("[comm]\nbits = 8", r"comm.bits=8 with comm.topology='hpc'"),
        (
            "[optim]\nc_lower = 2.0\nc_upper = 1.0",
            r"optim.c_lower=2.0, optim.c_upper=1.0: 0 <= c_lower <= c_upper",
        ),
        ("[train]\nglobal_batch_size = 100\nmicro_batch_size = 64", "not a multiple of"),
    ],
)
def test_bad_values_are_named(tmp_path, text, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(recipe(tmp_path, '[data]\nshards="x"\n' + text))


def test_overrides_are_typed_and_checked():
    cfg = load_config("recipes/digits_dat_pgd.toml", ["train.epochs=3", "attack.eps=0.1", "name=abc"])
    assert (cfg.train.epochs, cfg.attack.eps, cfg.name) == (3, 0.1, "abc")
    with pytest.raises(ConfigError, match="did you mean 'eps'"):
        load_config("recipes/digits_dat_pgd.toml", ["attack.epsilon=0.1"])


def test_world_size_must_divide_the_batch():
    cfg = load_config("recipes/digits_dat_pgd.toml")
    assert gradient_accumulation(cfg, 1) == 2 and gradient_accumulation(cfg, 2) == 1
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size x world size = 64 x 3"):
        gradient_accumulation(cfg, 3)


def test_ds_config_may_not_restate_the_recipe(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 4096, "zero_optimization": {"stage": 0}}))
    cfg = load_config("recipes/digits_dat_pgd.toml", [f'train.ds_config="{ds}"'])
    with pytest.raises(ConfigError, match="sets train_batch_size; these belong to the recipe"):
        build_ds_config(cfg, 2)


def test_ds_config_batch_comes_from_recipe():
    cfg = load_config("recipes/digits_dat_pgd.toml", ["train.micro_batch_size=32"])
    ds = build_ds_config(cfg, 2)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (128, 32, 2)


def test_compression_refused_under_zero1():
    cfg = load_config(
        "recipes/digits_dat_pgd.toml",
        ['train.ds_config="zero1_bf16.json"', "comm.bits=8", 'comm.topology="ps"'],
    )
    with pytest.raises(ConfigError, match="ZeRO stage 1 cannot carry compressed communication"):
        build_ds_config(cfg, 2)


def test_cli_errors_before_any_rank_work(capsys, tmp_path, digits_dir):
    assert (
        main(
            [
                "recipes/digits_dat_pgd.toml",
                "--check",
                "--set",
                "model.name=resnet9000",
                "--set",
                f'data.shards="{digits_dir}"',
            ]
        )
        == 2
    )
    assert "model.name='resnet9000' is not a timm model" in capsys.readouterr().err
    assert main(["recipes/digits_dat_pgd.toml", "--check", "--set", f'data.shards="{tmp_path}/nope"']) == 2
    assert f"shard folder {tmp_path}/nope does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "recipes/digits_dat_pgd.toml",
                "--check",
                "--world-size",
                "3",
                "--set",
                f'data.shards="{digits_dir}"',
            ]
        )
        == 2
    )
    assert "pick a global batch that is a multiple of 192" in capsys.readouterr().err
    assert (
        main(
            [
                "recipes/digits_dat_pgd.toml",
                "--check",
                "--world-size",
                "2",
                "--set",
                f'data.shards="{digits_dir}"',
            ]
        )
        == 0
    )
    assert "11 steps/epoch" in capsys.readouterr().out


def test_all_recipes_parse():
    from pathlib import Path

    for r in sorted(Path("recipes").glob("*.toml")):
        load_config(r)


def test_paper_recipes_fit_their_clusters():
    for name in (
        "imagenet_r50_dat_pgd",
        "imagenet_r50_dat_fgsm_lalr",
        "imagenet_r50_dat_pgd_lalr_8bit_2sided",
    ):
        cfg = load_config(f"recipes/{name}.toml")
        assert gradient_accumulation(cfg, 36) == 1 and cfg.train.global_batch_size == 36 * 85
        assert (
            cfg.attack.eps == pytest.approx(2 / 255)
            and cfg.train.epochs == 35  # the official code's 5 warm-up epochs before the paper's 30
            and cfg.optim.warmup_epochs == 5
        )
    cifar = load_config("recipes/cifar10_preact18_dat_pgd.toml")
    assert gradient_accumulation(cifar, 12) == 4 and cifar.attack.eps == pytest.approx(8 / 255)


BAD_VALUES = [
    ("checkpoint.every_epochs=0", "checkpoint.every_epochs=0 must be >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("eval.every_epochs=0", "eval.every_epochs=0 must be >= 1"),
    ("eval.pgd_steps=0", "eval.pgd_steps=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("eval.pgd_restarts=0", "eval.pgd_restarts=0 must be >= 1"),
    ("train.max_steps_per_epoch=-5", "train.max_steps_per_epoch=-5 must be >= 0"),
    ("attack.eps=8", r"attack.eps=8.0 must be in \[0, 1\]: pixels are in \[0,1\]"),
    ("attack.step_size=2", r"attack.step_size=2.0 must be in \(0, 1\]"),
    ("eval.pgd_step_size=3", r"eval.pgd_step_size=3.0 must be in \[0, 1\]"),
    ("optim.momentum=1.5", r"optim.momentum=1.5 must be in \[0, 1\)"),
    ("comm.bucket_mb=0", "comm.bucket_mb=0.0 must be > 0"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_out_of_range_values_are_refused_by_check(override, message, digits_dir, capsys):
    from dat_ds.train import main

    rc = main(
        ["recipes/digits_dat_pgd.toml", "--check", "--set", f'data.shards="{digits_dir}"', "--set", override]
    )
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert err.count("\n") == 1, "one line"


def test_global_batch_larger_than_the_split(digits_dir, capsys):
    from dat_ds.train import main

    args = ["--set", f'data.shards="{digits_dir}"', "--set", "train.global_batch_size=4096"]
    assert main(["recipes/digits_dat_pgd.toml", "--check", *args]) == 2
    assert "fewer than one global batch of 4096" in capsys.readouterr().err
