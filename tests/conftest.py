"""Shared fixtures: tiny randomly initialised models (made once per session, no network) and fixture data.

- tiny_bert:  BertModel (hidden 32, 2 layers, 2 heads) + a WordPiece tokenizer trained on the fixture
  texts, wrapped as PreTrainedTokenizerFast with [CLS] ... [SEP] post-processing. No LM head.
- tiny_llama: LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads) + a byte-level BPE tokenizer
  whose post-processor adds <s> (bos) in front. Has a causal LM head (strategy topk-logits).
- tiny_qwen:  Qwen2Model (hidden 48) + a BPE tokenizer that adds no special tokens at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
ITEMS = FIXTURES / "items.parquet"
INTERACTIONS = FIXTURES / "interactions.parquet"


def fixture_texts() -> list[str]:
    from tokensel.config import TextConfig
    from tokensel.io.items import read_items

    _, texts = read_items(ITEMS, TextConfig())
    t = pq.read_table(ITEMS).to_pydict()
    extra = [v for col in ("brand", "categories") for v in t[col] if v]
    return texts + extra


def _wordpiece_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials, min_frequency=2))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def _bpe_tokenizer(texts: list[str], add_bos: bool, vocab_size: int = 700):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session", autouse=True)
def _verdicts_session(tmp_path_factory):
    """Verdicts recorded by a check or curve go to a temporary folder, never beside fixtures/items.parquet."""
    old = os.environ.get("TOKENSEL_VERDICTS")
    os.environ["TOKENSEL_VERDICTS"] = str(tmp_path_factory.mktemp("verdicts"))
    yield
    if old is None:
        os.environ.pop("TOKENSEL_VERDICTS", None)
    else:
        os.environ["TOKENSEL_VERDICTS"] = old


@pytest.fixture(autouse=True)
def _verdicts(monkeypatch, tmp_path_factory):
    """Each test starts with no recorded verdict (a module fixture's check records in the session folder)."""
    monkeypatch.setenv("TOKENSEL_VERDICTS", str(tmp_path_factory.mktemp("verdicts")))


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return fixture_texts()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, texts) -> str:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    tokenizer = _wordpiece_tokenizer(texts)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    model = BertModel(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, texts) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = _bpe_tokenizer(texts, add_bos=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, texts) -> str:
    from transformers import Qwen2Config, Qwen2Model

    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    tokenizer = _bpe_tokenizer(texts, add_bos=False, vocab_size=650)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2Model(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def items_path() -> Path:
    return ITEMS


@pytest.fixture(scope="session")
def interactions_path() -> Path:
    return INTERACTIONS


def write_items(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    """Write an items Parquet from a list of row dicts."""
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle_trained(tmp_path_factory, tiny_bert):
    """(path, in-memory Bundle) trained on the fixtures with the tiny BERT: stage 1 + stage 2, one epoch each."""
    from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config
    from tokensel.train.pipeline import train

    out = tmp_path_factory.mktemp("bundles") / "tiny-bert-bundle"
    logs: list[dict] = []
    bundle = train(
        ITEMS, INTERACTIONS, out,
        item_cfg=ItemModelConfig(base_model=tiny_bert),
        stage1=Stage1Config(epochs=1, negatives=8),
        policy=PolicyConfig(epochs=1, negatives=8, batch_size=16, objective="bounded"),  # a moved head for the bundle mechanics; e2e: test_e2e.py
        device="cpu", log=logs.append,
    )
    bundle.train_log = logs
    return out, bundle


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_trained) -> Path:
    return tiny_bundle_trained[0]


def check_contract(out: Path, items: Path, tokenizer_path: str, k: int, *, max_len: int = 256, text_cols=("title", "description"), id_col: str = "item_id", limit: int | None = None, labels: bool = False) -> pa.Table:
    """Assert the output contract of SPEC.md for a compressed file; returns the output table."""
    from transformers import AutoTokenizer

    from tokensel.config import TextConfig
    from tokensel.io.items import read_items

    table = pq.read_table(out)
    schema = table.schema
    assert schema.field(id_col).type == pq.read_schema(items).field(id_col).type
    assert schema.field("text").type in (pa.string(), pa.large_string())
    assert schema.field("token_ids").type == pa.list_(pa.int32())
    assert schema.field("positions").type == pa.list_(pa.int32())
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.field("n_kept").type == pa.int32()
    ids, texts = read_items(items, TextConfig(id_col=id_col, text_cols=list(text_cols), labels=labels))
    if limit is not None:
        ids, texts = ids[:limit], texts[:limit]
    rows = table.to_pydict()
    assert rows[id_col] == ids, "one row per input item, in input order"
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    for r, text in enumerate(texts):
        # re-tokenise the ORIGINAL built text, never the output text
        full = tok(text, add_special_tokens=False)["input_ids"][:max_len]
        pos = rows["positions"][r]
        assert rows["n_tokens"][r] == len(full), f"row {r}"
        assert rows["n_kept"][r] == min(k, len(full)) == len(pos), f"row {r}"
        assert all(a < b for a, b in zip(pos, pos[1:])), f"row {r}: positions not strictly increasing"
        assert all(0 <= p < len(full) for p in pos)
        assert rows["token_ids"][r] == [full[p] for p in pos], f"row {r}: token_ids != tokenizer(text)[positions]"
        if len(full) <= k:
            assert pos == list(range(len(full))), f"row {r}: short text not kept whole"
    return table
