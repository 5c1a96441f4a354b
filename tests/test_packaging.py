"""A plain (non-editable) install carries everything the commands need: the dat_ds package with its DeepSpeed
configs as package data, and data_prep. Installed with pip into a folder of its own from a copy of the sources, then
run from outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import REPO, VENV_BIN


def test_pip_install_then_convert_and_resolve_from_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # a copy: pip's build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("dat_ds", "data_prep", "ds_configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (site / "dat_ds/ds_configs").glob("*.json")) == sorted(
        p.name for p in (REPO / "ds_configs").glob("*.json")
    )
    assert (site / "data_prep/digits.py").is_file() and (site / "dat_ds/training/phases.py").is_file()

    away = tmp_path / "elsewhere"  # no checkout here or above it
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "data_prep.digits", str(away / "digits")],
        cwd=away, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert (away / "digits/index.json").is_file() and list((away / "digits").glob("train-*.tar"))
    probe = (
        "import dat_ds, data_prep, dat_ds.engine as e\n"
        "from dat_ds.config import load_config\n"
        "e.REPO_ROOT = e.REPO_ROOT / 'no-checkout'  # as if installed from a wheel, far from any checkout\n"
        f"cfg = load_config({str(REPO / 'recipes/digits_dat_pgd.toml')!r}, ['data.shards=\"{away / 'digits'}\"'])\n"
        "print(dat_ds.__file__); print(data_prep.__file__); print(e.resolve_ds_config_path(cfg))\n"
    )
    r = subprocess.run([str(VENV_BIN / "python"), "-c", probe], cwd=away, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    dat_file, prep_file, ds_config = r.stdout.split()
    assert dat_file.startswith(str(site)) and prep_file.startswith(str(site)), r.stdout
    assert ds_config.startswith(str(site / "dat_ds/ds_configs")), r.stdout
    # a console entry point of the install runs
    r = subprocess.run([str(site / "bin/dat-ds-report"), "--help"], cwd=away, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
