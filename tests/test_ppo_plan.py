"""The PPO experiments' four parameter trees and two optimizer states, sharded abstractly on the mesh they are
sized for (no allocation): every tree divides over the mesh, and the 8B run's per-chip state fits a v5p chip."""

import math

import jax
import pytest

from conftest import REPO
from instruct_jax.config import load_experiment
from instruct_jax.parallel.mesh import make_abstract_mesh
from instruct_jax.parallel.sharding import param_shardings_for
from instruct_jax.rl.ppo.trainer import ppo_trees, validate_ppo


def per_device_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("spec", ["tiny_ppo.py:rm", "tiny_ppo.py:toy", "llama3_8b_ppo_v5p128.py"])
def test_ppo_trees_shard_on_the_experiment_mesh(spec):
    cfg = load_experiment(str(REPO / "experiments" / spec))
    n = cfg.mesh.num_devices or 8
    validate_ppo(cfg, num_devices=n)
    mesh, rules = make_abstract_mesh(cfg.mesh, n), cfg.mesh.logical_rules()
    trees = ppo_trees(cfg, mesh)  # build_ppo's own Model and Shard, on the experiment's full (abstract) mesh
    policy, value = trees.abstract_state.policy, trees.abstract_state.value
    reward, _ = param_shardings_for(trees.value_init, mesh, rules)
    # the value model and the reward model are the same tree: one initialises the other
    assert jax.tree.structure(value.params) == jax.tree.structure(reward)
    trained = per_device_bytes(policy) + per_device_bytes(value)
    frozen = per_device_bytes(policy.params) + per_device_bytes(reward)  # reference + reward model
    ema = per_device_bytes(policy.params) if cfg.ppo.ema_decay > 0 else 0
    total_gb = (trained + frozen + ema) / 2**30
    if spec.startswith("llama3_8b"):
        # 8.03B params: (4 + 8) bytes x 2 trained trees + 4 bytes x 3 (reference, reward, EMA) = 36 B/param / 64
        assert 4.0 < total_gb < 5.0, total_gb
