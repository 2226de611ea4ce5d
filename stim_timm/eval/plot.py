"""The network-loafing plot: sub-network top-1 against relative FLOPs."""
import os
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg', force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = ['plot_loafing']


def plot_loafing(rows: Sequence[Dict[str, Any]], path: str, title: Optional[str] = None) -> str:
    """Top-1 against relative FLOPs, one colour per checkpoint, the full network as a star and its
    accuracy as a dashed line: sub-networks far below the line are network loafing."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r['checkpoint'], []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=110)
    colours = plt.get_cmap('tab10').colors
    handles = []
    for i, (label, rs) in enumerate(groups.items()):
        c = colours[i % len(colours)]
        subs = [r for r in rs if not r['is_full']]
        full = [r for r in rs if r['is_full']]
        if subs:
            ax.scatter([r['rel_flops'] for r in subs], [r['top1'] for r in subs], s=30, color=c, alpha=0.75,
                       edgecolors='white', linewidths=0.5, zorder=3)
            levels: Dict[float, List[float]] = {}  # mean top-1 per cost level: the trend at a glance
            for r in subs + full:
                levels.setdefault(round(r['rel_flops'], 3), []).append(r['top1'])
            xs = sorted(levels)
            ax.plot(xs, [sum(levels[x]) / len(levels[x]) for x in xs], color=c, lw=1.5, alpha=0.9, zorder=2)
        summary = label
        if full:
            f = full[0]
            ax.axhline(f['top1'], color=c, ls='--', lw=1, alpha=0.6, zorder=1)
            ax.scatter([f['rel_flops']], [f['top1']], s=240, marker='*', color=c, edgecolors='black',
                       linewidths=0.8, zorder=4)
            summary += f" (full {f['top1']:.1f}%"
            summary += f", sub-nets mean {sum(r['top1'] for r in subs) / len(subs):.1f}%)" if subs else ')'
        handles.append(Line2D([], [], marker='o', ls='', color=c, markersize=7, label=summary))
    handles += [Line2D([], [], marker='*', ls='', color='grey', markeredgecolor='black', markersize=13,
                       label='full network (dashed: its top-1)'),
                Line2D([], [], marker='o', ls='-', color='grey', markersize=6, label='sub-networks (line: mean per cost)')]
    ax.set_xlabel('relative FLOPs (sub-network / full network)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_xlim(0, 1.05)
    top = max((r['top1'] for r in rows), default=100.0)
    ax.set_ylim(0, min(100.0, top + 5))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or 'Sub-network accuracy vs. cost (network loafing)', fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2,
              frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
