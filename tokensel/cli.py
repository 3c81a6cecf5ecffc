"""The `tokensel` command: a thin layer over the Python API (tokensel.api).

It starts fast: at import it loads nothing that imports torch or transformers, so `--help`,
`--version`, `info` and `compress` with a strategy that runs no model (first-k: what `--strategy auto`
runs with the shipped bundle) take about the time of reading the items. The commands that train,
check or inspect import the heavy API when they run (`heavy`, the CLI's one deferred import).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tokensel import __version__
from tokensel.compress.job import output_paths
from tokensel.compress.run import compress as compress_file
from tokensel.config import CHECK_EPOCHS, CHECK_SEEDS, COLD_SHARE, OBJECTIVE_NAMES, CacheConfig, ItemModelConfig, PolicyConfig, Stage1Config, TextConfig, UserModelConfig
from tokensel.errors import TokenselError
from tokensel.evaluate.command import COLD_SHARE_HELP, PROTOCOL_HELP, CacheDir, CacheStore, curve_command, evaluate_command, fail, headroom_command
from tokensel.io import writers
from tokensel.io.readers import open_items
from tokensel.policy.files import CHECK_FILE, DEFAULT_BUNDLE, bundle_hash, bundle_label
from tokensel.report import bundle_summary, check_table
from tokensel.select.auto import AUTO, current_check, resolve

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Keep the most informative tokens of item texts (TSPORec).")
console = Console(stderr=True)
out_console = Console()


def heavy():
    """(tokensel.api, tokensel.inspect): torch and transformers, imported by the commands that train,
    check or inspect when they run. The CLI's one deferred import (see the module docstring)."""
    from tokensel import api, inspect

    return api, inspect


def _version(value: bool) -> None:
    if value:
        out_console.print(f"tokensel {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Keep the most informative tokens of item texts (TSPORec)."""


def _cols(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def _budgets(value: str) -> int | list[int]:
    try:
        ks = [int(v) for v in _cols(value)]
    except ValueError:
        fail(console, TokenselError(f"--k {value}: give a whole number of tokens, or several separated by commas (32,64,128)"))
    if not ks:
        fail(console, TokenselError("--k: give at least one budget"))
    return ks[0] if len(ks) == 1 else ks


def _export_plan(items: Path, out: str | None, ks: list[int], strategy: str, policy: Path | None, fmt: str) -> tuple[str | None, dict[int, Path]]:
    """For --format recbole / hllm: (a hidden Parquet output to compress to, k -> the file to export),
    named as compress names its Parquet output (auto: after the strategy it runs)."""
    if fmt == "parquet":
        return out, {}
    if fmt not in writers.FORMATS:
        raise TokenselError(f"unknown --format {fmt!r}; choose one of {', '.join(writers.FORMATS)}")
    name = resolve(policy, items, ks[0])[0] if strategy == AUTO else strategy
    exports = output_paths(items, out, tuple(ks), name, writers.SUFFIX[fmt])
    pattern = out or str(exports[ks[0]])
    hidden = str(Path(pattern).with_name(f".{Path(pattern).name}.parquet"))
    return hidden, exports


@app.command()
def compress(
    items: Annotated[Path, typer.Argument(help="Items Parquet: an id column and text columns.")],
    out: Annotated[Optional[str], typer.Option("-o", "--out", help="Output Parquet (default: <items>.k<K>-<strategy>.parquet beside the items; with several --k it must contain {k}).")] = None,
    k: Annotated[str, typer.Option(help="Tokens kept per item (the budget); several as 32,64,128 write one file each from one model pass (-o must then contain {k}).")] = "64",
    chunk: Annotated[Optional[int], typer.Option(help="Selection chunk size in tokens (default 8; first-k ignores it).", show_default=False)] = None,
    prefix: Annotated[Optional[int], typer.Option(help="Leading tokens always kept (default 16; first-k ignores it).", show_default=False)] = None,
    strategy: Annotated[str, typer.Option(help="auto (default: what the bundle's strategy check chose, first-k where it has none; see tokensel info) | policy | item-align (the policy rule with W_Q = W_K = I: needs only stage 1) | first-k | random | rarity | topk-logits")] = "auto",
    policy: Annotated[Optional[Path], typer.Option(help="Trained bundle folder (default: the one shipped with tokensel).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Item LLM: hub id or folder (default: the bundle's model, or all-MiniLM-L6-v2).")] = None,
    id_col: Annotated[Optional[str], typer.Option(help="Item id column.")] = None,
    text_cols: Annotated[Optional[str], typer.Option(help="Comma-separated text columns, e.g. title,description.")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Tokens of the item text considered at all.")] = None,
    template: Annotated[Optional[str], typer.Option(help="Prompt before the text (never in the budget or output).")] = None,
    labels: Annotated[Optional[bool], typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` (labels) or `A B` (default: the bundle's setting, else no labels).")] = None,
    passthrough: Annotated[str, typer.Option(help="Comma-separated input columns copied to the output.")] = "",
    seed: Annotated[int, typer.Option(help="Seed of the random strategy.")] = 0,
    batch_rows: Annotated[Optional[int], typer.Option(help="Rows read per window (default 4096; 16384 when a model runs on CUDA). Results do not depend on it.")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per forward pass (default 8192; 65536 on CUDA). Results do not depend on it on the CPU; on a GPU pin it for byte-equal reruns.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N rows.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | fp32 | bf16 | fp16")] = "auto",
    cache: Annotated[Optional[Path], typer.Option(help="Score cache file (default: <items>.cache.sqlite beside the output). Makes runs resumable (a killed run loses at most the batch in flight), incremental (only new or changed items are scored) and free at another --k, --prefix or --chunk (no model runs).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the score cache.")] = False,
    engine: Annotated[str, typer.Option(help="local | ray (Ray Data with --workers model actors; pip install 'tokensel\\[ray]').")] = "local",  # \\[ escapes rich markup
    workers: Annotated[int, typer.Option(help="Model actors for --engine ray.")] = 2,
    fmt: Annotated[str, typer.Option("--format", help="parquet | recbole (an atomic .item file) | hllm (HLLM's item_id,title,tag,description CSV).")] = "parquet",  # [formats hook]
) -> None:
    """Compress every item's text to K tokens and write Parquet (or, with --format, a RecBole or HLLM item file).

    With a forward-pass strategy (policy, item-align, topk-logits) each item's token scores are kept in a
    score cache beside the output, so re-running after an interruption resumes, re-running on an
    updated catalogue scores only the items whose text changed, and another budget runs no model.
    """
    try:
        budgets = _budgets(k)
        ks = [budgets] if isinstance(budgets, int) else budgets
        out, exports = _export_plan(items, out, ks, strategy, policy, fmt)
        with progress_bar(items, limit) as tick:
            summary = compress_file(
                items, out, k=budgets, chunk=chunk, prefix=prefix, strategy=strategy, policy=policy, model=model,
                id_col=id_col, text_cols=_cols(text_cols) if text_cols else None, max_len=max_len, template=template, labels=labels,
                passthrough=_cols(passthrough), seed=seed, batch_rows=batch_rows, batch_tokens=batch_tokens, limit=limit,
                device=device, dtype=dtype, cache=False if no_cache else (cache or True), engine=engine,
                workers=workers, on_progress=tick,
            )
        for s in summary if isinstance(summary, list) else [summary]:  # the Parquet result, re-written in the asked layout
            if s.k in exports:
                try:
                    writers.export(s.out, exports[s.k], fmt)
                finally:
                    Path(s.out).unlink(missing_ok=True)
                s.out = str(exports[s.k])
    except TokenselError as exc:
        fail(console, exc)
    print_summary(summary if isinstance(summary, list) else [summary])


@contextlib.contextmanager
def progress_bar(items: Path, limit: int | None):
    """A bar with items/s that advances as forward batches finish (not once per window)."""
    try:
        total = open_items(items).num_rows  # None for CSV / JSON Lines: an open-ended bar
    except TokenselError:
        total = None  # api.compress names the problem
    total = (min(total, limit) if total is not None else limit) if limit else total
    columns = [TextColumn("compress"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("compress", total=total, rate="")
        start = time.perf_counter()
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=f"{done[0] / max(time.perf_counter() - start, 1e-9):.1f} items/s")

        yield tick


def print_summary(summaries: list) -> None:
    """One column per budget; the run's shared counts once; paths printed whole (never clipped)."""
    first = summaries[0]
    t = Table(title="tokensel compress", show_header=len(summaries) > 1)
    t.add_column("")
    for s in summaries:
        t.add_column(f"k = {s.k}", justify="right")
    row = lambda label, f: t.add_row(label, *[f(s) for s in summaries])  # noqa: E731
    row("items", lambda s: f"{s.items:,}")
    row("empty texts (written as empty rows)", lambda s: f"{s.empty:,}")
    row("texts with <= k tokens (kept whole)", lambda s: f"{s.shorter_than_k:,}")
    row("texts with > k tokens (selected)", lambda s: f"{s.scored:,}")
    row("tokens out", lambda s: f"{s.tokens_out:,}")
    row("ratio out/in", lambda s: f"{s.ratio:.3f}")
    out_console.print(t)
    lines = [f"tokens in {first.tokens_in:,}; engine {first.engine}; "
             f"{first.seconds:.1f} s ({first.items / max(first.seconds, 1e-9):.1f} items/s)"]
    if first.cache:
        lines.append(f"scored by the model in this run {first.computed:,}, reused from the cache {first.reused:,} "
                     f"({first.forward_batches:,} forward batches)")
        lines.append(f"cache: {first.cache}")
    lines += [f"wrote {s.out}" for s in summaries]
    for line in lines:
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)
    for note in first.notes:
        out_console.print(note, markup=False, highlight=False, soft_wrap=True)
    for warning in first.warnings:
        console.print(warning, markup=False, highlight=False, soft_wrap=True)
    for col in first.empty_columns:
        console.print(f"warning: text column {col!r} is null or blank in every row: check --text-cols", markup=False, highlight=False, soft_wrap=True)


@app.command()
def train(
    items: Annotated[Path, typer.Argument(help="Items Parquet.")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Bundle folder to write.")],
    stage: Annotated[str, typer.Option(help="all | 1 | 2 (2 alone continues the stage-1 bundle at --out).")] = "all",
    model: Annotated[str, typer.Option(help="Item LLM: hub id or folder; 'default' is all-MiniLM-L6-v2.")] = ItemModelConfig.base_model,
    id_col: Annotated[str, typer.Option()] = TextConfig.id_col,
    text_cols: Annotated[str, typer.Option()] = ",".join(TextConfig().text_cols),
    max_len: Annotated[int, typer.Option()] = TextConfig.max_len,
    template: Annotated[str, typer.Option()] = TextConfig.template,
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` (labels) or `A B` (default).")] = TextConfig.labels,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    tuning: Annotated[str, typer.Option(help="Stage-1 item LLM tuning: none | top (f's last block; BERT-style models, fine on a CPU) | lora | full.")] = ItemModelConfig.tuning,
    user_layers: Annotated[int, typer.Option(help="User model transformer blocks.")] = UserModelConfig.layers,
    user_pretrained: Annotated[Optional[str], typer.Option(help="Use this pretrained LM as the user model (GPU).")] = None,
    epochs1: Annotated[int, typer.Option(help="Stage-1 epochs.")] = Stage1Config.epochs,
    lr1: Annotated[float, typer.Option(help="Stage-1 learning rate (user model).")] = Stage1Config.lr,
    item_lr: Annotated[float, typer.Option(help="Stage-1 learning rate of the item LLM (top/lora/full).")] = Stage1Config.item_lr,
    epochs2: Annotated[Optional[int], typer.Option(help="Stage-2 epochs (default: 12 for e2e, 2 for paper / bounded).")] = None,
    lr2: Annotated[float, typer.Option(help="Stage-2 (policy) learning rate.")] = PolicyConfig.lr,
    k: Annotated[int, typer.Option(help="Budget used while training the policy.")] = PolicyConfig.k,
    prefix: Annotated[int, typer.Option()] = PolicyConfig.prefix,
    train_chunk: Annotated[int, typer.Option()] = PolicyConfig.train_chunk,
    select_chunk: Annotated[int, typer.Option()] = PolicyConfig.select_chunk,
    samples: Annotated[int, typer.Option(help="Sampled subsets per history (2 = the paper's pair).")] = PolicyConfig.samples,
    objective: Annotated[str, typer.Option(help="Stage-2 objective: auto (e2e where the item LLM is BERT-style, else bounded) | " + " | ".join(OBJECTIVE_NAMES))] = PolicyConfig.objective,
    masked_side: Annotated[str, typer.Option(help="e2e: which items are embedded from their kept tokens: both | history | target.")] = PolicyConfig.masked_side,
    mask_layers: Annotated[str, typer.Option(help="e2e: where the keep mask acts: top (the last block's [ITEM] query over cached states; CPU-sized) | exact (item vectors from f over the kept tokens, the mask's gradient from top; CPU-sized) | all (every block, exact value and gradient; GPU-sized).")] = PolicyConfig.mask_layers,
    sigma: Annotated[float, typer.Option(help="e2e: perturbed top-k noise, relative to each item's chunk-score spread.")] = PolicyConfig.sigma,
    perturb_samples: Annotated[int, typer.Option(help="e2e: rule evaluations per backward pass (antithetic pairs).")] = PolicyConfig.perturb_samples,
    prior_lr: Annotated[float, typer.Option(help="e2e: learning rate of the head's token position prior.")] = PolicyConfig.prior_lr,
    model_lr: Annotated[float, typer.Option(help="e2e: learning rate of the surrogate user model (and of the item readout unless --readout-lr).")] = PolicyConfig.model_lr,
    readout_lr: Annotated[Optional[float], typer.Option(help="e2e: learning rate of the surrogate item readout (default: --model-lr).")] = PolicyConfig.readout_lr,
    grad_chunks: Annotated[int, typer.Option(help="e2e with --mask-layers exact: dropped chunks per item whose keep gradient is exact (f gated over the kept tokens and these); 0: the top block's gradient.")] = PolicyConfig.grad_chunks,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="e2e: first stage-2 epochs with the head held, only the surrogate learning (on compressed texts); default: all but the last 2.")] = None,
    surrogate_mix: Annotated[float, typer.Option(help="e2e: share of steps the surrogate trains on first-k's texts (no head gradient there).")] = PolicyConfig.surrogate_mix,
    keep_best: Annotated[bool, typer.Option("--keep-best/--no-keep-best", help="e2e: end by keeping the best of the trained head, the identity head (item-align) and first-k on the surrogate's validation.")] = PolicyConfig.keep_best,
    settle_epochs: Annotated[int, typer.Option(help="e2e with --keep-best: epochs after the head's last step with the head held; the choice pools their validations.")] = PolicyConfig.settle_epochs,
    negatives: Annotated[int, typer.Option(help="Sampled negatives, both stages.")] = Stage1Config.negatives,
    history: Annotated[int, typer.Option(help="History length, both stages and the user model.")] = Stage1Config.history,
    max_users: Annotated[Optional[int], typer.Option(help="Stage 2 on at most this many users.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of both stages.")] = Stage1Config.seed,
    check: Annotated[bool, typer.Option("--check/--no-check", help="After stage 2, the downstream strategy check (see tokensel check): which strategy to trust.")] = True,
    check_epochs: Annotated[int, typer.Option(help="Epochs of each recommender the check trains.")] = CHECK_EPOCHS,
    protocol: Annotated[str, typer.Option(help="loo: train on every user's history | cold: leave the newest --cold-share of the items (by first interaction) out of both stages, negatives included, and run the check under the cold protocol.")] = "loo",
    cold_share: Annotated[float, typer.Option(help=COLD_SHARE_HELP)] = COLD_SHARE,
    check_seeds: Annotated[int, typer.Option(help="Training runs per strategy in the check; 2 or more let its test see seed variance.")] = CHECK_SEEDS,
    device: Annotated[str, typer.Option()] = "auto",
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """Train a policy bundle: stage 1 (recommender pretraining) and stage 2 (policy learning), then the
    strategy check: first-k, item-align and the policy, each retrained downstream and scored on validation.

    Each flag sets one field of a stage's config (tokensel.config), which checks its values; the defaults are theirs.
    """

    stages = {"all": (1, 2), "1": (1,), "2": (2,)}.get(stage)
    try:
        if stages is None:
            raise TokenselError(f"--stage must be all, 1 or 2 (got {stage!r})")
        configs = dict(
            text=TextConfig(id_col=id_col, text_cols=_cols(text_cols), template=template, max_len=max_len, labels=labels),
            item_cfg=ItemModelConfig(base_model=model, tuning=tuning),
            user_cfg=UserModelConfig(kind="pretrained" if user_pretrained else "transformer", layers=user_layers, max_history=history, pretrained=user_pretrained),
            stage1=Stage1Config(epochs=epochs1, lr=lr1, item_lr=item_lr, negatives=negatives, history=history, seed=seed),
            policy=PolicyConfig(prefix=prefix, k=k, train_chunk=train_chunk, select_chunk=select_chunk, epochs=epochs2, lr=lr2, negatives=negatives, history=history, samples=samples, objective=objective, seed=seed, max_users=max_users,
                                masked_side=masked_side, mask_layers=mask_layers, sigma=sigma, perturb_samples=perturb_samples, prior_lr=prior_lr, model_lr=model_lr, readout_lr=readout_lr,
                                grad_chunks=grad_chunks, warmup_epochs=warmup_epochs, surrogate_mix=surrogate_mix, keep_best=keep_best, settle_epochs=settle_epochs),
        )
        bundle = heavy()[0].train(
            items, interactions, out, stages=stages, **configs, columns=(user_col, item_col, order_col), device=device,
            log=lambda row: console.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True),
            check_strategies=check, check_epochs=check_epochs, protocol=protocol, cold_share=cold_share, check_seeds=check_seeds, cache=CacheConfig(cache_store, cache_dir),
        )
    except TokenselError as exc:
        fail(console, exc)
    out_console.print(f"bundle written to {bundle.path} (hash {bundle.hash})", markup=False)
    for w in bundle.config.logs.get("stage2", {}).get("warnings", []):
        console.print(f"[yellow]stage 2:[/] {escape(w)}")
    if verdict := bundle.check:
        print_lines(check_table(verdict))


@app.command("check")
def check_command(
    items: Annotated[Path, typer.Argument(help="Items Parquet (the bundle's training items, or a catalogue to check it on).")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    bundle: Annotated[Optional[Path], typer.Option("--policy", help="Bundle folder (default: the shipped one).")] = None,
    k: Annotated[Optional[int], typer.Option(help="Budget (default: the one the policy was trained at).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of each recommender (fixed: validation is what is scored).")] = CHECK_EPOCHS,
    seeds: Annotated[int, typer.Option(help="Training runs per strategy; 2 or more let the test see seed variance (1: a paired test over users, which cannot).")] = CHECK_SEEDS,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    max_users: Annotated[Optional[int], typer.Option(help="Only the first N users (a quick look).")] = None,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Write the verdict into the bundle (check.json), where compress --strategy auto reads it.")] = True,
    protocol: Annotated[str, typer.Option(help="loo | cold: the scored validation targets are the newest --cold-share of the items (by first interaction, test interactions not read), never trained on; the verdict is over the users whose validation target is cold.")] = "loo",
    cold_share: Annotated[float, typer.Option(help=COLD_SHARE_HELP)] = COLD_SHARE,
    device: Annotated[str, typer.Option()] = "auto",
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """Which strategy to trust with a bundle: first-k, item-align and the policy compressed at k, the same
    recommender (hllm) retrained on each with several seeds, VALIDATION targets scored (never test), each
    compared with first-k by a test over seeds and users (with --seeds 1, a paired test that cannot see seed variance)."""
    try:
        result = heavy()[0].check(
            bundle or DEFAULT_BUNDLE, items, interactions, k=k, seeds=seeds, epochs=epochs, columns=(user_col, item_col, order_col),
            max_users=max_users, device=device, save=save, protocol=protocol, cold_share=cold_share, cache=CacheConfig(cache_store, cache_dir),
            log=lambda row: console.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True),
        )
    except TokenselError as exc:
        fail(console, exc)
    print_lines(check_table(result))
    if save:
        out_console.print(f"saved in {(bundle or DEFAULT_BUNDLE) / CHECK_FILE}", markup=False)


def print_lines(lines: list[str]) -> None:
    for line in lines:  # plain lines, never wrapped into table cells: easy to read and to grep
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def inspect(
    items: Annotated[Path, typer.Argument(help="The items Parquet that was compressed.")],
    compressed: Annotated[Path, typer.Argument(help="The output of tokensel compress.")],
    ids: Annotated[str, typer.Option(help="Comma-separated item ids to show (default: the first --n whose selection differs from first-k).")] = "",
    n: Annotated[int, typer.Option(help="How many items to show.")] = 3,
    top: Annotated[int, typer.Option(help="How many frequent tokens to list.")] = 15,
) -> None:
    """Show kept tokens vs first-k: green = kept only by the selection, blue = only by first-k (paper fig. 3, 4)."""

    ins = heavy()[1]
    try:
        report = ins.inspect(items, compressed, ids=_cols(ids), n=n, top=top)
    except TokenselError as exc:
        fail(console, exc)
    ins.render(report, out_console)


@app.command()
def info(
    bundle: Annotated[Optional[Path], typer.Argument(help="Bundle folder (default: the shipped one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole config.json instead of the summary.")] = False,
) -> None:
    """How a bundle was made: model, text, training data and settings, what stage 2 warned about, and its hash."""
    path = bundle or DEFAULT_BUNDLE
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        fail(console, TokenselError(f"{path}: not a tokensel bundle (no config.json)"))
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        fail(console, TokenselError(f"{cfg_file}: unreadable bundle config ({exc})"))
    if as_json:
        out_console.print_json(data=cfg)
        out_console.print(f"hash {bundle_hash(path)}", markup=False)
        return
    lines = [f"tokensel bundle: {bundle_label(path)}"]
    for label, value in [*bundle_summary(cfg), ("hash", bundle_hash(path))]:
        first, *rest = value.split("\n")
        lines.append(f"  {label + ':':<18} {first}")
        lines += [f"  {'':<18} {more}" for more in rest]
    try:
        check = current_check(path)
    except TokenselError as exc:
        fail(console, exc)
    lines += check_table(check) if check else [f"  {'strategy check:':<18} none for these weights (tokensel check); --strategy auto runs first-k"]
    print_lines(lines)


app.command("evaluate")(evaluate_command)
app.command("headroom")(headroom_command)
app.command("curve")(curve_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
