"""PaLM's parallel block (one shared pre-norm; y = x + attn(norm(x)) + mlp(norm(x))) with multi-query
attention and tied embeddings equals a hand-written numpy forward pass of the same weights."""

import jax
import jax.numpy as jnp
import numpy as np

from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=24,
                  max_seq_len=16, tie_embeddings=True, parallel_block=True, init_std=0.3)


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotate(x, theta):
    """x [T, N, H] rotated by positions 0..T-1, pairing dim j with j + H/2."""
    t, _, h = x.shape
    angle = np.arange(t)[:, None] * theta ** (-np.arange(0, h, 2) / h)[None, :]  # [T, H/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_logits(params, tokens):
    """One row [T] -> logits [T, V], loop over layers, the single kv head shared by every query head."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    emb = p["embedding"]
    x = emb[tokens]  # [T, D]
    t = len(tokens)
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(CFG.num_layers):
        w = jax.tree.map(lambda a: a[layer], p["layers"])
        h = rms(x, w["norm"]["scale"], CFG.norm_eps)
        q = rotate(np.einsum("td,dnh->tnh", h, w["attn"]["q"]), CFG.rope_theta)
        k = rotate(np.einsum("td,dkh->tkh", h, w["attn"]["k"]), CFG.rope_theta)[:, 0]  # [T, H]: one kv head
        v = np.einsum("td,dkh->tkh", h, w["attn"]["v"])[:, 0]
        heads = []
        for n in range(CFG.num_heads):
            scores = q[:, n] @ k.T / np.sqrt(CFG.head_dim)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((probs / probs.sum(-1, keepdims=True)) @ v)
        attn = np.einsum("tnh,nhd->td", np.stack(heads, 1), w["attn"]["o"])
        gate, up = h @ w["mlp"]["gate"], h @ w["mlp"]["up"]
        mlp = (gate / (1 + np.exp(-gate)) * up) @ w["mlp"]["down"]
        x = x + attn + mlp  # both branches read the same normed input
    return rms(x, p["final_norm"]["scale"], CFG.norm_eps) @ emb.T


def test_parallel_block_matches_hand_written_forward():
    model = Transformer(CFG)
    tokens = jnp.array([[3, 17, 5, 29, 8, 1, 0, 22]], jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ModelInput.unpacked(tokens))["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value"))
    layer_names = set(params["layers"])
    assert layer_names == {"norm", "attn", "mlp"}, layer_names  # one shared norm, no per-branch norms
    assert "lm_head" not in params and params["layers"]["attn"]["k"].shape == (2, 16, 1, 8)  # tied, MQA
    got = model.apply({"params": params}, ModelInput.unpacked(tokens)).logits[0]
    np.testing.assert_allclose(np.asarray(got), reference_logits(params, np.asarray(tokens[0])), atol=2e-5,
                               rtol=1e-4)

