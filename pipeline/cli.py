"""The command line: ``python -m pipeline STAGE [--flag value ...]``.

Each stage command is generated from its config dataclass (one flag per field, the dataclass
holds the default, enum fields list their choices in ``--help``), so the CLI, ``params.yaml`` and
the library cannot drift apart. A command only parses flags, builds the config and calls
``stages.<name>.run(cfg)``. Stages are registered by name: running one imports only its own
config and recipe (``_StageGroup``), so no stage's code is a dependency of another's, and
``--help`` stays fast. ``UserError`` becomes one line on stderr and exit 2; SIGINT / SIGTERM one
``error: interrupted`` line saying what the stage kept (its ``interrupted(cfg)``), exit 130 / 143.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import signal
import sys
import threading
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from pipeline.core.config import comma_tuple, field_help, parse_float
from pipeline.core.errors import UserError

# name -> (config class "module:Class", stage module, one-line help). Nothing is imported here.
STAGES: dict[str, tuple[str, str, str]] = {
    "prepare": ("pipeline.data.config:PrepareConfig", "stages.prepare",
                "Raw dataset (IDX, CIFAR pickles, image folder, npz) -> webdataset shards + fingerprint."),
    "diffusion": ("pipeline.diffusion.config:DiffusionConfig", "stages.diffusion",
                  "Train a small class-conditional DDPM on the real shards, or point at an existing UNet (--pretrained)."),
    "generate": ("pipeline.generate.config:GenerateConfig", "stages.generate",
                 "Diffusion model -> labelled synthetic images as webdataset shards + sample grid PNG."),
    "extract": ("pipeline.cache.config:ExtractConfig", "stages.extract",
                "Shards + diffusion model -> sharded Zarr feature cache (K views per sample, resumable)."),
    "train": ("pipeline.train.config:TrainConfig", "stages.train",
              "Feature cache (+ the image shards it names) -> adversarially trained classifier with DRA."),
    "evaluate": ("pipeline.evaluate.config:EvaluateConfig", "stages.evaluate",
                 "Checkpoint + test shards -> clean, PGD and AutoAttack accuracy (JSON, with sanity checks)."),
    "report": ("pipeline.report.config:ReportConfig", "stages.report",
               "Evaluation and training results -> Markdown table + PNG plots comparing the variants."),
    "bench": ("pipeline.bench.config:BenchConfig", "stages.bench",
              "Measure what the cache saves (extract, training steps, reader, memory, 2 processes) -> table + JSON."),
}


def config_class(stage: str) -> type:
    module, _, name = STAGES[stage][0].partition(":")
    return getattr(importlib.import_module(module), name)


def _flags(cls: type) -> list[tuple[str, str, Any, Any, str]]:
    """(flag name, dotted field path, type, default, help) for every field, nested dataclasses
    flattened. The help is the field's ``# comment`` in its config.py (``field_help``); an enum field
    adds what each choice means, a nested field its parent's comment."""
    hints, notes = typing.get_type_hints(cls), field_help(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ, default, note = hints[f.name], getattr(cls(), f.name), notes.get(f.name, "")
        if dataclasses.is_dataclass(typ):
            out += [(f"{f.name}_{n}", f"{f.name}.{p}", t, d, "; ".join(filter(None, (h, note))))
                    for n, p, t, d, h in _flags(typ)]
            continue
        if isinstance(default, Enum):  # what each choice means, from the enum's own comments
            members = field_help(type(default))
            note = "; ".join(filter(None, [note, *(f"{m.value}: {members[m.name]}" for m in type(default)
                                                   if members.get(m.name))]))
        out.append((f.name, f.name, typ, default, note))
    return out


def _cli_type(typ: Any, default: Any) -> tuple[Any, Any]:
    """Map a dataclass field type to what Typer can parse (tuples become comma lists)."""
    if typing.get_origin(typ) is tuple:
        return str, ",".join(map(str, default))
    if isinstance(default, Enum):
        return type(default), default.value
    return typ, default


def _to_field(typ: Any, value: Any, name: str) -> Any:
    if typing.get_origin(typ) is tuple:
        return comma_tuple(value, typing.get_args(typ)[0], name)
    return typ(value) if isinstance(typ, type) and issubclass(typ, Enum) else value


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """Values keyed by flag name -> a config instance (nested dataclasses rebuilt)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            sub = {k[len(f.name) + 1:]: v for k, v in values.items() if k.startswith(f.name + "_")}
            kwargs[f.name] = build_config(typ, sub)
        elif f.name in values:
            kwargs[f.name] = _to_field(typ, values[f.name], f.name)
    return cls(**kwargs)


# exit status of a run stopped by a signal: 128 + its number, what a shell reports for a killed process
INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread by the handlers ``main`` installs.

    Important: not a KeyboardInterrupt. Under ``standalone_mode=False`` typer catches that and
    *returns* ``Exit(130)`` as a value, so ``main`` never saw the interrupt and the run exited 0.
    A BaseException also passes every ``except Exception`` of the library, like KeyboardInterrupt.
    """

    def __init__(self, signum: int, kept: str = "") -> None:
        super().__init__(signum, kept)
        self.signum, self.kept = signum, kept


def _interrupt(signum: int, _frame: Any) -> None:
    for sig in INTERRUPT_EXIT:  # a second signal during the clean-up stops the process outright
        signal.signal(sig, signal.SIG_DFL)
    raise Interrupted(signum)


def _nothing_kept(cfg: Any) -> str:
    return f"{cfg.out} was not finished; rerun the same command"


def run_stage(module: str, cfg: Any) -> Any:
    """Run a stage; an interrupt leaves with the stage's own account of what it kept."""
    recipe = importlib.import_module(module)
    try:
        return recipe.run(cfg)
    except (Interrupted, KeyboardInterrupt) as exc:
        kept = getattr(recipe, "interrupted", _nothing_kept)(cfg)
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), kept) from None


def _float_flag(name: str) -> Callable[[Any], float]:
    """Every float flag takes a number or a fraction a/b (``--eps 8/255``); bad input is click's one
    line, naming the flag."""
    def parse(value: Any) -> float:
        try:
            return parse_float(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'--{name.replace('_', '-')}'") from None

    return parse


def _make_command(cls: type, module: str) -> Callable[..., None]:
    params = []
    for name, _path, typ, default, note in _flags(cls):
        cli_typ, cli_default = _cli_type(typ, default)
        # "N|all": a count or every distinct view (extract's --views, --views-synthetic)
        metavar = "N|all" if name.startswith("views") and typ is str else None
        option = typer.Option(help=note, metavar=metavar, parser=_float_flag(name) if cli_typ is float else None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=cli_default,
                                        annotation=Annotated[cli_typ, option]))

    def command(**values: Any) -> None:
        run_stage(module, build_config(cls, values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def stage_command(stage: str) -> click.Command:
    """The click command of one stage, built from its config class (imported now, not before)."""
    _cls_path, module, help_text = STAGES[stage]
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    one.command(stage, help=help_text)(_make_command(config_class(stage), module))
    cmd = typer.main.get_command(one)
    cmd.name = stage
    return cmd


class _StageGroup(TyperGroup):
    """Lists every stage by name and help line; builds only the command that is run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*STAGES, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in STAGES:
            return stage_command(name)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        """An unknown command: click's message, with the closest stage or sub-command suggested."""
        name = args[0] if args else ""
        if name and self.get_command(ctx, name) is None and not name.startswith("-"):
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise click.UsageError(f"No such command '{name}'.{hint}", ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_c, _m, help_text) in STAGES.items()]
        rows += [(name, (super(_StageGroup, self).get_command(ctx, name).get_short_help_str(80)))
                 for name in super().list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(cls=_StageGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Offline diffusion feature cache for adversarial training with DRA.")


def version() -> str:
    """The installed package's version; from a source tree that is not installed, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("dra-feature-cache")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        print(f"dra-feature-cache {version()}")
        raise typer.Exit()


@app.callback()
def _root(_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    """Offline diffusion feature cache for adversarial training with DRA."""


cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature cache (path or fsspec URL).")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def _cache_info(store: str) -> None:
    """A readable summary: parts, N, K, D, chunks, shards, compressor, bytes, ratio, settings."""
    from pipeline.cache.store import cache_info

    print(cache_info(store))


@cache_app.command("verify")
def _cache_verify(store: str, digest: Annotated[str | None, typer.Option(
        help="require this digest (from `cache info` of the sender, through a channel you trust); "
             "an empty or malformed value is refused")] = None) -> None:
    """Every file against the manifest (metadata too), the digest, completeness, shapes, NaN/Inf:
    one line per problem, exit 2."""
    from pipeline.cache.store import verify_cache

    problems = verify_cache(store, digest=digest)
    for line in problems:
        print(line)
    if problems:
        raise UserError(f"{store}: {len(problems)} problem(s)")
    print(f"{store}: ok")


@cache_app.command("probe")
def _cache_probe(store: str, out: Annotated[str, typer.Option(
        help="the JSON file to write (a DVC metric); a file there that is not a probe is refused")]) -> None:
    """The linear probe the store records (accuracy per (t, layer) target set) as a JSON file:
    extract writes nothing beside a store."""
    from pipeline.cache.probe import export_probe
    from pipeline.cache.store import probe_table

    record = export_probe(store, out)
    print("\n".join(probe_table(record)))
    print(f"{store}: probe -> {out}")


def _close_bars() -> None:
    """End open progress bars with a newline, so that an error line starts a line of its own."""
    tq = sys.modules.get("tqdm.std")
    for bar in list(getattr(tq.tqdm, "_instances", ())) if tq else []:
        bar.close()


def main(argv: list[str] | None = None) -> None:
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _interrupt) for sig in INTERRUPT_EXIT}
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # typer's value for a KeyboardInterrupt it caught itself (no handler of ours ran)
            raise Interrupted(signal.SIGINT)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        _close_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as exc:
        _close_bars()
        signum = getattr(exc, "signum", signal.SIGINT)
        kept = getattr(exc, "kept", "") or "nothing was started; rerun the same command"
        print(f"error: interrupted ({signal.Signals(signum).name}): {kept}", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT[signum])
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except Exception as exc:  # click usage errors (bad flag, bad value): one line, exit 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code or 2)
        from pipeline.core.storage import access_problem

        if (problem := access_problem(exc)) is not None:  # no credentials for s3:// and the like
            _close_bars()
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
