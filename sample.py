"""
Look at what a model writes, or write candidates for raters to rank.

    python sample.py --init out/ppo/ckpt.pt                              # a few test prompts
    python sample.py --init out/sft/ckpt.pt --compare out/ppo/ckpt.pt    # two models side by side
    python sample.py --init out/sft/ckpt.pt --prompts prompts.jsonl --k 4 --out candidates.jsonl

--prompts is a prompts JSONL (any file with a "prompt" field, HH-RLHF too) or "task" for the
built-in task's prompts of --split. With --out, K responses per prompt are written as a
candidates file {prompt, responses}, which label.py (people) or `python -m data.tasks rate --task add`
(the simulated raters) rank. On the built-in task the gold score is shown beside each response.
"""

from dataclasses import dataclass

from common import check, load_model, parse_config, pick_device, run_main
from data.tasks import task_of
from data.formats import DataError, get_prompts, write_jsonl
from data.tokenizer import get_tokenizer, use_chat_template
from rollout import sample_responses


@dataclass
class Config:
    init: str = "out/ppo/ckpt.pt"  # checkpoint to sample from
    compare: str = ""  # a second checkpoint, shown side by side
    prompts: str = "task"  # prompts JSONL, or "task" for the built-in task ("task:sort", ...: a task of the suite)
    split: str = "test"  # built-in task: train / val / test prompts
    n: int = 8  # how many prompts (0: all)
    offset: int = 0  # skip this many prompts first (round r of train.sh takes the prompts after those of rounds 1..r-1)
    k: int = 1  # responses per prompt
    out: str = ""  # write a candidates JSONL here instead of printing
    max_new_tokens: int = 40  # longest response in tokens
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling mass (1: all)
    batch_size: int = 256  # sequences per generation batch
    seed: int = 0  # same seed, same samples (on CPU)
    chat_template: bool = False  # render prompts with the model's own chat template (a Hugging Face tokenizer directory's)
    device: str = ""  # cuda / cpu; default: cuda if available

    def check(self):
        check(self.n >= 0 and self.offset >= 0, f"--n and --offset must be 0 or more, not {self.n} and {self.offset}")
        check(self.k >= 1, f"--k must be 1 or more, not {self.k}")
        check(not self.out or self.k >= 2, f"--out writes candidates for raters to rank, which needs --k 2 or more, not {self.k}")
        check(self.batch_size >= 1 and self.max_new_tokens >= 1, "--batch_size and --max_new_tokens must be 1 or more")
        check(self.temperature >= 0, f"--temperature must be 0 (greedy) or more, not {self.temperature}")


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    prompts = get_prompts(cfg.prompts, cfg.split, cfg.n, cfg.offset)
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts left after skipping the first {cfg.offset}")
    sampling = dict(k=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, progress=True)
    paths = [cfg.init] + ([cfg.compare] if cfg.compare else [])
    outputs = []
    for path, flag in zip(paths, ("--init", "--compare")):
        model = load_model(path, kind="policy", device=device, flag=flag)
        use_chat_template(get_tokenizer(model.config.tokenizer), cfg.chat_template)
        outputs.append(sample_responses(model, prompts, **sampling))
    if cfg.out:
        write_jsonl(cfg.out, [{"prompt": p, "responses": r} for p, r in zip(prompts, outputs[0])])
        print(f"wrote {len(prompts)} prompts x {cfg.k} responses to {cfg.out}")
        return
    for i, prompt in enumerate(prompts):
        print("=" * 80 + "\n" + prompt)
        for path, out in zip(paths, outputs):
            for response in out[i]:
                task = task_of([prompt])
                gold = f"  [gold {task.gold_score(prompt, response):+.2f}]" if task else ""
                print(f"--- {path}{gold}\n{response}")


if __name__ == "__main__":
    run_main(main)
