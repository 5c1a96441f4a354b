"""Shared fixtures: the real digits shards (written once per session) and a helper that starts real ranks
through the stock deepspeed launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory) -> Path:
    """Real photographs (scikit-learn's sample images), cut into 12 JPEGs in 2 classes, train/ and val/."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("inet")
    photos = load_sample_images().images
    for split, n in (("train", 5), ("val", 1)):
        for wnid, photo in zip(("n01440764", "n01443537"), photos, strict=True):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                crop = photo[i * 40 : i * 40 + 300, i * 50 : i * 50 + 400]
                Image.fromarray(crop).save(d / f"{wnid}_{split}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from data_prep.digits import main

    out = tmp_path_factory.mktemp("digits")
    main([str(out)])
    return out


def launch_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp),
        WANDB_CACHE_DIR=str(tmp / "wc"),
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    env.pop("WANDB_API_KEY", None)
    return env


def deepspeed_cmd(
    recipe: str, overrides: list[str], nproc: int = 2, port: int = 29611, extra: list[str] | None = None
) -> list[str]:
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port),
        "--module",
        "dat_ds.train",
        str(REPO / "recipes" / recipe),
    ]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (extra or [])


def run_launcher(
    tmp: Path,
    recipe: str,
    overrides: list[str],
    nproc: int = 2,
    port: int = 29611,
    extra: list[str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        deepspeed_cmd(recipe, overrides, nproc, port, extra),
        cwd=REPO,
        env=launch_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def start(cmd: list[str], tmp: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so ``kill_tree`` can end all of it), output merged into ``stdout``."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launch_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended before {path} appeared: {proc.stdout.read() if proc.stdout else ''}"
            )
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def proc_pids(match) -> list[int]:
    """Pids of live processes whose command line (args joined by spaces) satisfies ``match``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if match(cmd):
                out.append(int(d.name))
    return out


@pytest.fixture(scope="session")
def semisup_digits(digits_dir, tmp_path_factory) -> dict[str, Path]:
    """scikit-learn digits as a semi-supervised task: 30 labels per class (300 images, seed 0), the other 1,137
    training images as an unlabeled set, and that set labelled by a perfect labeller (its hidden labels, confidence
    1) through the pseudo-labelling stage's writer: a pseudo-labelled set to stream in tests."""
    import numpy as np

    from dat_ds.data.shards import load_index
    from dat_ds.pseudo_label import write_labelled_set
    from data_prep.unlabeled import split_labels

    root = tmp_path_factory.mktemp("semisup")
    lab, unl, pseudo = root / "l30", root / "u", root / "pseudo"
    split_labels(digits_dir, lab, unl, per_class=30, seed=0, per_shard=200)
    index = load_index(unl)
    truth = np.load(unl / "heldout_labels.npy")
    table = np.stack([truth.astype(np.float64), np.ones(len(truth))], 1)
    write_labelled_set(index, index.split("train"), table, pseudo, {"labeller": "held-out labels"}, 300)
    return {"labeled": lab, "unlabeled": unl, "pseudo": pseudo}


@pytest.fixture
def labeller_run(tmp_path, semisup_digits):
    """A run folder holding an exported digits CNN (seeded weights, trained 30 SGD steps here on the 300 labels)."""
    import torch

    from dat_ds.config import load_config
    from dat_ds.data.shards import SampleReader, load_index
    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model

    index = load_index(semisup_digits["labeled"])
    cfg = load_config(REPO / "recipes/digits_standard.toml", [f'data.shards="{semisup_digits["labeled"]}"'])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1, index.mean, index.std)
    r = SampleReader(index.split("train"))
    from dat_ds.data.transforms import decode

    x = (
        torch.stack(
            [
                decode(r[i].image, channels=1, augment="none", train=False, image_size=8, rng=None)
                for i in range(300)
            ]
        ).float()
        / 255
    )
    y = torch.tensor([r[i].label for i in range(300)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    run = tmp_path / "labeller"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    export_safetensors(model.eval(), cfg, index, run / "model.safetensors")
    return run


def refused(capsys, rc: int | None, pattern: str) -> str:
    """A command's user-error refusal: exit status 2 and one ``dat-ds: error:`` line matching ``pattern``."""
    import re

    err = capsys.readouterr().err
    assert rc == 2, f"exit status {rc}, not 2; stderr: {err[-500:]}"
    assert "dat-ds: error: " in err and re.search(pattern, err), err[-500:]
    return err


def pytest_terminal_summary(terminalreporter):
    """One loud line for each test whose skip means part of the system was not exercised here (the namespace
    cluster tests without root): a green run must not hide what it did not run."""
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "NOT RUN:" in reason:
            terminalreporter.write_line(
                f"{reason[reason.index('NOT RUN:') :]}: {rep.nodeid}", red=True, bold=True
            )
