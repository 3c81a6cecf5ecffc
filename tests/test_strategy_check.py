"""The downstream strategy check (issue 17, part 3): the rule, validation-only scoring, where the
verdict is kept, and what compress / info / train do with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel import api
from tokensel.cli import app
from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config, TextConfig, TrainConfig
from tokensel.errors import TokenselError
from tokensel.evaluate.runner import evaluate_detailed
from tokensel.report import check_table
from tokensel.policy.bundle import CHECK_FILE, Bundle, bundle_hash, read_check, write_check
from tokensel.select import auto
from tokensel.select.auto import ONE_SEED, ONE_SEED_NOTE, RULE, SEED_AWARE, choose, current_check, lost_note, lost_to_first_k, resolve
from tokensel.select.rows import rows_vs_first_k
from tokensel.stats import paired_pvalue, seed_user_test
from tokensel.select.selector import Selector

runner = CliRunner()


def row(strategy, n10, ratio=None, p=None):
    return {"strategy": strategy, "N@10": n10, "R@10": n10, "ratio_N@10": ratio, "p_N@10": p, "ratio_R@10": ratio, "p_R@10": p}


# ------------------------------------------------------------------------------------------- the rule
def test_choose_takes_the_best_strategy_that_did_not_lose():
    rows = [row("first-k", 5.0), row("item-align", 5.4, 1.08, 0.2), row("policy", 5.2, 1.04, 0.5)]
    assert choose(rows) == "item-align"


def test_choose_skips_a_strategy_that_lost_significantly_and_keeps_first_k():
    rows = [row("first-k", 5.0), row("item-align", 4.5, 0.90, 0.001), row("policy", 4.9, 0.98, 0.6)]
    assert choose(rows) == "first-k"  # policy did not lose significantly, but it is not better than first-k
    assert [lost_to_first_k(r) for r in rows] == [False, True, False]


def test_choose_breaks_a_tie_towards_first_k():
    assert choose([row("first-k", 5.0), row("policy", 5.0, 1.0, 1.0)]) == "first-k"


def test_a_significant_loss_in_recall_alone_counts():
    r = {**row("item-align", 5.2, 1.04, 0.3), "ratio_R@10": 0.93, "p_R@10": 0.001}
    assert lost_to_first_k(r)
    assert choose([row("first-k", 5.0), r, row("policy", 5.1, 1.02, 0.6)]) == "policy"


def test_a_significant_gain_is_not_a_loss():
    assert not lost_to_first_k(row("policy", 6.0, 1.2, 0.001))


def _results(rng, seeds: int):
    """first-k and a selection over 300 users, the same on average, whose runs differ by seed effects
    (offsets -0.5, 0, 0.5 on first-k's seeds, 0, 0.5, 1 on the selection's)."""
    users = rng.normal(5, 2, 300)

    def runs(offsets):
        x = users[None, :] + np.array(offsets[:seeds])[:, None] + rng.normal(0, 1, (seeds, 300))
        return {"N@10": x, "R@10": x + 1}

    per_seed = {"first-k": runs([-0.5, 0.0, 0.5]), "policy": runs([0.0, 0.5, 1.0])}
    results = {s: ({m: float(v.mean()) for m, v in r.items()}, {m: v.mean(0) for m, v in r.items()}) for s, r in per_seed.items()}
    return results, per_seed


def test_the_rule_reads_the_seed_aware_p_with_two_seeds_or_more():
    results, per_seed = _results(np.random.default_rng(0), 3)
    rows = rows_vs_first_k(results, per_seed)
    first, policy = rows
    assert "test" not in first and first["p_N@10"] is None
    assert policy["test"] == SEED_AWARE
    for m in ("N@10", "R@10"):
        assert policy[f"p_{m}"] == seed_user_test(per_seed["policy"][m], per_seed["first-k"][m])[0]
        # the seed effect fools the paired test over users, not the seed-aware one
        assert paired_pvalue(results["policy"][1][m], results["first-k"][1][m]) < 0.05 < policy[f"p_{m}"]
    assert "seed-aware" in RULE and "cannot see training-seed variance" in RULE


def test_one_seed_falls_back_to_the_paired_test_and_says_so():
    results, per_seed = _results(np.random.default_rng(1), 1)
    for given in (per_seed, None):
        policy = rows_vs_first_k(results, given)[1]
        assert policy["test"] == ONE_SEED and "cannot see seed variance" in policy["test"]
        assert policy["p_N@10"] == paired_pvalue(results["policy"][1]["N@10"], results["first-k"][1]["N@10"])


def _check(rows, seeds):
    return {"k": 32, "recommender": "hllm, item tuning top", "epochs": 6, "seeds": seeds, "users": 100, "scored": "validation",
            "data": {"items": "items.parquet"}, "seconds": 1.0, "rows": rows, "chosen": choose(rows), "rule": RULE}


def test_check_table_says_in_one_line_that_one_seed_cannot_see_seed_variance():
    one = [row("first-k", 5.0, 1.0), {**row("policy", 4.0, 0.8, 0.001), "test": ONE_SEED}]
    lines = check_table(_check(one, 1))
    assert lines[-1].startswith("  --strategy auto runs:")  # the rule's text, which names both tests
    assert sum("cannot see" in line for line in lines[:-1]) == 1 and any(ONE_SEED_NOTE in line for line in lines)
    aware = [row("first-k", 5.0, 1.0), {**row("policy", 4.0, 0.8, 0.001), "test": SEED_AWARE}]
    lines = check_table(_check(aware, 3))
    assert not any("cannot see" in line for line in lines[:-1]) and any("test: seed-aware" in line for line in lines)


def test_an_old_check_without_the_test_field_still_reads():
    """check.json files written before rows recorded their test: the paired test, said so."""
    old = [row("first-k", 5.0, 1.0), row("item-align", 5.1, 1.02, 0.6), row("policy", 4.0, 0.8, 0.001)]
    assert choose(old) == "item-align" and lost_to_first_k(old[2])
    assert any(ONE_SEED_NOTE in line for line in check_table(_check(old, 1)))
    assert any("seed-averaged" in line for line in check_table(_check(old, 3)))


# ------------------------------------------------------------------------------------------- scoring
def _interactions_with_other_tests(src: Path, dst: Path, n_items: list[str]) -> Path:
    """The same file with each user's LAST interaction (the test target) moved to another item."""
    t = pq.read_table(src).to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    last = t.groupby("user_id").tail(1).index
    rng = np.random.default_rng(0)
    t.loc[last, "item_id"] = rng.choice(n_items, size=len(last))
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), dst)
    return dst


def test_validation_scoring_never_reads_the_test_targets(tmp_path, tiny_bert, items_path, interactions_path):
    texts = tmp_path / "first.parquet"
    api.compress(items_path, texts, k=32, strategy="first-k", model=tiny_bert, cache=False, device="cpu")
    ids = [str(i) for i in pq.read_table(items_path, columns=["item_id"])["item_id"].to_pylist()]
    other = _interactions_with_other_tests(interactions_path, tmp_path / "other.parquet", ids)

    def per_user(inter, score):
        cfg = TrainConfig(score=score, negatives=8, patience=None)
        ev = evaluate_detailed(items_path, inter, [texts], "hllm", 1, model=tiny_bert, train=cfg, epochs=2, device="cpu")
        return ev.files[0].per_user["N@10"]

    assert np.array_equal(per_user(interactions_path, "valid"), per_user(other, "valid"))
    assert not np.array_equal(per_user(interactions_path, "test"), per_user(other, "test"))  # the test targets did change


def test_an_unknown_scored_split_is_refused():
    with pytest.raises(TokenselError, match="score must be one of"):
        TrainConfig(score="train")


# ------------------------------------------------------------------------------------------- the check
@pytest.fixture()
def checked_bundle(tmp_path, tiny_bundle, items_path, interactions_path):
    """A copy of the tiny bundle with a real (short) check saved in it."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    before = bundle_hash(path)
    check = api.check(path, items_path, interactions_path, epochs=1, seeds=1, device="cpu")  # one seed: cheap
    assert bundle_hash(path) == before  # the verdict is not part of what selects
    return path, check


def test_the_check_pairs_each_strategy_with_first_k_and_is_saved(checked_bundle, items_path):
    path, check = checked_bundle
    assert [r["strategy"] for r in check["rows"]] == ["first-k", "item-align", "policy"]
    assert check["scored"] == "validation" and check["users"] > 0
    assert check["rows"][0]["ratio_N@10"] == 1.0 and check["rows"][0]["p_N@10"] is None
    assert all(r["p_N@10"] is not None for r in check["rows"][1:])
    assert check["chosen"] == choose(check["rows"])
    assert check["data"]["items"] == Path(items_path).name and check["data"]["items_rows"] == check["items"]  # no machine path
    assert read_check(path) == json.loads(json.dumps(check))
    assert Bundle.from_pretrained(path).check["chosen"] == check["chosen"]


def test_a_two_seed_check_uses_the_seed_aware_test(tmp_path, tiny_bundle, items_path, interactions_path):
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    check = api.check(path, items_path, interactions_path, epochs=1, seeds=2, device="cpu")
    assert check["seeds"] == 2 and "seed_note" not in check
    assert [r.get("test") for r in check["rows"]] == [None, SEED_AWARE, SEED_AWARE]
    assert check["chosen"] == choose(check["rows"])
    assert any("test: seed-aware" in line for line in check_table(check))


def test_a_one_seed_check_records_that_it_cannot_see_seed_variance(checked_bundle):
    path, check = checked_bundle
    assert check["seed_note"] == ONE_SEED_NOTE and read_check(path)["seed_note"] == ONE_SEED_NOTE
    assert all(r["test"] == ONE_SEED for r in check["rows"][1:])


def test_the_check_refuses_zero_seeds(checked_bundle, items_path, interactions_path):
    path, _ = checked_bundle
    r = runner.invoke(app, ["check", str(items_path), str(interactions_path), "--policy", str(path), "--seeds", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "seeds must be at least 1" in r.output and "Traceback" not in r.output


def test_a_policy_that_kept_first_k_reuses_first_k_runs_in_the_check(tmp_path, tiny_bundle, items_path, interactions_path):
    """Stage 2 chose first-k, so the policy writes first-k's texts: the check reuses first-k's runs
    (one recommender fewer to train), records it, and says so in its table."""
    b = Bundle.from_pretrained(tiny_bundle)
    b.policy.keeps_first_k = True
    path = b.save_pretrained(tmp_path / "kept")
    logged = []
    check = api.check(path, items_path, interactions_path, epochs=1, seeds=1, device="cpu", log=logged.append)
    assert check["same_texts"] == {"policy": "first-k"}
    first, policy = check["rows"][0], check["rows"][2]
    assert policy["N@10"] == first["N@10"] and policy["p_N@10"] == 1.0 and check["chosen"] != "policy"
    assert [r["stage"] for r in logged if r.get("stage") in ("reused", "train+test")] == ["train+test", "train+test", "reused"]
    assert any("policy" in line and "the same texts as first-k" in line for line in check_table(check))


def _with_verdict(path: Path, chosen: str, policy_row: dict) -> None:
    check = read_check(path)
    check["rows"] = [row("first-k", 5.0, 1.0), row("item-align", 5.1, 1.02, 0.6), policy_row]
    check["chosen"] = chosen
    write_check(path, check)


def test_auto_runs_the_chosen_strategy_with_the_bundles_text(checked_bundle, items_path, tmp_path):
    path, _ = checked_bundle
    _with_verdict(path, "item-align", row("policy", 4.0, 0.8, 0.001))
    assert resolve(path)[0] == "item-align"
    out = tmp_path / "auto.parquet"
    s = api.compress(items_path, out, k=32, strategy="auto", policy=path, cache=False, device="cpu")
    ref = api.compress(items_path, tmp_path / "ia.parquet", k=32, strategy="item-align", policy=path, cache=False, device="cpu")
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "ia.parquet"))
    assert s.notes and s.notes[0].startswith("auto: item-align") and not ref.notes
    assert Selector.from_pretrained(path, strategy="auto", device="cpu").name == Selector.from_pretrained(path, strategy="item-align", device="cpu").name


def test_compress_says_when_the_strategy_lost_the_check(checked_bundle, items_path, tmp_path):
    path, _ = checked_bundle
    _with_verdict(path, "first-k", row("policy", 4.0, 0.8, 0.001))
    s = api.compress(items_path, tmp_path / "p.parquet", k=32, strategy="policy", policy=path, cache=False, device="cpu")
    assert len(s.notes) == 1 and "policy lost to first-k" in s.notes[0] and "0.80x" in s.notes[0]
    assert "test: paired (one seed: cannot see seed variance)" in s.notes[0]  # an old-style row: the check had one seed
    r = runner.invoke(app, ["compress", str(items_path), "-o", str(tmp_path / "p2.parquet"), "--k", "32", "--strategy", "policy", "--policy", str(path), "--no-cache", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "policy lost to first-k" in r.output
    a = api.compress(items_path, tmp_path / "a.parquet", k=32, strategy="auto", policy=path, cache=False, device="cpu")
    assert a.notes[0].startswith("auto: first-k")
    base = Bundle.from_pretrained(path).config.item.base_model
    api.compress(items_path, tmp_path / "f.parquet", k=32, strategy="first-k", model=base, cache=False, device="cpu")
    assert pq.read_table(tmp_path / "a.parquet").column("token_ids").equals(pq.read_table(tmp_path / "f.parquet").column("token_ids"))


def test_a_stale_or_missing_check_makes_auto_keep_first_k(checked_bundle):
    path, _ = checked_bundle
    check = read_check(path)
    check["bundle_hash"] = "0" * 16  # made for other weights
    write_check(path, check)
    assert current_check(path) is None
    strategy, why = resolve(path)
    assert strategy == "first-k" and "no strategy check" in why
    assert lost_note("policy", path) is None
    (path / CHECK_FILE).unlink()
    assert resolve(path)[0] == "first-k"


def test_a_damaged_check_is_named(checked_bundle):
    path, _ = checked_bundle
    (path / CHECK_FILE).write_text("{not json")
    with pytest.raises(TokenselError, match="check.json: unreadable strategy check"):
        resolve(path)
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 2 and "check.json" in r.output and "Traceback" not in r.output


def test_info_prints_the_check_as_a_table(checked_bundle):
    path, check = checked_bundle
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert "strategy check: k=" in r.output and f"--strategy auto runs: {check['chosen']}" in r.output
    for s in ("first-k", "item-align", "policy"):
        assert any(line.strip().startswith(s) for line in r.output.splitlines())


def test_retraining_a_bundle_drops_its_old_check(checked_bundle):
    path, _ = checked_bundle
    b = Bundle.from_pretrained(path)
    assert b.check is not None
    b.save_pretrained(path)
    assert not (path / CHECK_FILE).exists() and b.check is None


def test_a_check_that_cannot_run_leaves_the_trained_bundle_and_says_why(tmp_path, tiny_bert, items_path, interactions_path):
    """max_len 40 with the policy's k 64: compress refuses to select, so the check cannot run; the
    bundle is still written and loads, with no verdict (auto keeps first-k)."""
    logs: list[dict] = []
    out = tmp_path / "b"
    b = api.train(items_path, interactions_path, out, text=TextConfig(max_len=40), item_cfg=ItemModelConfig(base_model=tiny_bert),
                  stage1=Stage1Config(epochs=1, negatives=8), policy=PolicyConfig(epochs=1, negatives=8, batch_size=16),
                  device="cpu", log=logs.append, check_epochs=1)
    assert b.check is None and not (out / CHECK_FILE).exists()
    assert any("not run" in str(r.get("strategy check", "")) for r in logs)
    assert Bundle.from_pretrained(out).policy is not None and resolve(out)[0] == "first-k"


def _row(strategy, n10, ratio_n=None, p_n=None, ratio_r=None, p_r=None):
    return {"strategy": strategy, "N@10": n10, "R@10": 0.0, "ratio_N@10": ratio_n, "p_N@10": p_n, "ratio_R@10": ratio_r, "p_R@10": p_r}


@pytest.mark.parametrize(
    "rows,chosen",
    [
        ([_row("policy", 4.67, 1.064, 0.061, 1.01, 0.70), _row("first-k", 4.39)], "first-k"),  # above, not significantly
        ([_row("policy", 4.67, 1.064, 0.01, 1.01, 0.70), _row("first-k", 4.39)], "policy"),
        ([_row("policy", 4.67, 1.064, 0.01, 0.93, 0.01), _row("first-k", 4.39)], "first-k"),  # lost in Recall@10
        ([_row("policy", 5.24, 1.076, 0.006, 1.06, 0.02), _row("item-align", 5.50, 1.129, 1e-5, 1.10, 1e-3), _row("first-k", 4.87)], "item-align"),
        ([_row("item-align", 5.9465, 1.0006, 0.98, 1.02, 0.33), _row("first-k", 5.9431)], "first-k"),  # a tie by any reading
    ],
)
def test_stage_2_leaves_first_k_only_on_evidence(rows, chosen):
    """Stage 2's rule reads a surrogate: a selection must beat first-k significantly; the check's rule
    (a recommender retrained per strategy) takes any selection that is best and has not lost."""
    assert auto.choose_proven(rows) == chosen
    assert auto.choose(rows) == max((r for r in rows if not auto.lost_to_first_k(r)), key=lambda r: r["N@10"])["strategy"]
