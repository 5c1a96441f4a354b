"""One convention for every command (issue 24): help text on every flag and argument, ``--help`` exits 0, a user
error exits 2 with one ``dat-ds: error:`` line naming what is wrong, before any work; and the console entry points
name real functions. In-process calls of each command's ``main`` (as the entry points call it)."""

from __future__ import annotations

import argparse
import importlib
import tomllib

import pytest

from tests.conftest import REPO, refused

COMMANDS = [
    "dat_ds.train",
    "dat_ds.evaluate",
    "dat_ds.certify",
    "dat_ds.pseudo_label",
    "dat_ds.report",
    "dat_ds.supervise",
    "data_prep.cifar",
    "data_prep.digits",
    "data_prep.folders",
    "data_prep.holdout",
    "data_prep.imagenet",
    "data_prep.members",
    "data_prep.mnist",
    "data_prep.tiny_images",
    "data_prep.unlabeled",
]

# a user error for each command: an input that does not exist, named in the message. MISSING is replaced by a path
# that does not exist, OUT by a fresh folder.
USER_ERRORS = {
    "dat_ds.train": (["MISSING"], r"MISSING"),
    "dat_ds.evaluate": (["MISSING"], r"MISSING"),
    "dat_ds.certify": (["MISSING", "--sigma", "0.25"], r"MISSING"),
    "dat_ds.pseudo_label": (["MISSING", "MISSING", "OUT"], r"MISSING"),
    "dat_ds.report": (["MISSING"], r"MISSING"),
    "dat_ds.supervise": (["--max-restarts", "-1", "--", "true"], r"--max-restarts"),
    "data_prep.cifar": (["MISSING", "OUT"], r"MISSING"),
    "data_prep.digits": (["OUT", "--train-shards", "0"], r"--train-shards"),
    "data_prep.folders": (["MISSING", "OUT"], r"MISSING"),
    "data_prep.holdout": (["MISSING", "OUT", "--n", "10"], r"MISSING"),
    "data_prep.imagenet": (["MISSING", "OUT"], r"MISSING"),
    "data_prep.members": (["MISSING"], r"MISSING"),
    "data_prep.mnist": (["OUT", "--wheel", "MISSING"], r"MISSING"),
    "data_prep.tiny_images": (["MISSING", "OUT"], r"MISSING"),
    "data_prep.unlabeled": (["folder", "MISSING", "OUT"], r"MISSING"),
}


class _Captured(Exception):
    pass


def _parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The command's parser, captured when its ``main`` parses (nothing after that runs)."""

    def capture(self, *a, **k):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        importlib.import_module(module).main([])
    except _Captured as c:
        return c.args[0]
    raise AssertionError(f"{module}.main parsed no arguments")


def _actions(p: argparse.ArgumentParser, where: str = ""):
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        yield where, a
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{where}{name} ")


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_and_argument_has_help(module, monkeypatch):
    p = _parser(module, monkeypatch)
    missing = [
        f"{where}{'/'.join(a.option_strings) or a.dest}"
        for where, a in _actions(p)
        if not a.help or (a.help == argparse.SUPPRESS and a.dest != "local_rank")
    ]
    assert not missing, f"{module}: no help text for {missing}"
    assert p.description, f"{module}: no description"


@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_0(module, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


@pytest.mark.parametrize("module", COMMANDS)
def test_a_user_error_exits_2_with_one_line_naming_it(module, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere but here
    argv, pattern = USER_ERRORS[module]
    missing, out = tmp_path / "no_such_input", tmp_path / "out"
    argv = [str(missing) if x == "MISSING" else str(out) if x == "OUT" else x for x in argv]
    try:
        rc = importlib.import_module(module).main(argv)
    except SystemExit as e:  # argparse's own refusals exit 2 with "usage:" and "error:"
        rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and "error:" in err, err
        return
    err = refused(capsys, rc, pattern.replace("MISSING", "no_such_input"))
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "nothing is written before the input is checked"


def test_unknown_flags_exit_2_everywhere(capsys):
    for module in COMMANDS:
        with pytest.raises(SystemExit) as e:
            importlib.import_module(module).main(["--no-such-flag"])
        assert e.value.code == 2, module
        assert "error:" in capsys.readouterr().err, module


def test_console_entry_points_name_real_commands():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 6
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module in COMMANDS, f"{name}: {module} is not a command"
        assert callable(getattr(importlib.import_module(module), func)), name
