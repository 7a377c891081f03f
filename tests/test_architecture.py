"""The package's layering, read from the source: which package may import which, and no
import cycles between modules (imports inside functions count too: a cycle postponed to call
time is still a cycle for the reader). The README's *Architecture* section states the same."""
from __future__ import annotations

import ast
import pathlib
import sys
from typing import Iterator, NamedTuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "repa_fast"

# The foundation every part may use: the package root, errors, atomic writes, the machine cache
# folder, the commands' help format, the version, the compiled extension. Everything else is a
# "part": a sub-package or a top-level module.
BASE = {"repa_fast", "errors", "atomic_write", "machine_cache", "cli_help", "version", "_C",
        "_build_info"}

# part -> the parts it may import (besides BASE and itself). Lower layers first.
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "ops": {"kernels"},
    "models": {"ops"},
    "transport": {"ops"},
    "diffusion": set(),
    "encoders": set(),
    "vae": set(),
    "data": {"vae"},
    "evaluation": set(),
    "distributed": set(),
    "generation": {"models", "transport", "diffusion", "vae", "data",
                   "training.checkpoint_files"},
    "training": {"kernels", "ops", "models", "transport", "diffusion", "encoders", "vae",
                 "data", "generation", "distributed",
                 # --log-alignment-every: the analysis's metric, inputs and sample reader
                 "analysis.cknna", "analysis.features", "analysis.samples"},
    # the alignment analysis: a checkpoint (as generation loads it), the frozen encoders (as
    # training builds them), the data, the noisy inputs of the model's path / diffusion, and
    # the alignment op's token pooling (its cosine is training's proj_loss); the demo's
    # comparison: its trained encoder's drawing and fitting, generation's pixel conversion,
    # evaluation's Fréchet distance
    "analysis": {"transport", "diffusion", "encoders", "vae", "data", "generation.loading",
                 "training.config", "training.encoders", "ops.alignment_common",
                 "training.demo_encoder", "generation.sample_batch", "evaluation.metrics"},
}
# The commands sit on top and may import any part.
COMMANDS = {"train", "generate", "evaluate", "info", "analyze", "compare"}


class Import(NamedTuple):
    source: str   # importing module, dotted
    target: str   # imported module, dotted
    line: int


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:]) if "." in name else pathlib.Path()
    base = PACKAGE / rel
    return name in ("repa_fast._C",) or base.with_suffix(".py").exists() or \
        (base / "__init__.py").exists()


def imports() -> Iterator[Import]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                    node.func, "id", None)) == "import_module" and node.args and \
                    isinstance(node.args[0], ast.Constant) and \
                    str(node.args[0].value).startswith("repa_fast."):  # importlib, by name
                yield Import(name, node.args[0].value, node.lineno)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "repa_fast":
                        yield Import(name, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base.split(".")[0] != "repa_fast":
                    continue
                for alias in node.names:  # `from x import y` names module x.y when it is one
                    sub = f"{base}.{alias.name}"
                    yield Import(name, sub if is_module(sub) else base, node.lineno)


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "repa_fast"


def allowed(source: str, target: str) -> bool:
    src, dst = part(source), part(target)
    if src == dst or dst in BASE or src in COMMANDS:
        return True
    rules = ALLOWED.get(src)
    if rules is None:
        return False
    return dst in rules or any(target == f"repa_fast.{r}" or target.startswith(f"repa_fast.{r}.")
                               for r in rules if "." in r)


def test_the_source_is_read():
    assert len(list(imports())) > 100, f"no imports read below {PACKAGE}"


def test_every_part_has_a_rule():
    parts = {part(module_name(p)) for p in PACKAGE.rglob("*.py")}
    unknown = parts - BASE - COMMANDS - set(ALLOWED)
    assert not unknown, f"give these parts a place in ALLOWED (and the README): {sorted(unknown)}"


def test_layers():
    wrong = [f"{i.source} (line {i.line}) imports {i.target}"
             for i in imports() if not allowed(i.source, i.target)]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def module_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in imports():
        if i.source == i.target:
            continue
        # a package's __init__ re-exports its children; a child importing a sibling through
        # the package is the normal way in, not a cycle of its own
        if i.source.startswith(i.target + ".") or i.target.startswith(i.source + "."):
            continue
        edges.setdefault(i.source, set()).add(i.target)
    return edges


def test_no_import_cycles():
    found = cycles(module_edges())
    assert not found, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("source,target", [("ops", "models"), ("kernels", "ops"),
                                           ("models", "training")])
def test_the_rules_can_fail(source, target):
    assert not allowed(f"repa_fast.{source}.x", f"repa_fast.{target}.y")


def test_import_module_by_name_counts(tmp_path, monkeypatch):
    (tmp_path / "repa_fast").mkdir()
    (tmp_path / "repa_fast" / "a.py").write_text(
        "import importlib\ndef f():\n    importlib.import_module('repa_fast.b')\n")
    (tmp_path / "repa_fast" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "repa_fast")
    assert cycles(module_edges()) == [["repa_fast.a", "repa_fast.b"]]


def test_cycle_finder_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
