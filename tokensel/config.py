"""One configuration object per stage, each saved as JSON beside its weights.

Every artifact says how it was made: the bundle's config.json holds all of these.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class TextConfig:
    """How an item's text is built from its columns: `A B` (default) or `title: A description: B`
    (HLLM style, labels on). Labels are part of the text and so of the budget: on amazon-scientific
    they cost first-32 text-sim NDCG@10 9% (4.14 -> 3.79), so they are off by default."""

    id_col: str = "item_id"
    text_cols: list[str] = field(default_factory=lambda: ["title", "description"])
    template: str = ""  # a prompt before the text; never part of the budget, prefix or output
    max_len: int = 256  # tokens of the item's own text that are considered at all
    labels: bool = False  # `column: value` per field (HLLM style) or the bare values (default)


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


@dataclass
class PolicyConfig:
    """Stage 2: policy learning with the pairwise proxy reward (paper eqs. 13-16)."""

    prefix: int = 16
    k: int = 64
    train_chunk: int = 8
    select_chunk: int = 8
    epochs: int = 2
    lr: float = 1e-3
    negatives: int = 128
    history: int = 10
    batch_size: int = 32
    samples: int = 2  # subsets per history; 2 is the paper's pair, more gives rank-based rewards
    objective: str = "bounded"  # paper | bounded | e2e (train/e2e.py: through the recommender's InfoNCE)
    reward: str = "history"  # history: the paper's CE of the next item | credit: the same CE, one history item's subset varied at a time | credit-both: credit + the subset as the positive after the items before it | item: subset stays close to the full-text embedding | target: subsets of the next item, everything compressed | text-sim: subsets as the positive under text-sim
    beta: float = 1.0
    seed: int = 0
    max_users: int | None = None
    valid_users: int | None = None  # validation users checked after each epoch (None: all)
    # objective e2e only (train/e2e.py)
    masked_side: str = "both"  # both | history | target: which items are embedded from their kept tokens
    sigma: float = 0.5  # perturbed top-k noise, relative to each item's chunk-score spread
    perturb_samples: int = 32  # rule evaluations per backward pass (antithetic pairs)
    prior_lr: float = 0.01  # learning rate of the head's token position prior
    model_lr: float = 1e-4  # learning rate of the surrogate user model and item readout


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
