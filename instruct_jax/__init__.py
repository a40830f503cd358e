"""instruct_jax: the InstructGPT recipe (SFT, reward model, PPO) in JAX/Flax on device meshes."""

__version__ = "0.1.0"
