"""Reinforcement learning with verifiable rewards (GRPO): rewards, advantages and the clipped objective, rollouts."""
