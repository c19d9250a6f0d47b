"""
Pictures of runs from their metrics.jsonl: every stage's curves, or several runs overlaid.

    python plot.py out/                          # out/sft, out/reward, out/ppo (and out/dpo): out/curves.png
    python plot.py out/ppo out/ppo_lowkl         # two runs, one colour each: out/ppo/overlay.png
    python plot.py out/ppo out/ppo_lowkl --panels rm_score,gold,kl --out overopt.png

A path is a run (a directory holding metrics.jsonl) or a pipeline's OUT (holding sft/, reward/,
ppo/, dpo/). Each panel draws its keys against the step (the update, for PPO); a panel whose keys
no run logged is left out. Runs differ by colour, keys within a panel by line style; train
metrics without dots, validation and held-out (eval/*) ones with a dot where each was logged.
"""

import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and the same pixels everywhere
import matplotlib.pyplot as plt
from PIL import Image  # comes with matplotlib

from common import ConfigError, run_main

# name (for --panels), stage, title, keys (line styles in order: solid, dashed, dotted)
PANELS = [
    ("sft_loss", "sft", "SFT loss", ["loss", "val_loss"]),
    ("rm_accuracy", "reward", "reward model accuracy", ["accuracy", "val/accuracy", "val/gold_accuracy"]),
    ("rm_margin", "reward", "reward model margin (val)", ["val/margin"]),
    ("rm_score", "ppo", "PPO reward-model score", ["objective/rm_score", "eval/rm_score"]),
    ("gold", "ppo", "PPO gold score", ["gold", "eval/gold"]),
    ("kl", "ppo", "PPO KL to the reference", ["objective/kl_exact", "eval/kl_exact"]),
    ("entropy", "ppo", "PPO entropy", ["objective/entropy"]),
    ("clipfrac", "ppo", "PPO clip fraction", ["ppo/clipfrac"]),
    ("resp_len", "ppo", "PPO response length", ["rollout/resp_len", "eval/resp_len"]),
    ("dpo_loss", "dpo", "DPO loss", ["loss", "val/loss"]),
    ("dpo_margin", "dpo", "DPO implicit reward margin", ["rewards/margin", "val/rewards/margin"]),
    ("dpo_accuracy", "dpo", "DPO pair accuracy", ["accuracy", "val/accuracy"]),
    ("dpo_gold", "dpo", "DPO gold score (held-out)", ["val/gold"]),
    ("dpo_kl", "dpo", "DPO KL to the reference (held-out)", ["val/kl_exact"]),
]
STAGES = ["sft", "reward", "ppo", "dpo"]  # the folders of a pipeline's OUT, in train.sh's order
LINE_STYLES = ["-", "--", ":"]
DPI = 80  # small files: a whole pipeline's picture is about 1000 x 670 pixels, 60 KB


def marker(key):
    """Dots on validation and held-out metrics: they are logged every few steps, not every step."""
    return "o" if key.startswith(("val", "eval/")) else None


def read_metrics(path):
    """The rows of one metrics.jsonl, as dicts; a bad line is one clear sentence."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}, line {i}: not a JSON object") from None
    if not rows:
        raise ConfigError(f"{path}: no rows (a run that has not logged yet?)")
    return rows


def guess_stage(path, rows):
    """The stage of a run given by its own directory: the folder's name (ppo_lowkl is PPO),
    else the stage whose panels' keys the run logged most of."""
    name = os.path.basename(os.path.normpath(path))
    for stage in STAGES:
        if name.startswith(stage):
            return stage
    logged = set().union(*rows)
    return max(STAGES, key=lambda s: sum(len(logged & set(keys)) for _, st, _, keys in PANELS if st == s))


def load_runs(paths):
    """[(label, stage, rows)]: each path is a run, or an OUT whose stage folders are runs.
    The label is the path as given, so that a legend tells the runs apart."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            rows = read_metrics(os.path.join(path, "metrics.jsonl"))
            runs.append((path, guess_stage(path, rows), rows))
            continue
        found = [s for s in STAGES if os.path.isfile(os.path.join(path, s, "metrics.jsonl"))]
        if not found:
            raise ConfigError(f"{path}: no metrics.jsonl there, nor in its {', '.join(s + '/' for s in STAGES)} folders")
        runs += [(path, s, read_metrics(os.path.join(path, s, "metrics.jsonl"))) for s in found]
    return runs


def draw(runs, names=None):
    """A figure of every panel (of `names`, when given) that some run has data for.
    Returns (fig, the names of the panels drawn)."""
    labels = list(dict.fromkeys(label for label, _, _ in runs))  # one colour per path, in order
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    panels = []
    for name, stage, title, keys in PANELS:
        keys = [k for k in keys if any(st == stage and any(k in r for r in rows) for _, st, rows in runs)]
        if keys and (names is None or name in names):
            panels.append((name, stage, title, keys))
    if not panels:
        asked = f"--panels {','.join(names)}" if names else "any panel"
        raise ConfigError(f"{', '.join(labels)}: nothing to draw, no metric of {asked} was logged")

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), dpi=DPI, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (name, stage, title, keys) in zip(axes.flat, panels):
        for label, st, rows in runs:
            if st != stage:
                continue
            for j, key in enumerate(keys):
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, color=colours[label], lw=1, ls=LINE_STYLES[j], marker=marker(key), ms=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update" if stage == "ppo" else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1:  # line styles; the colours are the runs' legend, once for the figure
            handles = [plt.Line2D([], [], color="grey", ls=LINE_STYLES[j], marker=marker(key), ms=3) for j, key in enumerate(keys)]
            ax.legend(handles, keys, fontsize=7)
    if len(labels) > 1:
        handles = [plt.Line2D([], [], color=colours[label], lw=2) for label in labels]
        fig.legend(handles, labels, loc="upper center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_size_inches()[1]))  # room for the legend on top
    else:
        fig.tight_layout()
    return fig, [name for name, _, _, _ in panels]


def save_png(fig, path):
    """A 256-colour PNG: on line plots it looks the same as matplotlib's RGBA one, at a third of the bytes."""
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    image.quantize(256).save(path, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="runs (folders with metrics.jsonl) or a pipeline's OUT")
    parser.add_argument("--out", default="", help="the PNG to write (default: PATH/curves.png, or FIRST/overlay.png for several)")
    parser.add_argument("--panels", default="", help=f"comma-separated panels to draw (default: all): {', '.join(p[0] for p in PANELS)}")
    args = parser.parse_args()
    names = [n for n in args.panels.split(",") if n] or None
    unknown = set(names or []) - {p[0] for p in PANELS}
    if unknown:
        raise ConfigError(f"--panels: no panel named {', '.join(sorted(unknown))}; there are {', '.join(p[0] for p in PANELS)}")
    runs = load_runs(args.paths)
    fig, drawn = draw(runs, names)
    out = args.out or os.path.join(args.paths[0], "curves.png" if len(args.paths) == 1 else "overlay.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_png(fig, out)
    print(f"wrote {out}: {len(runs)} run(s), panels {', '.join(drawn)}")


if __name__ == "__main__":
    run_main(main)
