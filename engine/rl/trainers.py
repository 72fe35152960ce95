"""Which trainer runs each objective of engine/rl (imported only when one is asked for)."""
from __future__ import annotations


def rl_trainer_class(objective: str):
    if objective == "reward":
        from engine.rl.reward_trainer import RewardTrainer
        return RewardTrainer
    from engine.rl.policy_trainer import GRPOTrainer, PPOTrainer
    return {"ppo": PPOTrainer, "grpo": GRPOTrainer}[objective]
