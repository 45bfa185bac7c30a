"""Attribution report: a text table per item and a PNG of helpful / neutral / harmful shares."""

from __future__ import annotations

import io
from pathlib import Path

from sgsd.skills.attribution import KINDS, AttributionTracker, ItemStats
from sgsd.skills.bank import SkillBank
from sgsd.storage import atomic_write_bytes


def ranked_items(tracker: AttributionTracker, kind: str) -> list[tuple[str, ItemStats]]:
    """Items of `kind` by uses (descending), then id."""
    items = [(item_id, s) for (k, item_id), s in tracker.items.items() if k == kind]
    return sorted(items, key=lambda x: (-x[1].uses, x[0]))


def format_table(tracker: AttributionTracker, bank: SkillBank | None = None, top: int | None = None) -> str:
    """One section per kind: id, uses, helpful / harmful / neutral counts and shares, mean support and
    weight, and the title (skills) or description (mistakes) when the bank is given."""
    labels = item_labels(bank)
    lines = [f"attribution over {tracker.rollouts} rollouts"]
    header = f"  {'id':<12} {'uses':>6} {'helpful':>8} {'harmful':>8} {'neutral':>8} {'help%':>6} {'harm%':>6} {'support':>8} {'weight':>7}  text"
    for kind in KINDS:
        rows = ranked_items(tracker, kind)
        lines.append(f"\n{kind}s ({len(rows)} used)")
        lines.append(header)
        for item_id, s in rows[:top]:
            lines.append(f"  {item_id:<12} {s.uses:>6} {s.helpful:>8} {s.harmful:>8} {s.neutral:>8} "
                         f"{100 * s.helpful / s.uses:>5.1f}% {100 * s.harmful / s.uses:>5.1f}% "
                         f"{s.mean_support:>8.4f} {s.mean_weight:>7.4f}  {labels.get((kind, item_id), '')[:60]}")
    return "\n".join(lines)


LABEL_CHARS = 48  # item text shown beside its id on the chart's axis


def item_labels(bank: SkillBank | None) -> dict[tuple[str, str], str]:
    """(kind, id) -> the item's title (skills) or description (mistakes)."""
    if bank is None:
        return {}
    labels = {("skill", s.skill_id): s.title for s in bank.general_skills}
    labels.update({("mistake", m.mistake_id): m.description for m in bank.common_mistakes})
    return labels


def _short(text: str, limit: int = LABEL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def plot_attribution(tracker: AttributionTracker, path: str | Path, top: int = 30, *, bank: SkillBank | None = None,
                     title: str = "") -> Path:
    """Horizontal stacked bars (helpful / neutral / harmful share) of the `top` most used items of
    each kind, labelled "id  text (n=uses)" when `bank` is given, written to `path` (PNG, matplotlib's
    Agg backend: no display needed). `title` prefixes the figure title (e.g. the run's name)."""
    # A bare Figure renders with Agg and touches no global pyplot state (safe inside a trainer).
    from matplotlib.figure import Figure

    per_kind = {kind: ranked_items(tracker, kind)[:top] for kind in KINDS}
    texts = item_labels(bank)
    height = max(3.0, 0.3 * max(len(v) for v in per_kind.values()) + 2.0)
    fig = Figure(figsize=(16 if texts else 13, height))
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, KINDS):
        rows = list(reversed(per_kind[kind]))  # most used at the top
        names = [f"{item_id}  {_short(texts[(kind, item_id)])} (n={s.uses})" if (kind, item_id) in texts
                 else f"{item_id} (n={s.uses})" for item_id, s in rows]
        shares = [[getattr(s, part) / s.uses for _, s in rows] for part in ("helpful", "neutral", "harmful")]
        left = [0.0] * len(rows)
        for values, color, label in zip(shares, ("#2a9d8f", "#c8c8c8", "#e76f51"), ("helpful", "neutral", "harmful")):
            ax.barh(names, values, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, values)]
        ax.set_xlim(0, 1)
        ax.set_title(f"{kind}s: teacher outcome shares")
        ax.set_xlabel("share of uses")
        ax.tick_params(axis="y", labelsize=8)
        if not rows:
            ax.text(0.5, 0.5, "no uses recorded", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{title}teacher outcomes per skill-bank item over {tracker.rollouts} rollouts "
                 f"(top {top} by uses)", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())
