"""`tokensel evaluate`: train the same recommender on several compressed text files and compare them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tokensel.config import CACHE_STORES, COLD_SHARE, CacheConfig
from tokensel.errors import TokenselError

PROTOCOL_HELP = (
    "loo: leave-one-out (every test item is also a training item) | cold: the newest --cold-share of the items (by first "
    "interaction) never trained on, not even as negatives; metrics over the users whose test target is one of them, the others beside."
)
COLD_SHARE_HELP = "--protocol cold: share of the items held out as cold, those whose first interaction comes last."
# where item tuning top (and stage 2's e2e objective) keeps f's lower-layer states: train, evaluate, check, headroom, curve
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
    protocol: Annotated[str, typer.Option(help=PROTOCOL_HELP)] = "loo",
    cold_share: Annotated[float, typer.Option(help=COLD_SHARE_HELP)] = COLD_SHARE,
    cache: Annotated[Optional[Path], typer.Option(help="Folder to keep item vectors and finished runs in: a re-run, or one started again after a kill, trains only the runs that had not finished.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (on a machine that is already busy, 1 can be several times faster than more).")] = None,
    dtype: Annotated[str, typer.Option(help="Item LLM dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every epoch.")] = False,
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """Train the same downstream recommender on each texts file and compare: Recall/NDCG@5/10/50 on the test split."""
    from tokensel.evaluate.recommenders import TrainConfig, names
    from tokensel.evaluate.cache import EvalCache
    from tokensel.evaluate.runner import evaluate_detailed, results_table, write_results
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
            cache=EvalCache(cache), log=log, protocol=protocol, cold_share=cold_share,
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
    item_tuning: Annotated[str, typer.Option(help="hllm: none | top (f's last block trains; the setting of RESULTS.md's downstream tables, runs on a CPU) | lora | full.")] = "none",
    model: Annotated[Optional[str], typer.Option(help="Item LLM: hub id or folder (default all-MiniLM-L6-v2).")] = None,
    id_col: Annotated[Optional[str], typer.Option()] = None,
    text_cols: Annotated[Optional[str], typer.Option(help="Text columns in order (default title,description).")] = None,
    labels: Annotated[Optional[bool], typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` or `A B` (default).")] = None,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    test: Annotated[str, typer.Option(help="Paired test on per-user metrics: ttest | wilcoxon.")] = "ttest",
    max_users: Annotated[Optional[int], typer.Option(help="Only the first N users (a quick check).")] = None,
    protocol: Annotated[str, typer.Option(help=PROTOCOL_HELP)] = "loo",
    cold_share: Annotated[float, typer.Option(help=COLD_SHARE_HELP)] = COLD_SHARE,
    work: Annotated[Optional[Path], typer.Option(help="Keep the compressed first-k files and finished runs in this folder: started again with it, headroom trains only what is missing (default: a temporary one).")] = None,
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
            protocol=protocol, cold_share=cold_share, device=device, dtype=dtype, log=lambda row: err.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True) if "stage" in row else None,
        )
    except TokenselError as exc:
        fail(err, exc)
    from rich.table import Table

    t = Table(title=f"tokensel headroom: {escape(str(items))}, {recommender}", caption=f"long = the first {factor}k tokens; ratio = long over first-k; p = paired {paired_test_name(test)} on per-user metrics over {rows[0].users:,} {'cold-target ' if rows[0].cold else ''}test users\ndata: {rows[0].data.note()}" + (f"\n{rows[0].cold.note()}" if rows[0].cold else ""), caption_justify="left")
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


def curve_table(result: dict):
    """One row per (strategy, k): tokens and merged items, test metrics over seeds, ratios to first-k and
    to the reference with the seed-aware p (paired p beside it), the item-LLM cost relative to the
    reference, validation N@10."""
    from rich.table import Table

    from tokensel.evaluate.runner import fmt_p

    multi = len(result["seeds"]) > 1 and not result["deterministic"]
    ref = result["reference"]
    seeds = "deterministic, one run" if result["deterministic"] else f"seeds {result['seeds']}" if multi else "one seed"
    t = Table(
        title=f"tokensel curve: {escape(Path(result['items']).name)}, {escape(result['recommender'])}, {seeds}, {result['protocol']}",
        caption=(
            f"ratios on test NDCG@10; p = seed-aware test (seeds and users) / paired t-test over users; reference = {ref['name']} "
            f"(test N@10 {ref['test']['N@10']:.2f}); cost = item-LLM forward time per item over the first {result['cost']['items_timed']:,} items "
            f"({ref['cost_ms_per_item']:.2f} ms for the reference); merged = items whose kept tokens equal another item's (one item to the "
            f"recommender; a tie counts against the target); run = the strategy to run at k (validation, {escape(result['verdict']['rule'])})\n"
            f"{escape(result['protocol_note'].split('; p = paired')[0])}"
        ),
        caption_justify="left",
    )
    for c in ("strategy", "k", "tokens", "merged", "N@10", "R@10", "vs first-k (p / paired)", "vs reference (p / paired)", "cost", "valid N@10", "run"):
        t.add_column(c, justify="left" if c == "strategy" else "right")
    sd = lambda cell, m: f" ±{cell['test_std'][m]:.2f}" if multi else ""  # noqa: E731
    cmp = lambda c: f"{c['N@10']['ratio']:.3f} ({fmt_p(c['N@10']['p'])} / {fmt_p(c['N@10']['p_paired'])})"  # noqa: E731
    for cell in sorted(result["cells"], key=lambda c: (c["k"], result["strategies"].index(c["strategy"]))):
        name = cell["strategy"] + (f" (= {cell['same_as']})" if cell["same_as"] else "")
        run = "✓" if result["verdict"]["run"][str(cell["k"])] == cell["strategy"] else ""
        cost = "-" if cell["cost_vs_reference"] is None else f"{cell['cost_vs_reference']:.2f}x"
        t.add_row(
            escape(name), str(cell["k"]), f"{cell['tokens_per_item']:.1f}", f"{cell['merged_items']:,}",
            f"{cell['test']['N@10']:.2f}{sd(cell, 'N@10')}", f"{cell['test']['R@10']:.2f}{sd(cell, 'R@10')}",
            "-" if cell["strategy"] == "first-k" else cmp(cell["vs_first_k"]), cmp(cell["vs_reference"]), cost, f"{cell['valid']['N@10']:.2f}", run,
        )
    return t


def curve_command(
    items: Annotated[Path, typer.Argument(help="Items Parquet (or CSV / JSON Lines).")],
    interactions: Annotated[Path, typer.Argument(help="Interactions Parquet: user id, item id, order column.")],
    ks: Annotated[str, typer.Option(help="Budgets, comma-separated, increasing.")] = "16,32,64,128",
    strategies: Annotated[str, typer.Option(help="Comma-separated: first-k (always run: every ratio is to it), item-align, policy.")] = "first-k,item-align,policy",
    policy: Annotated[Optional[Path], typer.Option(help="Bundle for item-align and policy (default: the shipped one; no training needed).")] = None,
    recommender: Annotated[str, typer.Option(help="hllm | text-sim (training-free, the cheapest) | sasrec-init")] = "hllm",
    item_tuning: Annotated[Optional[str], typer.Option(help="hllm: none | top (f's last block trains; default where the model allows it) | lora | full.")] = None,
    seeds: Annotated[int, typer.Option(help="Training runs per file (seeds 0..N-1); 2 or more let the verdicts see seed variance.")] = 3,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs per run (default: evaluate's).")] = None,
    protocol: Annotated[str, typer.Option(help="loo (leave-one-out) | cold (items never seen in training).")] = "loo",
    cold_share: Annotated[float, typer.Option(help="--protocol cold: share of the items held out as cold.")] = 0.1,
    reference: Annotated[str, typer.Option(help="longest (first-k at the largest --ks) | full (the whole texts up to --max-len).")] = "longest",
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Write everything the table shows (and more) as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw quality against tokens: .png or .svg (pip install 'tokensel\\[plot]').")] = None,
    max_users: Annotated[Optional[int], typer.Option(help="Only the first N users (a quick check).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Item LLM (default: the bundle's).")] = None,
    id_col: Annotated[Optional[str], typer.Option()] = None,
    text_cols: Annotated[Optional[str], typer.Option(help="Text columns in order (default: the bundle's).")] = None,
    labels: Annotated[Optional[bool], typer.Option("--labels/--no-labels", help="Build the text as `title: A description: B` or `A B` (default: the bundle's).")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Tokens of the item text considered at all (default: the bundle's).")] = None,
    user_col: Annotated[str, typer.Option()] = "user_id",
    item_col: Annotated[str, typer.Option()] = "item_id",
    order_col: Annotated[str, typer.Option()] = "timestamp",
    cost_items: Annotated[int, typer.Option(help="Items timed per file for the cost column (the first N, catalogue order; each file twice, the best counts).")] = 256,
    work: Annotated[Optional[Path], typer.Option(help="Keep the compressed files, score cache, item vectors and finished runs here: started again with the same folder (after a kill, or with more strategies, budgets or seeds) it trains only what is missing (default: a temporary folder).")] = None,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Record the strategy to run at each k for this catalogue, where compress --strategy auto reads it.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every epoch.")] = False,
    cache_dir: CacheDir = None,
    cache_store: CacheStore = CacheConfig.store,
) -> None:
    """At what budget does the recommender stop losing quality, which tokens should fill it, what does it save?
    First-k and selections at every budget, the same recommender retrained on each, against the reference."""
    from tokensel.config import write_json
    from tokensel.evaluate.curve import curve
    from tokensel.evaluate.plot import check_plot_path, plot_curve

    err = Console(stderr=True)
    try:
        try:
            budgets = [int(x) for x in ks.split(",") if x.strip()]
        except ValueError:
            raise TokenselError(f"--ks must be comma-separated whole numbers (got {ks!r})") from None
        if out is not None and out.suffix != ".json":
            raise TokenselError(f"{out}: --out must end in .json")
        if plot is not None:
            check_plot_path(plot)  # before any work: the suffix, and matplotlib installed

        def log(row: dict) -> None:
            if verbose or "stage" in row:
                err.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True)

        result = curve(
            items, interactions, budgets, strategies=[s.strip() for s in strategies.split(",") if s.strip()], policy=policy,
            recommender=recommender, item_tuning=item_tuning, seeds=seeds, epochs=epochs, protocol=protocol, cold_share=cold_share,
            reference=reference, model=model, id_col=id_col, text_cols=[c.strip() for c in text_cols.split(",") if c.strip()] if text_cols else None,
            labels=labels, max_len=max_len, user_col=user_col, item_col=item_col, order_col=order_col, max_users=max_users,
            cost_items=cost_items, work=work, record_verdict=record, cache=CacheConfig(cache_store, cache_dir), device=device, dtype=dtype, log=log,
        )
        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(curve_table(result))
        console.print(result["verdict"]["line"], markup=False, highlight=False, soft_wrap=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, result)
            err.print(f"curve written to {out}", markup=False)
        if plot is not None:
            plot_curve(result, plot)
            err.print(f"picture written to {plot}", markup=False)
        if record and result.get("verdict_store"):
            err.print(f"verdict recorded for this catalogue in {result['verdict_store']}", markup=False)
        elif result.get("verdict_store_error"):
            err.print(f"warning: the verdict was not recorded: {result['verdict_store_error']}", markup=False)
    except TokenselError as exc:
        fail(err, exc)
