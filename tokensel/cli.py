"""The `tokensel` command: a thin layer over the Python API (tokensel.api)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokensel.errors import TokenselError
from tokensel.evaluate.command import evaluate_command, fail, headroom_command
from tokensel.io import writers  # [formats hook]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Keep the most informative tokens of item texts (TSPORec).")
console = Console(stderr=True)
out_console = Console()


def _cols(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def _export_target(items: Path, out: Path | None, k: int, strategy: str, fmt: str) -> tuple[Path | None, Path | None]:
    """[formats hook] For --format recbole/hllm: compress to a hidden Parquet beside the target, export after."""
    if fmt == "parquet":
        return out, None
    if fmt not in writers.FORMATS:
        raise TokenselError(f"unknown --format {fmt!r}; choose one of {', '.join(writers.FORMATS)}")
    target = out or Path.cwd() / f"{items.stem}.k{k}-{strategy}{writers.SUFFIX[fmt]}"
    return target.with_name(f".{target.name}.parquet"), target


@app.command()
def compress(
    items: Annotated[Path, typer.Argument(help="Items Parquet: an id column and text columns.")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output Parquet (default: ./<items>.k<K>-<strategy>.parquet).")] = None,
    k: Annotated[int, typer.Option(help="Tokens kept per item (the budget).")] = 64,
    chunk: Annotated[int, typer.Option(help="Selection chunk size in tokens.")] = 8,
    prefix: Annotated[int, typer.Option(help="Leading tokens always kept.")] = 16,
    strategy: Annotated[str, typer.Option(help="policy | item-align (the policy rule with W_Q = W_K = I: needs only stage 1) | first-k | random | rarity | topk-logits")] = "policy",
    policy: Annotated[Optional[Path], typer.Option(help="Trained bundle folder (default: the one shipped with tokensel).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Item LLM: hub id or folder (default: the bundle's model, or all-MiniLM-L6-v2).")] = None,
    id_col: Annotated[Optional[str], typer.Option(help="Item id column.")] = None,
    text_cols: Annotated[Optional[str], typer.Option(help="Comma-separated text columns, e.g. title,description.")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Tokens of the item text considered at all.")] = None,
    template: Annotated[Optional[str], typer.Option(help="Prompt before the text (never in the budget or output).")] = None,
    labels: Annotated[Optional[bool], typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` (labels) or `A B` (default: the bundle's setting, else no labels).")] = None,
    passthrough: Annotated[str, typer.Option(help="Comma-separated input columns copied to the output.")] = "",
    seed: Annotated[int, typer.Option(help="Seed of the random strategy.")] = 0,
    batch_rows: Annotated[Optional[int], typer.Option(help="Rows read per window (default 4096; 16384 on CUDA). Results do not depend on it.")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per forward pass (default 8192; 65536 on CUDA). Results do not depend on it on the CPU; on a GPU pin it for byte-equal reruns.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N rows.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | fp32 | bf16 | fp16")] = "auto",
    cache: Annotated[Optional[Path], typer.Option(help="Selection cache file (default: <out>.cache.sqlite). Makes runs resumable: an interrupted run continues where it stopped, and a re-run scores only new or changed items.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the selection cache.")] = False,
    engine: Annotated[str, typer.Option(help="local | ray (Ray Data with --workers model actors; pip install 'tokensel\\[ray]').")] = "local",  # \\[ escapes rich markup
    workers: Annotated[int, typer.Option(help="Model actors for --engine ray.")] = 2,
    fmt: Annotated[str, typer.Option("--format", help="parquet | recbole (an atomic .item file) | hllm (HLLM's item_id,title,tag,description CSV).")] = "parquet",  # [formats hook]
) -> None:
    """Compress every item's text to K tokens and write Parquet (or, with --format, a RecBole or HLLM item file).

    With a forward-pass strategy (policy, item-align, topk-logits) finished items are kept in a selection cache
    beside the output, so re-running the same command after an interruption resumes, and re-running
    it on an updated catalogue recomputes only the items whose text changed.
    """
    from tokensel import api

    try:
        out, export_to = _export_target(items, out, k, strategy, fmt)  # [formats hook]
        summary = api.compress(
            items, out, k=k, chunk=chunk, prefix=prefix, strategy=strategy, policy=policy, model=model,
            id_col=id_col, text_cols=_cols(text_cols) if text_cols else None, max_len=max_len, template=template, labels=labels,
            passthrough=_cols(passthrough), seed=seed, batch_rows=batch_rows, batch_tokens=batch_tokens, limit=limit,
            device=device, dtype=dtype, progress=True, cache=False if no_cache else (cache or True), engine=engine,
            workers=workers,
        )
        if export_to is not None:  # [formats hook] the Parquet result, re-written in the asked layout
            try:
                writers.export(out, export_to, fmt)
            finally:
                out.unlink(missing_ok=True)
            summary.out = str(export_to)
    except TokenselError as exc:
        fail(console, exc)
    t = Table(title=f"tokensel compress: {escape(str(summary.out))}", show_header=False)
    t.add_row("items", f"{summary.items:,}")
    t.add_row("empty texts (written as empty rows)", f"{summary.empty:,}")
    t.add_row("texts with <= k tokens (kept whole)", f"{summary.shorter_than_k:,}")
    t.add_row("texts with > k tokens (selected)", f"{summary.scored:,}")
    if summary.cache:
        t.add_row("  scored in this run", f"{summary.computed:,}")
        t.add_row("  reused from the cache", f"{summary.reused:,} ({escape(str(summary.cache))})")
    t.add_row("tokens in", f"{summary.tokens_in:,}")
    t.add_row("tokens out", f"{summary.tokens_out:,}")
    t.add_row("ratio out/in", f"{summary.ratio:.3f}")
    t.add_row("engine", summary.engine)
    t.add_row("time", f"{summary.seconds:.1f} s ({summary.items / max(summary.seconds, 1e-9):.1f} items/s)")
    out_console.print(t)


@app.command()
def train(
    items: Annotated[Path, typer.Argument(help="Items Parquet.")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Bundle folder to write.")],
    stage: Annotated[str, typer.Option(help="all | 1 | 2 (2 alone continues the stage-1 bundle at --out).")] = "all",
    model: Annotated[str, typer.Option(help="Item LLM: hub id or folder; 'default' is all-MiniLM-L6-v2.")] = "default",
    id_col: Annotated[str, typer.Option()] = "item_id",
    text_cols: Annotated[str, typer.Option()] = "title,description",
    max_len: Annotated[int, typer.Option()] = 256,
    template: Annotated[str, typer.Option()] = "",
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` (labels) or `A B` (default).")] = False,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    tuning: Annotated[str, typer.Option(help="Stage-1 item LLM tuning: none | top (f's last block; BERT-style models, fine on a CPU) | lora | full.")] = "none",
    user_layers: Annotated[int, typer.Option(help="User model transformer blocks.")] = 2,
    user_pretrained: Annotated[Optional[str], typer.Option(help="Use this pretrained LM as the user model (GPU).")] = None,
    epochs1: Annotated[int, typer.Option(help="Stage-1 epochs.")] = 20,
    lr1: Annotated[float, typer.Option(help="Stage-1 learning rate (user model).")] = 1e-3,
    item_lr: Annotated[float, typer.Option(help="Stage-1 learning rate of the item LLM (lora/full).")] = 1e-4,
    epochs2: Annotated[int, typer.Option(help="Stage-2 epochs.")] = 2,
    lr2: Annotated[float, typer.Option(help="Stage-2 (policy) learning rate.")] = 1e-3,
    k: Annotated[int, typer.Option(help="Budget used while training the policy.")] = 64,
    prefix: Annotated[int, typer.Option()] = 16,
    train_chunk: Annotated[int, typer.Option()] = 8,
    select_chunk: Annotated[int, typer.Option()] = 8,
    samples: Annotated[int, typer.Option(help="Sampled subsets per history (2 = the paper's pair).")] = 2,
    objective: Annotated[str, typer.Option(help="paper | bounded")] = "bounded",
    reward: Annotated[str, typer.Option(help="history (paper: CE of the next item from sampled history subsets) | credit (the same CE, one history item varied at a time, the rest full text) | credit-both (credit plus the subset as the positive after the items before it) | item (subset close to the full-text embedding) | target (sampled subsets of the next item, everything compressed) | text-sim (subsets as the positive of the training-free text-sim scorer)")] = "history",
    negatives: Annotated[int, typer.Option()] = 128,
    history: Annotated[int, typer.Option()] = 10,
    max_users: Annotated[Optional[int], typer.Option(help="Stage 2 on at most this many users.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Train a policy bundle: stage 1 (recommender pretraining) and stage 2 (policy learning)."""
    from tokensel import api
    from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config, TextConfig, UserModelConfig

    stages = {"all": (1, 2), "1": (1,), "2": (2,)}.get(stage)
    if stages is None:
        fail(console, TokenselError(f"--stage must be all, 1 or 2 (got {stage!r})"))
    try:
        bundle = api.train(
            items, interactions, out, stages=stages,
            text=TextConfig(id_col=id_col, text_cols=_cols(text_cols), template=template, max_len=max_len, labels=labels),
            item_cfg=ItemModelConfig(base_model=model, tuning=tuning),
            user_cfg=UserModelConfig(kind="pretrained" if user_pretrained else "transformer", layers=user_layers, max_history=history, pretrained=user_pretrained),
            stage1=Stage1Config(epochs=epochs1, lr=lr1, item_lr=item_lr, negatives=negatives, history=history, seed=seed),
            policy=PolicyConfig(prefix=prefix, k=k, train_chunk=train_chunk, select_chunk=select_chunk, epochs=epochs2, lr=lr2, negatives=negatives, history=history, samples=samples, objective=objective, reward=reward, seed=seed, max_users=max_users),
            columns=(user_col, item_col, order_col), device=device,
            log=lambda row: console.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True),
        )
    except TokenselError as exc:
        fail(console, exc)
    out_console.print(f"bundle written to {bundle.path} (hash {bundle.hash})", markup=False)
    for w in bundle.config.logs.get("stage2", {}).get("warnings", []):
        console.print(f"[yellow]stage 2:[/] {escape(w)}")


@app.command()
def inspect(
    items: Annotated[Path, typer.Argument(help="The items Parquet that was compressed.")],
    compressed: Annotated[Path, typer.Argument(help="The output of tokensel compress.")],
    ids: Annotated[str, typer.Option(help="Comma-separated item ids to show (default: the first --n whose selection differs from first-k).")] = "",
    n: Annotated[int, typer.Option(help="How many items to show.")] = 3,
    top: Annotated[int, typer.Option(help="How many frequent tokens to list.")] = 15,
) -> None:
    """Show kept tokens vs first-k: green = kept only by the selection, blue = only by first-k (paper fig. 3, 4)."""
    from tokensel import inspect as ins

    try:
        report = ins.inspect(items, compressed, ids=_cols(ids), n=n, top=top)
    except TokenselError as exc:
        fail(console, exc)
    ins.render(report, out_console)


@app.command()
def info(bundle: Annotated[Optional[Path], typer.Argument(help="Bundle folder (default: the shipped one).")] = None) -> None:
    """Print how a bundle was made (its config.json) and its hash."""
    from tokensel.models.bundle import DEFAULT_BUNDLE, bundle_hash

    path = bundle or DEFAULT_BUNDLE
    cfg = path / "config.json"
    if not cfg.exists():
        fail(console, TokenselError(f"{path}: not a tokensel bundle (no config.json)"))
    out_console.print_json(cfg.read_text())
    out_console.print(f"hash {bundle_hash(path)}", markup=False)


app.command("evaluate")(evaluate_command)
app.command("headroom")(headroom_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
