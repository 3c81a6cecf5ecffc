"""The budget curve as a picture: quality against tokens, a line per strategy (the optional extra
`tokensel[plot]`, matplotlib with the Agg backend, so it draws without a display)."""

from __future__ import annotations

import importlib
from pathlib import Path

from tokensel.errors import TokenselError
from tokensel.io.atomic import AtomicTarget

SUFFIXES = (".png", ".svg")
EXTRA = "pip install 'tokensel[plot]'"


def check_plot_path(path: str | Path) -> Path:
    """Refuse a picture tokensel cannot draw before any work: a suffix other than .png/.svg, or no matplotlib."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise TokenselError(f"--plot {path}: the picture must end in .png or .svg")
    pyplot()
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a TokenselError naming the extra."""
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise TokenselError(f"--plot needs matplotlib, which is not installed: {EXTRA}") from None


def plot_curve(curve: dict, path: str | Path, metric: str = "N@10") -> Path:
    """Test `metric` (mean over seeds, error bars = std over seeds) against kept tokens (log2 axis), a line
    per strategy; the reference as a horizontal line. curve: Curve.as_dict()."""
    path = Path(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for n, strategy in enumerate(curve["strategies"]):
            cells = sorted((c for c in curve["cells"] if c["strategy"] == strategy), key=lambda c: c["k"])
            same = all(c["same_as"] and c["same_as"].startswith("first-") for c in cells)  # drawn on top of first-k: say so
            ax.errorbar(
                [c["k"] for c in cells], [c["test"][metric] for c in cells], yerr=[c["test_std"][metric] for c in cells],
                marker="os^Dv"[n % 5], capsize=3, linewidth=3.5 if n == 0 else 1.5, alpha=0.55 if n == 0 else 1.0,
                linestyle="-" if n < 2 else "--", label=strategy + (" (= first-k texts)" if same else ""),
            )
        ref = curve["reference"]
        ax.axhline(ref["test"][metric], color="grey", linestyle="--", label=f"reference: {ref['name']}")
        ax.set_xscale("log", base=2)
        ks = curve["ks"]
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("tokens kept per item (k)")
        ax.set_ylabel(f"test {metric.replace('N@', 'NDCG@').replace('R@', 'Recall@')} (%)")
        n = len(curve["seeds"])
        seeds = "deterministic" if curve.get("deterministic") else f"{n} seed{'s' if n != 1 else ''}"
        ax.set_title(f"{Path(curve['items']).name}: {curve['recommender']}, {seeds}, {curve['protocol']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        target = AtomicTarget(path)
        try:
            fig.savefig(target.tmp, format=path.suffix.lower().lstrip("."))
        except (OSError, ValueError) as exc:
            target.discard()
            raise TokenselError(f"{path}: cannot write the picture ({exc})") from None
        target.commit()
    finally:
        plt.close(fig)
    return path
