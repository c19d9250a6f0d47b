"""plot.py on small metrics files with the stages' real key names: every panel drawn from the
right numbers, the PNG the size of the figure, runs overlaid, and one sentence for a bad path."""

import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metrics(out_dir, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def sft_rows():
    return [{"step": s, "time": s, "loss": 5 / s, "grad_norm": 1.0, "lr": 1e-3, "tok/s": 100,
             **({"val_loss": 6 / s} if s % 5 == 0 else {})} for s in range(1, 11)]


def reward_rows():
    val = lambda s: {"val/accuracy": 0.5 + s / 100, "val/margin": s / 10, "val/gold_accuracy": 0.6 + s / 100, "val/gold_pairs": 10}
    return [{"step": 0, "time": 0, **val(0)}] + [
        {"step": s, "time": s, "loss": 0.7 - s / 100, "accuracy": 0.5 + s / 50, "grad_norm": 1.0, "lr": 1e-4,
         **(val(s) if s % 5 == 0 else {})} for s in range(1, 11)]


def ppo_rows(scale=1.0, gold=True):
    """A PPO run as ppo.py logs it: a row per update, and the held-out eval/* rows every 5 updates."""
    rows = []
    for u in range(0, 11):
        if u > 0:
            rows.append({"step": u, "time": u, "objective/score": scale * u, "objective/rm_score": scale * u,
                         "objective/kl_exact": scale * u * u, "objective/rlhf_reward": u, "objective/entropy": 1 / (u + scale),
                         "ppo/clipfrac": 0.05 * scale, "ppo/approx_kl": 0.01, "rollout/resp_len": 10 + u,
                         "rollout/eos_rate": 1.0, "kl_coef": 0.05, "tok/s": 100, **({"gold": 1 - scale * u} if gold else {})})
        if u % 5 == 0:
            rows.append({"step": u, "time": u, "eval/score": scale * u, "eval/rm_score": scale * u, "eval/kl_exact": scale * u * u,
                         "eval/resp_len": 12.0, **({"eval/gold": 1 - scale * u} if gold else {})})
    return rows


def dpo_rows():
    """DPO as dpo.py logs it: a row per step, the held-out val/* at step 0 and every 5 steps."""
    val = lambda s: {"val/loss": 0.69 - s / 100, "val/rewards/margin": s / 20, "val/accuracy": 0.5 + s / 40,
                     "val/kl_exact": s / 10, "val/gold": 1 + s / 10}
    return [{"step": 0, "time": 0, **val(0)}] + [
        {"step": s, "time": s, "loss": 0.69 - s / 50, "rewards/margin": s / 10, "accuracy": 0.5 + s / 30, "nll": 0.3,
         **(val(s) if s % 5 == 0 else {})} for s in range(1, 11)]


def run_plot(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "plot.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def lines_by_panel(fig):
    return {ax.get_title(): ax.get_lines() for ax in fig.axes}


def test_pipeline_draws_every_panel(tmp_path):
    write_metrics(tmp_path / "sft", sft_rows())
    write_metrics(tmp_path / "reward", reward_rows())
    write_metrics(tmp_path / "ppo", ppo_rows())
    write_metrics(tmp_path / "dpo", dpo_rows())
    write_metrics(tmp_path / "reward" / "member1", reward_rows())  # an ensemble member: not a stage
    proc = run_plot(tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [name for name, _, _, _ in plot.PANELS]
    assert proc.stdout.strip() == f"wrote {tmp_path / 'curves.png'}: 4 run(s), panels {', '.join(names)}"

    # the same figure in-process: each panel holds one line per key, with that key's numbers
    fig, drawn = plot.draw(plot.load_runs([str(tmp_path)]))
    assert drawn == names
    lines = lines_by_panel(fig)
    assert list(lines) == [title for _, _, title, _ in plot.PANELS]
    for _, stage, title, keys in plot.PANELS:
        rows = {"sft": sft_rows, "reward": reward_rows, "ppo": ppo_rows, "dpo": dpo_rows}[stage]()
        assert [line.get_label() for line in lines[title]] == keys
        for line, key in zip(lines[title], keys):
            assert list(line.get_xdata()) == [r["step"] for r in rows if key in r]
            assert list(line.get_ydata()) == [r[key] for r in rows if key in r]

    image = matplotlib.image.imread(tmp_path / "curves.png")
    width, height = np.round(fig.get_size_inches() * fig.dpi).astype(int)
    assert image.shape[:2] == (height, width)
    assert os.path.getsize(tmp_path / "curves.png") < 150_000


def test_a_key_nobody_logged_is_no_panel(tmp_path):
    write_metrics(tmp_path / "run", ppo_rows(gold=False))  # a judge or reward model only: no gold
    fig, drawn = plot.draw(plot.load_runs([str(tmp_path / "run")]))  # "run": the stage told by its keys
    assert "gold" not in drawn and len(fig.axes) == len(drawn)
    assert drawn == [name for name, stage, _, _ in plot.PANELS if stage == "ppo" and name != "gold"]
    proc = run_plot(tmp_path / "run", "--panels", "rm_score,kl", "--out", tmp_path / "two.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("panels rm_score, kl") and os.path.exists(tmp_path / "two.png")


def test_overlay_two_runs(tmp_path):
    write_metrics(tmp_path / "ppo", ppo_rows(1.0))
    write_metrics(tmp_path / "ppo_lowkl", ppo_rows(2.0))
    paths = [str(tmp_path / "ppo"), str(tmp_path / "ppo_lowkl")]
    fig, drawn = plot.draw(plot.load_runs(paths))
    for _, stage, title, keys in plot.PANELS:
        if stage != "ppo":
            continue
        lines = lines_by_panel(fig)[title]
        assert len(lines) == 2 * len(keys)  # each run draws each key
        assert len({line.get_color() for line in lines}) == 2  # a colour per run
    kl = lines_by_panel(fig)["PPO KL to the reference"]
    assert list(kl[0].get_ydata()) == [u * u for u in range(1, 11)]  # the first run, then the second
    assert list(kl[2].get_ydata()) == [2 * u * u for u in range(1, 11)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == paths

    proc = run_plot(*paths)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {os.path.join(paths[0], 'overlay.png')}: 2 run(s)")
    assert matplotlib.image.imread(os.path.join(paths[0], "overlay.png")).shape[0] > 100


def test_no_metrics_is_one_sentence(tmp_path):
    write_metrics(tmp_path / "ppo", ppo_rows())
    (tmp_path / "empty").mkdir()
    proc = run_plot(tmp_path / "ppo", tmp_path / "empty")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path / 'empty'}: no metrics.jsonl there, nor in its sft/, reward/, ppo/, dpo/ folders\n"
    assert not os.path.exists(tmp_path / "ppo" / "overlay.png")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2,\n')
    proc = run_plot(tmp_path / "bad")
    assert proc.returncode == 1 and proc.stderr == f"error: {tmp_path / 'bad' / 'metrics.jsonl'}, line 2: not a JSON object\n"
