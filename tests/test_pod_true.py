"""Communication in the hot loops, read from the compiled program (issue 27, items 3-4), on 8 CPU devices.

* `parallel/collectives.py` finds every collective of a compiled program, the loops around it with their trip
  counts, its bytes, and whether it re-sends loop-invariant data: checked on programs with known answers;
* the chunked loss on a (fsdp 2 x tensor 4) mesh equals the unsharded loss in value and gradient, and its
  compiled chunk loop carries no [V, D] collective (XLA's own partitioning gathered the kernel and
  all-reduced its gradient on every chunk);
* decoding reshards the weights once per call: no all-gather of a weight inside the decode loop, and the same
  tokens as before;
* attention computes heads / tensor query heads per device for multi-query and grouped-query attention.
The same properties on real TPU topologies (libtpu's compiler) are in test_pod_plans.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from instruct_jax.parallel.collectives import collectives, replica_groups, summary
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import MeshConfig, make_mesh
from instruct_jax.train.losses import fused_masked_loss_sum, masked_loss_sum


def mesh_of(**sizes):
    cfg = MeshConfig(**{"fsdp": -1, **sizes})
    return make_mesh(cfg), cfg.logical_rules()


# ----------------------------------------------------------------------------- the reader
def test_reader_counts_a_scanned_weight_gather_per_iteration_and_flags_it_invariant():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    w_sh, x_sh = NamedSharding(mesh, P(None, "x", None)), NamedSharding(mesh, P(None, None))

    @functools.partial(jax.jit, in_shardings=(w_sh, x_sh), out_shardings=x_sh)
    def f(w, x):  # 5 stacked weights [64, 32], each split over 8 devices; layer l needs all of w[l]
        def body(x, w_l):
            full = jax.lax.with_sharding_constraint(w_l, NamedSharding(mesh, P()))
            return jnp.tanh(x @ full.T @ full), None
        return jax.lax.scan(body, x, w)[0]

    compiled = f.lower(jnp.zeros((5, 64, 32)), jnp.zeros((4, 32))).compile()
    found = collectives(compiled.as_text())
    gathers = [c for c in found if c.op == "all-gather" and c.loops]
    assert len(gathers) == 1, [(c.op, c.shape, c.loops) for c in found]
    (g,) = gathers
    assert g.loops[-1].trips == 5 and g.executions == 5 and not g.loops[-1].early_exit
    assert g.invariant and g.group_size == 8 and g.shape == "f32[1,8,32]", g
    assert g.bytes == 8 * 32 * 4 * 7  # receives the 7 other shards
    assert g.bytes_per_step == 5 * g.bytes
    assert summary(found)["ici_bytes"] == pytest.approx(sum(c.bytes_per_step for c in found))


def test_reader_expands_every_replica_group_spelling():
    assert replica_groups("replica_groups={{0,1},{2,3}}, dimensions", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[8], dimensions", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), d", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use", 8) == [
        [0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use", 8) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}, x", 2) == [[0, 1], [1, 0]]
    assert replica_groups("replica_groups={}, x", 3) == [[0, 1, 2]]


def test_reader_marks_groups_that_span_slices_as_dcn():
    mesh = jax.make_mesh((2, 4), ("slice", "x"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    @functools.partial(jax.jit, in_shardings=NamedSharding(mesh, P(("slice", "x"))),
                       out_shardings=NamedSharding(mesh, P()))
    def total(x):
        return jnp.sum(x)

    text = total.lower(jnp.zeros(64)).compile().as_text()
    slice_of = [0] * 4 + [1] * 4
    assert any(c.dcn for c in collectives(text, slice_of))
    assert not any(c.dcn for c in collectives(text, [0] * 8))


# ----------------------------------------------------------------------------- the chunked loss
def _loss_case(v=96, d=32, b=8, t=12):
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (v, d)) * 0.5
    y = jax.random.randint(k[2], (b, t), 0, v)
    mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)
    return h, w, y, mask


@pytest.mark.parametrize("sizes", [dict(tensor=4), dict(data=2, tensor=2), dict(sequence=2, tensor=2), dict()])
def test_sharded_chunked_loss_equals_the_unsharded_loss_and_sends_no_kernel_per_chunk(sizes):
    h, w, y, mask = _loss_case()
    mesh, rules = mesh_of(**sizes)
    spec = {k: NamedSharding(mesh, P(*s)) for k, s in
            {"h": (("data", "fsdp"), "sequence", None), "w": ("tensor", "fsdp"), "rows": (("data", "fsdp"), "sequence")}.items()}

    def loss(h, w):
        return 0.3 * fused_masked_loss_sum(h, w, y, mask, 4)[0]

    with mesh_and_rules(mesh, rules):
        sharded = jax.jit(jax.value_and_grad(loss, (0, 1)), in_shardings=(spec["h"], spec["w"]))
        value, (dh, dw) = sharded(h, w)
        text = sharded.lower(h, w).compile().as_text()
    want_value = 0.3 * masked_loss_sum(jnp.einsum("BTD,VD->BTV", h, w), y, mask)[0]
    want_dh, want_dw = jax.grad(lambda h, w: 0.3 * masked_loss_sum(jnp.einsum("BTD,VD->BTV", h, w), y, mask)[0],
                                (0, 1))(h, w)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(dh, want_dh, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dw, want_dw, atol=2e-5, rtol=1e-5)
    in_loss_loop = [c for c in collectives(text) if any("losses.py" in lp.where for lp in c.loops)]
    # nothing the size of the vocabulary (its shard) crosses devices per chunk: no kernel, no gradient, no logits
    vocab_dims = {str(w.shape[0]), str(w.shape[0] // mesh.shape["tensor"])}
    dims = [set(re.findall(r"\d+", c.shape)) for c in in_loss_loop]
    assert not any(d & vocab_dims for d in dims), [(c.op, c.shape) for c in in_loss_loop]
    assert not any(c.invariant for c in in_loss_loop)


# ----------------------------------------------------------------------------- decoding
def _tiny_model(**overrides):
    from instruct_jax.model.config import ModelConfig
    from instruct_jax.model.transformer import Transformer, init_params_boxed

    cfg = ModelConfig(**{**dict(vocab_size=96, d_model=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8,
                                mlp_dim=128, max_seq_len=64), **overrides})
    model = Transformer(cfg)
    return model, functools.partial(init_params_boxed, model)


def _sampler_case(mesh, rules, weights):
    from instruct_jax.inference.sampling import SamplingConfig, make_sampler
    from instruct_jax.parallel.sharding import param_shardings_for, unbox

    model, init = _tiny_model()
    abstract, shardings = param_shardings_for(init, mesh, rules)
    with mesh_and_rules(mesh, rules):
        params = jax.jit(lambda k: unbox(init(k)), out_shardings=shardings)(jax.random.PRNGKey(0))
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=6, temperature=1.0), mesh, rules, shardings,
                           weights=weights)
    return model, params, sampler


@pytest.mark.parametrize("sizes", [dict(tensor=2), dict()])
def test_decode_loop_gathers_no_weight_and_decodes_the_same_tokens(sizes):
    from instruct_jax.model.transformer import ModelInput

    mesh, rules = mesh_of(**sizes)
    prompt = ModelInput.left_padded(jnp.asarray(np.random.default_rng(0).integers(1, 96, (8, 5)), jnp.int32),
                                    jnp.asarray([5, 3, 4, 5, 2, 5, 1, 4]))
    outs, loops = {}, {}
    for weights in ("gathered", "sharded"):
        _, params, sampler = _sampler_case(mesh, rules, weights)
        outs[weights] = sampler.sample(params, prompt, jax.random.PRNGKey(1))
        text = sampler.sample.lower(params, prompt, jax.random.PRNGKey(1)).compile().as_text()
        loops[weights] = [c for c in collectives(text) if any(lp.where == "sampling.py:sample" for lp in c.loops)]
    # bit for bit: the same samples and log-probs (PPO's rollouts, and so the CPU pipeline, are unchanged)
    for field in ("tokens", "logprobs", "lengths"):
        np.testing.assert_array_equal(getattr(outs["gathered"], field), getattr(outs["sharded"], field))
    weight_gathers = [c for c in loops["gathered"] if c.invariant and c.op in ("all-gather", "collective-permute")]
    assert not weight_gathers, [(c.op, c.shape, c.source) for c in weight_gathers]
    # (The CPU compiler hoists the training layout's weight gathers out of the loop by itself; the TPU compiler
    # does not: test_pod_plans.py shows them there, and their absence with the gathered layout.)
    assert all(lp.early_exit and lp.trips == 6 for c in loops["gathered"] for lp in c.loops
               if lp.where == "sampling.py:sample")


# ----------------------------------------------------------------------------- attention heads
@pytest.mark.parametrize("heads,kv_heads,tensor,kv_rule", [
    (8, 1, 4, None),  # multi-query (PaLM): kv replicated, 2 query heads per device
    (8, 2, 4, None),  # grouped-query with fewer kv heads than the tensor axis
    (8, 4, 2, None),  # kv heads a multiple of the tensor axis, but the experiment replicates them
    (8, 4, 4, "tensor"),  # kv heads split alike (the plain case)
])
def test_attention_computes_heads_over_tensor_query_heads_per_device(heads, kv_heads, tensor, kv_rule):
    from instruct_jax.model.attention import shard_local
    from instruct_jax.model.attention.masks import attention_mask, reference_attention

    mesh, rules = mesh_of(tensor=tensor)
    rules = tuple((n, kv_rule) if n == "act_kv_heads" else (n, a) for n, a in rules)
    b, t, h = 8, 6, 4
    k0 = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(k0[0], (b, t, heads, h))
    k = jax.random.normal(k0[1], (b, t, kv_heads, h))
    v = jax.random.normal(k0[2], (b, t, kv_heads, h))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    local_shapes = []

    def kernel(q, k, v, q_seg, kv_seg):  # a stand-in for Splash: sees only its device's shard
        local_shapes.append((q.shape, k.shape))
        p = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return reference_attention(q, k, v, attention_mask(p, p, q_seg, kv_seg))

    with mesh_and_rules(mesh, rules):
        out = jax.jit(lambda q, k, v: shard_local.per_shard(kernel, q, k, v, seg, seg))(q, k, v)
    want = reference_attention(q, k, v, attention_mask(pos, pos, seg, seg))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    (q_local, kv_local), = set(local_shapes)
    assert q_local[2] == heads // tensor  # never every head on every device
    assert kv_local[2] == max(kv_heads // tensor, 1)


# ----------------------------------------------------------------------------- data at scale
def test_a_hub_pretraining_mix_without_a_row_cap_is_refused():
    from conftest import REPO
    from instruct_jax.config import apply_overrides, load_experiment
    from instruct_jax.errors import ConfigError
    from instruct_jax.rl.ppo.trainer import validate_ppo

    cfg = load_experiment(str(REPO / "experiments" / "llama3_8b_ppo_v5p128.py"))
    assert cfg.ppo.ptx.max_rows > 0
    validate_ppo(cfg)
    with pytest.raises(ConfigError) as e:
        validate_ppo(apply_overrides(cfg, ["ppo.ptx.max_rows=0"]))
    assert e.value.field == "ppo.ptx.max_rows"
    validate_ppo(apply_overrides(cfg, ["ppo.ptx.max_rows=0", f"ppo.ptx.source={REPO / 'data' / 'tinyshakespeare.txt'}"]))
