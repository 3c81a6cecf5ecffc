"""The bundle: one folder per trained model, `from_pretrained`/`save_pretrained` style.

    config.json               how it was made: base model identity, text, stage configs, data, logs
    item.safetensors          the `[ITEM]` input embedding (+ the last block's weights if tuning=top,
                              all item-LLM weights if tuning=full)
    item_adapter/             the LoRA adapter when tuning=lora (peft format)
    user_model.safetensors    the user model g
    policy.safetensors        W_Q, W_K, the position prior and whether stage 2 chose to keep the first
                              tokens (absent until stage 2 has run)
    check.json                the downstream strategy check (tokensel.evaluate.check): which strategy to
                              trust; written after training, so it is not part of the bundle's hash

Loading checks that the model and tokenizer match the ones it was trained with and says exactly
what differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokensel import __version__
from tokensel.config import (
    ItemModelConfig,
    PolicyConfig,
    Stage1Config,
    TextConfig,
    UserModelConfig,
    from_dict,
    to_dict,
    write_json,
)
from tokensel.errors import TokenselError
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import last_block
from tokensel.models.user_model import UserModel
from tokensel.policy.head import PolicyHead

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "default_bundle"


@dataclass
class BundleConfig:
    identity: dict
    text: TextConfig = field(default_factory=TextConfig)
    item: ItemModelConfig = field(default_factory=ItemModelConfig)
    user: UserModelConfig = field(default_factory=UserModelConfig)
    stage1: Stage1Config | None = None
    policy: PolicyConfig | None = None
    data: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)
    version: str = __version__

    def to_json(self) -> dict:
        return {k: to_dict(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> BundleConfig:
        return cls(
            identity=d["identity"],
            text=from_dict(TextConfig, {"labels": True, **d["text"]}) if d.get("text") else TextConfig(),  # bundles from before `labels` had them
            item=from_dict(ItemModelConfig, d.get("item")) or ItemModelConfig(),
            user=from_dict(UserModelConfig, d.get("user")) or UserModelConfig(),
            stage1=from_dict(Stage1Config, d.get("stage1")),
            policy=from_dict(PolicyConfig, d.get("policy")),
            data=d.get("data", {}),
            logs=d.get("logs", {}),
            version=d.get("version", "?"),
        )


def check_identity(expected: dict, actual: dict, bundle: Path, model_name: str) -> None:
    """Raise naming every field where the loaded model differs from the one the bundle was trained on."""
    diffs = []
    for key in ("model_type", "hidden_size", "num_hidden_layers", "item_token_id"):
        if expected.get(key) != actual.get(key):
            diffs.append(f"{key}: bundle {expected.get(key)!r}, model {actual.get(key)!r}")
    for key in ("vocab_size", "vocab_sha"):
        e, a = expected["tokenizer"].get(key), actual["tokenizer"].get(key)
        if e != a:
            diffs.append(f"tokenizer {key}: bundle {e!r}, model {a!r}")
    if diffs:
        raise TokenselError(
            f"bundle {bundle} was trained on model {expected.get('name')!r}, which does not match model "
            f"{model_name!r}: " + "; ".join(diffs)
        )


CHECK_FILE = "check.json"


def bundle_path(path: str | Path | None) -> Path:
    """A bundle folder; None is the shipped one."""
    return Path(path) if path is not None else DEFAULT_BUNDLE


def bundle_label(path: str | Path | None) -> str:
    """How messages name a bundle: the shipped one by that name (its folder is wherever tokensel was
    installed, which says nothing to a reader), any other as the path it was given."""
    path = bundle_path(path)
    return "the shipped bundle" if path.resolve() == DEFAULT_BUNDLE else str(path)


def read_bundle_config(path: str | Path | None = None) -> BundleConfig:
    """A bundle's config alone (no weights loaded); default: the shipped bundle."""
    path = bundle_path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise TokenselError(f"{path}: not a tokensel bundle (no config.json)")
    try:
        return BundleConfig.from_json(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TokenselError(f"{cfg_file}: unreadable bundle config ({exc})") from None


def read_check(path: str | Path | None = None) -> dict | None:
    """The bundle's strategy check (tokensel.evaluate.check), or None where it has not run."""
    f = bundle_path(path) / CHECK_FILE
    if not f.exists():
        return None
    try:
        check = json.loads(f.read_text())
        if not isinstance(check, dict) or "chosen" not in check or "rows" not in check:
            raise ValueError("no chosen strategy or rows")
    except (json.JSONDecodeError, ValueError) as exc:
        raise TokenselError(f"{f}: unreadable strategy check ({exc}); run tokensel check again") from None
    return check


def write_check(path: Path, check: dict) -> None:
    write_json(Path(path) / CHECK_FILE, check)


def bundle_hash(path: Path) -> str:
    """A short content hash of the bundle (config and weights), recorded in compressed files. The
    strategy check is a verdict about the bundle written after it, not part of what selects: left out."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path) != Path(CHECK_FILE)):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Bundle:
    """A loaded bundle: the item LLM with its `[ITEM]` embedding (and adapter), g, and the policy head."""

    def __init__(self, config: BundleConfig, item_llm: ItemLLM, user_model: UserModel | None, policy: PolicyHead | None, path: Path | None = None):
        self.config = config
        self.item_llm = item_llm
        self.user_model = user_model
        self.policy = policy
        self.path = path

    @property
    def hash(self) -> str | None:
        return bundle_hash(self.path) if self.path else None

    @property
    def check(self) -> dict | None:
        """The downstream strategy check saved beside the weights (tokensel.evaluate.check), or None."""
        return read_check(self.path) if self.path is not None else None

    # ---------------------------------------------------------------- save
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CHECK_FILE).unlink(missing_ok=True)  # a verdict about the weights being replaced
        llm = self.item_llm
        emb = llm.model.get_input_embeddings().weight
        item_tensors = {"item_embedding": emb[llm.item_token_id].detach().float().cpu().contiguous()}
        if self.config.item.tuning == "full":
            item_tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in llm.model.state_dict().items()})
        if self.config.item.tuning == "top":
            item_tensors.update({f"last_block.{k}": v.detach().cpu().contiguous() for k, v in last_block(llm).state_dict().items()})
        save_file(item_tensors, path / "item.safetensors")
        if self.config.item.tuning == "lora":
            adapter = path / "item_adapter"
            if hasattr(llm.model, "peft_config"):  # a live PEFT model (stage 1): save its adapter
                llm.model.save_pretrained(adapter)
            else:  # the adapter was merged on load: it is the one this bundle was loaded from
                src = self.path / "item_adapter" if self.path is not None else None
                if src is None or not (src / "adapter_config.json").exists():
                    raise TokenselError(f"{path}: cannot save the LoRA item adapter: the model was merged and its source adapter is gone")
                if src.resolve() != adapter.resolve():
                    shutil.copytree(src, adapter, dirs_exist_ok=True)
        if self.user_model is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.user_model.state_dict().items()}, path / "user_model.safetensors")
        if self.policy is not None:
            save_file(
                {
                    "w_q": self.policy.w_q.weight.detach().float().cpu().contiguous(),
                    "w_k": self.policy.w_k.weight.detach().float().cpu().contiguous(),
                    "pos_prior": self.policy.pos_prior.detach().float().cpu().contiguous(),
                    "keeps_first_k": torch.tensor([float(self.policy.keeps_first_k)]),
                },
                path / "policy.safetensors",
            )
        write_json(path / "config.json", self.config.to_json())
        self.path = path
        return path

    # ---------------------------------------------------------------- load
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        model: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        lm_head: bool = False,
        need_policy: bool = True,
    ) -> Bundle:
        """Load a bundle (default: the one shipped in the package); `model` overrides where the base model is found."""
        path = bundle_path(path)
        config = read_bundle_config(path)
        if need_policy and not (path / "policy.safetensors").exists():
            raise TokenselError(f"{path}: the bundle has no policy yet (stage 2 has not run): tokensel train --stage 2, or compress with --strategy item-align (needs only stage 1)")
        name = model or config.item.base_model
        llm = ItemLLM.from_pretrained(name, item_token=config.item.item_token, lm_head=lm_head, device="cpu", dtype=torch.float32)
        check_identity(config.identity, llm.identity(), path, name)
        item_tensors = read_weights(path / "item.safetensors", ["item_embedding"])
        if config.item.tuning == "full":
            llm.model.load_state_dict({k[6:]: v for k, v in item_tensors.items() if k.startswith("model.")}, strict=False)
        if config.item.tuning == "top":
            last_block(llm).load_state_dict({k[11:]: v for k, v in item_tensors.items() if k.startswith("last_block.")})
        with torch.no_grad():
            llm.model.get_input_embeddings().weight[llm.item_token_id] = item_tensors["item_embedding"]
        if config.item.tuning == "lora":
            from peft import PeftModel

            llm.model = PeftModel.from_pretrained(llm.model, path / "item_adapter").merge_and_unload()
        llm.set_template(config.text.template)
        llm.model.to(device=device, dtype=dtype).eval()
        user = None
        if (path / "user_model.safetensors").exists():
            user = UserModel(llm.hidden_size, config.user)
            load_weights(user, path / "user_model.safetensors")
            user.to(device).eval()
        policy = None
        if (path / "policy.safetensors").exists():
            policy = PolicyHead(llm.hidden_size)
            w = read_weights(path / "policy.safetensors", ["w_q", "w_k"])
            if w["w_q"].shape != (llm.hidden_size, llm.hidden_size):
                raise TokenselError(f"{path}: policy weights are {tuple(w['w_q'].shape)}, model hidden size is {llm.hidden_size}")
            policy.w_q.weight.data.copy_(w["w_q"])
            policy.w_k.weight.data.copy_(w["w_k"])
            if "pos_prior" in w:  # heads saved before the position prior existed keep it at zero
                n = min(w["pos_prior"].shape[0], policy.pos_prior.shape[0])
                policy.pos_prior.data[:n].copy_(w["pos_prior"][:n])
            policy.keeps_first_k = bool("keeps_first_k" in w and w["keeps_first_k"].item())  # absent: saved before stage 2 could choose
            policy.to(device).eval()
        return cls(config, llm, user, policy, path)


def read_weights(file: Path, required: list[str] = ()) -> dict[str, torch.Tensor]:
    """A bundle's safetensors file, or a TokenselError naming it when it is missing, damaged or incomplete."""
    if not file.exists():
        raise TokenselError(f"{file}: missing from the bundle; copy the whole bundle folder, or train it again")
    try:
        tensors = load_file(file)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise TokenselError(f"{file}: damaged or not a safetensors file ({exc}); copy the bundle again, or train it again") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise TokenselError(f"{file}: no tensor {missing[0]!r}; the file is not the one this bundle wrote")
    return tensors


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load a module's weights from a bundle file; a mismatch is a TokenselError naming the file."""
    try:
        module.load_state_dict(read_weights(file))
    except RuntimeError as exc:
        raise TokenselError(f"{file}: the weights do not fit the model in config.json ({str(exc).splitlines()[0]})") from None
