"""instruct_jax: the InstructGPT recipe (SFT, reward model, PPO) in JAX/Flax on device meshes."""

__version__ = "0.1.0"


def __getattr__(name):
    """`instruct_jax.load_policy` without importing JAX when the package is imported."""
    if name == "load_policy":
        from instruct_jax.inference.policy import load_policy

        return load_policy
    raise AttributeError(f"module 'instruct_jax' has no attribute {name!r}")
