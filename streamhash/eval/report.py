"""Markdown table and PNG plot of a protocol run."""

from __future__ import annotations

from pathlib import Path

LABELS = {"map": "mAP@all", "map_at_1000": "mAP@1000", "p_r2": "P@r<=2", "reencodes": "re-encodes",
          "train_seconds": "learn s", "reencode_seconds": "re-encode s"}


def markdown_table(result: dict) -> str:
    rows = ["| method | mAP@all | mAP@1000 | P(r<=2) | P@1000 | re-encodes | images re-encoded | seconds | CPU s "
            "| learn s | re-encode s | MI test s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in result["methods"].items():
        rows.append(f"| {name} | {m['map']:.4f} | {m['map_at_1000']:.4f} | {m['p_r2']:.4f} | {m['p_at_1000']:.4f} | "
                    f"{m['reencodes']} | {m['images_reencoded']:,} | {m['seconds']:.1f} | {m['cpu_seconds']:.1f} | "
                    f"{m['train_seconds']:.1f} | {m['reencode_seconds']:.1f} | {m['mi_seconds']:.1f} |")
    return "\n".join(rows)


def curve_table(result: dict) -> str:
    names = list(result["methods"])
    positions = [p for p, _ in result["methods"][names[0]]["curve"]]
    rows = ["| stream position | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for i, p in enumerate(positions):
        rows.append(f"| {p} | " + " | ".join(f"{result['methods'][n]['curve'][i][1]:.4f}" for n in names) + " |")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in result["methods"].items():
        xs = [p for p, _ in m["curve"]]
        ys = [v for _, v in m["curve"]]
        style = {"never_reencode": dict(ls="--", lw=2.5, alpha=0.7), "streamhash": dict(lw=1.2)}.get(name, {})
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({m['reencodes']} re-enc.)", **style)
        if name != "full_retrain":
            ev = [(p, v) for p, v in m["curve"] if p in set(m["events"])]
            if ev:
                ax.scatter([p for p, _ in ev], [v for _, v in ev], marker="*", s=120, color=line.get_color(),
                           edgecolor="k", zorder=5)
    if result["protocol"] == "online":
        ax.axhline(0.73, ls="--", c="gray", lw=1)
        ax.text(ax.get_xlim()[0], 0.735, "HMOH 0.73", color="gray", fontsize=8)
    ax.set_xlabel("stream position (items)")
    ax.set_ylabel("mAP@all")
    ax.set_title(f"Fashion-MNIST {result['protocol']}, {result['bits']} bits (* = re-encode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
