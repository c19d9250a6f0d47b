"""Tests for kernels/: each Triton kernel (through TRITON_INTERPRET=1 on a CPU) against its PyTorch
reference, and both against an fp64 computation."""

import pytest
import torch

from kernels import gae_ref, ppo_advantages_ref


def test_gae_ref_by_hand():
    # gamma = 0.9, lam = 0.5, so gamma * lam = 0.45; worked out on paper from
    #   delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: the masked reward 2 and value 1.5 are ignored and V after the last token is 0:
    #   A_1 = 0 + 0 - 1 = -1;  A_0 = (1 + 0.9 * 1 - 0.5) + 0.45 * -1 = 0.95
    # row 1: A_2 = 1 - 0.6 = 0.4;  A_1 = (0.9 * 0.6 - 0.4) + 0.45 * 0.4 = 0.32
    #        A_0 = (0.9 * 0.4 - 0.2) + 0.45 * 0.32 = 0.304
    # row 2: all masked, all zeros
    advantages, returns = gae_ref(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor(
        [[0.95, -1.0, 0.0], [0.304, 0.32, 0.4], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor(
        [[1.45, 0.0, 0.0], [0.504, 0.72, 1.0], [0.0, 0.0, 0.0]]))


def test_ppo_advantages_ref_by_hand():
    # kl_coef = 0.5, gamma = lam = 1, so A_t = (sum of rewards from t on) - V_t
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -9.0]])
    values = torch.tensor([[0.25, 0.5, 7.0]])
    mask = torch.tensor([[True, True, False]])
    scores = torch.tensor([3.0])
    # k1 = logprobs - ref_logprobs = [0.5, -1.0, (masked)]; rewards = [-0.25, 0.5 + 3 (score), 0]
    advantages, returns, kl = ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask,
                                                 kl_coef=0.5, gamma=1.0, lam=1.0)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[3.25 - 0.25, 3.5 - 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[3.25, 3.5, 0.0]]))
