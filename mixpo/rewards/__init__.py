"""Rewards: answer extraction + math-verify, format reward, timed runner, DAPO overlong shaping."""

from mixpo.rewards.math_answer import (FormatReward, MathAnswerReward, extract_answer,
                                       format_reward, math_answer_reward, parse_gold,
                                       verify_answer)
from mixpo.rewards.overlong import (OverlongConfig, overlong_penalty, shape_rewards,
                                    truncation_loss_mask)
from mixpo.rewards.combine import Combined, combine
from mixpo.rewards.runner import RewardError, RewardResult, RewardRunner

__all__ = [
    "Combined", "FormatReward", "MathAnswerReward", "OverlongConfig", "RewardError",
    "RewardResult", "RewardRunner", "combine", "extract_answer", "format_reward",
    "math_answer_reward", "overlong_penalty", "parse_gold", "shape_rewards",
    "truncation_loss_mask", "verify_answer",
]
