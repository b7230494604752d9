"""The report's plots (matplotlib, the optional `report` extra): R/G share, loss curves, the
own-answer log-probability histogram (paper Figure 1), confusion matrices (Figure 3) and
retention drops. Each returns False where matplotlib or the data is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.rundir import SOURCES
from ssrengine.evaluation.runs import RETENTION_LABELS, SPLIT_LABELS, RunData


# ----------------------------------------------------------------------------------- plots
def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InputError(
            "the report's plots need matplotlib, which is not installed "
            "(pip install 'ssrengine[report]' or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    # Whole labels in every figure: the saved image grows to fit them, never clips them.
    matplotlib.rcParams["savefig.bbox"] = "tight"
    import matplotlib.pyplot as plt

    return plt


def plot_rg_share(runs: list[RunData], path: Path) -> bool:
    """Stacked bars: share of R (own answers), paraphrases and G (gold) per run and subset."""
    have = [r for r in runs if r.build]
    if not have:
        return False
    plt = _plt()
    labels: list[str] = []
    parts: dict[str, list[float]] = {k: [] for k in SOURCES}
    for r in have:
        assert r.build is not None
        for subset, s in r.build.subsets().items():
            if not s.n:
                continue
            labels.append(f"{r.name}\n{subset}")
            for k in parts:
                parts[k].append(s.share(k))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4))
    bottom = [0.0] * len(labels)
    colors = {
        "self": "tab:green",
        "paraphrase": "tab:olive",
        "prefix": "tab:cyan",
        "gold": "tab:gray",
    }
    names = {
        "self": "R (own answer)",
        "paraphrase": "paraphrase",
        "prefix": "gold decision, own words",
        "gold": "G (gold)",
    }
    for k, vals in parts.items():
        ax.bar(labels, vals, bottom=bottom, label=names[k], color=colors[k])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of training targets")
    ax.set_ylim(0, 1)
    ax.set_title("Rehearsal set: R / G share")
    ax.legend(loc="upper right", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_loss_curves(runs: list[RunData], path: Path) -> bool:
    have = [r for r in runs if r.metrics]
    if not have:
        return False
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in have:
        (line,) = ax.plot(
            [m.step for m in r.metrics],
            [m.loss for m in r.metrics],
            marker=".",
            label=f"{r.name} ({r.mode})",
        )
        evals = [m for m in r.metrics if m.eval_loss is not None]
        if evals:
            ax.plot(
                [m.step for m in evals],
                [m.eval_loss for m in evals],
                marker="o",
                ls="--",
                color=line.get_color(),
                label=f"{r.name} validation",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_logprob_hist(runs: list[RunData], path: Path) -> bool:
    """Paper Figure 1: per-token log-probability of gold vs own answers under the base model."""
    have = [r for r in runs if r.fig1 and r.fig1.rows]
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(6 * len(have), 4), squeeze=False)
    for ax, r in zip(axes[0], have):
        assert r.fig1 is not None
        rows = r.fig1.rows
        gold = [x.gold_logprob for x in rows]
        own = [x.own_logprob for x in rows]
        lo = min(gold + own)
        bins = [lo + i * (0 - lo) / 30 for i in range(31)]
        ax.hist(
            gold,
            bins=bins,
            alpha=0.6,
            label=f"gold (mean {sum(gold) / len(gold):.2f})",
            color="tab:gray",
        )
        ax.hist(
            own,
            bins=bins,
            alpha=0.6,
            label=f"own (mean {sum(own) / len(own):.2f})",
            color="tab:green",
        )
        ax.set_xlabel("log-probability per answer token under the base model")
        ax.set_ylabel("training examples")
        ax.set_title(f"Gold vs own answers ({r.name}, n={len(rows)})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_confusion(runs: list[RunData], splits: list[str], path: Path) -> bool:
    """Paper Figure 3: answerable/unanswerable confusion matrices, runs x splits."""
    if not splits:
        return False
    plt = _plt()
    fig, axes = plt.subplots(
        len(splits), len(runs), figsize=(2.8 * len(runs), 2.6 * len(splits)), squeeze=False
    )
    for i, s in enumerate(splits):
        for j, r in enumerate(runs):
            ax = axes[i][j]
            c = r.eval.splits[s].confusion
            m = c.matrix
            tot = [max(sum(row), 1) for row in m]
            frac = [[v / t for v in row] for row, t in zip(m, tot)]
            ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
            for a in range(2):
                for b in range(2):
                    color = "white" if frac[a][b] > 0.6 else "black"
                    ax.text(
                        b,
                        a,
                        f"{m[a][b]}\n{frac[a][b]:.0%}",
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=8,
                    )
            ax.set_xticks([0, 1], labels=c.cols, fontsize=7)
            ax.set_yticks([0, 1], labels=c.rows, fontsize=7)
            ax.set_title(f"{r.name} · {SPLIT_LABELS.get(s, s)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_retention(table: dict[str, Any], path: Path) -> bool:
    rows = [r for r in table["rows"] if "drops" in r and r["mode"] != "base"]
    keys = table["retention_keys"]
    if not rows or not keys:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(keys) * len(rows) / 2), 4))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(
            xs, [-r["drops"].get(k, 0.0) for k in keys], width, label=f"{r['run']} ({r['mode']})"
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(keys))],
        labels=[RETENTION_LABELS.get(k, k) for k in keys],
        fontsize=8,
    )
    ax.set_ylabel("change vs base (%)")
    ax.set_title("Retention of general ability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
