"""The project files a DVC stage runs: what `dvc.yaml` must list as the stage's code `deps`.

Rule (static, from the source): the CLI entry (pipeline/__init__.py, __main__.py, cli.py and
what they import at module level), the stage module with every import it makes (lazy ones
included: the stage's recipe runs them), and the module-level imports of every library module
reached, transitively. Lazy imports inside library functions are not followed: they are the
optional paths (cli's `cache` sub-commands, the trainer's `--online` mode) that the pipeline never
runs, so editing them must not re-run the stage.

    python tests/stage_deps.py train     # print the list for one stage
    python tests/stage_deps.py --write   # rewrite every stage's code deps in dvc.yaml

A stage named ``COMMAND-SUFFIX`` (``train-sweep``) runs ``python -m pipeline COMMAND``. A stage
that runs a sub-command of the CLI (``probe``: ``python -m pipeline cache probe``) is listed in
``SUBCOMMANDS``; its files are the CLI entry, the imports of that sub-command's function in cli.py
(lazy: they are the command's code) and their module-level imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ["pipeline/__init__.py", "pipeline/__main__.py", "pipeline/cli.py"]
# DVC stages that run a sub-command instead of a stage: stage name -> `python -m pipeline` words
SUBCOMMANDS = {"probe": "cache probe"}


def _module_file(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] not in ("pipeline", "stages"):
        return None
    base = ROOT.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return str(cand.relative_to(ROOT))
    return None


def _imports(path: str, *, lazy: bool, tree: ast.AST | None = None) -> set[str]:
    """Project files imported by one file (module level only unless lazy), or by one node of it."""
    tree = tree or ast.parse((ROOT / path).read_text())
    nodes = ast.walk(tree) if lazy else iter(tree.body)
    found: set[str] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            continue
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package import runs its __init__ too
                f = _module_file(".".join(parts[:i]))
                if f:
                    found.add(f)
    return found


def _subcommand(group: str, name: str) -> ast.FunctionDef:
    """The function in cli.py decorated with ``@{group}_app.command("{name}")``."""
    for node in ast.walk(ast.parse((ROOT / "pipeline/cli.py").read_text())):
        for deco in getattr(node, "decorator_list", []):
            if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "command"
                    and isinstance(deco.func.value, ast.Name) and deco.func.value.id == f"{group}_app"
                    and deco.args and getattr(deco.args[0], "value", None) == name):
                return node
    raise KeyError(f"pipeline/cli.py has no command {group} {name}")


def stage_files(stage: str) -> list[str]:
    """Sorted project files that `python -m pipeline STAGE` (or a sub-command, "cache probe") imports."""
    if " " in stage:
        fn = _subcommand(*stage.split(" ", 1))
        todo = list(ENTRY) + sorted(_imports("pipeline/cli.py", lazy=True, tree=fn))
    else:
        stage_file = f"stages/{stage}.py"
        todo = list(ENTRY) + ["stages/__init__.py", stage_file]
        todo += sorted(_imports(stage_file, lazy=True))
    seen: set[str] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += sorted(_imports(f, lazy=False) - seen)
    return sorted(seen)


def command(stage: str) -> str:
    """The `python -m pipeline` command a dvc.yaml stage runs: its name up to the first "-"
    (`train-sweep` runs `train`), or its sub-command (`probe` runs `cache probe`)."""
    name = stage.split("-", 1)[0]
    return SUBCOMMANDS.get(name, name)


def write_dvc_yaml(path: Path = ROOT / "dvc.yaml") -> None:
    """Replace the code lines (pipeline/, stages/) of every stage's deps with ``stage_files``."""
    out, stage, indent = [], None, None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage = stripped[:-1]
        if stripped.startswith("- ") and stripped[2:].startswith(("pipeline/", "stages/")):
            if indent is None:  # the first code line of this stage: all of them go here
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}- {f}" for f in stage_files(command(stage))]
            continue
        if not stripped.startswith("- "):
            indent = None
        out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_dvc_yaml()
        sys.exit(0)
    for s in sys.argv[1:]:
        print(f"{s}:")
        print("\n".join(f"  - {f}" for f in stage_files(s)))
