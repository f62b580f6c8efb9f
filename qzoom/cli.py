"""The `qzoom` command line (Typer).

    qzoom ask IMAGE QUERY [--model DIR] [--json] [--max-steps N] [--show OUT.png] ...
    qzoom serve [--host H] [--port P] [--model DIR] [--redis-url URL] [--device D]   the HTTP service (uvicorn)
    qzoom mcp [--model DIR]              serve the `zoom` tool over MCP (stdio)
    qzoom init-tiny DIR                  write a tiny random Q-Zoom checkpoint to try the pipeline with
    qzoom bench engine                   gate-closed vs stock generate, KV-reuse vs recompute (ratios in one run)
    qzoom bench followup                 a follow-up question vs a cold one, from L1 and from Redis (L2)
    qzoom bench abuse                    the hostile set: 5xx count, peak RSS over baseline, worst cost ratio
    qzoom bench paper-scale [--small]    Qwen2.5-VL-7B-sized random model: Q-Zoom vs 4096-token baseline (GPU)
    qzoom eval bench NAME --data DIR     a public benchmark (or synthetic) through the graph; --sweep: Pareto grid
    qzoom bench chat                     /v1/chat/completions vs /ask on the same requests, plain and streamed
    qzoom train stage1|stage2|stage3 MODEL OUT (--data FILE.jsonl | --synthetic N)   the Q-Zoom training stages
    qzoom train gate-threshold MODEL (--data FILE.jsonl | --synthetic N)   choose τ_gate on labelled items

`qzoom ask --json` prints exactly one JSON object, the contract of DESIGN.md; everything else goes to stderr.
Every error a user can cause (a bad option value, an image over the pixel cap or not an image, an empty question, a
device this machine lacks, a bad QZOOM_* setting) is one line on stderr, `error: ...`, and exit status 2, found
before any model loads (`OneLineErrors` for Click's own usage errors, `_fail` for ours).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from typer.core import TyperGroup

from qzoom.backbones import BACKBONE_NAMES

if TYPE_CHECKING:
    from qzoom.settings import Settings
    from qzoom.train.labels import Judge


class OneLineErrors(TyperGroup):
    """The root command: Typer's usage errors (a bad option value, a missing argument, an unknown option) become one
    line on stderr with exit 2, like every other user error of this CLI, instead of a framed usage block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # a caller handling errors itself gets them as Typer raises them
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as err:  # Typer's (vendored Click's) ClickException and its usage errors
            if type(err).__name__ == "NoArgsIsHelpError":  # `qzoom` alone: the help, as Typer prints it
                typer.echo(err.format_message(), err=True)
                sys.exit(2)
            ctx = getattr(err, "ctx", None)
            where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            message = " ".join(err.format_message().split())
            typer.echo(f"error: {message}{where}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Query-aware zooming for multimodal LLMs (Q-Zoom).",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(no_args_is_help=True, help="The synthetic high-res benchmark and evaluations.")
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(no_args_is_help=True, help="The Q-Zoom training stages (resumable; HF-format outputs).")
app.add_typer(train_app, name="train")

# `qzoom.schemas.MultiBox`, spelled out so that the command line starts without importing pydantic (a test keeps the
# two equal).
MultiBoxChoice = Literal["joint", "best"]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _settings() -> Settings:
    """The QZOOM_* settings; a bad value ends the command with one line naming it."""
    from pydantic import ValidationError

    from qzoom.settings import get_settings

    try:
        return get_settings()
    except ValidationError as err:
        _fail("; ".join(f"QZOOM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors()))


def _device(settings: Settings) -> Any:
    """The torch device of `settings`; one that does not exist here ends the command with its reason."""
    try:
        return settings.torch_device()
    except ValueError as err:
        _fail(str(err))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


MODEL_HELP = "checkpoint directory [env QZOOM_MODEL; default: the shipped demo model qzoom-tiny]"


def _model_dir(model: str | None, settings: Settings) -> str:
    """``--model``, else QZOOM_MODEL, else the shipped demo model; a missing one ends the command with its reason."""
    from qzoom.models import ModelNotFoundError

    try:
        chosen = model or settings.model_dir()
    except ModelNotFoundError as err:
        _fail(str(err))
    if not Path(chosen).is_dir():
        _fail(f"model directory {chosen} does not exist")
    return chosen


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="the picture (PNG, JPEG, WebP, ...)")],
    query: Annotated[str, typer.Argument(help="the question about it")],
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    max_steps: Annotated[int, typer.Option(min=0, max=8, help="zoom steps at most")] = 1,
    show: Annotated[Path | None, typer.Option(help="write the image with heatmap and boxes to this PNG")] = None,
    zoom: Annotated[
        bool | None, typer.Option("--zoom/--no-zoom", help="force zooming on or off (default: gate)")
    ] = None,
    gate_thresh: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="τ_gate")] = None,
    roi_thresh: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="τ_roi")] = None,
    min_pixels: Annotated[int | None, typer.Option(help="lower pixel budget per view")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="upper pixel budget per view")] = None,
    max_boxes: Annotated[int | None, typer.Option(min=1, max=8, help="boxes per step [checkpoint]")] = None,
    box_mode: Annotated[
        Literal["union", "components"] | None,
        typer.Option(help="union: one box around every cell (paper); components: heaviest first [checkpoint]"),
    ] = None,
    roi_peak_frac: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="keep cells above this fraction of the peak [checkpoint]")
    ] = None,
    multi_box: Annotated[
        MultiBoxChoice | None,
        typer.Option(
            help="several boxes: joint, all in one sequence; best, the most confident of one per box [checkpoint]"
        ),
    ] = None,
    margin: Annotated[float, typer.Option(min=0.0, max=1.0, help="border around each box, fraction of side")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... [env QZOOM_DEVICE]")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also print each step's time on stderr (ms, model loaded)")
    ] = False,
) -> None:
    """Answer QUERY about IMAGE, zooming where the question needs detail."""
    import warnings

    from PIL import Image
    from pydantic import ValidationError

    from qzoom.guards import InputError, check_query
    from qzoom.images import load_image
    from qzoom.schemas import AskOptions, PromptTextError, check_prompt_text

    # Everything the user gave is checked here, before the (slow) imports and the model load below. Pillow's bomb
    # warning would print a second line before the guard's own refusal: as an error, the guard reports it.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    settings = _settings()
    if device:
        settings = settings.model_copy(update={"device": device})
    torch_device = _device(settings)
    model_dir = _model_dir(model, settings)
    try:
        check_query(query)
        check_prompt_text(query, "query")
        options = AskOptions(
            gate_thresh=gate_thresh,
            roi_thresh=roi_thresh,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            force_zoom=zoom,
            max_steps=max_steps,
            max_boxes=max_boxes,
            box_mode=box_mode,
            roi_peak_frac=roi_peak_frac,
            multi_box=multi_box,
            margin=margin,
            max_new_tokens=max_new_tokens,
        )
        picture = load_image(image, settings.max_pixels_in)
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors()))
    except (InputError, PromptTextError, OSError) as err:
        _fail(str(err))

    from qzoom.agent import result, run
    from qzoom.checkpoint import CheckpointError
    from qzoom.engine import QZoomEngine

    _quiet_transformers()
    try:
        engine = QZoomEngine.from_pretrained(model_dir, device=torch_device, dtype=settings.torch_dtype())
        state = engine.new_state(picture, query, options)
    except (CheckpointError, OSError, ValueError) as err:
        _fail(str(err))
    run(engine, [state])
    res = result(engine, state)
    if show is not None:
        from qzoom.visualize import render

        render(state).save(show)
    if as_json:
        sys.stdout.write(res.model_dump_json() + "\n")
        return
    typer.echo(res.answer)
    if res.gate_score is not None:
        gate = f"{res.gate_score:.3f}"
    elif zoom is not None:
        gate = "not consulted (--zoom/--no-zoom)"
    elif max_steps == 0:
        gate = "not consulted (--max-steps 0 allows no zoom step)"
    else:
        gate = "none (this checkpoint has no gate)"
    typer.echo(f"gate score: {gate}; zoomed: {'yes' if res.zoomed else 'no'}; visual tokens: {res.visual_tokens}")
    # One line per region; several boxes of one zoom step share the gate score that opened the step.
    for i, step in enumerate(res.steps, 1):
        typer.echo(f"  region {i}: box {step.box} ({step.visual_tokens} tokens)")
    if verbose:
        steps = ", ".join(f"{name} {ms:.0f}" for name, ms in res.timings_ms.items())
        typer.echo(f"time: {sum(res.timings_ms.values()):.0f} ms ({steps})", err=True)


@app.command("init-tiny")
def init_tiny(
    out: Annotated[Path, typer.Argument(help="directory to write the checkpoint into")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    layers: Annotated[int, typer.Option(min=2, help="decoder layers")] = 4,
    hidden: Annotated[int, typer.Option(min=16, help="hidden size (multiple of 4 heads)")] = 64,
    twig_k: Annotated[int, typer.Option("--twig-k", min=1, help="branch point K")] = 2,
    backbone: Annotated[str, typer.Option(help=f"model family: {' or '.join(BACKBONE_NAMES)}")] = BACKBONE_NAMES[0],
) -> None:
    """Write a tiny randomly initialised Q-Zoom checkpoint (answers are noise; the pipeline is real)."""
    import torch

    from qzoom.backbones import backbone_named
    from qzoom.checkpoint import save_checkpoint
    from qzoom.modeling import enable_qzoom
    from qzoom.offline import build_tokenizer

    _quiet_transformers()
    if backbone not in BACKBONE_NAMES:
        _fail(f"unknown --backbone {backbone!r}; choose {' or '.join(BACKBONE_NAMES)}")
    if twig_k + 2 > layers:
        _fail(f"--twig-k {twig_k} leaves no room for 2 branch layers in a {layers}-layer model")
    family = backbone_named(backbone)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers}
    config = enable_qzoom(family.tiny_config(tok, **sizes), twig_K=twig_k, twig_T=2)
    model = family.model_class(config)
    model.init_branches_from_backbone()
    save_checkpoint(model, family.build_processor(tok), out)
    typer.echo(f"wrote a tiny random {backbone} Q-Zoom checkpoint to {out}")


@eval_app.command("export-synthetic")
def export_synthetic(
    out: Annotated[Path, typer.Argument(help="directory to write items.jsonl and the PNGs into")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    n: Annotated[int, typer.Option(min=1, help="how many items")] = 20,
    seed: Annotated[int, typer.Option(help="benchmark seed")] = 0,
    families: Annotated[str | None, typer.Option(help="comma-separated families (default: all)")] = None,
) -> None:
    """Write the first N items of a split of the synthetic high-res benchmark to disk, for inspection."""
    from qzoom.evals.synthetic import FAMILIES, export

    chosen = [f.strip() for f in families.split(",")] if families else None
    unknown = [f for f in chosen or [] if f not in FAMILIES]
    if unknown:
        _fail(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    if split not in ("train", "val", "test"):
        _fail(f"unknown split {split!r}; choose train, val or test")
    path = export(out, split, n, seed=seed, families=chosen)
    typer.echo(f"wrote {n} items to {path}")


@eval_app.command("demo")
def eval_demo(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    items: Annotated[int, typer.Option(min=1, help="held-out items of the test split")] = 300,
    seed: Annotated[int, typer.Option(help="benchmark seed")] = 0,
    budgets: Annotated[str, typer.Option(help="no-zoom baseline budgets in tokens, comma-separated")] = "1024,4096",
    card: Annotated[bool, typer.Option("--card", help="write MODEL_CARD.md into the model directory")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="also draw accuracy vs throughput of every configuration (a PNG)")
    ] = None,
) -> None:
    """The demo model's targets on held-out synthetic items: coarse view vs Q-Zoom vs larger budgets, gate, SD-RPN."""
    from tqdm import tqdm

    from qzoom.evals.demo import evaluate_demo, format_report, plot_pareto, uncached_engine, write_model_card

    _quiet_transformers()
    model_dir = Path(_model_dir(model, _settings()))
    try:
        sizes = tuple(int(b) for b in budgets.split(","))
    except ValueError:
        _fail(f"--budgets takes comma-separated token budgets such as 1024,4096; got {budgets!r}")
    engine = uncached_engine(model_dir)
    with tqdm(total=items, desc="eval demo", unit="item") as bar:
        report = evaluate_demo(engine, items, seed=seed, budgets=sizes, on_chunk=bar.update)
    table = format_report(report)
    typer.echo(table)
    if card:
        path = write_model_card(model_dir, report, items=items, seed=seed, budgets=sizes)
        typer.echo(f"wrote {path}", err=True)
    if plot is not None:
        typer.echo(f"wrote {plot_pareto(report, plot)}", err=True)


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated token budgets such as 576,1024; got {text!r}")
    if not values or min(values) < 1:
        _fail(f"{option} takes positive token budgets such as 576,1024; got {text!r}")
    return values


@eval_app.command("bench")
def eval_bench(
    name: Annotated[
        str,
        typer.Argument(
            help="textvqa, chartqa, docvqa, infovqa, ocrbench, vstar, hrbench4k, "
            "hrbench8k, mme-realworld-lite or synthetic"
        ),
    ],
    data: Annotated[Path | None, typer.Option(help="the benchmark's downloaded files (docs/benchmarks.md)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="results folder (resumable) [default: runs/bench-NAME]")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="the first N questions only")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="the paper's budget grid (no zoom and Q-Zoom)")] = False,
    methods: Annotated[str | None, typer.Option(help="comma-separated: baseline, qzoom, vicrop, oracle")] = None,
    baseline_budgets: Annotated[str, typer.Option(help="no-zoom budgets (paper tokens)")] = "576,1024,2048,4096",
    qzoom_budgets: Annotated[
        str | None,
        typer.Option(help="zoom budgets (paper tokens) [--sweep: 256,384,576,1024,2048,4096; else the family's]"),
    ] = None,
    scale: Annotated[float, typer.Option(help="multiply every budget (a smaller model's scale)")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="requests per engine call")] = 8,
    shuffles: Annotated[
        int | None, typer.Option(min=1, help="option orders per multiple-choice question (Avg@k)")
    ] = None,
    paper_suffix: Annotated[bool, typer.Option(help="append the paper's answer-format suffix to prompts")] = True,
) -> None:
    """One of the paper's benchmarks (or the synthetic one) through the Q-Zoom graph: its own metric, samples/s,
    visual tokens, latency and gate rate per configuration; --sweep runs the paper's budget grid and draws the
    Pareto plots."""
    from qzoom.evals import benchmarks
    from qzoom.evals import sweep as sw
    from qzoom.evals.demo import uncached_engine
    from qzoom.settings import get_settings

    _quiet_transformers()
    try:
        bench = benchmarks.get(name)
        samples = benchmarks.load(name, data, limit=limit, shuffles=shuffles, paper_suffix=paper_suffix)
        chosen = methods.split(",") if methods else (["baseline", "qzoom"] if sweep else ["qzoom"])
        default_qz = "256,384,576,1024,2048,4096" if sweep else str(sw.FAMILY_DEFAULT_BUDGET[bench.family])
        configs = sw.paper_configs(
            bench,
            methods=[m.strip() for m in chosen],
            scale=scale,
            baseline_budgets=_int_list("--baseline-budgets", baseline_budgets),
            qzoom_budgets=_int_list("--qzoom-budgets", qzoom_budgets or default_qz),
        )
        engine = uncached_engine(_model_dir(model, get_settings()))
        sw.evaluate_benchmark(
            engine,
            bench,
            samples,
            configs,
            out or Path("runs") / f"bench-{name}",
            batch_size=batch_size,
            total=limit,
            echo=typer.echo,
        )
    except (benchmarks.BenchmarkDataError, sw.SweepError) as error:
        _fail(str(error))


@eval_app.command("tower-probe")
def eval_tower_probe(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    train_items: Annotated[int, typer.Option(min=1, help="train-split detail items the probe is fitted on")] = 1500,
    val_items: Annotated[int, typer.Option(min=1, help="val-split detail items it is scored on")] = 300,
    seed: Annotated[int, typer.Option(help="benchmark seed")] = 0,
) -> None:
    """How much of each detail the vision tower's tokens show: a linear probe per token, native and true-box crops."""
    from qzoom.engine import QZoomEngine
    from qzoom.evals.tower_probe import format_probe, probe_tower

    _quiet_transformers()
    engine = QZoomEngine.from_pretrained(_model_dir(model, _settings()))
    try:
        report = probe_tower(engine, train_items, val_items, seed=seed)
    except ValueError as error:
        _fail(str(error))
    typer.echo(format_probe(report))


# The random benchmark model's shape (Qwen2.5-VL-7B's K/L by default) and the measurement, shared by the benchmarks.
BenchLayers = Annotated[int, typer.Option(help="decoder layers L")]
BenchSplit = Annotated[int, typer.Option("--k", help="branch point K")]
BenchHidden = Annotated[int, typer.Option(help="hidden size")]
BenchTokens = Annotated[int, typer.Option(help="visual token budget of each view")]
BenchRepeats = Annotated[int, typer.Option(min=1, help="timed runs per variant (median is reported)")]


@app.command("mcp")
def mcp(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
) -> None:
    """Serve the `zoom`, `gate` and `propose` tools over MCP on stdio (for desktop hosts; local image paths allowed)."""
    from qzoom.tools.mcp_server import run_stdio

    _quiet_transformers()
    # Checked here, before the protocol starts: a failure inside the server's lifespan reaches the host as a
    # dropped connection, not as a message.
    settings = _settings()
    _device(settings)
    model_dir = _model_dir(model, settings)
    run_stdio(model_dir)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    redis_url: Annotated[str | None, typer.Option(help="L2 feature cache [env QZOOM_REDIS_URL]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... [env QZOOM_DEVICE]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    backend: Annotated[
        Literal["local", "ray"], typer.Option(help="local: one process, one model; ray: Ray Serve worker replicas")
    ] = "local",
    workers: Annotated[
        str, typer.Option(help="ray: worker replicas, a number or 'auto' (autoscaling between 1 and --max-workers)")
    ] = "2",
    max_workers: Annotated[int, typer.Option(min=1, help="ray: autoscaling upper bound")] = 4,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="ray: GPUs per worker replica (0: CPU)")] = 0.0,
    ray_address: Annotated[
        str | None, typer.Option(help="ray: cluster to join (else RAY_ADDRESS); default: a new local one")
    ] = None,
) -> None:
    """Serve POST /ask, the zoom tool, /healthz and /readyz over HTTP (one process, one model; or on Ray Serve)."""
    import uvicorn

    from qzoom.service.app import create_app

    _quiet_transformers()
    base = _settings()
    overrides = {k: v for k, v in {"redis_url": redis_url, "device": device}.items() if v}
    if backend == "ray":
        _serve_on_ray(overrides, model, host, port, workers, max_workers, gpus_per_worker, ray_address)
        return
    settings = base.model_copy(update={**overrides, "model": _model_dir(model, base)})
    _device(settings)
    # workers=1 always: every uvicorn worker would load its own copy of the model onto the same device.
    uvicorn.run(create_app(settings=settings), host=host, port=port, workers=1, log_level=log_level)


def _serve_on_ray(
    overrides: dict[str, str],
    model: str | None,
    host: str,
    port: int,
    workers: str,
    max_workers: int,
    gpus: float,
    address: str | None,
) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # only Ray's absence is the user's to fix here
        _fail("the ray backend needs Ray Serve: pip install 'qzoom[ray]'")
    from qzoom.service.ray_serve import RayAppArgs, serve_on_ray

    if workers != "auto" and not (workers.isdigit() and int(workers) >= 1):
        _fail(f"--workers takes a positive number or 'auto'; got {workers!r}")
    import os

    from qzoom.settings import get_settings

    settings: dict[str, str] = dict(overrides)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        settings["model"] = _model_dir(model, get_settings())  # a local cluster: the path must exist here
    elif model is not None:
        settings["model"] = model  # a path on every node of the cluster; the replicas check it where they load it
    args = RayAppArgs(
        workers="auto" if workers == "auto" else int(workers), max_workers=max(max_workers, 1),
        num_gpus=gpus, settings=settings,
    )  # fmt: skip
    serve_on_ray(args, host=host, port=port, address=address)


@bench_app.command("engine")
def bench_engine(
    layers: BenchLayers = 28,
    split: BenchSplit = 18,
    hidden: BenchHidden = 256,
    tokens: BenchTokens = 576,
    repeats: BenchRepeats = 5,
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens decoded per answer")] = 8,
) -> None:
    """Gate-closed path vs stock generate, and the KV-reuse zoom step vs a full recompute, side by side."""
    from qzoom.evals.bench_engine import run_engine_benchmark

    _quiet_transformers()
    run_engine_benchmark(
        layers=layers,
        split=split,
        hidden=hidden,
        tokens=tokens,
        repeats=repeats,
        new_tokens=new_tokens,
        echo=typer.echo,
    )


@bench_app.command("coldstart")
def bench_coldstart(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    repeats: Annotated[int, typer.Option(min=1, max=20, help="fresh processes of each kind")] = 3,
) -> None:
    """A first `qzoom ask` from a cold process beside a bare `import torch`, and its split (imports, load, answer)."""
    from qzoom.evals.bench_coldstart import run_coldstart_benchmark

    run_coldstart_benchmark(_model_dir(model, _settings()), repeats, typer.echo)


@bench_app.command("followup")
def bench_followup(
    layers: BenchLayers = 28,
    split: BenchSplit = 18,
    hidden: BenchHidden = 256,
    tokens: BenchTokens = 576,
    repeats: BenchRepeats = 5,
    new_tokens: Annotated[int, typer.Option(min=1, help="answer length in tokens (a short answer by default)")] = 4,
    redis_url: Annotated[str | None, typer.Option(help="Redis for the L2 half [env QZOOM_REDIS_URL]")] = None,
) -> None:
    """A follow-up question on a seen image vs a cold one: same process (L1) and a fresh process over Redis (L2)."""
    from qzoom.evals.bench_followup import run_followup_benchmark

    _quiet_transformers()
    run_followup_benchmark(
        layers=layers,
        split=split,
        hidden=hidden,
        tokens=tokens,
        repeats=repeats,
        new_tokens=new_tokens,
        redis_url=redis_url or _settings().redis_url,
        echo=typer.echo,
    )


@bench_app.command("paper-scale")
def bench_paper_scale(
    small: Annotated[bool, typer.Option("--small", help="a small model of the same family (CPU, seconds)")] = False,
    device: Annotated[str | None, typer.Option(help="torch device [default: cuda when available, else cpu]")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16, float16 or float32 [default: bfloat16 on GPU]")] = None,
    batches: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,8",
    repeats: BenchRepeats = 3,
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens decoded per answer")] = 16,
) -> None:
    """Qwen2.5-VL-7B's real architecture with random weights: Q-Zoom vs the 4096-token baseline at batch 1 and 8,
    gate-closed vs stock generate, KV reuse vs recompute (under 8 minutes on one H100)."""
    from qzoom.evals.paper_scale import run_paper_scale

    _quiet_transformers()
    sizes = tuple(_int_list("--batches", batches))
    try:
        run_paper_scale(
            small=small,
            device=device,
            dtype=dtype,
            batches=sizes,
            repeats=repeats,
            new_tokens=new_tokens,
            echo=typer.echo,
        )
    except (ValueError, RuntimeError) as error:  # a bad --device/--dtype, or out of device memory
        _fail(str(error))


@bench_app.command("http")
def bench_http(
    layers: BenchLayers = 28,
    split: BenchSplit = 18,
    hidden: BenchHidden = 256,
    tokens: BenchTokens = 576,
    new_tokens: Annotated[int, typer.Option(min=1, help="answer length in tokens")] = 8,
    concurrency: Annotated[str, typer.Option(help="comma-separated client counts")] = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="requests per concurrency, side and round")] = 16,
    rounds: Annotated[int, typer.Option(min=1, help="alternating rounds of both sides")] = 2,
) -> None:
    """HTTP /ask under load (p50/p99, throughput) vs the in-process graph call on the same inputs, side by side."""
    from qzoom.evals.bench_http import run_http_benchmark

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        _fail(f"--concurrency takes comma-separated positive integers such as 1,4,16; got {concurrency!r}")
    if any(c < 1 for c in levels):
        _fail(f"--concurrency takes comma-separated positive integers such as 1,4,16; got {concurrency!r}")
    _quiet_transformers()
    run_http_benchmark(
        layers=layers, split=split, hidden=hidden, tokens=tokens, new_tokens=new_tokens,
        concurrency=levels, requests=requests, rounds=rounds, echo=typer.echo,
    )  # fmt: skip


@bench_app.command("abuse")
def bench_abuse(
    bombs: Annotated[int, typer.Option(min=1, help="concurrent 6000x6000 pixel-bomb PNGs (sent twice)")] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per costly request and its default (median)")] = 3,
) -> None:
    """The hostile set against `qzoom serve` on the demo model: 5xx count, peak RSS over baseline, worst cost ratio."""
    from qzoom.evals.bench_abuse import run_abuse_benchmark

    _quiet_transformers()
    run_abuse_benchmark(bombs=bombs, repeats=repeats, echo=typer.echo)


@bench_app.command("ray")
def bench_ray(
    clients: Annotated[int, typer.Option(min=1, help="concurrent HTTP clients")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="requests per replica count")] = 32,
    sequential: Annotated[int, typer.Option(min=1, help="one-client requests per side for the p50 overhead")] = 12,
) -> None:
    """Ray Serve on a local cluster: throughput with 1 vs 2 CPU worker replicas, and the Ray path's p50 overhead vs
    the single-process service on the same requests (demo model)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        _fail("the ray benchmark needs Ray Serve: pip install 'qzoom[ray]'")
    from qzoom.evals.bench_ray import run_ray_benchmark

    _quiet_transformers()
    run_ray_benchmark(clients=clients, requests=requests, sequential=sequential, echo=typer.echo)


@bench_app.command("chat")
def bench_chat(
    layers: BenchLayers = 28,
    split: BenchSplit = 18,
    hidden: BenchHidden = 256,
    tokens: BenchTokens = 576,
    new_tokens: Annotated[int, typer.Option(min=1, help="answer length in tokens")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="requests per round, each sent to every side")] = 24,
    rounds: Annotated[int, typer.Option(min=1, help="rounds over the requests")] = 2,
    model: Annotated[
        Path | None, typer.Option(help="a checkpoint directory instead of the random benchmark model")
    ] = None,
) -> None:
    """/v1/chat/completions p50 vs /ask p50 on the same requests, interleaved, plain and streamed (target <= 1.05x)."""
    from qzoom.evals.bench_chat import run_chat_benchmark

    if model is not None and not (model / "config.json").is_file():
        _fail(f"--model {model}: not a checkpoint directory (no config.json)")
    _quiet_transformers()
    run_chat_benchmark(
        layers=layers, split=split, hidden=hidden, tokens=tokens, new_tokens=new_tokens,
        requests=requests, rounds=rounds, model_dir=model, echo=typer.echo,
    )  # fmt: skip


# -- qzoom train stage1|stage2|stage3 (qzoom.train.*): shared options, then one command per stage ---------------------

TrainModel = Annotated[Path, typer.Argument(help="input checkpoint directory")]
TrainOut = Annotated[Path, typer.Argument(help="output directory (rerun the same command to resume)")]
TrainData = Annotated[Path | None, typer.Option("--data", help="JSONL items: image, question, answer[, box, uid]")]
TrainSynthetic = Annotated[int | None, typer.Option("--synthetic", min=1, help="N items of the synthetic train split")]
TrainDataSeed = Annotated[int, typer.Option(help="synthetic benchmark seed")]
TrainSide = Annotated[int, typer.Option(min=256, help="synthetic canvas side bound (px)")]
TrainLr = Annotated[float | None, typer.Option(help="peak learning rate (default: the stage's recipe)")]
TrainBatch = Annotated[int, typer.Option(min=1, help="samples per optimizer step")]
TrainEpochs = Annotated[float, typer.Option(help="passes over the training samples")]
TrainSteps = Annotated[int | None, typer.Option(min=1, help="stop after this many optimizer steps")]
TrainSeed = Annotated[int, typer.Option(help="sample order and label draws")]
TrainSaveEvery = Annotated[int, typer.Option(min=1, help="optimizer steps between resumable save points")]
TrainDevice = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (bf16 autocast on CUDA)")]
TrainDtype = Annotated[str, typer.Option(help="weights: float32, bfloat16 or float16")]
TrainPixels = Annotated[int | None, typer.Option(help="pixel budget bound of each view (default: checkpoint's)")]
TrainTokens = Annotated[int, typer.Option(min=1, max=1024, help="answer length limit while the model answers")]
TrainMineBatch = Annotated[int, typer.Option(min=1, help="samples per batch while the frozen model answers")]
GateMaxFpr = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=0.99,
        help="recall rule: the largest share of right coarse answers to fire on (1 - skip rate); where both bounds "
        "cannot hold, the threshold that misses them least",
    ),
]


def _check_judge(judge: str, judge_model: Path | None) -> None:
    if judge not in ("auto", "exact", "llm"):
        _fail(f"--judge takes auto, exact or llm; got {judge!r}")
    if judge == "llm" and judge_model is None:
        _fail("--judge llm needs --judge-model DIR (a chat checkpoint, e.g. Qwen2.5-VL-7B-Instruct)")


def _make_judge(judge: str, judge_model: Path | None, device: str, *, synthetic: bool) -> Judge:
    """--judge as a Judge: the LLM judge, else the synthetic benchmark's scoring on --synthetic items (auto), else
    exact match."""
    from qzoom.train.labels import exact_match_judge, llm_judge
    from qzoom.train.stage2 import hf_chat_generate, synthetic_judge

    if judge == "llm" and judge_model is not None:
        return llm_judge(hf_chat_generate(judge_model, device=device))
    if judge == "auto" and synthetic:
        return synthetic_judge
    return exact_match_judge


def _train_run(stage: str, config_cls: type, build: Callable[[Any], Path], **fields: Any) -> None:
    """Validate the options into the stage's config, run it, report where the checkpoint is and what it did."""
    import json

    from pydantic import ValidationError

    from qzoom.checkpoint import CheckpointError
    from qzoom.images import ImageError
    from qzoom.train.common import TrainingError

    _quiet_transformers()
    try:
        config = config_cls(**{k: v for k, v in fields.items() if v is not None})
        out = build(config)
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or stage}: {e['msg']}" for e in err.errors()))
    except (TrainingError, CheckpointError, ImageError, OSError) as err:
        _fail(str(err))
    state = json.loads((out / "trainer" / "state.json").read_text())
    typer.echo(f"{stage}: wrote {out}")
    typer.echo(json.dumps(state.get("summary", {})))


@train_app.command("stage1")
def train_stage1_cmd(
    model: TrainModel,
    out: TrainOut,
    data: TrainData = None,
    synthetic: TrainSynthetic = None,
    heads: Annotated[str | None, typer.Option(help="grounding heads 'L:H,L:H' [';L:H,...' sink heads]")] = None,
    calibration: Annotated[int, typer.Option(min=0, help="items with a box to pick heads automatically")] = 32,
    top_k_heads: Annotated[int, typer.Option(min=1, help="grounding heads kept by the automatic choice")] = 4,
    calibration_data: Annotated[Path | None, typer.Option(help="JSONL of calibration items with boxes")] = None,
    twig_k: Annotated[int | None, typer.Option("--twig-k", min=1, help="branch point (model without SD-RPN)")] = None,
    twig_t: Annotated[int, typer.Option("--twig-t", min=1, help="twig depth (model without SD-RPN)")] = 3,
    data_seed: TrainDataSeed = 0,
    min_side: TrainSide = 896,
    max_side: TrainSide = 4096,
    lr: TrainLr = None,
    batch_size: TrainBatch = 8,
    epochs: TrainEpochs = 1.0,
    max_steps: TrainSteps = None,
    seed: TrainSeed = 0,
    save_every: TrainSaveEvery = 50,
    device: TrainDevice = "cpu",
    dtype: TrainDtype = "float32",
    min_pixels: TrainPixels = None,
    max_pixels: TrainPixels = None,
    max_new_tokens: TrainTokens = 32,
    mine_batch_size: TrainMineBatch = 8,
) -> None:
    """Stage 1: self-distil the SD-RPN from the model's own answer->image attention (trains twig_layers only).

    Heads: --heads, else picked on calibration items with a box (--calibration-data, the synthetic val split with
    --synthetic, else the first --calibration boxed items of --data), else the ones recorded in MODEL's config.json.
    """
    from qzoom.train.common import JsonlItems, SyntheticItems, TrainItem, data_source
    from qzoom.train.stage1 import Heads, Stage1Config, train_stage1

    def build(config: Any) -> Path:
        items = data_source(data, synthetic, seed=data_seed, min_side=min_side, max_side=max_side)
        cal: Sequence[TrainItem] | None = None
        if config.heads is None and calibration > 0:
            if calibration_data is not None:
                cal = JsonlItems(calibration_data)
            elif isinstance(items, SyntheticItems):
                cal = SyntheticItems(calibration, split="val", seed=data_seed, min_side=min_side, max_side=max_side)
            else:
                boxed = [i for i, r in enumerate(items.records) if r.box is not None][:calibration]
                cal = [items[i] for i in boxed] if len(boxed) >= 2 else None
        return train_stage1(model, items, out, config, calibration=cal)

    try:
        parsed = Heads.parse(heads) if heads else None
    except ValueError as err:
        _fail(f"--heads: {err}")
    _train_run(
        "stage 1", Stage1Config, build, heads=parsed, top_k_heads=top_k_heads, twig_K=twig_k, twig_T=twig_t, lr=lr,
        batch_size=batch_size, epochs=epochs, max_steps=max_steps, seed=seed, save_every=save_every, device=device,
        dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels, max_new_tokens=max_new_tokens,
        mine_batch_size=mine_batch_size,
    )  # fmt: skip


@train_app.command("stage2")
def train_stage2_cmd(
    model: TrainModel,
    out: TrainOut,
    data: TrainData = None,
    synthetic: TrainSynthetic = None,
    judge: Annotated[str, typer.Option(help="auto (synthetic scoring / exact match), exact, or llm")] = "auto",
    judge_model: Annotated[Path | None, typer.Option(help="chat checkpoint for --judge llm")] = None,
    target: Annotated[str, typer.Option(help="SFT target: answer (the coarse answer) or gt")] = "answer",
    samples: Annotated[
        Literal["regressions", "zoomed"],
        typer.Option(help="train on the regressions (paper) or on every sample zoomed on (with --target gt)"),
    ] = "regressions",
    first_layer: Annotated[
        int, typer.Option(min=0, help="decoder layers below stay frozen (>= twig_K keeps the SD-RPN's input)")
    ] = 0,
    gradient_checkpointing: Annotated[bool, typer.Option(help="less memory, more compute")] = False,
    data_seed: TrainDataSeed = 0,
    min_side: TrainSide = 896,
    max_side: TrainSide = 4096,
    lr: TrainLr = None,
    batch_size: TrainBatch = 8,
    epochs: TrainEpochs = 1.0,
    max_steps: TrainSteps = None,
    seed: TrainSeed = 0,
    save_every: TrainSaveEvery = 50,
    device: TrainDevice = "cpu",
    dtype: TrainDtype = "float32",
    min_pixels: TrainPixels = None,
    max_pixels: TrainPixels = None,
    max_new_tokens: TrainTokens = 32,
    mine_batch_size: TrainMineBatch = 8,
) -> None:
    """Stage 2: mine regressions (coarse right, zoomed wrong) and post-SFT the decoder layers + lm_head on them."""
    from qzoom.train.common import SyntheticItems, data_source
    from qzoom.train.stage2 import Stage2Config, train_stage2

    _check_judge(judge, judge_model)

    def build(config: Any) -> Path:
        items = data_source(data, synthetic, seed=data_seed, min_side=min_side, max_side=max_side)
        chosen = _make_judge(judge, judge_model, device, synthetic=isinstance(items, SyntheticItems))
        return train_stage2(model, items, out, config, judge=chosen)

    _train_run(
        "stage 2", Stage2Config, build, target=target, samples=samples, first_layer=first_layer,
        gradient_checkpointing=gradient_checkpointing, lr=lr,
        batch_size=batch_size, epochs=epochs, max_steps=max_steps, seed=seed, save_every=save_every, device=device,
        dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels, max_new_tokens=max_new_tokens,
        mine_batch_size=mine_batch_size,
    )  # fmt: skip


@train_app.command("stage3")
def train_stage3_cmd(
    model: TrainModel,
    out: TrainOut,
    data: TrainData = None,
    synthetic: TrainSynthetic = None,
    ladder: Annotated[str, typer.Option(help="token budgets, ascending, comma-separated")] = "64,128,256,576,1024",
    signal: Annotated[
        Literal["consistency", "prediction_vs_gt"],
        typer.Option(help="labels: consistency over the ladder (paper) or the low-budget answer vs GT (ablation)"),
    ] = "consistency",
    pool: Annotated[
        Literal["matched", "all"],
        typer.Option(help="prediction_vs_gt: as many ladders as the consistency filter keeps (reference), or all"),
    ] = "matched",
    p_refine: Annotated[float, typer.Option(help="P(draw a 'needs zoom' step) on a transition")] = 0.9,
    max_samples: Annotated[int, typer.Option(min=1, help="ladders kept after filtering")] = 20000,
    high_res_thresh: Annotated[
        str | None,
        typer.Option(
            help="gate threshold to write into OUT: a number in (0, 1), or a rule that chooses it after training: "
            "'youden' (best TPR - FPR) or 'recall' (fire on --gate-recall of the wrong answers); default: keep the "
            "model's"
        ),
    ] = None,
    gate_recall: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="--high-res-thresh recall: share of wrong answers to fire on")
    ] = 0.95,
    gate_max_fpr: GateMaxFpr = None,
    calibration: Annotated[
        int,
        typer.Option(
            min=0, help="with --synthetic: N items of the val split choose the threshold (0: the training items)"
        ),
    ] = 0,
    calibration_data: Annotated[
        Path | None, typer.Option(help="JSONL of items (no box needed) that choose the threshold")
    ] = None,
    high_res_k: Annotated[int | None, typer.Option("--high-res-k", min=1, help="gate branch point (new gate)")] = None,
    high_res_t: Annotated[int | None, typer.Option("--high-res-t", min=1, help="gate depth (new gate)")] = None,
    data_seed: TrainDataSeed = 0,
    min_side: TrainSide = 896,
    max_side: TrainSide = 4096,
    lr: TrainLr = None,
    batch_size: TrainBatch = 8,
    epochs: TrainEpochs = 1.0,
    max_steps: TrainSteps = None,
    seed: TrainSeed = 0,
    save_every: TrainSaveEvery = 50,
    device: TrainDevice = "cpu",
    dtype: TrainDtype = "float32",
    max_new_tokens: TrainTokens = 32,
    mine_batch_size: TrainMineBatch = 8,
) -> None:
    """Stage 3: label the gate from answers over a budget ladder (spec §5.2) and train the gate branch only.

    A threshold rule reads the answers on --calibration-data, or on --calibration items of the synthetic val split,
    else on the training items (whose gate scores are surer than a new question's).
    """
    from qzoom.train.common import JsonlItems, SyntheticItems, TrainItem, data_source
    from qzoom.train.stage3 import Stage3Config, train_stage3

    try:
        budgets = [int(b) for b in ladder.split(",")]
    except ValueError:
        _fail(f"--ladder takes comma-separated token budgets such as 64,128,256,576,1024; got {ladder!r}")
    thresh: float | str | None = high_res_thresh
    if high_res_thresh is not None and high_res_thresh not in ("youden", "recall"):
        try:
            thresh = float(high_res_thresh)
        except ValueError:
            thresh = -1.0
        if not 0.0 < thresh < 1.0:
            _fail(f"--high-res-thresh takes a number in (0, 1), 'youden' or 'recall'; got {high_res_thresh!r}")

    def build(config: Any) -> Path:
        items = data_source(data, synthetic, seed=data_seed, min_side=min_side, max_side=max_side)
        cal: Sequence[TrainItem] | None = None
        if calibration_data is not None:
            cal = JsonlItems(calibration_data)
        elif calibration > 0:
            if not isinstance(items, SyntheticItems):
                _fail(
                    "--calibration N draws from the synthetic val split (with --synthetic); with --data, give "
                    "--calibration-data FILE"
                )
            cal = SyntheticItems(calibration, split="val", seed=data_seed, min_side=min_side, max_side=max_side)
        return train_stage3(model, items, out, config, calibration=cal)

    _train_run(
        "stage 3", Stage3Config, build, ladder=budgets, signal=signal, pool=pool, p_refine=p_refine,
        max_samples=max_samples, high_res_thresh=thresh, gate_recall=gate_recall, gate_max_fpr=gate_max_fpr,
        high_res_K=high_res_k, high_res_T=high_res_t, lr=lr, batch_size=batch_size, epochs=epochs,
        max_steps=max_steps, seed=seed, save_every=save_every, device=device, dtype=dtype,
        max_new_tokens=max_new_tokens, mine_batch_size=mine_batch_size,
    )  # fmt: skip


@train_app.command("boxes")
def train_boxes_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint directory; its config.json is updated in place")],
    data: TrainData = None,
    synthetic: Annotated[
        int | None, typer.Option("--synthetic", min=1, help="N detail questions of the synthetic train split")
    ] = None,
    candidates: Annotated[
        str, typer.Option(help="'TAU:BOXES,...' in order of preference, the paper's first")
    ] = "0.1:1,0.2:2,0.3:2,0.2:3,0.3:3",
    min_gain: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share of the items a later candidate must answer better")
    ] = 0.03,
    multi_box: Annotated[
        MultiBoxChoice,
        typer.Option(help="several boxes: joint (one sequence) or best (one per box, most confident answer)"),
    ] = "joint",
    judge: Annotated[str, typer.Option(help="auto (synthetic scoring / exact match), exact, or llm")] = "auto",
    judge_model: Annotated[Path | None, typer.Option(help="chat checkpoint for --judge llm")] = None,
    data_seed: TrainDataSeed = 0,
    min_side: TrainSide = 896,
    max_side: TrainSide = 4096,
    batch_size: TrainMineBatch = 8,
    device: TrainDevice = "cpu",
    min_pixels: TrainPixels = None,
    max_pixels: TrainPixels = None,
    max_new_tokens: TrainTokens = 32,
) -> None:
    """Pick τ_roi and the boxes per zoom step by forced-zoom answers on labelled items; writes them into MODEL.

    Give it the questions that need zooming (with --synthetic: the benchmark's detail questions). Only the answers
    are read, never a box. Requests can still set --roi-thresh / --max-boxes.
    """
    import json

    from pydantic import ValidationError

    from qzoom.checkpoint import CheckpointError
    from qzoom.demo.boxes import BoxConfig, calibrate_boxes, write_box_settings
    from qzoom.evals.synthetic import DETAIL_FAMILIES
    from qzoom.images import ImageError
    from qzoom.train.common import SyntheticItems, TrainingError, data_source

    _check_judge(judge, judge_model)
    try:
        pairs = [(float(t), int(b)) for t, b in (c.split(":") for c in candidates.split(","))]
    except ValueError:
        _fail(f"--candidates takes comma-separated TAU:BOXES pairs such as 0.1:1,0.3:2; got {candidates!r}")
    _quiet_transformers()
    try:
        config = BoxConfig(
            candidates=pairs, min_gain=min_gain, multi_box=multi_box, batch_size=batch_size,
            max_new_tokens=max_new_tokens, min_pixels=min_pixels, max_pixels=max_pixels, device=device,
        )  # fmt: skip
        families = tuple(sorted(DETAIL_FAMILIES))
        items = data_source(data, synthetic, seed=data_seed, families=families, min_side=min_side, max_side=max_side)
        chosen_judge = _make_judge(judge, judge_model, device, synthetic=isinstance(items, SyntheticItems))
        chosen = calibrate_boxes(model, items, config, judge=chosen_judge)
        write_box_settings(model, chosen)
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'boxes'}: {e['msg']}" for e in err.errors()))
    except (TrainingError, CheckpointError, ImageError, OSError) as err:
        _fail(str(err))
    several = f" (answered {chosen.multi_box})" if chosen.max_boxes > 1 else ""
    typer.echo(
        f"boxes: roi_thresh {chosen.roi_thresh:g}, {chosen.max_boxes} box(es) per step{several}, written to {model}"
    )
    typer.echo(json.dumps(chosen.right))


@train_app.command("gate-threshold")
def train_gate_threshold_cmd(
    model: Annotated[
        Path, typer.Argument(help="checkpoint directory with a gate; its config.json is updated in place")
    ],
    data: TrainData = None,
    synthetic: Annotated[
        int | None, typer.Option("--synthetic", min=2, help="N items of the synthetic val split")
    ] = None,
    rule: Annotated[
        Literal["youden", "recall"],
        typer.Option(
            help="youden: best TPR - FPR; recall: the highest threshold firing on --gate-recall of wrong answers"
        ),
    ] = "youden",
    gate_recall: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="--rule recall: share of wrong coarse answers to fire on")
    ] = 0.95,
    gate_max_fpr: GateMaxFpr = None,
    data_seed: TrainDataSeed = 0,
    min_side: TrainSide = 896,
    max_side: TrainSide = 4096,
    device: TrainDevice = "cpu",
    min_pixels: TrainPixels = None,
    max_pixels: TrainPixels = None,
    max_new_tokens: TrainTokens = 32,
    batch_size: TrainMineBatch = 8,
) -> None:
    """Choose τ_gate of a trained checkpoint on labelled items (no training) and write it into MODEL.

    Every item is answered on the coarse view at the checkpoint's budget (or --min-pixels/--max-pixels); the gate's
    scores of the wrong answers against the right ones choose the threshold by --rule. Only answers are read.
    """
    import json

    from pydantic import ValidationError

    from qzoom.checkpoint import CheckpointError
    from qzoom.images import ImageError
    from qzoom.train.common import TrainingError, data_source
    from qzoom.train.stage3 import Stage3Config, calibrate_gate

    _quiet_transformers()
    try:
        config = Stage3Config(
            gate_recall=gate_recall, gate_max_fpr=gate_max_fpr, device=device, min_pixels=min_pixels,
            max_pixels=max_pixels, max_new_tokens=max_new_tokens, mine_batch_size=batch_size,
        )  # fmt: skip
        items = data_source(data, synthetic, seed=data_seed, split="val", min_side=min_side, max_side=max_side)
        source = str(data) if data is not None else f"synthetic val split (seed {data_seed})"
        record = calibrate_gate(model, items, config, rule, source=source)
    except ValidationError as err:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'gate'}: {e['msg']}" for e in err.errors()))
    except (TrainingError, CheckpointError, ImageError, OSError) as err:
        _fail(str(err))
    if record["value"] is None:
        typer.echo(f"gate threshold: unchanged ({record['why']})")
    else:
        typer.echo(f"gate threshold: {record['value']} ({rule}), written to {model}")
    typer.echo(json.dumps(record))


@train_app.command("demo")
def train_demo_cmd(
    out: Annotated[Path, typer.Argument(help="output checkpoint directory")] = Path("qzoom-tiny"),
    work_dir: Annotated[
        Path | None, typer.Option(help="intermediate checkpoints (default: OUT.work); rerun to resume the stages")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the data stream, the initialisation and every stage")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 2,
) -> None:
    """Train the demo model qzoom-tiny from scratch: base model on the synthetic benchmark, then Stages 1-3."""
    from qzoom.demo.pipeline import DemoRecipe, train_demo
    from qzoom.train.common import TrainingError

    _quiet_transformers()
    try:
        path = train_demo(out, work_dir=work_dir, recipe=DemoRecipe(seed=seed, threads=threads), log=typer.echo)
    except (TrainingError, OSError) as err:
        _fail(str(err))
    typer.echo(f"wrote {path}; measure it with `qzoom eval demo --model {path}`")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
