"""Item vectors under a keep mask, for the end-to-end stage 2 (train/e2e.py explains the objective).

The catalogue is run through f once (`prepare`); then, per step, the head's keep mask over each item's
tokens (the selection rule, with the perturbed-top-k gradient while training) and the `[ITEM]` vector
the surrogate recommender reads under it, where the mask acts as `mask_layers` says: `top` (the last
block's `[ITEM]` query over cached states), `exact` (f over the kept tokens; the gradient from `top`,
or exact on drawn chunks with `grad_chunks`) or `all` (every block, gated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tqdm.auto import tqdm

from tokensel.config import CacheConfig, PolicyConfig
from tokensel.errors import TokenselError
from tokensel.models.batching import length_buckets
from tokensel.models.gated import kept_vectors, lower_blocks
from tokensel.policy.head import PolicyHead
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import BlockInputs, ItemReadout, last_block
from tokensel.models.scratch import scratch_states
from tokensel.select.rule import chunk_sums, select_mask
from tokensel.train.relaxation import PerturbedMask, relative_sigma

MASK_LAYERS = ("top", "exact", "all")


# ----------------------------------------------------------------------------------------- data
@dataclass
class E2EData:
    """Per item: tokens, the cached inputs of f's last block (mask in the top block only), final-layer
    text states and [ITEM] states; `llm` set when the mask acts in every block (f runs per step)."""

    tokens: list[list[int]]
    cache: BlockInputs | None
    hidden: list[torch.Tensor] | torch.Tensor  # per item [n_i, d] fp16 (or [N, L, d] fp16 in a scratch file), what the head scores
    item: torch.Tensor  # [N, d] final [ITEM] states of the full text
    offset: int  # cache column of each item's first text token
    llm: ItemLLM | None = None  # mask_layers "exact" / "all": f itself, run over each step's items
    mask_layers: str = "top"
    cache_cfg: CacheConfig | None = None  # where the catalogue-sized tables live (models/scratch.py)


@torch.inference_mode()
def prepare(llm: ItemLLM, tokens: list[list[int]], mask_layers: str = "top", cache_cfg: CacheConfig | None = None, batch_tokens: int = 16384, max_batch: int = 128) -> E2EData:
    """One frozen forward over the catalogue: the final states (for the head) and, for the top-block
    mask, the last block's inputs (for the readout) from the same pass, kept where `cache_cfg` says
    (models/scratch.py)."""
    if mask_layers not in MASK_LAYERS:
        raise TokenselError(f"unknown mask layers {mask_layers!r}; choose {', '.join(MASK_LAYERS)}")
    if mask_layers == "all":  # f's layout, checked once up front (lower_blocks checks the last block too)
        lower_blocks(llm)
    else:
        last_block(llm)
    off = len(llm.lead_ids) + len(llm.template_ids)
    lens = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    N, W = len(tokens), off + (int(lens.max()) if len(lens) else 0) + 1
    d = llm.hidden_size
    cached = mask_layers != "all"
    cache_cfg = cache_cfg or CacheConfig()
    states = scratch_states((N, W, d), cache_cfg, "stage 2 caches the item LLM's lower layers") if cached else None
    item = torch.zeros(N, d)
    on_disk = cache_cfg.store == "disk"  # the text states too: as many values as the block inputs
    hidden = scratch_states((N, max(W - off - 1, 1), d), cache_cfg, "stage 2 keeps the item LLM's text states") if on_disk else [None] * N
    llm.model.eval()
    with tqdm(total=N, desc="stage 2: embedding items", unit="item", disable=None, leave=False) as bar:
        for group in length_buckets(lens.tolist(), max_batch, batch_tokens):
            ids, mask, _ = llm.build_inputs([tokens[i] for i in group])
            out = llm.model(input_ids=ids.to(llm.device), attention_mask=mask.to(llm.device), output_hidden_states=True)
            if cached:
                h = out.hidden_states[-2].cpu().to(states.dtype)
                states[group, : h.shape[1]] = h
            top = out.hidden_states[-1].float().cpu()
            for j, i in enumerate(group):
                n = len(tokens[i])
                if on_disk:
                    hidden[i, :n] = top[j, off : off + n].to(torch.float16)
                else:
                    hidden[i] = top[j, off : off + n].to(torch.float16).clone()
                item[i] = top[j, off + n]
            bar.update(len(group))
    mask = torch.arange(W)[None, :] < (off + lens + 1)[:, None]
    cache = BlockInputs(states, mask, off + lens) if cached else None
    return E2EData(tokens, cache, hidden, item, off, None if mask_layers == "top" else llm, mask_layers, cache_cfg)


def pad_states(data: E2EData, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, d] float final-layer text states of these items (zeros past each end), [B] lengths."""
    n = torch.tensor([len(data.tokens[i]) for i in items], dtype=torch.long)
    out = torch.zeros(len(items), max(int(n.max()) if len(items) else 0, 1), data.item.shape[1])
    for r, i in enumerate(items):
        out[r, : n[r]] = data.hidden[i][: n[r]].float()
    return out, n


# ----------------------------------------------------------------------------------------- selection
def chunk_scores(head: PolicyHead, data: E2EData, items: list[int], cfg: PolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] chunk scores (sum of log p, as the `policy` strategy) and [B] token counts."""
    h, n = pad_states(data, items)
    logp = head.log_probs(h, data.item[items], n, cfg.prefix, folded=True)
    return chunk_sums(logp, cfg.prefix, cfg.train_chunk), n


def keep_mask(head: PolicyHead | None, data: E2EData, items: list[int], cfg: PolicyConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] keep mask over the items' text tokens at budget k, [B] lengths. head None: first-k.
    With a generator the mask carries the perturbed-top-k gradient to the head; without, it is the
    plain rule (validation)."""
    if head is None:
        n = torch.tensor([len(data.tokens[i]) for i in items], dtype=torch.long)
        width = max(int(n.max()), 1)
        zeros = torch.zeros(len(items), max(1, -(-(width - cfg.prefix) // cfg.train_chunk)))
        return select_mask(zeros, n, k=cfg.k, prefix=cfg.prefix, chunk=cfg.train_chunk, width=width).float(), n
    scores, n = chunk_scores(head, data, items, cfg)
    width = max(int(n.max()), 1)
    if generator is None:
        return select_mask(scores.detach(), n, k=cfg.k, prefix=cfg.prefix, chunk=cfg.train_chunk, width=width).float(), n
    p = min(cfg.prefix, cfg.k)
    real = (n - p).clamp(min=0).add(cfg.train_chunk - 1).div(cfg.train_chunk, rounding_mode="floor")
    sigma = relative_sigma(scores, real, cfg.sigma)
    mask = PerturbedMask.apply(scores, n, sigma, cfg.k, cfg.prefix, cfg.train_chunk, width, cfg.perturb_samples, generator)
    return mask, n


def readout_weights(data: E2EData, items: list[int], token_mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B, W] attention weights over the cache columns: 1 for the lead and `[ITEM]`, the keep mask on text."""
    idx = torch.as_tensor(items, dtype=torch.long)
    W = int(data.cache.lengths[idx].max())
    L = token_mask.shape[1]
    text = torch.where(torch.arange(L)[None] < n[:, None], token_mask, torch.ones_like(token_mask))
    weights = torch.ones(len(items), W, dtype=token_mask.dtype)
    return torch.cat([weights[:, : data.offset], text[:, : W - data.offset], weights[:, data.offset + L :]], 1)


@torch.no_grad()
def kept_block_inputs(data: E2EData, items: list[int], token_mask: torch.Tensor) -> BlockInputs:
    """f's lower blocks run over each item's kept tokens alone (the compressed text, renumbered from 0
    as downstream sees it): the last block's inputs. Kept texts are at most k tokens, so this costs a
    fraction of the full-text forward `prepare` ran once."""
    llm = data.llm
    keep = token_mask.detach().cpu() > 0.5
    kept = [[t for t, m in zip(data.tokens[i], keep[r].tolist()) if m] for r, i in enumerate(items)]
    ids, mask, off = llm.build_inputs(kept)
    out = llm.model(input_ids=ids.to(llm.device), attention_mask=mask.to(llm.device), output_hidden_states=True)
    n = torch.tensor([len(t) for t in kept], dtype=torch.long)
    states = out.hidden_states[-2].float().cpu()
    if data.cache_cfg is not None and data.cache_cfg.store == "disk":
        states = states.half().float()  # the precision of the cached tables, so every selection is read alike
    return BlockInputs(states, mask.bool(), off + n)


@torch.no_grad()
def kept_inputs_table(data: E2EData, head: PolicyHead | None, cfg: PolicyConfig, batch: int = 256) -> BlockInputs:
    """Every item's kept-token block inputs under one fixed selection (head None: first-k). While the
    head is held (warm-up) its selection does not change, so the surrogate reads these cached inputs
    and a warm-up step costs the readout and the user model only."""
    N = len(data.tokens)
    width = data.offset + min(cfg.k, max((len(t) for t in data.tokens), default=0)) + 1  # kept texts are at most k tokens
    states = scratch_states((N, width, data.item.shape[1]), data.cache_cfg or CacheConfig(), "stage 2 caches the kept tokens' lower layers")
    mask = torch.zeros(N, width, dtype=torch.bool)
    item_pos = torch.zeros(N, dtype=torch.long)
    for s in range(0, N, batch):
        items = list(range(s, min(s + batch, N)))
        part = kept_block_inputs(data, items, keep_mask(head, data, items, cfg)[0])
        w = part.states.shape[1]
        states[s : s + len(items), :w] = part.states.to(states.dtype)
        mask[s : s + len(items), :w] = part.mask
        item_pos[s : s + len(items)] = part.item_pos
    return BlockInputs(states, mask, item_pos)


def item_vectors(readout: ItemReadout, data: E2EData, items: list[int], token_mask: torch.Tensor | None, n: torch.Tensor | None = None) -> torch.Tensor:
    """[B, d] readout `[ITEM]` states; with a keep mask (None: the full text):
    - `top`: dropped text tokens are masked out of the `[ITEM]` query's attention; lower layers still
      saw the full text (the approximation);
    - `exact`: the value is f over the kept tokens alone (what downstream embeds), the mask's gradient
      is the `top` path's (straight-through: exact forward, top-block backward; the readout's own
      gradient comes from the exact value only);
    - `all`: the gate in every block, exact in value and in gradient (f forward and backward per item)."""
    if data.mask_layers == "all":
        toks = [data.tokens[i] for i in items]
        if token_mask is None:
            token_mask = torch.ones(len(items), max(max(len(t) for t in toks), 1))
        return kept_vectors(data.llm, readout, toks, token_mask)
    idx = torch.as_tensor(items, dtype=torch.long)
    W = int(data.cache.lengths[idx].max())
    c = data.cache
    top_inputs = c.rows(idx, W)
    if token_mask is None:
        return readout(*top_inputs)
    weights = readout_weights(data, items, token_mask, n)
    if data.mask_layers == "top":
        return readout(*top_inputs, weights)
    k = kept_block_inputs(data, items, token_mask)
    exact = readout(k.states, k.mask, k.item_pos)
    if not (torch.is_grad_enabled() and weights.requires_grad):
        return exact
    frozen = {name: p.detach() for name, p in readout.named_parameters()}
    top = torch.func.functional_call(readout, frozen, (*top_inputs, weights))
    return exact + (top - top.detach())


def sampled_exact_vectors(readout: ItemReadout, data: E2EData, items: list[int], token_mask: torch.Tensor, n: torch.Tensor, cfg: PolicyConfig, generator: torch.Generator) -> torch.Tensor:
    """[B, d] f over the kept tokens (exact value) whose keep gradient is exact too, for the kept tokens
    and for `cfg.grad_chunks` dropped chunks per item drawn at random (their gradient scaled by dropped /
    drawn, so its expectation is the gradient over every dropped chunk).

    f runs gated (`models/gated.py`) over the kept tokens plus the drawn chunks at gate 0, a few dozen
    tokens per item instead of the whole text: the `all` mask's exact gradient at a CPU's price, for a
    sample of the alternatives. Undrawn dropped tokens get no gradient."""
    p = min(cfg.prefix, cfg.k)
    L = token_mask.shape[1]
    pos = torch.arange(L)
    chunk_of = torch.where(pos >= p, (pos - p) // cfg.train_chunk, -1)
    keep = token_mask.detach() > 0.5
    rows, scales = [], []
    for r in range(len(items)):
        inside = pos < int(n[r])
        dropped = inside & ~keep[r]
        ids = torch.unique(chunk_of[dropped])
        take = ids[torch.randperm(len(ids), generator=generator)[: cfg.grad_chunks]]
        drawn = dropped & torch.isin(chunk_of, take)
        rows.append((keep[r] & inside) | drawn)
        scales.append(len(ids) / max(len(take), 1))
    width = max(int(m.sum()) for m in rows)
    index = torch.zeros(len(items), max(width, 1), dtype=torch.long)
    scale = torch.ones(len(items), max(width, 1))
    lists = []
    for r, (m, sc) in enumerate(zip(rows, scales)):
        where = m.nonzero().flatten()
        index[r, : len(where)] = where
        scale[r, : len(where)] = torch.where(keep[r, where], 1.0, sc)
        lists.append([data.tokens[items[r]][j] for j in where.tolist()])
    gate = token_mask.gather(1, index)
    gate = gate + (scale - 1) * (gate - gate.detach())  # the value stays 0/1, the gradient is scaled
    return kept_vectors(data.llm, readout, lists, gate)


def step_vectors(readout: ItemReadout, data: E2EData, items: list[int], token_mask: torch.Tensor | None, n: torch.Tensor | None, cfg: PolicyConfig, generator: torch.Generator) -> torch.Tensor:
    """[B, d] the vectors one training step reads: the sampled exact gradient where the head's mask
    moves and `cfg.grad_chunks` asks for it, else `item_vectors` (one place for the choice, so the loop
    stays a loop)."""
    if token_mask is not None and token_mask.requires_grad and data.mask_layers == "exact" and cfg.grad_chunks:
        return sampled_exact_vectors(readout, data, items, token_mask, n, cfg, generator)
    return item_vectors(readout, data, items, token_mask, n)


@torch.no_grad()
def masked_table(readout: ItemReadout, head: PolicyHead | None, data: E2EData, cfg: PolicyConfig, batch: int = 256) -> torch.Tensor:
    """[N, d] every item's masked-readout vector under the hard rule (head None: first-k)."""
    readout.eval()
    N = len(data.tokens)
    out = []
    batch = batch if data.mask_layers != "all" else max(1, batch // 4)  # a full forward per item: smaller batches
    for s in range(0, N, batch):
        items = list(range(s, min(s + batch, N)))
        mask, n = keep_mask(head, data, items, cfg)
        out.append(item_vectors(readout, data, items, mask, n))
    return torch.cat(out)
