"""`tokensel evaluate`: train the same recommender on several compressed text files and compare them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tokensel.config import CACHE_STORES, CacheConfig
from tokensel.errors import TokenselError

# where item tuning top (and stage 2's e2e objective) keeps f's lower-layer states: train, evaluate, check, headroom
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Folder of the half-precision block-input cache file of item tuning top / stage 2 (default: the system's temporary folder); removed when the run ends.")]
CacheStore = Annotated[str, typer.Option("--cache-store", help="Where item tuning top keeps the item LLM's lower-layer states: " + " | ".join(CACHE_STORES) + " (disk: float16, memory-mapped, bounded memory; ram: float32, must fit in half the RAM).")]


def fail(err: Console, exc: Exception) -> None:
    """Print a TokenselError's message verbatim (never read as rich markup) and exit with code 2."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(2) from None


def evaluate_command(
    items: Annotated[Path, typer.Argument(help="Items Parquet: the catalogue every texts file must cover.")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    texts: Annotated[list[Path], typer.Option("--texts", help="A compressed texts file (tokensel compress output); repeat it. The first is the baseline of the paired test.")],
    recommender: Annotated[str, typer.Option(help="hllm | sasrec-init | text-sim")] = "hllm",
    seeds: Annotated[int, typer.Option(help="Training runs per file (seeds 0..N-1); text-sim is deterministic.")] = 3,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Write the results: .json (the evaluate contract) or .parquet.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Item LLM for every file (default: the model named in the first file's metadata, else all-MiniLM-L6-v2).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs per run, the best on validation NDCG@10 is kept (default: hllm 8, sasrec-init 30).")] = None,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation NDCG@10 (0 = never).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Training histories per step.")] = 128,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: hllm 5e-4, sasrec-init 1e-3).")] = None,
    negatives: Annotated[int, typer.Option(help="Sampled negatives per step (InfoNCE).")] = 128,
    history: Annotated[int, typer.Option(help="History length fed to the user model / averaged by text-sim.")] = 10,
    pooling: Annotated[str, typer.Option(help="text-sim / sasrec-init item vector: mean-specials ([CLS] kept tokens [SEP], sentence-transformers style) | mean (kept tokens alone).")] = "mean-specials",
    center: Annotated[bool, typer.Option("--center/--no-center", help="hllm: subtract the catalogue mean from the frozen [ITEM] states.")] = True,
    item_tuning: Annotated[str, typer.Option(help="hllm: none (item LLM frozen) | top (its last block trains with the user model, lower layers cached: cheap, runs on a CPU) | lora | full (all of f trains in every run: HLLM proper, the paper's stage 3; a GPU setting).")] = "none",
    item_lr: Annotated[float, typer.Option(help="hllm with --item-tuning: learning rate of the item LLM.")] = 1e-4,
    test: Annotated[str, typer.Option(help="Paired test on per-user metrics: ttest | wilcoxon.")] = "ttest",
    id_col: Annotated[Optional[str], typer.Option(help="Item id column (default: the one in the texts metadata).")] = None,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    max_users: Annotated[Optional[int], typer.Option(help="Only the first N users (a quick check).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Folder to cache item vectors in (re-runs skip the item LLM).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (on a machine that is already busy, 1 can be several times faster than more).")] = None,
    dtype: Annotated[str, typer.Option(help="Item LLM dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every epoch.")] = False,
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """Train the same downstream recommender on each texts file and compare: Recall/NDCG@5/10/50 on the test split."""
    from tokensel.evaluate.recommenders import TrainConfig, names
    from tokensel.evaluate.runner import VectorCache, evaluate_detailed, results_table, write_results
    from tokensel.stats import TESTS

    err = Console(stderr=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if recommender not in names():
            raise TokenselError(f"--recommender must be one of {', '.join(names())} (got {recommender!r})")
        if test not in TESTS:
            raise TokenselError(f"--test must be one of {', '.join(TESTS)} (got {test!r})")
        if seeds < 1 or (epochs is not None and epochs < 1):
            raise TokenselError("--seeds and --epochs must be at least 1")
        if out is not None and out.suffix not in (".json", ".parquet"):
            raise TokenselError(f"{out}: --out must end in .json or .parquet")
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives, history=history, patience=patience or None, pooling=pooling, center=center, item_tuning=item_tuning, item_lr=item_lr, cache=CacheConfig(cache_store, cache_dir))

        def log(row: dict) -> None:
            if verbose or "stage" in row:
                err.print(json.dumps(row), highlight=False, soft_wrap=True)

        ev = evaluate_detailed(
            items, interactions, list(texts), recommender, seeds, model=model, train=cfg, device=device, dtype=dtype,
            id_col=id_col, user_col=user_col, item_col=item_col, order_col=order_col, test=test, max_users=max_users,
            cache=VectorCache(cache), log=log,
        )
    except TokenselError as exc:
        fail(err, exc)
    Console(width=None if sys.stdout.isatty() else 200).print(results_table(ev))  # piped into a log: one line per file
    if out is not None:
        write_results(ev, out)
        err.print(f"results written to {out}", markup=False)


def headroom_command(
    items: Annotated[Path, typer.Argument(help="Items Parquet.")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    ks: Annotated[str, typer.Option(help="Budgets, comma-separated.")] = "32,64",
    factor: Annotated[int, typer.Option(help="The long side is the first factor*k tokens (the paper's 4k).")] = 4,
    recommender: Annotated[str, typer.Option(help="text-sim (training-free, the cheapest) | hllm | sasrec-init")] = "text-sim",
    seeds: Annotated[int, typer.Option(help="Training runs per file (text-sim is deterministic).")] = 1,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs for hllm / sasrec-init (default: evaluate's).")] = None,
    item_tuning: Annotated[str, typer.Option(help="hllm: none | top (f's last block trains; the README's downstream setting, runs on a CPU) | lora | full.")] = "none",
    model: Annotated[Optional[str], typer.Option(help="Item LLM: hub id or folder (default all-MiniLM-L6-v2).")] = None,
    id_col: Annotated[Optional[str], typer.Option()] = None,
    text_cols: Annotated[Optional[str], typer.Option(help="Text columns in order (default title,description).")] = None,
    labels: Annotated[Optional[bool], typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` or `A B` (default).")] = None,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    test: Annotated[str, typer.Option(help="Paired test on per-user metrics: ttest | wilcoxon.")] = "ttest",
    max_users: Annotated[Optional[int], typer.Option(help="Only the first N users (a quick check).")] = None,
    work: Annotated[Optional[Path], typer.Option(help="Keep the compressed first-k files in this folder (default: a temporary one).")] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Write the rows as JSON.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")] = "auto",
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """Before training a policy: do the tokens past k help a recommender on your data? First-k vs first-4k, paired."""
    from tokensel.evaluate.headroom import headroom
    from tokensel.evaluate.recommenders import TrainConfig
    from tokensel.config import write_json
    from tokensel.evaluate.runner import fmt_p
    from tokensel.stats import paired_test_name

    err = Console(stderr=True)
    try:
        budgets = [int(x) for x in ks.split(",") if x.strip()]
    except ValueError:
        fail(err, TokenselError(f"--ks must be comma-separated integers (got {ks!r})"))
    try:
        rows = headroom(
            items, interactions, budgets, factor=factor, recommender=recommender, seeds=seeds, model=model, id_col=id_col,
            text_cols=[c.strip() for c in text_cols.split(",") if c.strip()] if text_cols else None, labels=labels,
            user_col=user_col, item_col=item_col, order_col=order_col, epochs=epochs, train=TrainConfig(item_tuning=item_tuning, cache=CacheConfig(cache_store, cache_dir)), test=test, max_users=max_users, work=work,
            device=device, dtype=dtype, log=lambda row: err.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True) if "stage" in row else None,
        )
    except TokenselError as exc:
        fail(err, exc)
    from rich.table import Table

    t = Table(title=f"tokensel headroom: {escape(str(items))}, {recommender}", caption=f"long = the first {factor}k tokens; ratio = long over first-k; p = paired {paired_test_name(test)} on per-user metrics over {rows[0].users:,} test users\ndata: {rows[0].data.note()}", caption_justify="left")
    for c in ("k", "long", "texts > k", "N@10 first-k", "N@10 long", "N@10 ratio (p)", "R@10 first-k", "R@10 long", "R@10 ratio (p)"):
        t.add_column(c, justify="right")
    t.add_column("verdict", overflow="fold", min_width=30)
    for r in rows:
        t.add_row(
            str(r.k), str(r.long_k), f"{100 * r.longer_than_k:.0f}%",
            f"{r.first_k['N@10']:.2f}", f"{r.first_long['N@10']:.2f}", f"{r.ratio['N@10']:.3f} ({fmt_p(r.p['N@10'])})",
            f"{r.first_k['R@10']:.2f}", f"{r.first_long['R@10']:.2f}", f"{r.ratio['R@10']:.3f} ({fmt_p(r.p['R@10'])})",
            escape(r.verdict),
        )
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, [r.as_dict() for r in rows])
        err.print(f"rows written to {out}", markup=False)
