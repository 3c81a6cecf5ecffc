"""The block-input cache on disk (models/scratch.py): same readout as in RAM within half precision, and
no file outlives its run, whether it ends, fails or is killed."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tokensel.cli import app
from tokensel.config import CacheConfig
from tokensel.errors import TokenselError
from tokensel.models import scratch
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout, cache_block_inputs

from conftest import INTERACTIONS, ITEMS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm(tiny_bert) -> ItemLLM:
    return ItemLLM.from_pretrained(tiny_bert)


def scratch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{scratch.PREFIX}*"))


def mapped_scratch() -> list[str]:
    """This process's mappings of scratch files (a mapping outlives the unlinked file's name)."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if scratch.PREFIX in line]


def test_disk_cache_reads_as_the_ram_cache_within_half_precision(llm, texts, tmp_path):
    tokens = llm.tokenize(texts[:40], 48)
    ram = cache_block_inputs(llm, tokens, CacheConfig("ram"), batch_tokens=300)
    disk = cache_block_inputs(llm, tokens, CacheConfig("disk", tmp_path), batch_tokens=300)
    assert disk.states.dtype == torch.float16 and ram.states.dtype == torch.float32
    assert torch.equal(disk.mask, ram.mask) and torch.equal(disk.item_pos, ram.item_pos)
    torch.testing.assert_close(disk.states.float(), ram.states, atol=2e-3, rtol=1e-3)  # float16: 11-bit mantissa
    readout = ItemReadout(llm).eval()
    with torch.no_grad():
        want = readout.table(ram)
        got = readout.table(disk)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.9999


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_the_file_is_gone_after_success(llm, texts, tmp_path):
    before = len(mapped_scratch())
    cache = cache_block_inputs(llm, llm.tokenize(texts[:20], 32), CacheConfig("disk", tmp_path))
    assert scratch_files(tmp_path) == []  # unlinked as soon as it was mapped
    assert len(mapped_scratch()) == before + 1 and "(deleted)" in mapped_scratch()[-1]
    del cache
    gc.collect()
    assert len(mapped_scratch()) == before  # the space goes back with the array


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_the_file_is_gone_after_a_failure_mid_run(llm, texts, tmp_path, monkeypatch):
    before = len(mapped_scratch())
    forward, calls = llm.model.forward, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return forward(*a, **kw)

    monkeypatch.setattr(llm.model, "forward", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        cache_block_inputs(llm, llm.tokenize(texts[:40], 48), CacheConfig("disk", tmp_path), batch_tokens=300)
    assert len(calls) == 2  # it failed mid-way, with the file written in part
    gc.collect()
    assert scratch_files(tmp_path) == [] and len(mapped_scratch()) == before


CHILD = textwrap.dedent(
    """
    import sys, time
    from tokensel.config import CacheConfig
    from tokensel.models.item_llm import ItemLLM
    from tokensel.models.readout import cache_block_inputs
    llm = ItemLLM.from_pretrained(sys.argv[1])
    cache = cache_block_inputs(llm, llm.tokenize(["a few words of text"] * 50, 16), CacheConfig("disk", sys.argv[2]))
    print("cached", flush=True)
    time.sleep(60)
    """
)


def test_a_killed_run_leaves_nothing_and_the_next_removes_a_stale_file(llm, texts, tiny_bert, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, tiny_bert, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "cached"
        maps = Path(f"/proc/{child.pid}/maps")
        if maps.exists():
            assert scratch.PREFIX in maps.read_text()  # the child holds the cache, mapped
    finally:
        child.kill()  # SIGKILL: no finally, no atexit
        child.wait()
    assert scratch_files(tmp_path) == []
    # a file a dead process left behind (where the OS kept its name: unlinking failed, or killed in the
    # instant between creating and unlinking it) is removed by the next run that uses the folder
    stale = tmp_path / f"{scratch.PREFIX}{child.pid}-0123456789ab.f16"
    stale.write_bytes(b"\0" * 4096)
    mine = tmp_path / f"{scratch.PREFIX}{os.getpid()}-0123456789ab.f16"  # a live process's file stays
    mine.write_bytes(b"\0" * 16)
    cache_block_inputs(llm, llm.tokenize(texts[:5], 16), CacheConfig("disk", tmp_path))
    assert scratch_files(tmp_path) == [mine]


def test_too_little_disk_is_refused_naming_the_folder_and_the_size(llm, texts, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1000, 1000))
    tokens = llm.tokenize(texts[:40], 48)
    need = 40 * (max(map(len, tokens)) + 2) * llm.hidden_size * 2  # [CLS] + text + [ITEM], 2 bytes each
    with pytest.raises(TokenselError) as err:
        cache_block_inputs(llm, tokens, CacheConfig("disk", tmp_path))
    assert str(tmp_path) in str(err.value) and f"{need / 2**30:.1f} GiB" in str(err.value)
    assert scratch_files(tmp_path) == []


def test_the_cli_exits_2_when_the_cache_folder_is_too_small(tiny_bert, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    r = CliRunner().invoke(app, [
        "train", str(ITEMS), str(INTERACTIONS), "-o", str(tmp_path / "bundle"), "--model", tiny_bert, "--stage", "1",
        "--tuning", "top", "--epochs1", "1", "--negatives", "8", "--cache-dir", str(cache_dir),
    ])
    flat = "".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert str(cache_dir) in flat and "GiBofdisk" in flat and "--cache-dir" in flat
    assert scratch_files(cache_dir) == []


def test_a_missing_cache_folder_and_an_unknown_store_are_refused(tmp_path):
    with pytest.raises(TokenselError, match="no such folder"):
        CacheConfig("disk", tmp_path / "nowhere")
    with pytest.raises(TokenselError, match="--cache-store"):
        CacheConfig("gpu")
