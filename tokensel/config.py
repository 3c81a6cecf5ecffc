"""One configuration object per stage, each saved as JSON beside its weights.

Every artifact says how it was made: the bundle's config.json holds all of these.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokensel.errors import TokenselError

T = TypeVar("T")


@dataclass
class TextConfig:
    """How an item's text is built from its columns: `A B` (default) or `title: A description: B`
    (HLLM style, labels on). Labels are part of the text and so of the budget: every label token is
    one text token less, so they are off by default (docs/formats.md has what they cost)."""

    id_col: str = "item_id"
    text_cols: list[str] = field(default_factory=lambda: ["title", "description"])
    template: str = ""  # a prompt before the text; never part of the budget, prefix or output
    max_len: int = 256  # tokens of the item's own text that are considered at all
    labels: bool = False  # `column: value` per field (HLLM style) or the bare values (default)


def check_rule_settings(ks, chunk: int, prefix: int) -> None:
    """The selection rule's settings, for the file job and the in-memory Selector alike."""
    if not ks or min(ks) < 1 or chunk < 1 or prefix < 0:
        raise TokenselError(f"need --k >= 1, --chunk >= 1, --prefix >= 0 (got k={list(ks)}, chunk={chunk}, prefix={prefix})")


DTYPE_NAMES = ("fp32", "bf16", "fp16")  # --dtype besides auto (tokensel.device maps them to torch dtypes)


def check_device_names(device: str, dtype: str) -> None:
    """--device and --dtype spelled as tokensel knows them; whether this machine has the device is
    tokensel.device's question, asked only where a model runs."""
    if not re.fullmatch(r"auto|cpu(:\d+)?|cuda(:\d+)?", device):
        raise TokenselError(f"--device {device}: tokensel runs on cpu or cuda; choose auto, cpu, cuda or cuda:N")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise TokenselError(f"--dtype {dtype}: choose auto, {', '.join(DTYPE_NAMES)}")


@dataclass(frozen=True)
class CompressConfig:
    """One compress job: budgets, selection rule settings, and how the file is streamed.

    Several budgets (`ks`) come from one model pass: the job caches token scores, not selections."""

    ks: tuple[int, ...] = (64,)
    chunk: int = 8
    prefix: int = 16
    batch_rows: int = 4096  # rows read (and tokenised) per window; larger windows fill the width buckets
    passthrough: tuple[str, ...] = ()  # input columns copied to the output
    limit: int | None = None  # only the first N rows
    pipeline: bool | None = None  # overlap reading/tokenising and writing with the forward pass; None: auto
    row_group_rows: int | None = None  # output row groups of about this many rows (None: one per window)

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(sorted(set(int(k) for k in self.ks))))
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        check_rule_settings(self.ks, self.chunk, self.prefix)
        for name in ("batch_rows", "limit", "row_group_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TokenselError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


@dataclass
class ItemModelConfig:
    """The item LLM f: any transformers model plus an appended `[ITEM]` token."""

    base_model: str = "default"
    item_token: str = "[ITEM]"
    tuning: str = "none"  # none | top (last block, CPU-affordable) | lora | full  (stage 1 item-LLM tuning)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int = 2  # LoRA on the top N transformer blocks


@dataclass
class UserModelConfig:
    """The user model g: a small causal transformer over item embeddings (HLLM's user LLM, CPU size)."""

    kind: str = "transformer"  # transformer | pretrained
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    max_history: int = 10
    pretrained: str | None = None  # hub id / folder when kind == "pretrained"


@dataclass
class Stage1Config:
    """Stage 1: InfoNCE pretraining of f and g (paper eq. 1)."""

    epochs: int = 20
    lr: float = 1e-3
    item_lr: float = 1e-4
    negatives: int = 128
    history: int = 10
    batch_size: int = 64
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.negatives < 1 or self.history < 1 or self.batch_size < 1:
            raise TokenselError(
                f"stage 1 needs epochs >= 0 and negatives, history, batch size >= 1 (got epochs={self.epochs}, "
                f"negatives={self.negatives}, history={self.history}, batch_size={self.batch_size})"
            )


@dataclass
class PolicyConfig:
    """Stage 2: policy learning. `e2e` trains the head through the recommender it serves and ends by
    keeping the best of the trained head, item-align and first-k (train/e2e.py); `paper` and `bounded`
    are the paper's pairwise proxy reward (eqs. 13-16). `auto` (the default) is e2e where the item LLM
    has the BERT-style last block its readout trains, else bounded (train/pipeline.py resolves it and
    the bundle records the result). The e2e defaults are the recipe measured in RESULTS.md: exact
    kept-token vectors, 10 warm-up epochs, 2 head epochs."""

    prefix: int = 16
    k: int = 64
    train_chunk: int = 8
    select_chunk: int = 8
    epochs: int | None = None  # None: 12 for e2e (warm-up + 2 head epochs), 2 for paper / bounded
    lr: float = 1e-3
    negatives: int = 128
    history: int = 10
    batch_size: int = 32
    samples: int = 2  # subsets per history; 2 is the paper's pair, more gives rank-based rewards
    objective: str = "auto"  # auto | e2e (train/e2e.py: through the recommender's InfoNCE) | paper | bounded (the pairwise reward)
    reward: str = "history"  # the paper's: CE of the next item from sampled history subsets (the only one in the product; research/stage2_rewards.py holds the variants that lost)
    beta: float = 1.0
    seed: int = 0
    max_users: int | None = None
    valid_users: int | None = None  # validation users checked after each epoch (None: all)
    # objective e2e only (train/e2e.py)
    masked_side: str = "both"  # both | history | target: which items are embedded from their kept tokens
    mask_layers: str = "exact"  # top (last block's [ITEM] query: CPU-sized) | exact (value: f over the kept tokens; gradient: top's) | all (every block: exact value and gradient, GPU-sized)
    sigma: float = 0.5  # perturbed top-k noise, relative to each item's chunk-score spread
    perturb_samples: int = 32  # rule evaluations per backward pass (antithetic pairs)
    prior_lr: float = 0.01  # learning rate of the head's token position prior
    model_lr: float = 1e-3  # learning rate of the surrogate user model (and of the item readout unless readout_lr)
    readout_lr: float | None = 1e-4  # learning rate of the surrogate item readout (f's last block); None: model_lr
    grad_chunks: int = 0  # exact mask: dropped chunks per item whose keep gradient is exact (f gated over kept + these); 0: the top block's gradient
    warmup_epochs: int | None = None  # first epochs with the head held, only the surrogate learning (on compressed texts); None: all but the last 2
    surrogate_mix: float = 0.5  # share of steps the surrogate trains on first-k's texts (the head gets no gradient there)
    keep_best: bool = True  # end by keeping the best of the trained head, the identity head and first-k on the surrogate's validation
    settle_epochs: int = 2  # keep_best: epochs after the head's last step with the head held; the choice pools their validations

    def __post_init__(self) -> None:
        if self.objective not in (*OBJECTIVE_NAMES, AUTO_OBJECTIVE):
            raise TokenselError(f"unknown stage-2 objective {self.objective!r}; choose {', '.join((AUTO_OBJECTIVE, *OBJECTIVE_NAMES))}")
        if self.objective != AUTO_OBJECTIVE:  # auto: epochs and warm-up follow the objective it resolves to
            if self.epochs is None:
                self.epochs = E2E_EPOCHS if self.objective == "e2e" else 2
            if self.warmup_epochs is None:
                self.warmup_epochs = max(0, self.epochs - E2E_HEAD_EPOCHS) if self.objective == "e2e" else 0
        if self.settle_epochs < 0:
            raise TokenselError(f"stage 2 needs settle epochs >= 0 (got {self.settle_epochs})")
        if self.reward != "history":
            raise TokenselError(f"unknown stage-2 reward {self.reward!r}; the product has only history (the paper's)")
        if self.samples < 2:
            raise TokenselError(f"stage 2 needs at least 2 samples per history (got {self.samples})")
        if self.k < 1 or self.train_chunk < 1 or self.select_chunk < 1 or self.prefix < 0:
            raise TokenselError(
                f"need k >= 1, chunks >= 1, prefix >= 0 (got k={self.k}, train_chunk={self.train_chunk}, "
                f"select_chunk={self.select_chunk}, prefix={self.prefix})"
            )
        if (self.epochs is not None and self.epochs < 0) or self.negatives < 1 or self.history < 1 or self.batch_size < 1:
            raise TokenselError(
                f"stage 2 needs epochs >= 0 and negatives, history, batch size >= 1 (got epochs={self.epochs}, "
                f"negatives={self.negatives}, history={self.history}, batch_size={self.batch_size})"
            )


E2E_EPOCHS, E2E_HEAD_EPOCHS = 12, 2  # the e2e default: the head moves only once the surrogate reads compressed texts

# the names stage 2 accepts (tokensel.train.stage2.OBJECTIVES maps each to its function)
OBJECTIVE_NAMES = ("paper", "bounded", "e2e")  # e2e: through the recommender (train/e2e.py)
AUTO_OBJECTIVE = "auto"  # e2e where the model allows it, else bounded (train/pipeline.py)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T | None:
    """Build a config dataclass, ignoring unknown keys so newer bundles still load."""
    if data is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclass(frozen=True)
class CacheConfig:
    """Where f's lower-layer states are kept while its last block trains over them (item tuning top,
    stage 2's e2e objective): items x positions x hidden values, too many for RAM on a large catalogue.

    `disk` (the default) writes them once to a half-precision memory-mapped file in `dir` (default: the
    system's temporary folder, TMPDIR) and reads each step's rows from it: memory stays bounded at any
    catalogue size, the kernel keeps what fits in its page cache, and half precision halves the disk
    and page-cache footprint. The file lives as long as the run (it is unlinked as soon as it is
    mapped, so even a killed run leaves nothing behind). `ram` keeps them in float32 in memory, as
    before, where they fit in half the machine's RAM (RESULTS.md compares the two)."""

    store: str = "disk"  # disk (float16, memory-mapped file) | ram (float32 in memory)
    dir: str | None = None  # disk: the folder of the file (default: the system's temporary folder)

    def __post_init__(self) -> None:
        if self.store not in CACHE_STORES:
            raise TokenselError(f"--cache-store must be one of {', '.join(CACHE_STORES)} (got {self.store!r})")
        if self.dir is not None:
            object.__setattr__(self, "dir", str(self.dir))
            if not Path(self.dir).is_dir():
                raise TokenselError(f"--cache-dir {self.dir}: no such folder")

    def folder(self) -> Path:
        return Path(self.dir) if self.dir is not None else Path(tempfile.gettempdir())


CACHE_STORES = ("disk", "ram")


@dataclass
class TrainConfig:
    """A downstream recommender's training budget (tokensel evaluate / headroom), identical for every
    file and seed of one evaluation."""

    epochs: int | None = None  # None: the recommender's default (Recommender.default_epochs)
    batch_size: int = 128
    lr: float | None = None  # None: the recommender's default (Recommender.default_lr)
    negatives: int = 128  # paper: 128 sampled negatives
    history: int = 10  # paper: maximum sequence length 10
    temperature: float = 0.05
    patience: int | None = 3  # stop after this many epochs without a better validation NDCG@10
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    id_dim: int = 64  # sasrec-init: width of the ID table (PCA of the text embeddings)
    pooling: str = "mean-specials"  # text-sim and sasrec-init item vectors: mean-specials | mean
    center: bool = True  # hllm: subtract the catalogue mean from the frozen [ITEM] states (see HLLM)
    item_tuning: str = "none"  # hllm: none (f frozen) | top (f's last block trains; CPU-affordable) | lora | full (a GPU setting)
    item_lr: float = 1e-4  # hllm with item_tuning: learning rate of the item LLM
    amp: str = "auto"  # bf16 autocast of the user model: auto (on CUDA) | bf16 | off
    # which targets are ranked: "test" (best epoch chosen on validation) or "valid" (a check that must
    # never see the test targets: every epoch is trained and the last one is scored, no selection)
    score: str = "test"
    cache: CacheConfig = field(default_factory=CacheConfig)  # item_tuning top: where f's lower-layer states are kept

    def __post_init__(self) -> None:
        if self.score not in SCORED_SPLITS:
            raise TokenselError(f"score must be one of {', '.join(SCORED_SPLITS)} (got {self.score!r})")
        if self.pooling not in POOLINGS:
            raise TokenselError(f"--pooling must be one of {', '.join(POOLINGS)} (got {self.pooling!r})")
        if self.item_tuning not in ITEM_TUNINGS:
            raise TokenselError(f"item tuning {self.item_tuning!r}: choose one of {', '.join(ITEM_TUNINGS)}, and anything but none only with --recommender hllm")


SCORED_SPLITS = ("test", "valid")
CHECK_EPOCHS = 6  # the strategy check's epochs per recommender: fixed, since the validation targets it scores cannot pick the epoch
CHECK_SEEDS = 3  # the strategy check's training runs per strategy: the seed-aware test needs >= 2 per side to see seed variance
POOLINGS = ("mean", "mean-specials")  # text-sim / sasrec-init item vectors
ITEM_TUNINGS = ("none", "top", "lora", "full")  # hllm: how much of the item LLM trains with the user model


PROTOCOLS = ("loo", "cold")  # evaluation protocols: leave-one-out, cold start (tokensel.io.cold)
COLD_SHARE = 0.1  # --protocol cold: share of the items held out as cold, those whose first interaction comes last


def check_protocol(protocol: str, cold_share: float) -> None:
    """Refuse an unknown --protocol or a --cold-share outside (0, 1) before anything is read."""
    if protocol not in PROTOCOLS:
        raise TokenselError(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    if protocol == "cold" and not 0 < cold_share < 1:
        raise TokenselError(f"--cold-share is a share of the items in (0, 1) (got {cold_share})")
