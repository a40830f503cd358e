"""Are the image task's answers determined by its 16 x 16 pixels? A pixel probe per question kind.

    python benchmarks/image_task_probe.py                  # seed 0, 4000 training prompts per kind
    python benchmarks/image_task_probe.py --train 1000 --seeds 0 1

For each kind of instruct_jax/instructgpt/image_task.py, scikit-learn classifiers read the raw pixels (/ 255,
flattened; both images side by side for "compare") plus a one-hot of the question's slots (colour: the shape asked
about; position: the two objects' colour and shape and the axis), and predict the reference answer. They train on
`train_prompts` and are scored on the task's own `eval_prompts` (unseen scenes, held-out digits). This is not a
test: it checks that a small model can read the answers from the pixels at this resolution, before a vision tower
is trained from scratch on them (docs/MULTIMODAL.md, "Built-in image task", has the numbers).

    majority   the most common training answer (what the question alone gives)
    logistic   multinomial logistic regression
    mlp        one hidden layer of 256 ReLU units, Adam, early stopping on 10% of the training prompts
    vit        a tower of the multimodal config's shape (patch 4 -> 16 tokens an image, width 64, 2 pre-norm
               blocks of 4 heads, MLP 128), trained from scratch in JAX: a query token (a linear map of the
               slots' one-hot) leads the image tokens and a linear head reads it; Adam 1e-3 with a cosine decay,
               batch 128, `--vit-steps` steps. Pixels normalised as data/images.load_image does ([-1, 1]).

All on CPU; `--no-vit` skips the JAX model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU probe: no accelerator look-up

import numpy as np  # noqa: E402

from instruct_jax.instructgpt.image_task import (COLOURS, KINDS, RELATIONS, SHAPES, ImageTask,  # noqa: E402
                                                 ImageTaskPrompt)


def _one_hot(value: str, options) -> list[float]:
    return [float(value == o) for o in options]


def slots(p: ImageTaskPrompt) -> np.ndarray:
    """The question's slots one-hot: colour -> the shape asked about; position -> a's and b's colour and shape, the
    axis; other kinds ask one fixed question (empty)."""
    out: list[float] = []
    params = p.spec.params
    if p.spec.kind == "colour":
        out = _one_hot(params["shape"], SHAPES)
    if p.spec.kind == "position":
        for ref in (params["a"], params["b"]):
            colour, shape = ref.split()
            out += _one_hot(colour, COLOURS) + _one_hot(shape, SHAPES)
        out += _one_hot(params["axis"], RELATIONS)
    return np.asarray(out, np.float32)


def features(p: ImageTaskPrompt) -> np.ndarray:
    """Pixels in [0, 1] (every image's, flattened), then the slots."""
    return np.concatenate([np.concatenate([im.reshape(-1) for im in p.images]) / 255.0, slots(p)]).astype(np.float32)


def vit_accuracy(train: list[ImageTaskPrompt], test: list[ImageTaskPrompt], labels: list[str], steps: int,
                 seed: int) -> float:
    """Eval accuracy of the tower-shaped classifier (module docstring) trained on `train` for `steps` steps."""
    import jax
    import jax.numpy as jnp
    import optax

    d, heads, layers, mlp, patch = 64, 4, 2, 128, 4

    def arrays(prompts):
        images = np.stack([np.stack(p.images) for p in prompts]).astype(np.float32) / 127.5 - 1.0  # [N, M, H, W, C]
        n, m, h, w, c = images.shape
        patches = images.reshape(n, m, h // patch, patch, w // patch, patch, c).transpose(0, 1, 2, 4, 3, 5, 6)
        query = np.stack([np.append(slots(p), 1.0) for p in prompts])  # the constant 1: a plain query token
        y = np.array([labels.index(p.spec.reference) for p in prompts])
        return patches.reshape(n, m * (h // patch) * (w // patch), patch * patch * c), query, y

    (xp, xs, y), (tp, ts, ty) = arrays(train), arrays(test)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
    normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)  # noqa: E731
    params = {"patch": normal(xp.shape[-1], d), "pos": normal(xp.shape[1], d), "query": normal(xs.shape[1], d),
              "head": normal(d, len(labels)), "norm": jnp.ones(d),
              "blocks": [{"n1": jnp.ones(d), "qkv": normal(d, 3 * d), "o": normal(d, d), "n2": jnp.ones(d),
                          "fc1": normal(d, mlp), "fc2": normal(mlp, d)} for _ in range(layers)]}

    def norm(x, scale):
        return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6) * scale

    def logits(params, patches, slots):
        x = jnp.concatenate([(slots @ params["query"])[:, None], patches @ params["patch"] + params["pos"]], 1)
        for b in params["blocks"]:
            q, k, v = jnp.split(norm(x, b["n1"]) @ b["qkv"], 3, -1)  # [B, T, D] each
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d // heads) for t in (q, k, v))
            att = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(d // heads), -1)
            x = x + jnp.einsum("BNTS,BSNH->BTNH", att, v).reshape(x.shape) @ b["o"]
            x = x + jax.nn.gelu(norm(x, b["n2"]) @ b["fc1"]) @ b["fc2"]
        return norm(x[:, 0], params["norm"]) @ params["head"]

    opt = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
    state = opt.init(params)

    @jax.jit
    def step(params, state, patches, slots, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, patches, slots), y).mean()  # noqa
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(len(y), size=128)
        params, state = step(params, state, xp[i], xs[i], y[i])
    predicted = np.asarray(jax.jit(logits)(params, tp, ts)).argmax(-1)
    return float(np.mean(predicted == ty))


def probe(kind: str, seed: int, n_train: int, vit_steps: int, sklearn: bool = True) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    task = ImageTask(seed, num_eval=480, kinds=(kind,))
    train, test = task.train_prompts(n_train), task.eval_prompts()
    x_train, x_test = np.stack([features(p) for p in train]), np.stack([features(p) for p in test])
    y_train, y_test = [p.spec.reference for p in train], np.array([p.spec.reference for p in test])
    majority = Counter(y_train).most_common(1)[0][0]
    out = {"train": len(train), "eval": len(test), "answers": len(set(y_train)),
           "majority": float(np.mean(y_test == majority))}
    models = {} if not sklearn else {
        "logistic": LogisticRegression(max_iter=2000, C=1.0),
        "mlp": MLPClassifier((256,), early_stopping=True, max_iter=400, random_state=seed)}
    for name, model in models.items():
        start = time.perf_counter()
        model.fit(x_train, y_train)
        out[name] = float(np.mean(model.predict(x_test) == y_test))
        out[f"{name}_s"] = round(time.perf_counter() - start, 1)
    if vit_steps:
        start = time.perf_counter()
        out["vit"] = vit_accuracy(train, test, sorted(set(y_train) | set(y_test)), vit_steps, seed)
        out["vit_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000, help="training prompts per kind")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--vit-steps", type=int, default=3000, help="training steps of the tower-shaped model")
    ap.add_argument("--no-vit", action="store_true", help="skip the JAX model")
    ap.add_argument("--no-sklearn", action="store_true", help="skip the logistic regression and the MLP")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    steps = 0 if args.no_vit else args.vit_steps
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "train_per_kind": args.train, "eval_per_kind": 480, "vit_steps": steps, "by_seed": {}}
    columns = ["majority"] + ([] if args.no_sklearn else ["logistic", "mlp"]) + (["vit"] if steps else [])
    print(f"{'seed':>4} {'kind':>9} {'answers':>7} " + " ".join(f"{c:>8}" for c in columns) + "  (eval accuracy)")
    for seed in args.seeds:
        results["by_seed"][seed] = {}
        for kind in args.kinds:
            r = probe(kind, seed, args.train, steps, not args.no_sklearn)
            results["by_seed"][seed][kind] = r
            seconds = ", ".join(f"{c} {r[c + '_s']} s" for c in columns[1:])
            print(f"{seed:>4} {kind:>9} {r['answers']:>7} " + " ".join(f"{r[c]:>8.3f}" for c in columns)
                  + f"  ({seconds})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
