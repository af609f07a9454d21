"""The guard's state diagram, generated from :data:`ekko.guard.state.TRANSITIONS`.

``python -m ekko.guard.diagram`` rewrites ``docs/guard_states.png`` (matplotlib, no Graphviz
needed); ``python -m ekko.guard.diagram --dot`` prints Graphviz DOT text instead. There is no
hand-drawn copy to drift from the table.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

from ekko.guard.state import TRANSITIONS, Event, State

DEFAULT_PNG = Path(__file__).resolve().parents[3] / "docs" / "guard_states.png"


def edges(
    table: dict[tuple[State, Event], State] = TRANSITIONS,
) -> dict[tuple[State, State], list[Event]]:
    """Events grouped by (from, to), in table order; self-loops included."""
    out: dict[tuple[State, State], list[Event]] = defaultdict(list)
    for (src, ev), dst in table.items():
        out[(src, dst)].append(ev)
    return dict(out)


def to_dot(table: dict[tuple[State, Event], State] = TRANSITIONS) -> str:
    """Graphviz DOT source for the state machine."""
    lines = ["digraph guard_states {", "  rankdir=LR;", "  node [shape=ellipse];"]
    for state in State:
        style = ", style=bold" if state is State.HEALTHY else ""
        lines.append(f'  "{state}" [label="{state}"{style}];')
    for (src, dst), evs in edges(table).items():
        label = "\\n".join(str(e) for e in evs)
        lines.append(f'  "{src}" -> "{dst}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_png(
    path: str | Path = DEFAULT_PNG, table: dict[tuple[State, Event], State] = TRANSITIONS
) -> Path:
    """Draw the states on a circle with labelled arrows; write a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    states = list(State)
    n = len(states)
    radius = 1.0
    pos = {
        s: (
            radius * math.cos(math.pi / 2 - 2 * math.pi * i / n),
            radius * math.sin(math.pi / 2 - 2 * math.pi * i / n),
        )
        for i, s in enumerate(states)
    }
    fig, ax = plt.subplots(figsize=(9, 9))
    node_r = 0.26
    colors = {
        State.HEALTHY: "#c7e9c0",
        State.UNCERTAIN: "#fee391",
        State.CORRUPTED: "#fcbba1",
        State.RECOVERING: "#c6dbef",
    }
    for s, (x, y) in pos.items():
        ax.add_patch(
            plt.Circle(
                (x, y), node_r, facecolor=colors.get(s, "white"), edgecolor="black", zorder=3
            )
        )
        ax.text(x, y, str(s), ha="center", va="center", fontsize=11, weight="bold", zorder=4)
    for (src, dst), evs in edges(table).items():
        label = "\n".join(str(e) for e in evs)
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        if src is dst:
            # Self-loops: listed just outside the node, away from the centre.
            text = "↺ " + label.replace("\n", "\n   ")
            if abs(x0) > abs(y0):
                ax.text(
                    x0 + math.copysign(node_r + 0.04, x0),
                    y0,
                    text,
                    fontsize=8,
                    ha="left" if x0 > 0 else "right",
                    va="center",
                    color="#555555",
                )
            else:
                ax.text(
                    x0,
                    y0 + math.copysign(node_r + 0.04, y0),
                    text,
                    fontsize=8,
                    ha="center",
                    va="bottom" if y0 > 0 else "top",
                    color="#555555",
                )
            continue
        arrow = FancyArrowPatch(
            (x0, y0),
            (x1, y1),
            connectionstyle="arc3,rad=0.18",
            arrowstyle="-|>",
            mutation_scale=18,
            shrinkA=34,
            shrinkB=34,
            color="#333333",
            zorder=2,
        )
        ax.add_patch(arrow)
        # Label at the bent midpoint (arc3 bends to the right of src→dst).
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        dx, dy = x1 - x0, y1 - y0
        ax.text(
            mx + 0.12 * dy,
            my - 0.12 * dx,
            label,
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=5,
        )
    ax.set_xlim(-2.0, 2.0)
    ax.set_ylim(-1.75, 1.75)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("ekko.guard model health (generated from state.TRANSITIONS)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--dot":
        sys.stdout.write(to_dot())
        return 0
    out = render_png(args[0] if args else DEFAULT_PNG)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
