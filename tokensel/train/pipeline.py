"""`tokensel train`: stage 1 then stage 2, each runnable alone, writing one bundle folder."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from tokensel.config import AUTO_OBJECTIVE, COLD_SHARE, CacheConfig, ItemModelConfig, PolicyConfig, Stage1Config, TextConfig, UserModelConfig, check_protocol
from tokensel.device import pick_device
from tokensel.errors import TokenselError
from tokensel.io.cold import cold_split
from tokensel.io.interactions import COLUMNS, read_histories
from tokensel.io.items import read_items
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import check_top_tunable, is_top_tunable
from tokensel.models.user_model import UserModel
from tokensel.policy.bundle import Bundle, BundleConfig, read_bundle_config
from tokensel.policy.head import PolicyHead
from tokensel.train.common import Catalogue, embed_tokens
from tokensel.train.e2e import OBJECTIVE as E2E, check_e2e, train_e2e
from tokensel.train.stage1 import train_stage1
from tokensel.train.stage2 import Reward, stage2_warnings, train_stage2


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256: which data, wherever the file lives."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def data_record(items: Path, interactions: Path, item_rows: int, interaction_rows: int) -> dict:
    """The training data as a bundle (config.json) and its strategy check (check.json) record it: file
    name, row count and content hash of each file, never a path, so a bundle says nothing about the
    machine that built it and still identifies its data on another one."""
    items, interactions = Path(items), Path(interactions)
    return {
        "items": items.name, "items_rows": item_rows, "items_sha": file_digest(items),
        "interactions": interactions.name, "interactions_rows": interaction_rows, "interactions_sha": file_digest(interactions),
    }


def stage1_model(out: Path) -> str:
    """The item LLM stage 2 will train on: the stage-1 bundle's at `out`, else the default's."""
    return read_bundle_config(out).item.base_model if (out / "config.json").exists() else ItemModelConfig().base_model


def resolve_objective(policy: PolicyConfig, model: str) -> PolicyConfig:
    """`auto` -> e2e where f has the BERT-style last block the e2e readout trains, else bounded (the
    pairwise reward needs no readout), so the default trains on every model `train` accepts."""
    if policy.objective != AUTO_OBJECTIVE:
        return policy
    return replace(policy, objective=E2E if is_top_tunable(model) else "bounded")


def check_settings(item_cfg: ItemModelConfig | None, policy: PolicyConfig | None) -> None:
    """Refuse bad training settings up front, as user errors, before any model is loaded or trained."""
    if item_cfg is not None and item_cfg.tuning not in ("none", "top", "lora", "full"):
        raise TokenselError(f"unknown item tuning {item_cfg.tuning!r}; choose none, top, lora or full")
    e2e = policy is not None and policy.objective == E2E
    if e2e:
        check_e2e(policy)
    # top tuning trains f's last block, and so does the e2e readout: refuse a model without one before stage 1 runs
    if item_cfg is not None and (item_cfg.tuning == "top" or e2e):
        check_top_tunable(item_cfg.base_model)
    # PolicyConfig and Stage1Config validate themselves when built


def train(
    items: str | Path,
    interactions: str | Path,
    out: str | Path,
    *,
    stages: tuple[int, ...] = (1, 2),
    text: TextConfig | None = None,
    item_cfg: ItemModelConfig | None = None,
    user_cfg: UserModelConfig | None = None,
    stage1: Stage1Config | None = None,
    policy: PolicyConfig | None = None,
    columns: tuple[str, str, str] = COLUMNS,
    device: str = "auto",
    log: Callable[[dict], None] = print,
    reward: Reward | None = None,
    protocol: str = "loo",
    cold_share: float = COLD_SHARE,
    cache: CacheConfig | None = None,
) -> Bundle:
    """Train a bundle. Stage 2 alone starts from the stage-1 bundle already at `out`. `cache`: where f's
    lower-layer states are kept while its last block trains (models/scratch.py).

    `reward` replaces the paper's stage-2 reward (experiments: research/stage2_rewards.py); its name is
    then logged in the bundle's config (logs.stage2.reward). `protocol` "cold": both stages train
    without the cold items (tokensel.io.cold), so the bundle can be evaluated under the cold protocol
    on the same data without having seen its cold items; the split's counts are in the config's data."""
    check_protocol(protocol, cold_share)
    out = Path(out)
    if 2 in stages:
        policy = resolve_objective(policy or PolicyConfig(), item_cfg.base_model if item_cfg else stage1_model(out))
    check_settings(item_cfg, policy)
    dev = pick_device(device)
    torch.set_float32_matmul_precision("high")
    if 1 in stages:
        text, item_cfg = text or TextConfig(), item_cfg or ItemModelConfig()
        user_cfg, stage1 = user_cfg or UserModelConfig(), stage1 or Stage1Config()
        llm = ItemLLM.from_pretrained(item_cfg.base_model, item_token=item_cfg.item_token, device=dev)
        llm.set_template(text.template)
        torch.manual_seed(stage1.seed)  # g's initial weights come from the global generator: same seed, same bundle
        user = UserModel(llm.hidden_size, user_cfg)
    else:
        if not (out / "config.json").exists():
            raise TokenselError(f"{out}: stage 2 alone needs a stage-1 bundle there (run tokensel train --stage 1 first)")
        b = Bundle.from_pretrained(out, device=dev, need_policy=False)
        llm, user = b.item_llm, b.user_model
        text, item_cfg, user_cfg, stage1 = b.config.text, b.config.item, b.config.user, b.config.stage1
        prev_logs = {k: v for k, v in b.config.logs.items() if k != "stage2"}  # keep how stage 1 went
        prev = b.config.data.get("protocol") or {}
        if protocol == "cold" and (prev.get("protocol") != "cold" or prev.get("share") != cold_share):
            was = f"--protocol cold --cold-share {prev['share']:g}" if prev.get("protocol") == "cold" else "--protocol loo"
            raise TokenselError(f"{out}: stage 1 was trained with {was}, so its batches held items that are cold under --cold-share {cold_share:g}; train stage 1 with the same protocol")
    t0 = time.perf_counter()
    ids, texts = read_items(items, text)
    index = {i: n for n, i in enumerate(ids)}
    hist = read_histories(interactions, index, *columns)
    cold = None
    if protocol == "cold":  # neither stage sees a cold item: histories, targets and negatives are warm
        split = cold_split(hist, interactions, index, tuple(columns), cold_share)
        hist, cold = split.histories, split.counts
        log({"cold split": cold.note()})
    tokens = llm.tokenize(texts, text.max_len)
    log({"items": len(ids), "users": len(hist.users), "skipped interactions with unknown items": hist.skipped_unknown, "skipped users with < 3 interactions": hist.skipped_short, "dropped duplicate interaction rows": hist.counts.duplicate_rows, "interaction rows tied in the order column": hist.counts.order_ties, "empty texts": sum(1 for t in tokens if not t)})
    config = BundleConfig(
        identity=llm.identity(),
        text=text,
        item=item_cfg,
        user=user_cfg,
        stage1=stage1,
        data={
            **data_record(items, interactions, len(ids), hist.counts.rows),
            "n_items": len(ids),
            "n_users": len(hist.users),
            **({"protocol": cold.as_dict()} if cold else {}),
        },
    )
    if 1 not in stages:
        config.logs.update(prev_logs)
    if 1 in stages:
        config.logs["stage1"] = train_stage1(llm, user, tokens, hist, stage1, item_cfg, log, cache)
        config.logs["stage1"]["seconds"] = round(time.perf_counter() - t0, 1)
        Bundle(config, llm, user, None).save_pretrained(out)
    head = None
    if 2 in stages:
        config.policy = policy
        t1 = time.perf_counter()
        head = PolicyHead(llm.hidden_size)
        if policy.objective == E2E:
            config.logs["stage2"] = train_e2e(llm, user, head, tokens, hist, policy, stage1.temperature, log, cache=cache)
        else:
            item, hidden = embed_tokens(llm, tokens, keep_hidden=True, desc="stage 2: embedding full texts")
            cat = Catalogue(tokens, item, hidden)
            config.logs["stage2"] = train_stage2(llm, user, head, cat, hist, policy, stage1.temperature, log, reward)
            if reward is not None:
                config.logs["stage2"]["reward"] = reward.name
        config.logs["stage2"]["seconds_total"] = round(time.perf_counter() - t1, 1)
        config.logs["stage2"]["warnings"] = stage2_warnings(config.logs["stage2"])  # the CLI prints them
    bundle = Bundle(config, llm, user, head, out)  # path: where a merged LoRA adapter is found again
    bundle.save_pretrained(out)
    return bundle
