"""The command line: ``python -m pipeline STAGE [--flag value ...]``.

Each stage command is generated from its config dataclass (one flag per field, the dataclass
holds the default), so the CLI, ``params.yaml`` and the library cannot drift apart. A command
only parses flags, builds the config and calls ``stages.<name>.run(cfg)``; stage modules are
imported lazily so ``--help`` stays fast. ``UserError`` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import typer

from pipeline import config as C
from pipeline.errors import UserError

# name -> (config class, stage module, help). Only stages that exist are listed.
STAGES: dict[str, tuple[type, str, str]] = {
    "prepare": (C.PrepareConfig, "stages.prepare",
                "Raw dataset (IDX, CIFAR pickles, image folder, npz) -> webdataset shards + fingerprint."),
    "diffusion": (C.DiffusionConfig, "stages.diffusion",
                  "Train a small class-conditional DDPM on the real shards, or point at an existing UNet (--model)."),
    "generate": (C.GenerateConfig, "stages.generate",
                 "Diffusion model -> labelled synthetic images as webdataset shards + sample grid PNG."),
    "extract": (C.ExtractConfig, "stages.extract",
                "Shards + diffusion model -> sharded Zarr feature cache (K views per sample, resumable)."),
    "train": (C.TrainConfig, "stages.train",
              "Feature cache (+ the image shards it names) -> adversarially trained classifier with DRA."),
    "evaluate": (C.EvaluateConfig, "stages.evaluate",
                 "Checkpoint + test shards -> clean, PGD and AutoAttack accuracy (JSON, with sanity checks)."),
    "report": (C.ReportConfig, "stages.report",
               "Evaluation and training results -> Markdown table + PNG plots comparing the variants."),
    "bench": (C.BenchConfig, "stages.bench",
              "Measure what the cache saves (extract, training steps, reader, memory, 2 processes) -> table + JSON."),
}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline diffusion feature cache for adversarial training with DRA.")


@app.callback()
def _root() -> None:
    """Offline diffusion feature cache for adversarial training with DRA."""


def _flags(cls: type, prefix: str = "") -> list[tuple[str, str, Any, Any]]:
    """(flag name, dotted field path, type, default) for every field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ, default = hints[f.name], getattr(cls(), f.name)
        if dataclasses.is_dataclass(typ):
            out += [(f"{f.name}_{n}", f"{f.name}.{p}", t, d) for n, p, t, d in _flags(typ)]
        else:
            out.append((f.name, f.name, typ, default))
    return out


def _cli_type(typ: Any, default: Any) -> tuple[Any, Any]:
    """Map a dataclass field type to what Typer can parse (tuples become comma lists)."""
    if typing.get_origin(typ) is tuple:
        return str, ",".join(map(str, default))
    if isinstance(default, Enum):
        return type(default), default.value
    return typ, default


def _to_field(typ: Any, value: Any) -> Any:
    if typing.get_origin(typ) is tuple:
        item = typing.get_args(typ)[0]
        try:
            return tuple(item(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise UserError(f"expected a comma-separated list of {item.__name__}, got {value!r}") from None
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
            kwargs[f.name] = _to_field(typ, values[f.name])
    return cls(**kwargs)


def run_stage(module: str, cfg: Any) -> Any:
    return importlib.import_module(module).run(cfg)


def _make_command(cls: type, module: str) -> Callable[..., None]:
    params = []
    for name, _path, typ, default in _flags(cls):
        cli_typ, cli_default = _cli_type(typ, default)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=cli_default,
                                        annotation=Annotated[cli_typ, typer.Option()]))

    def command(**values: Any) -> None:
        run_stage(module, build_config(cls, values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


for _name, (_cls, _module, _help) in STAGES.items():
    app.command(_name, help=_help)(_make_command(_cls, _module))


cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature cache (path or fsspec URL).")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def _cache_info(store: str) -> None:
    """A readable summary: parts, N, K, D, chunks, shards, compressor, bytes, ratio, settings."""
    from pipeline.cache import cache_info

    print(cache_info(store))


@cache_app.command("verify")
def _cache_verify(store: str, digest: Annotated[str, typer.Option(
        help="require this digest (from `cache info` of the sender, through a channel you trust)")] = "") -> None:
    """Every file against the manifest (metadata too), the digest, completeness, shapes, NaN/Inf:
    one line per problem, exit 2."""
    from pipeline.cache import verify_cache

    problems = verify_cache(store, digest=digest or None)
    for line in problems:
        print(line)
    if problems:
        raise UserError(f"{store}: {len(problems)} problem(s)")
    print(f"{store}: ok")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except Exception as exc:  # click usage errors (bad flag, bad value): one line, exit 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code or 2)
        raise
