"""hllm: item = final state at [ITEM] over the kept tokens, user = tokensel's causal UserModel trained
with InfoNCE on sampled negatives. Item LLM frozen by default (HLLM / stage 1 with f frozen); with
`item_tuning` it trains too (HLLM proper, the paper's stage 3, from a fresh copy of f per run): `top`
trains only f's last block over lower layers cached once per file (cheap enough for a CPU), lora | full
re-encode every item a step touches (a GPU setting)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensel.evaluate.recommenders.base import SeedRun, Trained
from tokensel.evaluate.recommenders.registry import register
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import BlockInputs, cache_block_inputs
from tokensel.train.common import embed_tokens
from tokensel.train.loop import FrozenItems, ItemTable, ReadoutItems, TunedItems


@register
class HLLM(Trained):
    """HLLM with the item LLM frozen: item = [ITEM] final state over the kept tokens, user model trained.

    With `center` (default) the catalogue mean is subtracted from the frozen [ITEM] states first. The
    [ITEM] state of a frozen, untuned model is strongly anisotropic, so cosine scores against fixed item
    vectors barely separate items; centring is a fixed shift with no parameters that removes the shared
    direction (RESULTS.md has the measurement). A tuned item LLM (the paper's HLLM) learns this away;
    frozen, it is the cheapest fix.
    """

    name = "hllm"
    default_epochs = 8  # the budget and learning rate chosen in RESULTS.md
    default_lr = 5e-4
    tunes_item_llm = True
    _block_cache: tuple[int, BlockInputs] | None = None  # item_tuning top: the current file's lower-layer states

    @property
    def vector_kind(self) -> str:
        return "item-token"

    def prepare(self, llm, token_lists):
        return embed_tokens(llm, token_lists, desc="embedding items")[0]

    @property
    def needs_item_llm(self) -> bool:
        return self.cfg.item_tuning != "none"

    def run_tuned(self, make_llm: Callable[[], ItemLLM], tokens: list[list[int]], hist: Histories, seed: int) -> SeedRun:
        """HLLM proper: a fresh item LLM from `make_llm`, trained with the user model from this seed
        (all of it, LoRA adapters, or with `top` only its last block over cached lower layers)."""
        if self.cfg.item_tuning == "top":
            llm = make_llm()
            key = hash((tuple(llm.lead_ids + llm.template_ids), tuple(map(tuple, tokens))))  # the template is input too
            if self._block_cache is None or self._block_cache[0] != key:  # the lower layers run once per file, not per seed
                self._block_cache = (key, cache_block_inputs(llm, tokens, self.cfg.cache))
            torch.manual_seed(seed)
            items: ItemTable = ReadoutItems(llm, self._block_cache[1], self.cfg.center, self.device)
        else:
            torch.manual_seed(seed)
            items = TunedItems(make_llm(), tokens, self.cfg.item_tuning, self.cfg.center)
        user = self.user_model(items.all_rows().shape[1])
        return self.fit(user, items, hist, seed)

    def run(self, vectors, hist, seed):
        torch.manual_seed(seed)
        table = vectors.float()
        if self.cfg.center:
            table = table - table.mean(0, keepdim=True)
        user = self.user_model(vectors.shape[1])
        return self.fit(user, FrozenItems(table.to(self.device)), hist, seed)
