"""Reinforcement learning from a reward: rollouts (rollout.py), rewards and KL (rewards.py), advantages
(advantages.py), shared by every algorithm; ppo/ is PPO. Critic-free methods go beside ppo/."""
