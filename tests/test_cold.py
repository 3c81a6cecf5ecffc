"""The cold-start protocol (`--protocol cold`, tokensel.io.cold): which items are cold, what the split
keeps and drops, that no cold item reaches any training or validation history, target or batch (the real
batch builders and trainers, negatives included), and the commands that take it."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tokensel.io.cold as cold_mod
from tokensel.cli import app
from tokensel.config import PolicyConfig, Stage1Config, TrainConfig, UserModelConfig
from tokensel.errors import TokenselError
from tokensel.evaluate.recommenders import make_recommender
from tokensel.evaluate.runner import METRICS, evaluate_detailed, results_table
from tokensel.io.cold import KEEP_LAST, cold_split, first_interaction_order
from tokensel.io.interactions import Histories, read_histories
from tokensel.models.user_model import UserModel
from tokensel.train import e2e as e2e_mod
from tokensel.train import loop as loop_mod
from tokensel.train import stage1 as stage1_mod
from tokensel.train import stage2 as stage2_mod
from tokensel.train.common import Catalogue, draw_negatives, embed_tokens, stage2_users
from tokensel.train.loop import length_batches, windows

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ROOT / "fixtures" / "items.parquet"
INTERACTIONS = ROOT / "fixtures" / "interactions.parquet"
COLUMNS = ("user_id", "item_id", "timestamp")
FIXTURE_IDS = [str(i) for i in pq.read_table(ITEMS, columns=["item_id"])["item_id"].to_pylist()]
runner = CliRunner()


# ------------------------------------------------------------------------------------ random tables
@st.composite
def tables(draw, item_ids: list[str] | None = None, max_users: int = 14, min_len: int = 1, max_len: int = 9):
    """(rows in file order, item index, cold share): users with repeats, ties in the order column,
    exact duplicate rows, items missing from the catalogue and users too short to split."""
    if item_ids is None:
        item_ids = [f"i{j}" for j in range(draw(st.integers(3, 24)))]
    names = item_ids + ["unknown-a", "unknown-b"]
    rows = []
    for u in range(draw(st.integers(1, max_users))):
        for _ in range(draw(st.integers(min_len, max_len))):
            rows.append((f"u{u}", draw(st.sampled_from(names)), draw(st.integers(0, 15))))
    if rows and draw(st.booleans()):
        rows.append(draw(st.sampled_from(rows)))  # an exact duplicate row
    draw(st.randoms(use_true_random=False)).shuffle(rows)
    return rows, {i: n for n, i in enumerate(item_ids)}, draw(st.floats(0.05, 0.95))


def write_table(rows, path: Path) -> Path:
    users, items, order = zip(*rows)
    pq.write_table(pa.table({"user_id": list(users), "item_id": list(items), "timestamp": pa.array(order, pa.int64())}), path)
    return path


def expected_order(rows, index: dict, skip_last: int) -> list[int]:
    """An independent reading of "first interaction, earliest first": duplicates dropped, unknown items
    skipped, each splittable user's last `skip_last` interactions left out, ties by file row."""
    seen, kept = set(), []
    for r, (u, i, o) in enumerate(rows):
        if (u, i, o) in seen:
            continue
        seen.add((u, i, o))
        if i in index:
            kept.append((u, i, o, r))
    if skip_last:
        by_user = defaultdict(list)
        for x in kept:
            by_user[x[0]].append(x)
        kept = []
        for xs in by_user.values():
            xs.sort(key=lambda x: (x[2], x[3]))
            kept += xs[: len(xs) - skip_last] if len(xs) >= 3 else xs
    first: dict[str, tuple] = {}
    for _, i, o, r in kept:
        first[i] = min(first.get(i, (o, r)), (o, r))
    return [index[i] for i in sorted(first, key=first.get)]


def split_of(rows, index, share, scored, tmp: Path):
    path = write_table(rows, tmp / "interactions.parquet")
    try:
        hist = read_histories(path, index, *COLUMNS)
    except TokenselError:  # no user long enough to split
        assume(False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cold_mod, "MIN_COLD_USERS", 0)
        try:
            return path, hist, cold_split(hist, path, index, COLUMNS, share, scored)
        except TokenselError as exc:  # a share that leaves no warm item is refused
            assert "makes every one of the" in str(exc)
            assume(False)


def assert_warm(cold: np.ndarray, items, what: str) -> None:
    leaked = sorted({int(i) for i in items if cold[int(i)]})
    assert not leaked, f"cold items {leaked} reached {what}"


# ------------------------------------------------------------------------------------ the split
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), scored=st.sampled_from(["test", "valid"]))
def test_the_split_holds_out_the_newest_items_and_counts_what_it_dropped(tmp_path_factory, table, scored):
    rows, index, share = table
    path, hist, split = split_of(rows, index, share, scored, tmp_path_factory.mktemp("cold"))
    keep_last = KEEP_LAST[scored]
    order = expected_order(rows, index, keep_last - 1)
    assert first_interaction_order(path, index, *COLUMNS, skip_last=keep_last - 1).tolist() == order
    n = min(len(order), max(1, int(share * len(order) + 0.5)))
    cold = split.cold
    assert set(np.flatnonzero(cold).tolist()) == set(order[len(order) - n :])  # the newest n, nothing else
    assert sorted(split.histories.negatives) == sorted(set(range(len(index))) - set(np.flatnonzero(cold).tolist()))

    before = dict(zip(hist.users, hist.sequences))
    out = split.histories
    dropped = 0
    for user, seq in zip(out.users, out.sequences):
        orig = before[user]
        head = orig[: len(orig) - keep_last]
        assert seq[-keep_last:] == orig[-keep_last:]  # the scored target (and what follows) as it was
        assert seq[:-keep_last] == [i for i in head if not cold[i]]  # the rest: the warm items, in order
        assert len(seq) >= 3
        dropped += len(head) - len(seq[:-keep_last])
    for user in set(before) - set(out.users):  # dropped users had too little warm history to split
        orig = before[user]
        assert len([i for i in orig[: len(orig) - keep_last] if not cold[i]]) + keep_last < 3
    c = split.counts
    assert (c.items, c.cold_items, c.dropped_interactions) == (len(order), n, dropped)
    assert c.dropped_users == len(hist.users) - len(out.users)
    assert c.cold_users + c.warm_users == len(out.users)
    assert split.cold_users.tolist() == [bool(cold[s[-keep_last]]) for s in out.sequences]
    assert c.cold_users == int(split.cold_users.sum())

    # what every trainer reads: no cold item in a training sequence or a validation history, nor as a
    # training target; the validation target only where it is the scored one (the strategy check)
    assert_warm(cold, [i for s in out.train_sequences() for i in s], "a training sequence")
    h, t = out.split("train")
    assert_warm(cold, [i for s in h for i in s] + list(t), "a training history or target")
    h, t = out.split("valid")
    assert_warm(cold, [i for s in h for i in s] + (list(t) if scored == "test" else []), "a validation history or target")
    if scored == "test":
        h, _ = out.split("test")
        assert_warm(cold, [i for s in h for i in s], "a test history")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), seed=st.integers(0, 2**16))
def test_no_cold_item_reaches_a_downstream_batch_or_negative(tmp_path_factory, table, seed):
    """The real batch builders and the downstream trainer (tokensel.train.loop.fit through hllm over
    random vectors): every window, sampled negative and validation ranking is warm."""
    rows, index, share = table
    _, _, split = split_of(rows, index, share, "test", tmp_path_factory.mktemp("cold"))
    out, cold = split.histories, split.cold
    rng = random.Random(seed)
    for batch in length_batches(windows(out.train_sequences(), 11, rng), 4, rng):
        assert_warm(cold, [i for w in batch for i in w], "a training window")
    assert_warm(cold, draw_negatives(out, len(index), 256, generator=torch.Generator().manual_seed(seed)), "a sampled negative")
    pairs, v_h, v_t = stage2_users(out, PolicyConfig(objective="bounded", max_users=5, valid_users=5), rng)
    assert_warm(cold, [i for h, t in pairs for i in [*h, t]] + [i for h in v_h for i in h] + list(v_t), "a stage-2 pair")

    seen, ranked = [], []

    def step(user, opt, emb, batch, negs, *a, **k):
        seen.append([i for w in batch for i in w] + negs.tolist())
        return real_step(user, opt, emb, batch, negs, *a, **k)

    def rank(user_emb, item_emb, targets, histories, *a, **k):
        ranked.append((list(targets), [i for h in histories for i in h]))
        return real_rank(user_emb, item_emb, targets, histories, *a, **k)

    real_step, real_rank = loop_mod.infonce_step, loop_mod.rank_users
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod, "infonce_step", step)
        mp.setattr(loop_mod, "rank_users", rank)
        cfg = TrainConfig(epochs=2, negatives=32, batch_size=4, layers=1, heads=1, patience=None)
        run = make_recommender("hllm", cfg).run(torch.randn(len(index), 8), out, seed)
    for items in seen:
        assert_warm(cold, items, "a downstream training step")
    *valid, (test_targets, test_hist) = ranked
    for targets, hist_items in valid:
        assert_warm(cold, targets + hist_items, "a validation ranking")
    assert_warm(cold, test_hist, "a test history")
    assert list(test_targets) == list(out.split("test")[1]) and len(run.test_ranks) == len(out.users)  # cold test targets are ranked


# ------------------------------------------------------------------------------------ stage 1 and 2
@pytest.fixture(scope="module")
def model(tiny_bert):
    """The tiny BERT as f over the fixture items, and its frozen full-text catalogue (stage 2's input)."""
    from tokensel.config import TextConfig
    from tokensel.io.items import read_items
    from tokensel.models.item_llm import ItemLLM

    llm = ItemLLM.from_pretrained(tiny_bert)
    ids, texts = read_items(ITEMS, TextConfig())
    tokens = llm.tokenize(texts, 48)
    item, hidden = embed_tokens(llm, tokens, keep_hidden=True)
    return llm, [str(i) for i in ids], tokens, Catalogue(tokens, item, hidden)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(table=tables(item_ids=FIXTURE_IDS, max_users=30, min_len=4, max_len=10), objective=st.sampled_from(["bounded", "e2e"]))
def test_no_cold_item_reaches_a_stage_1_or_stage_2_batch(tmp_path_factory, model, table, objective):
    """Stage 1, then stage 2 (the pairwise reward, or e2e) on a cold split of a random table: every
    item of every batch, target and sampled negative, and every validation ranking, is warm."""
    from tokensel.policy.head import PolicyHead

    llm, ids, tokens, cat = model
    rows, index, share = table
    _, _, split = split_of(rows, index, share, "test", tmp_path_factory.mktemp("cold"))
    out, cold = split.histories, split.cold
    assume(sum(len(s) >= 2 for s in out.train_sequences()) >= 2)  # something for every stage to train on
    seen: dict[str, list] = defaultdict(list)

    def spy(name, fn, pick):
        def wrapped(*a, **k):
            seen[name].append(pick(*a, **k))
            return fn(*a, **k)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage1_mod, "infonce_step", spy("stage-1 step", stage1_mod.infonce_step, lambda u, o, e, batch, negs, *a, **k: [i for w in batch for i in w] + negs.tolist()))
        mp.setattr(stage1_mod, "rank_users", spy("validation (stage 1, e2e)", stage1_mod.rank_users, lambda ue, ie, t, h, *a, **k: list(t) + [i for x in h for i in x]))
        mp.setattr(stage2_mod, "rank_users", spy("validation (stage 2)", stage2_mod.rank_users, lambda ue, ie, t, h, *a, **k: list(t) + [i for x in h for i in x]))
        # a step's histories, targets and negatives (item ids; the step itself indexes them by position)
        mp.setattr(e2e_mod, "step_rows", spy("e2e step items", e2e_mod.step_rows, lambda windows, negs: [i for w in windows for i in w] + negs.tolist()))
        user = UserModel(llm.hidden_size, UserModelConfig(layers=1, heads=2))
        from tokensel.config import ItemModelConfig

        stage1_mod.train_stage1(llm, user, tokens, out, Stage1Config(epochs=1, negatives=32, batch_size=8), ItemModelConfig(), lambda r: None)
        cfg = PolicyConfig(objective=objective, k=8, prefix=2, train_chunk=2, select_chunk=2, epochs=1, negatives=32, batch_size=8, valid_users=10, keep_best=False, mask_layers="top")
        head = PolicyHead(llm.hidden_size)
        if objective == "e2e":
            e2e_mod.train_e2e(llm, user, head, tokens, out, cfg, 0.05, lambda r: None)
        else:
            def losses(llm_, user_, head_, cat_, batch, tgt, negs, *a):
                seen["stage-2 batch"].append([i for h, _ in batch for i in h] + tgt.tolist() + negs.tolist())
                return stage2_mod.history_rewards(llm_, user_, head_, cat_, batch, tgt, negs, *a)

            stage2_mod.train_stage2(llm, user, head, cat, out, cfg, 0.05, lambda r: None, stage2_mod.Reward(losses))
    assert seen["stage-1 step"] and (seen["stage-2 batch"] or seen["e2e step items"])  # the spies saw the steps
    for name, batches in seen.items():
        for items in batches:
            assert_warm(cold, items, name)


# ------------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def cold_texts(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    from tokensel import api

    d = tmp_path_factory.mktemp("cold_texts")
    out = {}
    for name in ("first-k", "random"):
        out[name] = d / f"{name}.parquet"
        api.compress(ITEMS, out[name], k=16, chunk=4, prefix=4, strategy=name, model=tiny_bert, cache=False, device="cpu")
    return out


def test_evaluate_cold_end_to_end_with_text_sim(cold_texts, tiny_bert, tmp_path, monkeypatch):
    """The headline is the cold-target users', the warm-target users beside, counts printed and written."""
    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    out = tmp_path / "cold.json"
    res = runner.invoke(app, [
        "evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(cold_texts["first-k"]), "--texts", str(cold_texts["random"]),
        "--recommender", "text-sim", "--model", tiny_bert, "--protocol", "cold", "--cold-share", "0.2", "--device", "cpu", "-o", str(out),
    ], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    proto = rows[0]["protocol"]
    assert proto["protocol"] == "cold" and proto["share"] == 0.2 and proto["cold_items"] == 10  # 20% of the 48 items
    assert proto["cold_users"] >= 5 and proto["cold_users"] + proto["warm_users"] + proto["dropped_users"] == 60
    assert rows[1]["warm_users"]["users"] == proto["warm_users"] and rows[1]["warm_users"]["p_vs_first"] is not None
    assert rows[1]["p_vs_first"] is not None
    for line in (f"{proto['cold_items']} cold items", f"headline over the {proto['cold_users']} users whose test target is cold",
                 f"{proto['dropped_interactions']} interactions with cold items dropped", "warm N@10"):
        assert line in " ".join(res.output.split()), line

    # the headline and the warm rows are the two groups of the same ranking: the per-user means agree
    twin = tmp_path / "twin.parquet"  # the same token lists: first-k's runs, both groups paired with it
    twin.write_bytes(cold_texts["first-k"].read_bytes())
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [cold_texts["first-k"], twin], "text-sim", 1, model=tiny_bert, device="cpu", protocol="cold", cold_share=0.2)
    f, g = ev.files
    assert ev.n_users == proto["cold_users"] == len(f.per_user["N@10"])
    assert {m: round(f.metrics[m], 6) for m in METRICS} == {m: round(rows[0]["metrics"][m], 6) for m in METRICS}
    assert g.same_as == str(cold_texts["first-k"]) and g.warm["metrics"] == f.warm["metrics"] and g.warm["p_vs_first"] is not None
    loo = evaluate_detailed(ITEMS, INTERACTIONS, [cold_texts["first-k"]], "text-sim", 1, model=tiny_bert, device="cpu")
    assert len(loo.files[0].per_user["N@10"]) == 60 and loo.cold is None and "warm N@10" not in _render(loo)


def _render(ev) -> str:
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(results_table(ev))
    return console.export_text()


def test_a_trained_recommender_runs_under_cold(cold_texts, tiny_bert, monkeypatch):
    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    cfg = TrainConfig(epochs=1, negatives=16, patience=None)
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [cold_texts["first-k"], cold_texts["random"]], "hllm", 2, model=tiny_bert, train=cfg, device="cpu", protocol="cold", cold_share=0.2)
    assert ev.cold.cold_users == ev.n_users == ev.files[0].per_seed_user["N@10"].shape[1]
    assert ev.files[1].warm["users"] == ev.cold.warm_users and set(ev.files[1].p_vs_first) == set(METRICS)


def test_the_check_under_cold_never_reads_the_test_targets(cold_texts, tiny_bert, tmp_path, monkeypatch):
    """Scoring validation (the strategy check): the cold items and the scored users come from the
    interactions before each test target, so moving every test target changes nothing."""
    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    t = pq.read_table(INTERACTIONS).to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    last = t.groupby("user_id").tail(1).index
    t.loc[last, "item_id"] = np.random.default_rng(0).choice(FIXTURE_IDS, size=len(last))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), other)

    def run(inter):
        ev = evaluate_detailed(ITEMS, inter, [cold_texts["first-k"]], "text-sim", 1, model=tiny_bert, train=TrainConfig(score="valid"), device="cpu", protocol="cold", cold_share=0.2)
        return ev.cold, ev.files[0].per_user["N@10"]

    (c1, a), (c2, b) = run(INTERACTIONS), run(other)
    assert c1 == c2 and c1.scored == "valid" and np.array_equal(a, b)


def test_too_few_cold_users_is_refused_with_one_message(cold_texts, tiny_bert, tiny_bundle, tmp_path, monkeypatch):
    """The product threshold (200) on the 60 fixture users: every command that takes --protocol cold exits
    2, and those that compress before they evaluate refuse before compressing anything."""
    from tokensel.evaluate import check, curve

    def no_compress(*a, **k):
        raise AssertionError("compressed before refusing")

    monkeypatch.setattr(check, "compress", no_compress)
    monkeypatch.setattr(curve, "compress", no_compress)  # headroom and curve compress through curve.compress_grid
    calls = {
        "evaluate": ["evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(cold_texts["first-k"]), "--recommender", "text-sim", "--model", tiny_bert],
        "headroom": ["headroom", str(ITEMS), str(INTERACTIONS), "--ks", "8", "--model", tiny_bert],
        "curve": ["curve", str(ITEMS), str(INTERACTIONS), "--ks", "8,16", "--strategies", "first-k", "--recommender", "text-sim", "--policy", str(tiny_bundle)],
        "check": ["check", str(ITEMS), str(INTERACTIONS), "--policy", str(tiny_bundle), "--no-save"],
        "train": ["train", str(ITEMS), str(INTERACTIONS), "-o", str(tmp_path / "bundle"), "--model", tiny_bert, "--epochs1", "1"],
    }
    for name, args in calls.items():
        res = runner.invoke(app, [*args, "--protocol", "cold", "--device", "cpu"], env={"COLUMNS": "250"})
        assert res.exit_code == 2, (name, res.output)
        msg = " ".join(res.output.split())
        assert msg.count("error:") == 1 and "Traceback" not in res.output, (name, res.output)
        scored = "validation" if name == "check" else "test"
        assert "--cold-share 0.1: only" in msg and f"users have a cold {scored} target" in msg and "at least 200" in msg, (name, msg)
    assert not (tmp_path / "bundle").exists()  # nothing half-written


@pytest.mark.parametrize("args, message", [
    (["--protocol", "warm"], "--protocol must be one of loo, cold"),
    (["--protocol", "cold", "--cold-share", "0"], "--cold-share is a share of the items in (0, 1)"),
    (["--protocol", "cold", "--cold-share", "1"], "--cold-share is a share of the items in (0, 1)"),
])
def test_bad_protocol_settings_exit_2(cold_texts, tiny_bert, args, message):
    res = runner.invoke(app, ["evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(cold_texts["first-k"]), "--model", tiny_bert, *args], env={"COLUMNS": "250"})
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_train_under_cold_records_the_split_and_refuses_a_stage_1_that_saw_cold_items(tiny_bert, tmp_path, monkeypatch):
    from tokensel.config import ItemModelConfig
    from tokensel.train.pipeline import train

    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    common = dict(item_cfg=ItemModelConfig(base_model=tiny_bert), stage1=Stage1Config(epochs=1, negatives=8), device="cpu", log=lambda r: None)
    b = train(ITEMS, INTERACTIONS, tmp_path / "cold", stages=(1,), protocol="cold", cold_share=0.2, **common)
    data = b.config.data["protocol"]
    assert data["protocol"] == "cold" and data["cold_items"] == 10 and b.config.data["n_users"] == data["cold_users"] + data["warm_users"]
    train(ITEMS, INTERACTIONS, tmp_path / "loo", stages=(1,), **common)
    policy = PolicyConfig(objective="bounded", epochs=1, negatives=8, k=8, prefix=2, train_chunk=2, select_chunk=2)
    with pytest.raises(TokenselError, match="stage 1 was trained with --protocol loo"):
        train(ITEMS, INTERACTIONS, tmp_path / "loo", stages=(2,), policy=policy, protocol="cold", cold_share=0.2, device="cpu", log=lambda r: None)


def test_headroom_pairs_the_cold_target_users(tiny_bert, tmp_path, monkeypatch):
    from tokensel.evaluate.headroom import headroom

    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    rows = headroom(ITEMS, INTERACTIONS, [8], model=tiny_bert, device="cpu", protocol="cold", cold_share=0.2)
    assert rows[0].cold.cold_items == 10 and rows[0].users == rows[0].cold.cold_users
    assert rows[0].as_dict()["protocol"] == "cold" and rows[0].as_dict()["cold"]["cold_users"] == rows[0].users


def test_the_strategy_check_under_cold_records_its_split(tmp_path, tiny_bundle, monkeypatch):
    import shutil

    from tokensel import api
    from tokensel.report import check_table

    monkeypatch.setattr(cold_mod, "MIN_COLD_USERS", 5)
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    check = api.check(path, ITEMS, INTERACTIONS, epochs=1, device="cpu", save=False, protocol="cold", cold_share=0.2)
    cold = check["protocol"]
    assert cold["protocol"] == "cold" and cold["scored"] == "valid" and check["users"] == cold["cold_users"]
    lines = check_table(check)
    assert "cold-target users' validation targets" in lines[0] and lines[1].startswith("  cold start: 10 cold items (20%")
