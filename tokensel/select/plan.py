"""What a selector needs, read from files before anything is loaded (no torch, no transformers).

A spec (strategy, bundle, model, seed, device, dtype) becomes a `Plan`: the strategy that actually
runs (a policy whose bundle's stage 2 kept the first tokens runs first-k), the model's files and
fast tokenizer, and the provenance compressed files record. Everything here is cheap: a strategy
that needs no forward pass never loads the item LLM, and one that does loads it on its first cache
miss (tokensel.select.selector).

tokensel.select.build turns a plan into a selector: the tokenizer-only TokenSelector for first-k,
the model path's Selector for everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokensel.config import TextConfig, check_device_names, check_rule_settings
from tokensel.errors import TokenselError
from tokensel.models.tokenizer import DEFAULT_MODEL, ModelFiles, TextTokenizer, load_text_tokenizer, read_model
from tokensel.policy.files import BundleConfig, bundle_hash, bundle_path, check_identity, keeps_first_k, verify_bundle

STRATEGIES = ("policy", "item-align", "first-k", "random", "rarity", "topk-logits")
BUNDLE_STRATEGIES = ("policy", "item-align")  # the ones that read a trained bundle
FORWARD_STRATEGIES = ("policy", "item-align", "topk-logits")  # scored by a forward pass of the item LLM
FIRST_K = "first-k"


@dataclass(frozen=True)
class SelectorSpec:
    """What to load: everything a worker needs to rebuild the same Selector."""

    strategy: str = "policy"
    policy: str | None = None  # bundle folder (policy, item-align); None: the shipped default bundle
    model: str | None = None  # item LLM: hub id or folder; None: the bundle's, or the default model
    seed: int = 0  # the random strategy's seed
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise TokenselError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        check_device_names(self.device, self.dtype)


def check_budgets(ks: Sequence[int], chunk: int, prefix: int, max_len: int, strategy: str) -> None:
    """Refuse budgets that are invalid, or under which a selecting strategy would silently select nothing."""
    check_rule_settings(ks, chunk, prefix)
    if strategy == FIRST_K:
        return
    if prefix >= min(ks):
        raise TokenselError(
            f"--prefix {prefix} >= --k {min(ks)}: every kept token would be prefix, which is --strategy first-k; lower --prefix or raise --k"
        )
    if max(ks) >= max_len:
        raise TokenselError(
            f"--k {max(ks)} >= --max-len {max_len}: every text fits the budget and is kept whole, so nothing is selected; "
            "lower --k or raise --max-len (or use --strategy first-k for the whole texts)"
        )


@dataclass
class Plan:
    """A spec resolved from files: what runs, with which tokenizer, recorded as what."""

    spec: SelectorSpec
    name: str  # the strategy that runs
    model: ModelFiles | None  # None: not on this machine yet (the model path downloads it)
    tokenizer: TextTokenizer | None  # None: only transformers reads it as the model path does
    provenance: dict | None  # what compressed files record (None where the model is not on disk)
    bundle: BundleConfig | None = None  # bundle strategies: the bundle's config

    @property
    def needs_forward(self) -> bool:
        return self.name in FORWARD_STRATEGIES

    @property
    def identity(self) -> dict | None:
        """The item LLM's identity (item_llm.ItemLLM.identity), from its files."""
        return self.model.identity(self.tokenizer) if self.model is not None and self.tokenizer is not None else None

    @property
    def text(self) -> TextConfig | None:
        """The bundle's text settings (bundle strategies), else None."""
        return self.bundle.text if self.bundle is not None else None


def plan_selector(spec: SelectorSpec) -> Plan:
    """Resolve a spec from files: the bundle verified (tokensel.policy.files), its stage-2 choice read,
    the model's identity checked against the bundle's, the provenance built as the model path builds it."""
    bundle = None
    if spec.strategy in BUNDLE_STRATEGIES:
        path = bundle_path(spec.policy)
        if spec.strategy == "policy" and (path / "config.json").exists() and not (path / "policy.safetensors").exists():
            raise TokenselError(f"{path}: the bundle has no policy yet (stage 2 has not run): tokensel train --stage 2, or compress with --strategy item-align (needs only stage 1)")
        bundle = verify_bundle(path, required=("item.safetensors",))
        name = FIRST_K if spec.strategy == "policy" and keeps_first_k(path) else spec.strategy
        model_name = spec.model or bundle.item.base_model
        model = read_model(model_name)
        tokenizer = load_text_tokenizer(model, bundle.item.item_token)
        prov = {"model": bundle.identity.get("name"), **model.source, "policy": str(path), "policy_hash": bundle_hash(path)} if model else None
        plan = Plan(spec, name, model, tokenizer, prov, bundle)
        if plan.identity is not None:  # a field config.json names differently (n_layer, d_model) is left to the model path
            check_identity(bundle.identity, {**bundle.identity, **{k: v for k, v in plan.identity.items() if v is not None}}, path, model_name)
        return plan
    model_name = spec.model or DEFAULT_MODEL
    model = read_model(model_name)
    seed = spec.seed if spec.strategy == "random" else None
    prov = {"model": model_name, **model.source, "policy": None, "policy_hash": None, "seed": seed} if model else None
    return Plan(spec, spec.strategy, model, load_text_tokenizer(model), prov)

