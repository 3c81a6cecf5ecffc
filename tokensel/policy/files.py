"""A bundle's files read without loading it (no torch): its config, its strategy check, its hash,
and the check that its files are the ones it was saved with.

`config.json` records a manifest (`files`: each weight file's SHA-256) written when the bundle is
saved, so a bundle can be verified in milliseconds before anything trusts it, also when the strategy
that runs reads none of its weights (`--strategy auto` resolving to first-k). A bundle saved before
manifests existed gets a structural check instead (every safetensors file whole: its header and its
length agree).

The bundle hash (recorded in compressed files) leaves the manifest out: the manifest is derived from
the files it lists, so it adds nothing, and leaving it out keeps a bundle's hash what it was before
it recorded one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

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

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "default_bundle"
CHECK_FILE = "check.json"
CONFIG_FILE = "config.json"
FILES_KEY = "files"


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
    files: dict = field(default_factory=dict)  # the manifest: file -> SHA-256 (file_manifest)

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
            files=d.get(FILES_KEY) or {},
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
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise TokenselError(f"{path}: not a tokensel bundle (no config.json)")
    try:
        return BundleConfig.from_json(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
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


def _hashed_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path) != Path(CHECK_FILE))


def _without_manifest(data: bytes) -> bytes:
    """config.json's bytes as they were before the manifest was added (written canonically by write_json)."""
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return data
    if not isinstance(cfg, dict) or FILES_KEY not in cfg:
        return data
    cfg.pop(FILES_KEY)
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def bundle_hash(path: Path) -> str:
    """A short content hash of the bundle (config and weights), recorded in compressed files. The
    strategy check is a verdict about the bundle written after it, not part of what selects, and the
    manifest repeats what the files say: both left out."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _hashed_files(path):
        rel = f.relative_to(path)
        h.update(str(rel).encode())
        data = f.read_bytes()
        h.update(_without_manifest(data) if rel == Path(CONFIG_FILE) else data)
    return h.hexdigest()[:16]


def sha256_of(f: Path) -> str:
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(path: Path) -> dict[str, str]:
    """file (relative, POSIX) -> SHA-256 of every bundle file but config.json and check.json."""
    path = Path(path)
    return {f.relative_to(path).as_posix(): sha256_of(f) for f in _hashed_files(path) if f.relative_to(path) != Path(CONFIG_FILE)}


def verify_bundle(path: str | Path | None, required: tuple[str, ...] = ()) -> BundleConfig:
    """The bundle's config, after checking its files against the manifest it records (or, for a bundle
    saved before manifests, that its safetensors files are whole); damage is a TokenselError naming the
    file. A file that is absent is an error only where it is `required` (compress needs no user model)."""
    path = bundle_path(path)
    cfg = read_bundle_config(path)
    for name in required:
        if not (path / name).is_file():
            raise TokenselError(f"{path / name}: missing from the bundle; copy the whole bundle folder, or train it again")
    if cfg.files:
        for name, digest in sorted(cfg.files.items()):
            f = path / name
            if not f.is_file():
                continue  # absent: `required` says where that matters
            if sha256_of(f) != digest:
                raise TokenselError(f"{f}: damaged: its content does not match the SHA-256 the bundle's config.json records; copy the bundle again, or train it again")
        return cfg
    for f in _hashed_files(path):
        if f.suffix == ".safetensors":
            check_safetensors(f)
    return cfg


def check_safetensors(f: Path) -> None:
    """A safetensors file is whole: an 8-byte header length, a JSON header, and exactly the data it describes."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"{size} bytes where the header describes {8 + n + end}")
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise TokenselError(f"{f}: damaged or not a safetensors file ({exc}); copy the bundle again, or train it again") from None


def keeps_first_k(path: str | Path | None) -> bool:
    """Whether the bundle's stage 2 chose the first tokens (the policy head's saved flag), read without torch."""
    f = bundle_path(path) / "policy.safetensors"
    try:
        with safe_open(str(f), framework="numpy") as st:
            return "keeps_first_k" in st.keys() and bool(st.get_tensor("keeps_first_k").reshape(-1)[0])
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise TokenselError(f"{f}: damaged or not a safetensors file ({exc}); copy the bundle again, or train it again") from None
