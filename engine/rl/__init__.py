"""Preference and RL objectives on the parallel core: reward-model training (Bradley-Terry),
PPO and GRPO with rollouts from the KV-cache generator (docs/rl.md)."""
