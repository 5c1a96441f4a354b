"""The layering rules of docs/architecture.md, checked on the source: the floors (read from the document's table),
no import cycle, no module importing a command, the layering of config / codec / attacks, gradients moved between
ranks only by the transport, run-folder and shard-set file names written only by their owners, and one atomic
write. Static checks over the AST: a rule broken anywhere in dat_ds/, bench/ or data_prep/ fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.test_commands import COMMANDS as EVERY_COMMAND

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "dat_ds"
COMMANDS = {m for m in EVERY_COMMAND if m.startswith("dat_ds.")}  # the training library's commands


def _modname(f: Path) -> str:
    parts = list(f.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*folders: str) -> list[Path]:
    return sorted(f for d in folders for f in (REPO / d).rglob("*.py"))


MODULES = {_modname(f): f for f in _sources("dat_ds")}


def _imports(f: Path) -> set[str]:
    """Every dat_ds module that ``f`` imports (at any depth of the file: lazy imports count too)."""
    m = _modname(f)
    pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
    out: set[str] = set()
    for n in ast.walk(ast.parse(f.read_text())):
        targets: list[str] = []
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in n.names]
        elif isinstance(n, ast.Import):
            targets = [a.name for a in n.names]
        out |= {t for t in targets if t.startswith("dat_ds") and t in MODULES and t != m}
    return out


GRAPH = {m: _imports(f) for m, f in MODULES.items()}


def _floors() -> dict[str, int]:
    """Module -> floor number (0 = ground) from the table in docs/architecture.md."""
    text = (REPO / "docs/architecture.md").read_text()
    table = text[text.index("| floor |") :].split("\n\n")[0].splitlines()[2:]
    floors: dict[str, int] = {}
    for height, row in enumerate(reversed(table)):
        cells = row.split("|")
        for name in re.findall(r"`([a-z_/]+)`", cells[2].split("(")[0] + "".join(cells[2].split(")")[1:])):
            floors[name.rstrip("/")] = height
    return floors


def _floor_of(module: str, floors: dict[str, int]) -> int:
    rel = module.removeprefix("dat_ds.")
    for key in (rel, rel.split(".")[0]):
        if key in floors:
            return floors[key]
    raise AssertionError(f"{module} is on no floor of docs/architecture.md's table: add it to a row")


def test_every_module_is_on_a_floor_and_imports_only_its_floor_or_below():
    floors = _floors()
    assert {"train", "stage", "robust_eval", "engine", "data", "run_folder"} <= set(floors), floors
    upward = []
    for m, deps in GRAPH.items():
        if m in ("dat_ds", "dat_ds.data", "dat_ds.comm", "dat_ds.optim", "dat_ds.training"):
            continue  # package __init__ files re-export their own modules
        for d in deps:
            if d in ("dat_ds.data", "dat_ds.comm", "dat_ds.optim", "dat_ds.training"):
                continue
            if _floor_of(d, floors) > _floor_of(m, floors):
                upward.append(
                    f"{m} (floor {_floor_of(m, floors)}) imports {d} (floor {_floor_of(d, floors)})"
                )
    assert not upward, "imports that reach up a floor:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])


def test_no_module_imports_a_command():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps if d in COMMANDS]
    assert not bad, "commands import library modules only, and nothing imports a command:\n" + "\n".join(bad)


def _third_party(f: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
            out.add(n.module.split(".")[0])
    return out


def test_config_codec_and_attacks_stay_on_their_floor():
    assert not GRAPH["dat_ds.config"], (
        f"config imports nothing of dat_ds, it imports {GRAPH['dat_ds.config']}"
    )
    assert "deepspeed" not in _third_party(PKG / "comm/codec.py"), "the codec is pure torch"
    assert "deepspeed" not in _third_party(PKG / "attacks.py")
    assert not GRAPH["dat_ds.attacks"] & {"dat_ds.engine", "dat_ds.comm.transport", "dat_ds.checkpoint"}


P2P = {
    "isend",
    "irecv",
    "send",
    "recv",
    "batch_isend_irecv",
    "P2POp",
    "all_to_all",
    "all_to_all_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
}


def test_only_the_transport_exchanges_tensors_point_to_point():
    """Gradients move between ranks in comm/transport.py alone: no other module uses point-to-point or
    scatter/all-to-all collectives (the others use all_reduce/broadcast for metrics and decisions)."""
    found = []
    for f in _sources("dat_ds", "bench"):
        if f == PKG / "comm/transport.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(n, ast.Attribute)
                and n.attr in P2P
                and isinstance(n.value, ast.Name)
                and n.value.id in ("dist", "torch")
            ):
                found.append(f"{f.relative_to(REPO)}:{n.lineno}: {n.value.id}.{n.attr}")
    assert not found, "\n".join(found)
    assert "batch_isend_irecv" in (PKG / "comm/transport.py").read_text(), (
        "the check above looks for a real name"
    )


def _constants(path: Path, module: str) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id.isupper()
    }


def _string_uses(f: Path) -> list[tuple[int, str, str]]:
    """(line, text, use) of every string constant of ``f`` that is not a docstring, f-string parts included; use is
    "div" (an operand of ``/``), "arg" (an argument of a call) or "" (anything else: a message, a help text)."""
    tree = ast.parse(f.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    use: dict[int, str] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            use.update({id(n.left): "div", id(n.right): "div"})
        elif isinstance(n, ast.Call):
            use.update({id(a): "arg" for a in n.args if id(a) not in use})
    return [
        (n.lineno, n.value, use.get(id(n), ""))
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def _hits(owner: Path, names: dict[str, str], folders: tuple[str, ...]) -> list[str]:
    """Strings used as paths that spell one of ``names``: ``run / "metrics.jsonl"``, ``"x/metrics.jsonl"``,
    ``open("metrics.jsonl")``, ``run / "checkpoints"``. A message that mentions a file is not a path."""
    found = []
    for f in _sources(*folders):
        if f == owner:
            continue
        for line, text, use in _string_uses(f):
            for name in names.values():
                stem = name.split("{")[0]
                as_file = "." in stem.strip(".")
                hit = (
                    (text == stem and (use == "div" or (use == "arg" and as_file)))
                    or re.search(
                        rf"(^|/){re.escape(stem)}(/|$)" if not as_file else rf"/{re.escape(stem)}", text
                    )
                    and "/" in text
                    and " " not in text
                )
                if hit:
                    found.append(f"{f.relative_to(REPO)}:{line}: {name!r} in {text[:60]!r}")
    return found


def test_run_folder_file_names_appear_only_in_run_folder():
    names = _constants(PKG / "run_folder.py", "dat_ds.run_folder")
    assert {"metrics.jsonl", "model.safetensors", "recipe.json", "COMPLETE"} <= set(names.values())
    found = _hits(PKG / "run_folder.py", names, ("dat_ds", "bench", "data_prep"))
    assert not found, "ask dat_ds.run_folder (RunFolder(...).<file>) instead:\n" + "\n".join(found)


def test_shard_set_file_names_appear_only_in_data_index():
    names = {
        k: v
        for k, v in _constants(PKG / "data/index.py", "dat_ds.data.index").items()
        if k in ("INDEX_NAME", "TEST_FILES", "MEMBERS_SUFFIX")
    }
    assert len(names) == 3, names
    found = _hits(PKG / "data/index.py", names, ("dat_ds", "bench", "data_prep"))
    assert not found, "use dat_ds.data.index's names instead:\n" + "\n".join(found)


def test_the_name_check_finds_a_planted_name(tmp_path, monkeypatch):
    """The two checks above would see a violation: a planted module using a run-folder name is found."""
    planted = REPO / "bench" / "_planted_for_test_architecture.py"
    planted.write_text(
        'from pathlib import Path\n\n\ndef f(run):\n    return Path(run) / "metrics.jsonl", Path(run) / "checkpoints"\n'
    )
    try:
        found = _hits(PKG / "run_folder.py", _constants(PKG / "run_folder.py", ""), ("bench",))
    finally:
        planted.unlink()
    assert any("metrics.jsonl" in h for h in found) and any("'checkpoints'" in h for h in found), found


def test_one_atomic_write():
    """Every replace-into-place goes through run_folder.atomic_path (fsync, rename, fsync of the folder)."""
    found = []
    for f in _sources("dat_ds", "bench", "data_prep"):
        if f == PKG / "run_folder.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                if (n.value.id, n.attr) in (("os", "replace"), ("os", "rename"), ("shutil", "move")):
                    found.append(f"{f.relative_to(REPO)}:{n.lineno}: {n.value.id}.{n.attr}")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "rename":
                found.append(f"{f.relative_to(REPO)}:{n.lineno}: .rename(...)")
    assert not found, "use dat_ds.run_folder.atomic_path / atomic_write:\n" + "\n".join(found)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_have_a_main(command):
    tree = ast.parse(MODULES[command].read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), (
        f"{command} has no main()"
    )
