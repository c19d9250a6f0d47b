"""A judge for the worked example of rate.py, ppo.py --reward_fn and eval.py --judge: it likes
responses that end by wishing the person a great day. The task's demonstrator does so 15% of the
time, so the SFT policy already can, and PPO has something to make more frequent.

    python rate.py --candidates out/candidates.jsonl --judge judges/great_day.py:great_day --out out/rankings.jsonl
"""


def great_day(prompts, responses):
    """1.0 for a response that ends with "have a great day!", else 0.0."""
    return [float(r.strip().endswith("have a great day!")) for r in responses]
