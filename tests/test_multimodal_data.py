"""Images as data through training (issue 29, items 2 and 3 in part): the chat template's marker expansion with no
loss on image tokens, rows read with their images and checked at preparation (mismatches named, or counted skips),
fixed-shape image slots in packed, prompt and ranking rows, and SFT on image + text rows learning what only the
images tell."""

import json

import numpy as np
import pytest

from instruct_jax.data.build import load_data, make_loader
from instruct_jax.data.chat import BuiltinChatTemplate
from instruct_jax.data.config import DataConfig
from instruct_jax.data.images import ImageLayout, load_image
from instruct_jax.data.packing import greedy_pack
from instruct_jax.data.stats import MalformedDataError
from instruct_jax.data.tokenizer import train_sentencepiece, load_tokenizer

IMAGE = 399  # past the tokenizer's vocabulary (300): never a text token
LAYOUT = ImageLayout(token_id=IMAGE, tokens_per_image=4, size=8, channels=3, max_images=2)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "corpus.txt"
    words = " ".join(COLOURS) + " what colour is the picture first second picture and describe it"
    text.write_text("\n".join([words] * 200))
    train_sentencepiece([str(text)], str(folder / "spm"), 300)
    return load_tokenizer(str(folder / "spm.model"))


def write_images(folder, names):
    from PIL import Image

    for name in names:
        Image.fromarray(np.full((8, 8, 3), COLOURS[name], np.uint8)).save(folder / f"{name}.png")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def conversation(question, answer, images):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": images}


def test_marker_expansion_worked_example(tokenizer):
    """Each marker becomes tokens_per_image image tokens where it stands; image tokens are never targets,
    even when an answer holds a marker; without `with_images` the marker is text."""
    plain = BuiltinChatTemplate(tokenizer)
    template = BuiltinChatTemplate(tokenizer).with_images(IMAGE, 4)
    messages = [{"role": "user", "content": "<image> what colour"}, {"role": "assistant", "content": "red <image>"}]
    ids, mask = template.render(messages)
    h = template.headers
    what, red = tokenizer.encode(" what colour"), tokenizer.encode("red ")
    expected = ([tokenizer.bos_id] + h["user"] + [IMAGE] * 4 + what + [tokenizer.eot_id] + h["assistant"] + red
                + [IMAGE] * 4 + [tokenizer.eot_id])
    assert ids == expected
    assert mask == [0] * (len(expected) - len(red) - 5) + [1] * len(red) + [0] * 4 + [1]
    assert IMAGE not in plain.render(messages)[0]


def test_rows_with_images_are_read_and_checked(tmp_path, tokenizer):
    write_images(tmp_path, ["red", "blue"])
    data = tmp_path / "rows.jsonl"
    write_rows(data, [conversation("<image> what colour", "red", ["red.png"]),
                      conversation("<image> <image> first and second", "blue and red", ["blue.png", "red.png"]),
                      conversation("what colour", "none", [])])
    cfg = DataConfig(source=str(data), format="sft", messages_field="messages", packing=True)
    got = load_data(cfg, tokenizer, seq_len=48, images=LAYOUT)
    assert [0 if e.images is None else len(e.images) for e in got.train] == [1, 2, 0]
    np.testing.assert_array_equal(got.train[1].images[0], load_image(str(tmp_path / "blue.png"), 8))
    assert all(int(np.sum(e.ids == IMAGE)) == 4 * (0 if e.images is None else len(e.images)) for e in got.train)
    assert all(not np.any(e.weights[e.ids == IMAGE]) for e in got.train)

    # a mismatch is named at preparation: file, line and both counts; or, with skip, counted
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, [conversation("<image> what colour", "red", ["red.png"]),
                     conversation("<image> <image> first and second", "blue", ["blue.png"])])
    with pytest.raises(MalformedDataError, match=r"bad.jsonl:2: .*2 image marker\(s\) '<image>' in the messages but "
                                                 r"1 image\(s\)"):
        load_data(DataConfig(source=str(bad), format="sft", messages_field="messages"), tokenizer, seq_len=48,
                  images=LAYOUT)
    skipped = load_data(DataConfig(source=str(bad), format="sft", messages_field="messages", on_malformed="skip"),
                        tokenizer, seq_len=48, images=LAYOUT)
    assert len(skipped.train) == 1 and skipped.train_stats.skipped == {"image_marker_mismatch": 1}
    missing = tmp_path / "missing.jsonl"
    write_rows(missing, [conversation("<image> what colour", "red", ["nowhere.png"])])
    with pytest.raises(MalformedDataError, match=r"missing.jsonl:1: field 'images\[0\]': cannot read the image"):
        load_data(DataConfig(source=str(missing), format="sft", messages_field="messages"), tokenizer, seq_len=48,
                  images=LAYOUT)
    # a truncation that would cut an image's tokens drops the example, counted
    cut = load_data(DataConfig(source=str(data), format="prompt", messages_field="messages", max_prompt_len=6),
                    tokenizer, seq_len=48, images=LAYOUT)
    assert cut.train_stats.dropped.get("image_tokens_cut", 0) == 2


def test_image_slots_in_rows(tmp_path, tokenizer):
    """Packed rows hold at most max_images images, in the order of their image tokens; prompt and ranking rows
    carry their prompt's images; unused slots are zero with a 0 mask."""
    assert greedy_pack([2, 2, 2], 8, counts=[1, 1, 0], count_capacity=1) == [[0, 2], [1]]
    write_images(tmp_path, ["red", "green", "blue"])
    data = tmp_path / "rows.jsonl"
    write_rows(data, [conversation("<image> what colour", c, [f"{c}.png"]) for c in COLOURS] +
               [conversation("<image> <image> first and second", "red and blue", ["red.png", "blue.png"])])
    cfg = DataConfig(source=str(data), format="sft", messages_field="messages", packing=True)
    examples = load_data(cfg, tokenizer, seq_len=64, images=LAYOUT).train
    loader = make_loader(examples, cfg, tokenizer, global_batch_size=3, seq_len=64, seed=0, images=LAYOUT)
    for step in range(3):
        batch = loader.global_batch(step)
        assert batch["images"].shape == (3, 2, 8, 8, 3) and batch["image_mask"].shape == (3, 2)
        for row in range(3):
            used = int(batch["image_mask"][row].sum())
            assert int(np.sum(batch["tokens"][row] == IMAGE)) == 4 * used  # every image's tokens, whole
            assert not batch["images"][row, used:].any()
            assert not np.any(batch["loss_mask"][row][batch["targets"][row] == IMAGE])
            # the k-th image token block's image is the k-th slot: check colours by the answer tokens
    ranking = tmp_path / "ranking.jsonl"
    write_rows(ranking, [{"prompt": "<image> what colour", "responses": ["red", "blue"], "ranks": [1, 2],
                          "images": ["red.png"]}])
    rcfg = DataConfig(source=str(ranking), format="ranking")
    rows = make_loader(load_data(rcfg, tokenizer, seq_len=32, images=LAYOUT).train, rcfg, tokenizer,
                       global_batch_size=1, seq_len=32, seed=0, images=LAYOUT).global_batch(0)
    assert rows["images"].shape == (1, 2, 2, 8, 8, 3) and rows["image_mask"].tolist() == [[[1, 0], [1, 0]]]
    np.testing.assert_array_equal(rows["images"][0, 1, 0], load_image(str(tmp_path / "red.png"), 8))


def colour_rows(n, seed):
    """n rows "<image> what colour is picture i" -> the picture's colour (one of three, drawn from the seed): only
    the image tells the answer (the prompts differ by a number only: held-out rows are picked by prompt)."""
    rng = np.random.default_rng(seed)
    names = [list(COLOURS)[i] for i in rng.integers(0, 3, n)]
    return [conversation(f"<image> what colour is picture {i}", c, [f"{c}.png"]) for i, c in enumerate(names)]


def colour_pairs(n, seed):
    """n pairs on the same prompts: the picture's colour beats another colour."""
    rng, names, rows = np.random.default_rng(seed), list(COLOURS), []
    for i in range(n):
        right, wrong = (names[j] for j in rng.permutation(3)[:2])
        flip = bool(rng.integers(2))
        rows.append({"prompt": f"<image> what colour is picture {i}", "ranks": [2, 1] if flip else [1, 2],
                     "responses": [wrong, right] if flip else [right, wrong], "images": [f"{right}.png"]})
    return rows


def vision_config(tokenizer, data: DataConfig, steps: int, prefix_lm: bool = False, **train):
    from instruct_jax.config import CheckpointConfig, Config, LoggingConfig, OptimConfig, TrainConfig, validate
    from instruct_jax.model.config import ModelConfig, VisionConfig
    from instruct_jax.parallel.mesh import MeshConfig

    vision = VisionConfig(image_size=8, patch_size=4, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                          max_images=1, image_token_id=IMAGE, prefix_lm=prefix_lm)
    cfg = Config(
        model=ModelConfig(vocab_size=400, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                          mlp_dim=64, max_seq_len=32, vision=vision),
        mesh=MeshConfig(data=2, fsdp=-1),
        data=data,
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2, decay="constant", weight_decay=0.0),
        train=TrainConfig(steps=steps, global_batch_size=16, seq_len=32, eval_every=0, **train),
        checkpoint=CheckpointConfig(every_steps=0, keep=1, async_save=False),
        logging=LoggingConfig(log_every=10, tensorboard=False, progress_bar=False))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory, tokenizer):
    """SFT and a reward model trained with images on the colour task, through the real phases (8 devices)."""
    from instruct_jax.train.lm.trainer import run_lm
    from instruct_jax.train.rm.trainer import run_rm

    folder = tmp_path_factory.mktemp("colours")
    write_images(folder, list(COLOURS))
    write_rows(folder / "sft.jsonl", colour_rows(96, 0))
    write_rows(folder / "pairs.jsonl", colour_pairs(240, 1))
    write_rows(folder / "prompts.jsonl", [{"prompt": r["messages"][0]["content"], "images": r["images"]}
                                          for r in colour_rows(64, 2)])
    sft = vision_config(tokenizer, DataConfig(source=str(folder / "sft.jsonl"), format="sft", messages_field="messages",
                                              tokenizer=tokenizer.path, packing=False, prefetch=0), 40)
    sft_result = run_lm(sft, str(folder / "sft"), phase="sft")
    # the reward model (and PPO after it) with the prompt as a bidirectional prefix: the prefix flags go through
    # the ranking batches, the normalisation, the rollouts and the experience
    rm = vision_config(tokenizer, DataConfig(source=str(folder / "pairs.jsonl"), format="ranking",
                                             tokenizer=tokenizer.path, eval_fraction=0.2, prefetch=0), 80,
                       prefix_lm=True)
    rm_result = run_rm(rm, str(folder / "rm"))
    return {"folder": folder, "sft": sft, "sft_result": sft_result, "rm_result": rm_result}


def test_sft_with_images_learns_what_only_the_images_tell(colour_runs, tokenizer):
    """SFT on image + text rows: the answer depends only on the image, so a model that ignored it could not
    beat 1/3. The exported policy, decoding with its images in the prefill, names every colour; with the images
    swapped it follows them."""
    import jax
    import jax.numpy as jnp

    from instruct_jax.checkpoint import load_params, resolve_params_dir
    from instruct_jax.inference.sampling import SamplingConfig, make_sampler
    from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
    from instruct_jax.parallel.sharding import unbox

    assert colour_runs["sft_result"]["loss"] < 0.2, colour_runs["sft_result"]  # guessing: ~log 3 / 3 = 0.37
    folder, cfg = colour_runs["folder"], colour_runs["sft"]
    model = Transformer(cfg.model)
    abstract = jax.eval_shape(lambda: unbox(init_params_boxed(model, jax.random.PRNGKey(0))))
    params = load_params(resolve_params_dir(str(folder / "sft")), abstract)
    template = BuiltinChatTemplate(tokenizer).with_images(IMAGE, cfg.model.vision.tokens_per_image)
    prompt = template.render_prompt([{"role": "user", "content": "<image> what colour is picture 7"}])
    names = list(COLOURS)
    pixels = np.stack([load_image(str(folder / f"{c}.png"), 8) for c in names])[:, None]  # [3, 1, 8, 8, 3]
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=4, temperature=0.0, stop_tokens=(tokenizer.eot_id,),
                                                 pad_id=tokenizer.pad_id))

    def answers(images):
        tokens = jnp.asarray([prompt] * 3, jnp.int32)
        inputs = ModelInput.left_padded(tokens, jnp.full((3,), len(prompt))).replace(images=jnp.asarray(images))
        out = sampler.sample(params, inputs, jax.random.PRNGKey(0))
        return [tokenizer.decode([int(t) for t in row[:n] if t != tokenizer.eot_id]).strip()
                for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]

    assert answers(pixels) == names
    assert answers(pixels[[1, 2, 0]]) == [names[1], names[2], names[0]]


def test_reward_model_with_images_ranks_by_what_the_image_shows(colour_runs):
    """The reward model on pairs whose prompt text says nothing: which answer is best depends only on the image.
    Held-out accuracy (after normalisation on the best-ranked answers with their images) is far above the 0.5
    that text alone allows."""
    assert colour_runs["rm_result"]["eval_accuracy"] > 0.8, colour_runs["rm_result"]


def test_ppo_with_images(colour_runs, tokenizer):
    """PPO from the SFT policy against the reward model, on prompts with images (and, as the reward model, the
    prompt as a prefix-LM prefix): rollouts encode the images in the prefill, the experience step's recomputed log-probs (a full forward over prompt + response with the same
    images) match the sampler's, and the reward model scores with the images (its scores of the SFT policy's
    right answers are high)."""
    import json as _json

    from instruct_jax.config import PPOConfig
    from instruct_jax.rl.ppo.trainer import run_ppo

    folder = colour_runs["folder"]
    cfg = vision_config(tokenizer, DataConfig(source=str(folder / "prompts.jsonl"), format="prompt",
                                              tokenizer=tokenizer.path, max_prompt_len=24, prefetch=0), 3,
                        prefix_lm=True, init_from=str(folder / "sft"))
    cfg.ppo = PPOConfig(reward="model", reward_model=str(folder / "rm"), response_len=4, temperature=1.0,
                        kl_coef=0.05, epochs=1, minibatches=1, log_samples=0)
    cfg.optim.learning_rate = 1e-4
    run_ppo(cfg, str(folder / "ppo"))
    rows = [_json.loads(line) for line in open(folder / "ppo" / "metrics.jsonl")]
    mismatch = [r["logprob_mismatch_max"] for r in rows if "logprob_mismatch_max" in r]
    assert mismatch and max(mismatch) < 1e-4, rows


def test_prefix_flags_and_an_sft_step_with_them(tmp_path, tokenizer):
    """vision.prefix_lm: each example's prompt (inputs before its first target) is flagged, packed examples each
    their own; prompt rows are all prefix where real; an SFT run takes the flags through its sharded step."""
    from instruct_jax.data.examples import LMExample
    from instruct_jax.data.packing import pack_lm_row, prefix_flags, prompt_row
    from instruct_jax.data.examples import PromptExample
    from instruct_jax.train.lm.trainer import run_lm

    a = LMExample(np.array([1, 5, 6, 7]), np.array([0, 0, 1, 1], np.float32))
    b = LMExample(np.array([1, 8, 9]), np.array([0, 1, 1], np.float32))
    c = LMExample(np.array([1, 4, 5, 6, 2]), np.array([0, 0, 0, 1, 1], np.float32))
    assert prefix_flags(pack_lm_row([a, b, c], 12, 0)).tolist() == [1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert prefix_flags(prompt_row(PromptExample(np.array([1, 5, 6])), 5, 0)).tolist() == [0, 0, 1, 1, 1]

    write_images(tmp_path, list(COLOURS))
    write_rows(tmp_path / "sft.jsonl", colour_rows(32, 3))
    cfg = vision_config(tokenizer, DataConfig(source=str(tmp_path / "sft.jsonl"), format="sft",
                                              messages_field="messages", tokenizer=tokenizer.path, prefetch=0), 3,
                        prefix_lm=True)
    assert np.isfinite(run_lm(cfg, str(tmp_path / "run"), phase="sft")["loss"])
