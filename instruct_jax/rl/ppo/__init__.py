"""PPO against the reward model (InstructGPT step 3): rollouts in the training mesh, rewards with a KL
penalty, GAE, the clipped PPO update, and the loop. docs/PPO.md describes the algorithm and settings."""
