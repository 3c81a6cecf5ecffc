"""Write the tests' tiny BERT (tests/conftest.py, seed 0) to a folder, for scripts that need a fast item LLM.

Usage: python research/make_tiny_bert.py ITEMS.parquet OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import conftest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

out = Path(sys.argv[2])
tokenizer = conftest._wordpiece_tokenizer(conftest.fixture_texts())
torch.manual_seed(0)
cfg = BertConfig(
    vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
)
BertModel(cfg).eval().save_pretrained(out)
tokenizer.save_pretrained(out)
