"""One process of tests/test_checkpoint_parts.py: save or restore a sharded state over two processes and
record which checkpoint files this process hashed. argv: OUT_DIR MODE (save | restore)."""

import json
import os
import sys

from instruct_jax.parallel.distributed import DistributedConfig, initialize, plan

initialize(plan(DistributedConfig()))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from instruct_jax import checkpoint  # noqa: E402

out_dir, mode = sys.argv[1], sys.argv[2]
ckpt_dir = os.path.join(out_dir, "checkpoints")
hashed = []
original = checkpoint._sha256


def recording(path):
    hashed.append(os.path.relpath(str(path), ckpt_dir))
    return original(path)


checkpoint._sha256 = recording
mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = NamedSharding(mesh, P("x"))
data = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
state = {"w": jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])}
abstract = {"w": jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)}
manager = checkpoint.CheckpointManager(ckpt_dir, every_steps=1, keep=3, async_save=True)
result = {"process": jax.process_index()}
if mode == "save":
    manager.save(1, state, {"note": "x"}, force=True)
    manager.wait()
else:
    restored = manager.restore_latest(abstract)
    result["restored_step"] = None if restored is None else restored[0]
    if restored is not None:
        local = restored[1]["w"].addressable_shards[0]
        result["restored_ok"] = bool(np.array_equal(np.asarray(local.data), data[local.index]))
manager.close()
result["hashed"] = hashed
with open(os.path.join(out_dir, f"{mode}_process_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)
