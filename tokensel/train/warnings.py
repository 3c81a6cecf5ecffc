"""What a user should know before trusting a trained head, read from stage 2's log: a pure function
of the log (no torch), so `tokensel info` can derive it for bundles that predate the recorded key."""

from __future__ import annotations


def stage2_warnings(log: dict) -> list[str]:
    """What a user should know before using the trained head, read from stage 2's own log."""
    epochs = log["epochs"]
    start, last = epochs[0], epochs[-1]
    out = []
    ag = last.get("agreement")
    if ag and ag["pairs"] and ag["p"] > 0.05:
        out.append(
            f"in its last epoch the head preferred the subset its reward preferred in {ag['rate']:.1%} of "
            f"{ag['pairs']:,} sampled pairs (chance 50%, p {ag['p']:.2g}): it did not learn the reward's preference"
        )
    choice = log.get("choice")
    if choice is not None:  # e2e: one surrogate scored all three at the end; the head is what it kept
        if (chosen := choice["chosen"]) != "policy":
            how = "did not beat first-k significantly" if chosen == "first-k" else f"scored below {chosen}"
            out.append(f"the trained head {how} on stage 2's validation, so the bundle's policy is {chosen} (tokensel info shows the scores)")
    elif len(epochs) > 1 and last["policy"]["N@10"] < start["policy"]["N@10"]:
        out.append(
            f"validation NDCG@10 fell from {start['policy']['N@10']} with the untrained head (= --strategy item-align) "
            f"to {last['policy']['N@10']} (first-k {start['first_k']['N@10']})"
        )
    if out:
        out.append("compare policy, item-align and first-k downstream (tokensel evaluate, bench/quality) before relying on the policy")
    return out
