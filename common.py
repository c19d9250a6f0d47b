"""
What every stage shares: command-line config, device and torchrun setup, print0, checkpoints,
metric logging. Nothing stage-specific lives here.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from model import GPT, GPTConfig


# ----------------------------------------------------------------------------- config

def parse_config(cls, argv=None):
    """Fill a stage's @dataclass from the command line: every field is a flag (--lr 3e-6) and
    its one-line comment is the flag's help; --max-steps and --max_steps alike. Booleans take true/false."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        hyphenated = ["--" + f.name.replace("_", "-")] if "_" in f.name else []  # --skip-bad-lines works too
        parser.add_argument("--" + f.name, *hyphenated, type=kind, default=f.default,
                            help=f"{comments.get(f.name, '')} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# ----------------------------------------------------------------------------- devices

@dataclasses.dataclass
class Dist:
    ddp: bool  # launched by torchrun
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def pick_device(name=""):
    """--device, or CUDA when present, else the CPU. Apple's mps is refused: nothing here is
    tested on it (no CI machine has one), and on a Mac the CPU runs the built-in task in minutes."""
    if name.startswith("mps"):
        raise ConfigError("--device mps is not supported: the stages are tested on CUDA and the CPU only; "
                          "on a Mac use --device cpu (the default there)")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup(device="", seed=0):
    """Device and process group: CUDA when present, else CPU (--device overrides); under
    torchrun one process per device (NCCL on GPU, gloo on CPU). Seeds every process alike, so
    models start identical; data-dependent randomness is offset by rank where it matters."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = str(pick_device(device))
    if device == "cuda" and ddp:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # processes share the cores
    return Dist(ddp, rank, local_rank, world, torch.device(device))


def cleanup(d):
    """The end of a stage: every process waits until all are done (rank 0 may still be saving),
    then the process group goes. A process that tore down gloo while another still worked
    aborted at exit now and then ("terminate called without an active exception")."""
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()


def autocast(device):
    """bf16 autocast on GPU, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(device):
    """The dtype that frozen models and rollout copies are kept in: bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def all_reduce_mean(x, d):
    """Mean of a float or tensor over processes (for logging and validation)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=d.device).clone()
    if d.ddp:
        dist.all_reduce(t)
        t /= d.world_size
    return t.item() if t.dim() == 0 else t


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint that cannot be used where it was given; the message says why."""


class ConfigError(ValueError):
    """Settings that cannot work together; the message says why in one sentence."""


def save_checkpoint(path, model, *, kind, config, step, optimizer=None, **extra):
    """Write OUT/ckpt.pt atomically: a crash mid-write never leaves a broken checkpoint.
    kind: 'policy' or 'reward' (the value model is saved beside the policy, as 'value')."""
    model = getattr(model, "module", model)  # unwrap DDP
    ckpt = {"kind": kind, "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "config": dataclasses.asdict(config), "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None, **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None):
    """Read a checkpoint safely (weights_only: no code runs on load), checking its kind."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message would advise weights_only=False: wrong for a damaged file, and unsafe
        # (it runs whatever code the file holds), so it is not passed on
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); the file is damaged, "
                              f"cut short, or was not written by one of these stages") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a minRLHF checkpoint")
    if kind is not None and ckpt.get("kind") not in (kind if isinstance(kind, tuple) else (kind,)):
        raise CheckpointError(f"{path}: is a {ckpt.get('kind')} checkpoint, expected {kind}")
    return ckpt


def load_model(path, kind=None, head=None, device="cpu"):
    """A GPT from a checkpoint; head='scalar' or 'lm' rebuilds the trunk with that head (the
    reward model starts from the SFT policy; the value model from the reward model).
    path may also be a Hugging Face GPT-2 directory (config.json + weights): it counts as a
    policy, and as a reward model only when GPT.save_pretrained wrote a score head beside it."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from model import SCORE_FILE, PretrainedError
        wanted = kind if isinstance(kind, tuple) else (kind,) if kind else None
        kinds = ("policy", "reward") if os.path.exists(os.path.join(path, SCORE_FILE)) else ("policy",)
        if wanted is not None and not set(wanted) & set(kinds):
            raise CheckpointError(f"{path}: is a GPT-2 directory without a {SCORE_FILE} head, expected {kind}")
        if head is None and wanted is not None and "policy" in wanted:
            head = "lm"  # a reward model's directory is also a language model; as a policy it is one
        try:
            return GPT.from_pretrained(path, head=head).to(device)
        except PretrainedError as e:
            raise CheckpointError(str(e)) from None
    ckpt = load_checkpoint(path, kind)
    config = GPTConfig(**ckpt["model_config"])
    state = ckpt["model"]
    if head is not None and head != config.head:
        config = dataclasses.replace(config, head=head)
        state = {k: v for k, v in state.items() if not k.startswith("score.")}
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("score.") for k in missing), (missing, unexpected)
    return model.to(device)


# ----------------------------------------------------------------------------- resume

def rng_states(d, *generators):
    """Every random state that decides what a stage does next, one dict per process (a
    collective under torchrun: every process calls it): torch's CPU and CUDA default
    generators and the stage's own generators (data order, sampling)."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in generators]}
    if not d.ddp:
        return [mine]
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def set_rng_states(d, states, *generators):
    """Put back what rng_states saved, each process its own."""
    mine = states[d.rank]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    for g, state in zip(generators, mine["generators"], strict=True):
        g.set_state(state)


def resume_checkpoint(cfg, kind, step_field, d, path=None):
    """With --resume true, the stage's last checkpoint (path, default OUT/ckpt.pt), or None when
    there is none yet (the run starts at the beginning). The checkpoint must come from the same
    settings: anything but the step count (`step_field`) that differs is refused, naming the field."""
    if not cfg.resume:
        return None
    path = path or os.path.join(cfg.out, "ckpt.pt")
    if not os.path.exists(path):
        print0(f"resume: no checkpoint {path} yet, starting from the beginning")
        return None
    ckpt = load_checkpoint(path, kind)
    if "resume" not in ckpt:
        raise CheckpointError(f"{path}: holds no state to resume from (it was written without --save_every)")
    for f in dataclasses.fields(cfg):
        saved, now = ckpt["config"].get(f.name), getattr(cfg, f.name)
        if f.name not in (step_field, "resume") and saved != now:
            raise CheckpointError(f"{path}: was written with --{f.name} {saved} but the command line has --{f.name} {now}; "
                                  f"resume with the same settings (only --{step_field} may change)")
    if len(ckpt["resume"]["rng"]) != d.world_size:
        raise CheckpointError(f"{path}: was written by {len(ckpt['resume']['rng'])} process(es), not {d.world_size}; "
                              f"resume with the same number")
    print0(f"resume: {path} at step {ckpt['step']}")
    return ckpt


# ----------------------------------------------------------------------------- training

def make_optimizer(model, lr, weight_decay, device, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not on biases, LayerNorms or positions' scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def micro_batches(batch_size, micro_batch_size, world_size):
    """(micro-batch per process, accumulation steps) for a global batch; micro 0 means no accumulation.
    The global batch is the same whatever the number of processes."""
    micro = micro_batch_size or batch_size // world_size
    per_step = micro * world_size
    assert micro > 0 and batch_size % per_step == 0, \
        f"batch_size {batch_size} must be a multiple of micro_batch_size x processes = {per_step}"
    return micro, batch_size // per_step


def token_batches(lengths, max_tokens):
    """Consecutive index batches of sequences with these lengths, each padded batch (count x
    longest) within max_tokens, so that scoring never needs more memory than a training step."""
    batch, longest = [], 0
    for i, n in enumerate(lengths):
        if batch and (len(batch) + 1) * max(longest, n) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


def lr_at(step, lr, warmup, total, min_ratio=0.1):
    """Linear warmup to lr, then cosine decay to lr * min_ratio at the last step."""
    if step <= warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def done_line(stage, stats, result, saved, device):
    """The one line a stage ends with, so a user sees at a glance that nothing was lost: the
    rows read, skipped, cut and dropped, how it ended, what it wrote (and on a GPU the peak memory)."""
    data = (f"{stats.get('rows', 0)} rows read, {stats.get('bad_lines', 0)} bad lines skipped, "
            f"{stats.get('truncated', 0)} prompts cut from the left, {stats.get('dropped', 0)} examples dropped")
    memory = f" | peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB" if device.type == "cuda" else ""
    return f"{stage} done: {data} | {result} | saved {saved}{memory}"


def run_main(main):
    """Run a stage; errors a user can cause (bad data, a wrong checkpoint) end with one sentence."""
    from data.formats import DataError
    try:
        main()
    except (DataError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- logging

class Logger:
    """One `|`-separated line per step on the console, every metric to OUT/metrics.jsonl.
    resume_step: a resumed run keeps the rows up to that step and appends after them, so the
    file never holds a step twice."""

    def __init__(self, out_dir, master=True, resume_step=None):
        self.master = master
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.t0 = time.time()
        if master:
            keep_rows(self.path, resume_step)

    def log(self, step, metrics, console=None, bar=None):
        """console: the keys to print (default: all); bar: a tqdm bar to write through."""
        if not self.master:
            return
        row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if console == []:
            return  # file only
        shown = [f"{k} {_fmt(metrics[k])}" for k in (console or metrics) if k in metrics]
        line = " | ".join([f"step {step}"] + shown)
        if bar is not None:
            bar.write(line)  # above the progress bar, not through it
        else:
            print(line, flush=True)


def keep_rows(path, step):
    """Start a JSONL log of steps: a resumed run keeps its rows up to `step` and appends after
    them, so no step is there twice; a new run (step None) starts it empty."""
    rows = []
    if step is not None and os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
