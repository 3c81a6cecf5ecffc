"""The item LLM f: any transformers model with an `[ITEM]` token appended after the item's text.

Model input = [leading specials, e.g. CLS/BOS] + template + text tokens + [ITEM].
The final-layer state at `[ITEM]` is the item embedding; the states of the text tokens feed the
policy head. Text is tokenised without special tokens, so positions index the item's own tokens.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokensel.errors import TokenselError
from tokensel.models.tokenizer import DEFAULT_MODEL, decode_plain, encode_plain, local_folder, model_source, resolve_model_path, tokenizer_identity

__all__ = ["DEFAULT_MODEL", "Encoded", "ItemLLM", "resolve_model_path"]


def _lm_head_classes():
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return [("causal", AutoModelForCausalLM), ("masked", AutoModelForMaskedLM)]


@dataclass
class Encoded:
    """Hidden states of a batch: text-token states aligned at column 0, and the `[ITEM]` states."""

    hidden: torch.Tensor  # [B, L, d] states of the text tokens (padding beyond n_tokens)
    item: torch.Tensor  # [B, d] final-layer state at [ITEM]
    n_tokens: torch.Tensor  # [B]
    token_logits: torch.Tensor | None = None  # [B, L] LM logit of each actual text token


class ItemLLM(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, name: str, item_token: str = "[ITEM]", lm_kind: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.lm_kind = lm_kind  # None, "causal" or "masked": whether token logits are available
        self.item_token = item_token
        if item_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [item_token]})
        self.item_token_id = tokenizer.convert_tokens_to_ids(item_token)
        emb = model.get_input_embeddings()
        if self.item_token_id >= emb.weight.shape[0]:
            with torch.no_grad():
                mean = emb.weight.float().mean(0)
            model.resize_token_embeddings(self.item_token_id + 1, mean_resizing=False)
            with torch.no_grad():
                model.get_input_embeddings().weight[self.item_token_id] = mean.to(emb.weight.dtype)
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        self.lead_ids: list[int] = full[:start]
        self.template_ids: list[int] = []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.source: dict = {"model_name": name, "model_revision": None}  # set by from_pretrained

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        item_token: str = "[ITEM]",
        lm_head: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ItemLLM:
        """Load a model and tokenizer from a hub id or folder; `lm_head=True` also loads a (checked) LM head."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = resolve_model_path(name)
        if Path(path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise TokenselError(f"cannot load the tokenizer of model {name!r} ({exc})") from None
        lm_kind = None
        model = None
        if lm_head:
            for kind, auto in _lm_head_classes():
                try:
                    model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
                except (ValueError, KeyError):
                    continue
                if info["missing_keys"]:
                    model = None
                    continue
                lm_kind = kind
                break
            if model is None:
                raise TokenselError(
                    f"model {name!r} has no trained language-model head, so strategy 'topk-logits' cannot score "
                    "tokens with it; use a causal or masked LM checkpoint, or another strategy"
                )
        else:
            try:
                model = AutoModel.from_pretrained(path, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise TokenselError(f"cannot load model {name!r} ({exc})") from None
        model.to(device).eval()
        llm = cls(model, tokenizer, name, item_token, lm_kind)
        llm.source = model_source(name, local_folder(name) or Path(path))
        return llm

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def input_offset(self) -> int:
        """Model-input columns before the item's own text (leading specials + template)."""
        return len(self.lead_ids) + len(self.template_ids)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "model_type": cfg.model_type,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "tokenizer": tokenizer_identity(type(self.tokenizer).__name__, self.tokenizer.get_vocab()),
            "item_token_id": self.item_token_id,
        }

    def set_template(self, template: str) -> None:
        self.template_ids = self.tokenizer(template, add_special_tokens=False)["input_ids"] if template else []

    # ---------------------------------------------------------------- tokenising
    def tokenize(self, texts: list[str], max_len: int) -> list[list[int]]:
        """The item's own tokens (no specials), cut at max_len: the space positions index into."""
        if not texts:
            return []
        backend = self._plain_backend()
        if backend is not None:  # the Rust tokenizer directly: same ids, no per-item wrapper work
            return encode_plain(backend, texts, max_len)
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]

    def _plain_backend(self):
        """The fast tokenizer's Rust backend when calling it directly gives what the wrapper gives, else None."""
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False) or getattr(tok, "truncation_side", "right") != "right":
            return None
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        return backend

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        """`decode` of many sequences at once (in Rust when the tokenizer is fast)."""
        backend = self._plain_backend()
        if backend is not None:
            return decode_plain(backend, sequences)
        return [self.decode(s) for s in sequences]

    def offsets(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Each token's character span in its text (no specials, not cut): what per-field output reads."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise TokenselError("per-field output needs a fast tokenizer (character offsets); this one is not")
        return self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- forward
    def build_inputs(self, token_lists: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Right-padded input ids and mask; returns the column where the item's own text starts.

        `width`: pad the text part to this many tokens (default: the longest item's).
        """
        lead = self.lead_ids + self.template_ids
        off = len(lead)
        rows = len(token_lists)
        lens = np.fromiter(map(len, token_lists), dtype=np.int64, count=rows)
        longest = int(lens.max()) if rows else 0
        if width is not None and width < longest:
            raise ValueError(f"width {width} is shorter than the longest item ({longest} tokens)")
        width = off + (longest if width is None else width) + 1
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        if off:
            ids[:, :off] = lead
        total = int(lens.sum())
        if total:  # scatter all tokens at once: row r, column off + position
            flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
            row_of = np.repeat(np.arange(rows), lens)
            col = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + off
            ids[row_of, col] = flat
        ids[np.arange(rows), off + lens] = self.item_token_id
        mask = (np.arange(width)[None, :] < (off + lens + 1)[:, None]).astype(np.int64)
        return torch.from_numpy(ids), torch.from_numpy(mask), off

    def encode(self, token_lists: list[list[int]], need_hidden: bool = True, width: int | None = None) -> Encoded:
        """Run f over the items' tokens + [ITEM]; gradients flow if the caller enables them.

        `width`: pad every item's text to this many tokens (default: the longest item's).
        """
        ids, mask, off = self.build_inputs(token_lists, width)
        dev = self.device
        n = mask.sum(1) - (off + 1)
        if dev.type == "cuda":  # pinned host memory: the copies are truly asynchronous
            ids, mask, n = ids.pin_memory(), mask.pin_memory(), n.pin_memory()
        ids, mask, n = ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True), n.to(dev, non_blocking=True)
        if self.lm_kind is not None:
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            last = out.hidden_states[-1]
            logits = out.logits
        else:
            last = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = None
        rows = torch.arange(len(token_lists), device=dev)
        item = last[rows, off + n]
        width = ids.shape[1] - off - 1
        hidden = last[:, off : off + width] if need_hidden else last[:, :0]
        token_logits = None
        if logits is not None:
            if self.lm_kind == "causal":  # the logit of the token at p comes from position p - 1
                tl = logits[:, :-1].float().gather(-1, ids[:, 1:, None]).squeeze(-1)
                tl = torch.cat([torch.zeros_like(tl[:, :1]), tl], 1)
            else:  # masked LM on unmasked input: the logit at the token's own position
                tl = logits.float().gather(-1, ids[..., None]).squeeze(-1)
            token_logits = tl[:, off : off + width]
        return Encoded(hidden, item, n, token_logits)
