"""Every number a user gives is checked before work starts: each numeric recipe field and each numeric flag of each
command, tried with nan, inf, 0 and a negative value, is either refused with a message naming it, or is a value
this file lists as meaningful (with why). A new numeric field or flag that nobody checked fails here."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from dat_ds.config import ConfigError, RunConfig, load_config
from tests.conftest import REPO

BAD = {"nan": "nan", "inf": "inf", "zero": "0", "negative": "-1"}

# (field, value name) pairs that are meaningful, and why
ALLOWED = {
    ("data.image_size", "zero"): "0: the shard set's native size",
    ("data.workers", "zero"): "0: load in the training process",
    ("data.eval_limit", "zero"): "0: every test sample",
    ("model.drop_rate", "zero"): "no dropout",
    ("attack.eps", "zero"): "eps 0 is clean training through the attack path (a baseline)",
    ("loss.clean_weight", "zero"): "Madry's AT and DAT-FGSM's official loss",
    ("loss.trades_beta", "zero"): "TRADES without its KL term",
    ("smoothing.attack_warmup_epochs", "zero"): "no warm-up",
    ("optim.momentum", "zero"): "plain SGD",
    ("optim.weight_decay", "zero"): "no decay",
    ("optim.c_lower", "zero"): "LALR's tau may reach 0 from below (the official clamp(0, 10))",
    ("optim.warmup_epochs", "zero"): "no warm-up",
    ("optim.betas", "zero"): "beta 0: no moment averaging",
    ("optim.milestones", "zero"): "a decay before the first step",
    ("eval.pgd_step_size", "zero"): "0: 2.5 eps / steps",
    ("train.seed", "zero"): "seed 0",
    ("train.gradient_clipping", "zero"): "0: no clipping",
    ("train.log_every", "zero"): "0: about ten lines an epoch",
    ("train.max_steps_per_epoch", "zero"): "0: a full pass",
    ("train.layer_stats_every", "zero"): "0: off",
    ("checkpoint.every_steps", "zero"): "0: epochs only",
    ("log.every_steps", "zero"): "0: epochs only",
}


def numeric_fields() -> list[str]:
    out = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            scalar = tp in (int, float) or (
                typing.get_origin(tp) is tuple and args and args[0] in (int, float)
            )
            literal_numbers = typing.get_origin(tp) is typing.Literal and all(
                isinstance(a, int) for a in args
            )
            if scalar or literal_numbers:
                out.append(f"{section.name}.{f.name}")
    return out


FIELDS = numeric_fields()


def _override(key: str, raw: str) -> str:
    cfg = RunConfig()
    section, name = key.split(".")
    current = getattr(getattr(cfg, section), name)
    if isinstance(current, tuple):  # a list field: every entry gets the value
        n = max(len(current), 1)
        return f"{key}=[{', '.join([raw] * n)}]"
    return f"{key}={raw}"


def test_the_walk_covers_the_fields():
    assert len(FIELDS) >= 50 and "optim.lr" in FIELDS and "comm.bits" in FIELDS


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("key", FIELDS)
def test_every_numeric_recipe_field_refuses_bad_numbers(key, kind):
    base = REPO / "recipes" / "digits_dat_pgd.toml"
    extra = ['unlabeled.shards="x"'] if key.startswith("unlabeled.") else []
    try:
        load_config(base, [*extra, _override(key, BAD[kind])])
    except ConfigError as e:
        assert key in str(e) or key.split(".")[1] in str(e), f"the message names the field: {e}"
        return
    assert (key, kind) in ALLOWED, (
        f"{key}={BAD[kind]} was accepted: refuse it, or list it in ALLOWED with why"
    )


# ----------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_dir):
    """A run folder with an exported digits model (no training: the flags are refused before it is read)."""
    import json

    import torch

    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "recipes/digits_dat_pgd.toml", [f'data.shards="{digits_dir}"'])
    (run / "recipe.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1, [0.5], [0.25])
    from dat_ds.data.shards import load_index

    export_safetensors(model, cfg, load_index(digits_dir), run / "model.safetensors")
    return run


# command -> (module, base arguments, numeric flags with the kinds that are meaningful)
COMMANDS = {
    "evaluate": ("dat_ds.evaluate", [], {"--eps": set(), "--pgd-steps": set(), "--pgd-step-size": {"zero"},
                 "--pgd-restarts": set(), "--subset": {"zero"}, "--chunk": set(), "--batch": {"zero"},
                 "--seed": {"zero", "negative"}}),
    "certify": ("dat_ds.certify", ["--sigma", "0.25"], {"--sigma": set(), "--N0": set(), "--N": set(),
                "--alpha": set(), "--every": {"zero"}, "--subset": {"zero"}, "--chunk": set(), "--batch": set(),
                "--predict-n": {"zero"}, "--seed": {"zero", "negative"}}),
    "pseudo_label": ("dat_ds.pseudo_label", ["UNL", "OUT"], {"--chunk": set(), "--batch": set(), "--per-shard": set()}),
}  # fmt: skip
CASES = [
    (c, f, k) for c, (_, _, flags) in COMMANDS.items() for f, ok in flags.items() for k in BAD if k not in ok
]


@pytest.mark.parametrize(("command", "flag", "kind"), CASES, ids=[f"{c}{f}={k}" for c, f, k in CASES])
def test_every_numeric_flag_refuses_bad_numbers(command, flag, kind, finished_run, tmp_path, capsys):
    import importlib

    module, base, _ = COMMANDS[command]
    main = importlib.import_module(module).main
    base = [str(tmp_path / b) if b.isupper() else b for b in base]
    if command == "certify" and flag == "--sigma":
        base = []
    argv = [str(finished_run), *base, flag, BAD[kind]]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: an integer flag given "nan"
        rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and "invalid" in err and flag in err
        return
    err = capsys.readouterr().err
    assert rc == 2, f"{command} {flag} {BAD[kind]} was accepted"
    assert err.startswith("dat-ds: error: ") and flag in err, err
