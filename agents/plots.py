"""The comparison's figures (PNG, matplotlib with the Agg backend, imported lazily).

- :func:`pareto`: per policy, migration downtime against the vCPU time dirty tracking costs
  (left: ring-full exits and lock stalls; right: all the vCPU time lost, write-protect faults
  and throttle sleeps included),
  mean and 95% interval, the Pareto-optimal policies joined, each point labelled where its
  label overlaps no other (:func:`label_points`).
- :func:`timeline`: one episode per policy: ring fill per vCPU over time with the harvests
  marked, and harvests, full exits and the chosen interval per control interval.
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _front(points):
    """Indices of the points not dominated in (x, y), both lower-is-better."""
    out = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            out.append(i)
    return sorted(out, key=lambda i: points[i][0])


def pareto(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Downtime versus exit overhead per policy (rows from :func:`agents.evaluate.summarize`)."""
    import math

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    xs = [("exit_stall_s", "vCPU time in ring-full exits + lock stalls, s / episode"),
          ("lost_s", "vCPU time lost (exits, stalls, faults, throttle sleeps), s / episode")]
    cmap = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes, xs):
        pts = []
        for k, r in enumerate(rows):
            x, xe = r[key], r[key + "_ci"]
            y, ye = r["downtime_s"] * 1000, r["downtime_s_ci"] * 1000
            pts.append((x, y))
            ax.errorbar([x], [y], xerr=[0 if math.isnan(xe) else xe], yerr=[0 if math.isnan(ye) else ye], fmt="o",
                        color=cmap(k % 10), capsize=3, label=f"{r['policy']} ({r['reward']:.2f})")
        front = _front(pts)
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="grey", lw=1, zorder=0,
                    label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("downtime, ms")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, title="policy (mean reward)", title_fontsize=7, loc="best")
    fig.suptitle(title or "downtime versus exit overhead (mean, 95% interval)", fontsize=10)
    fig.tight_layout()  # the final layout first: the labels are placed in display space
    for ax, (key, _) in zip(axes, xs):
        label_points(ax, [(r[key], r["downtime_s"] * 1000) for r in rows], [r["policy"] for r in rows],
                     colors=[cmap(k % 10) for k in range(len(rows))])
    return _save(fig, path)


#: label offsets from a point tried in turn, in points (x, y): beside it, then further up or down
_OFFSETS = [(sx * 5, dy) for k in range(9) for dy in (3 + 10 * k, -10 - 10 * k) for sx in (1, -1)]


def label_points(ax, points: list[tuple[float, float]], labels: list[str], colors: list | None = None,
                 fontsize: float = 7) -> list:
    """Write each label next to its point (data coordinates; in its color) where it overlaps
    no label written before it, no point, not the legend and nothing outside the axes, trying
    the offsets of ``_OFFSETS`` in turn (a label moved off its point's line gets a thin leader
    to it); where every offset collides, the one overlapping least. Call it once the figure is
    laid out (the labels stay out of the layout). Returns the annotations."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    px = ax.transData.transform(points) if points else []
    r = 4 * ax.figure.dpi / 72  # a marker's half-width in pixels (errorbar's default marker: 6 pt)
    obstacles = [(x - r, y - r, x + r, y + r) for x, y in px]  # the markers, and the legend
    legend = ax.get_legend()
    if legend is not None:
        e = legend.get_window_extent(renderer)
        obstacles.append((e.x0, e.y0, e.x1, e.y1))
    placed: list[tuple[float, float, float, float]] = []
    colors = colors or ["black"] * len(points)
    out = []
    for xy, label, color in zip(points, labels, colors):
        best, best_cost = None, None
        for dx, dy in _OFFSETS:
            leader = ({"arrowstyle": "-", "color": "grey", "lw": 0.5, "shrinkA": 0, "shrinkB": 3} if abs(dy) > 13
                      else None)
            ann = ax.annotate(label, xy, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                              color=color, annotation_clip=False, arrowprops=leader)
            ann.set_in_layout(False)
            ann.update_positions(renderer)
            e = Text.get_window_extent(ann, renderer)  # the text's box, without its leader
            box = (e.x0, e.y0, e.x1, e.y1)
            cost = sum(_overlap(box, o) for o in placed + obstacles)
            cost += e.width * e.height - _overlap(box, (inside.x0, inside.y0, inside.x1, inside.y1))
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box), cost
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[1])
        out.append(best[0])
    return out


def _overlap(a, b) -> float:
    """Area of the intersection of two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def timeline(episodes: list[dict], path: str | Path, title: str = "") -> Path:
    """One column per episode record with a ``trace`` (from ``run_episode(..., trace=True)``)."""
    import numpy as np

    plt = _plt()
    n = len(episodes)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 5.4), dpi=110, sharex="col", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for c, ep in enumerate(episodes):
        tr = ep["trace"]
        t = np.array([s["t"] for s in tr])
        fill = np.array([s["fill"] for s in tr])
        harv = np.array([s["harvests"] for s in tr])
        exits = np.array([s["full_exits"] for s in tr])
        ivl = np.array([s["interval_ms"] for s in tr])
        a1, a2 = axes[0, c], axes[1, c]
        if fill.size:
            for v in range(fill.shape[1]):
                a1.plot(t, fill[:, v], lw=0.6, alpha=0.5)
            a1.plot(t, fill.max(axis=1), color="black", lw=1.4, label="fullest ring")
        hs = harv > 0
        a1.scatter(t[hs], np.full(hs.sum(), 1.02), marker="|", s=40, color="tab:green", label="harvest(s) in interval")
        xs = exits > 0
        if xs.any():
            a1.scatter(t[xs], np.full(xs.sum(), 1.06), marker="v", s=14, color="tab:red", label="ring-full exit(s)")
        a1.set_ylim(0, 1.1)
        a1.set_ylabel("ring fill / soft limit")
        ring = f"ring {ep['ring_entries']}" if ep["ring_entries"] else "bitmap collector (no ring)"
        a1.set_title(f"{ep['policy']}: {ep['workload']}, {ring}\nreward {ep['reward']:.3f}, "
                     f"downtime {ep['downtime_s'] * 1000:.0f} ms, {ep['full_exits']} full exits", fontsize=8)
        a1.legend(fontsize=6, loc="upper left")
        a1.grid(alpha=0.3)
        dt = np.diff(t).mean() if len(t) > 1 else 0.2
        a2.bar(t, harv, width=dt * 0.9, color="tab:green", alpha=0.6, label="harvests")
        a2.bar(t, exits, width=dt * 0.5, color="tab:red", alpha=0.8, label="full exits")
        a2.set_ylabel("per control interval")
        a2.set_xlabel("simulated time, s")
        if (ivl > 0).any():  # the bitmap collector has no reaper (interval 0 throughout)
            b = a2.twinx()
            b.step(t, ivl, where="post", color="tab:blue", lw=1, label="reaper interval")
            b.set_yscale("log")
            b.set_ylabel("reaper interval, ms", color="tab:blue", fontsize=8)
        a2.legend(fontsize=6, loc="upper left")
        a2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay the figure out, write it as PNG (creating the directory), close it."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
