"""
What every stage shares: command-line config, device and torchrun setup, print0, checkpoints,
metric logging. Nothing stage-specific lives here.
"""

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig, add_lora, has_lora, lora_state_dict, merge_lora


# ----------------------------------------------------------------------------- config

def parse_config(cls, argv=None):
    """Fill a stage's @dataclass from the command line: every field is a flag (--lr 3e-6) and
    its one-line comment is the flag's help; --max-steps and --max_steps alike. Booleans take
    true/false. No abbreviations (--max_step is refused, not taken as --max_steps); a flag that
    does not exist is refused in one sentence naming the closest real one. The Config's own
    check(), if it has one, then refuses settings that cannot work, one sentence each."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # a stage's Config, and the RunConfig it extends
        comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(klass), re.M))
    parser = _Parser(description=(sys.modules[cls.__module__].__doc__ or "").strip(), allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):  # the stage's own flags first
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        hyphenated = ["--" + f.name.replace("_", "-")] if "_" in f.name else []  # --skip-bad-lines works too
        help_text = f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument("--" + f.name, *hyphenated, type=kind, default=f.default, help=help_text)
    cfg = cls(**vars(parser.parse_args(argv)))
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


class _Parser(argparse.ArgumentParser):
    """argparse, with every mistake on the command line one sentence (a ConfigError) instead of
    the usage text and an exit: an unknown flag names the closest real one."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flag = unknown.group(1).split()[0]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else "; --help lists every flag"
            raise ConfigError(f"unknown flag {flag}{hint}")
        raise ConfigError(f"{message} (--help lists every flag)")


@dataclasses.dataclass
class RunConfig:
    """The settings every trainer has beside its own (listed after them in --help)."""
    save_every: int = 0  # steps (ppo.py: updates) between checkpoints that --resume can continue from (0: at the end only)
    resume: bool = False  # continue from OUT/ckpt.pt (same settings; only the length of the run may change)
    overwrite: bool = False  # start again in an --out that already holds a run (without it, that is refused)
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available
    lora_rank: int = 0  # train LoRA adapters of this rank (Hu et al. 2021) instead of every weight; 0: full fine-tuning
    lora_alpha: float = 0.0  # LoRA: the update is scaled by alpha / rank (0: alpha = rank)
    lora_targets: str = ""  # LoRA: comma-separated projections to adapt (default: the attention's, e.g. q_proj,k_proj,v_proj,o_proj)
    chat_template: bool = False  # render prompts (HH dialogues too) with the model's own chat template (a Hugging Face tokenizer directory's)


def check(condition, message):
    """A Config's check(): settings that cannot work stop with one sentence."""
    if not condition:
        raise ConfigError(message)


def check_positive(cfg, *names):
    """Each named setting must be 1 or more (and --micro_batch_size, where there is one, 0 or more)."""
    for name in names:
        check(getattr(cfg, name) >= 1, f"--{name} must be 1 or more, not {getattr(cfg, name)}")
    check(getattr(cfg, "micro_batch_size", 0) >= 0,
          f"--micro_batch_size must be 0 (no accumulation) or more, not {getattr(cfg, 'micro_batch_size', 0)}")
    check(0 < getattr(cfg, "val_frac", 0.5) < 1, f"--val_frac must be between 0 and 1, not {getattr(cfg, 'val_frac', 0.5)}")


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
    """--device, or CUDA when present, else the CPU; a device this machine does not have is
    refused in one sentence. Apple's mps is refused too: nothing here is tested on it (no CI
    machine has one), and on a Mac the CPU runs the built-in task in minutes."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use cpu, cuda, or cuda:N for the N-th GPU") from None
    if device.type == "mps":
        raise ConfigError("--device mps is not supported: the stages are tested on CUDA and the CPU only; "
                          "on a Mac use --device cpu (the default there)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: not supported; use cpu, cuda, or cuda:N for the N-th GPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch finds no CUDA GPU on this machine"
        raise ConfigError(f"--device {name}: {why}; use --device cpu, or install a CUDA build of torch (README: GPUs)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return device


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


def import_transformers():
    """Hugging Face transformers (tests and benchmarks only: the parity checks and the HF path).
    Its optional integration of Hugging Face's own `kernels` package imports a top-level
    `kernels` when transformers is imported, which from this project's root would be this
    project's kernels/ (ImportError: cannot import name 'CUDAProperties'). So transformers is
    imported with the root off sys.path and ours out of sys.modules, then ours is put back; what
    transformers bound at import keeps pointing at the other package. And from_pretrained would
    swap layers for kernels downloaded from the Hub (transformers 5.25 does so by default when
    `kernels` is installed): the parity checks want transformers' own PyTorch code, and nothing
    here can download, so USE_HUB_KERNELS=NO unless the environment says otherwise."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    root = os.path.dirname(os.path.abspath(__file__))
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "kernels" or k.startswith("kernels.")}
    path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        import transformers
        import transformers.modeling_utils  # noqa: F401  (what imports the kernels integration)
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return transformers


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
    if has_lora(model):  # the adapters alone too, small enough to keep many (model.lora_state_dict)
        assert path.endswith(".pt"), path
        from safetensors.torch import save_file
        adapters = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
        save_file(adapters, tmp, metadata={"rank": str(model.config.lora_rank), "alpha": str(model.config.lora_alpha)})
        os.replace(tmp, path[:-len(".pt")] + ".adapters.safetensors")  # OUT/ckpt.adapters.safetensors


KIND_FLAGS = {"policy": "--init (an SFT, DPO or PPO ckpt.pt, or a Hugging Face directory)",
              "reward": "--reward (a reward.py ckpt.pt)"}


def load_checkpoint(path, kind=None, flag=None):
    """Read a checkpoint safely (weights_only: no code runs on load), checking its kind.
    flag: the command-line flag that named it, for the message when it is of the wrong kind."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    given = f"{path} (given as {flag})" if flag else path
    if not os.path.exists(path):
        raise CheckpointError(f"{given}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message would advise weights_only=False: wrong for a damaged file, and unsafe
        # (it runs whatever code the file holds), so it is not passed on
        raise CheckpointError(f"{given}: not a readable checkpoint ({type(e).__name__}); the file is damaged, "
                              f"cut short, or was not written by one of these stages") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{given}: not a minRLHF checkpoint")
    wanted = kind if isinstance(kind, tuple) else (kind,)
    if kind is not None and ckpt.get("kind") not in wanted:
        hint = " or ".join(f"a {k} checkpoint" for k in wanted)
        fix = "; ".join(f"a {k} checkpoint goes to {KIND_FLAGS[k]}" for k in (ckpt.get("kind"),) if k in KIND_FLAGS)
        raise CheckpointError(f"{given}: is a {ckpt.get('kind')} checkpoint, but {flag or 'this'} takes {hint}"
                              + (f" ({fix})" if fix else ""))
    return ckpt


def load_model(path, kind=None, head=None, device="cpu", flag=None):
    """A GPT from a checkpoint; head='scalar' or 'lm' rebuilds the trunk with that head (the
    reward model starts from the SFT policy; the value model from the reward model).
    A LoRA stage's checkpoint comes back merged (its adapters folded into the weights).
    path may also be a Hugging Face directory (config.json + weights): it counts as a policy,
    and as a reward model only when GPT.save_pretrained wrote a score head beside it."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from model import SCORE_FILE, PretrainedError
        wanted = kind if isinstance(kind, tuple) else (kind,) if kind else None
        kinds = ("policy", "reward") if os.path.exists(os.path.join(path, SCORE_FILE)) else ("policy",)
        if wanted is not None and not set(wanted) & set(kinds):
            raise CheckpointError(f"{path}{f' (given as {flag})' if flag else ''}: is a Hugging Face directory without "
                                  f"a {SCORE_FILE} head, so a language model, but {flag or 'this'} takes a {kind} model")
        if head is None and wanted is not None and "policy" in wanted:
            head = "lm"  # a reward model's directory is also a language model; as a policy it is one
        try:
            return GPT.from_pretrained(path, head=head).to(device)
        except PretrainedError as e:
            raise CheckpointError(str(e)) from None
    ckpt = load_checkpoint(path, kind, flag)
    config = GPTConfig(**ckpt["model_config"])
    state = ckpt["model"]
    if head is not None and head != config.head:
        config = dataclasses.replace(config, head=head)
        state = {k: v for k, v in state.items() if not k.startswith("score.")}
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("score.") for k in missing), (missing, unexpected)
    if has_lora(model):  # a LoRA stage's checkpoint: its adapters folded in, so the next stage starts from a plain model
        merge_lora(model).requires_grad_(True)
    return model.to(device)


def apply_lora(cfg, model):
    """--lora_rank r: LoRA adapters on the model's projections and everything else frozen, but a
    reward or value model's scalar head, which trains too. Without it, the model as it is."""
    if cfg.lora_rank:
        try:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha or None, [t for t in cfg.lora_targets.split(",") if t] or None)
        except ValueError as e:
            raise ConfigError(f"--lora_targets {cfg.lora_targets}: {e}") from None
        if model.score is not None:
            model.score.requires_grad_(True)
    return model


def same_tokenizer(a, b):
    """Two checkpoints' tokenizer records name the same tokenizer: the same name, or two
    directories with the same tokenizer.json (a model saved elsewhere keeps its tokenizer)."""
    if a == b:
        return True
    files = [os.path.join(x, "tokenizer.json") for x in (a, b)]
    return all(os.path.isfile(f) for f in files) and open(files[0], "rb").read() == open(files[1], "rb").read()


def check_tokenizers(models):
    """{flag or path: model}: every model must read text with the same tokenizer."""
    (first, m0), *rest = models.items()
    for name, m in rest:
        if not same_tokenizer(m.config.tokenizer, m0.config.tokenizer):
            raise CheckpointError(f"{name}: uses tokenizer {m.config.tokenizer!r} but {first} uses "
                                  f"{m0.config.tokenizer!r}; give models trained with the same tokenizer")


# ----------------------------------------------------------------------------- runs: overwrite, resume, save

def check_out(cfg, *paths):
    """Before a stage writes anything: a finished or partial run in --out (its ckpt.pt or
    metrics.jsonl, or one of paths) is never overwritten silently. Without --resume it is refused
    in one sentence, unless --overwrite true says to start again."""
    if cfg.resume or cfg.overwrite:
        return
    found = [p for p in (os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl"), *paths)
             if os.path.exists(p)]
    if found:
        raise ConfigError(f"{found[0]}: a run is already there; continue it with --resume true, start again with "
                          f"--overwrite true, or give another --out")


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


# Settings that a resumed run may change: where the run lives (a moved or copied folder resumes),
# how long it goes on, the device, and the flags that say how to start.
RESUMABLE = ("out", "resume", "overwrite", "device")


def resume_checkpoint(cfg, kind, step_field, d, path):
    """With --resume true, the stage's last checkpoint at path, or None when there is none yet
    (the run starts at the beginning). It must come from the same settings: every one that
    differs, other than the step count (`step_field`) and RESUMABLE, is named in the refusal."""
    if not cfg.resume:
        return None
    if not os.path.exists(path):
        print0(f"resume: no checkpoint {path} yet, starting from the beginning")
        return None
    ckpt = load_checkpoint(path, kind)
    if "resume" not in ckpt:
        raise CheckpointError(f"{path}: holds no state to resume from (it was written without --save_every)")
    differ = [f"--{f.name} {ckpt['config'].get(f.name)} (now {getattr(cfg, f.name)})" for f in dataclasses.fields(cfg)
              if f.name not in (step_field, *RESUMABLE) and ckpt["config"].get(f.name) != getattr(cfg, f.name)]
    if differ:
        raise CheckpointError(f"{path}: was written with {', '.join(differ)}; resume with the same settings "
                              f"(only --{step_field} may change)")
    if len(ckpt["resume"]["rng"]) != d.world_size:
        raise CheckpointError(f"{path}: was written by {len(ckpt['resume']['rng'])} process(es), not {d.world_size}; "
                              f"resume with the same number")
    print0(f"resume: {path} at step {ckpt['step']}")
    return ckpt


class Batches:
    """The order in which a trainer visits its n examples: a random permutation per pass, drawn by
    a generator that every process seeds alike, so that all agree on each global batch; each
    process takes its own slice. A new pass starts when too few are left for a whole batch."""

    def __init__(self, n, batch_size, generator, d):
        self.n, self.batch_size, self.generator, self.d = n, batch_size, generator, d
        self.order, self.cursor = torch.randperm(n, generator=generator), 0

    def next(self):
        """This process's share of the next global batch: a list of indices."""
        if self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.generator), 0
        batch = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        share = self.batch_size // self.d.world_size
        return batch[self.d.rank * share:(self.d.rank + 1) * share].tolist()

    def state_dict(self):
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.order, self.cursor = state["order"], state["cursor"]


class Run:
    """One trainer's run: the model (and its DDP wrapper under torchrun), the optimizer, the batch
    order, the log, and its checkpoint OUT/ckpt.pt with everything that decides what happens next
    (the batch order and cursor, every random state, and what the stage adds), so that
    --resume true ends where an uninterrupted run would."""

    def __init__(self, cfg, d, model, optimizer, batches, *, kind, step_field, generators, out=None):
        self.cfg, self.d, self.kind, self.step_field = cfg, d, kind, step_field
        self.model, self.optimizer, self.batches, self.generators = model, optimizer, batches, generators
        self.ddp_model = DDP(model) if d.ddp else model
        self.out = out or cfg.out
        self.path = os.path.join(self.out, "ckpt.pt")
        self.resumed, self.logger = None, None

    def resume(self):
        """The step to continue after: with --resume true and a checkpoint to resume from, its step
        (the weights, optimizer, batch order and random states put back, and self.resumed its
        "resume" dict); else 0. Opens the log (a resumed one keeps its rows up to that step)."""
        ckpt = resume_checkpoint(self.cfg, self.kind, self.step_field, self.d, self.path)
        start = 0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.batches.load_state_dict(ckpt["resume"]["batches"])
            set_rng_states(self.d, ckpt["resume"]["rng"], *self.generators)
            start, self.resumed = ckpt["step"], ckpt["resume"]
        self.logger = Logger(self.out, self.d.master, resume_step=start if ckpt else None)
        return start

    def save(self, step, resume=None, **extra):
        """Every process calls it (the random states are gathered); rank 0 writes. resume: what
        the stage adds to the resume state; extra: what it adds beside the weights."""
        rng = rng_states(self.d, *self.generators)
        if self.d.master:
            save_checkpoint(self.path, self.model, kind=self.kind, config=self.cfg, step=step, optimizer=self.optimizer,
                            resume={"batches": self.batches.state_dict(), "rng": rng, **(resume or {})}, **extra)


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
    if micro <= 0 or batch_size % per_step:
        raise ConfigError(f"--batch_size {batch_size} must be a multiple of --micro_batch_size x processes "
                          f"({micro_batch_size or 'batch_size / processes'} x {world_size})")
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
