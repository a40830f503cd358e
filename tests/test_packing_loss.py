"""A packed batch gives the same per-example loss as the examples run one by one (model + pipeline)."""

import jax
import jax.numpy as jnp
import numpy as np

from instruct_jax.data.examples import LMExample
from instruct_jax.data.packing import pack_lm_row
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.sharding import unbox
from instruct_jax.train.losses import token_nll


def per_segment_loss(model, params, row, num_segments):
    batch = {k: v[None] for k, v in row.items()}
    logits = model.apply({"params": params}, ModelInput.from_batch(batch)).logits
    nll = np.asarray(token_nll(logits, batch["targets"]))[0] * row["loss_mask"]
    return [nll[row["segment_ids"] == s].sum() / row["loss_mask"][row["segment_ids"] == s].sum()
            for s in range(1, num_segments + 1)]


def test_packed_row_loss_equals_each_example_alone():
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=32)
    model = Transformer(cfg)
    params = unbox(model.init(jax.random.PRNGKey(0), ModelInput.unpacked(jnp.zeros((1, 8), jnp.int32)))["params"])
    rng = np.random.default_rng(0)
    examples = []
    for n, prompt in ((7, 3), (5, 2), (9, 4)):
        ids = rng.integers(3, 50, size=n).astype(np.int32)
        weights = (np.arange(n) >= prompt).astype(np.float32)  # the "assistant" part
        examples.append(LMExample(ids, weights))
    packed = pack_lm_row(examples, 24, pad_id=0)
    assert packed["segment_ids"].max() == 3
    got = per_segment_loss(model, params, packed, 3)
    want = [per_segment_loss(model, params, pack_lm_row([ex], 24, pad_id=0), 1)[0] for ex in examples]
    np.testing.assert_allclose(got, want, rtol=1e-5)
