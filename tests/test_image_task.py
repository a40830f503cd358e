"""The built-in image task (instruct_jax/instructgpt/image_task.py): rendering, splits, phrasings and its gold judge."""

import json

import numpy as np
import pytest

from instruct_jax.data.formats import Ranking
from instruct_jax.data.images import IMAGE_MARKER, check_image_markers, count_markers, load_image
from instruct_jax.instructgpt.gold import Labeler
from instruct_jax.instructgpt.image_task import (CELL_NAMES, COLOURS, DEFAULT_KINDS, IMAGE_SIZE, IMAGE_TOKENS, KINDS,
                                                 NUM_DIGITS, PATCH_SIZE, SHAPES, SIZES, TEMPLATES, ImageGoldJudge,
                                                 ImageTask, ImageTaskPrompt, ImageTaskSpec, blank_images, caption,
                                                 digit_label, make_prompt, near_miss, parse_scene, question_text,
                                                 render_image, render_scene, sample_response, shape_mask,
                                                 shuffle_images, wrong_answer)
from instruct_jax.instructgpt.task import ONES


@pytest.fixture(scope="module")
def task():
    return ImageTask(0, num_eval=240, kinds=KINDS)


def all_prompts(task, n=300):
    return task.eval_prompts() + task.train_prompts(n) + task.sft_prompts(n)


# ----------------------------------------------------------------------------- pictures
def test_shape_masks_at_small_size():
    rows = lambda mask: ["".join("X" if v else "." for v in row) for row in mask]  # noqa: E731
    assert rows(shape_mask("square", 4)) == ["XXXX"] * 4
    assert rows(shape_mask("cross", 4)) == [".XX.", "XXXX", "XXXX", ".XX."]
    assert rows(shape_mask("triangle", 4)) == [".XX.", ".XX.", "XXXX", "XXXX"]
    assert rows(shape_mask("triangle", 7))[0] == "...X..." and rows(shape_mask("cross", 7))[0] == "..XXX.."
    # every large shape has more pixels (and a larger extent) than every small one: "largest" is unambiguous
    assert min(shape_mask(s, SIZES["large"]).sum() for s in SHAPES) > max(shape_mask(s, SIZES["small"]).sum()
                                                                         for s in SHAPES)


def test_render_scene_draws_each_object_where_its_spec_says():
    objects = [{"shape": "square", "colour": "red", "size": "large", "cell": [0, 1], "at": [1, 9]},
               {"shape": "cross", "colour": "blue", "size": "small", "cell": [1, 0], "at": [12, 2]}]
    image = render_scene(objects)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    red, blue = np.all(image == COLOURS["red"], -1), np.all(image == COLOURS["blue"], -1)
    expected_red = np.zeros((16, 16), bool)
    expected_red[1:8, 9:16] = True
    assert np.array_equal(red, expected_red)
    assert np.array_equal(np.argwhere(blue), [[12, 3], [12, 4], [13, 2], [13, 3], [13, 4], [13, 5], [14, 2], [14, 3],
                                              [14, 4], [14, 5], [15, 3], [15, 4]])
    assert not image[~(red | blue)].any()  # black elsewhere
    assert np.array_equal(render_scene(objects, size=32), image.repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="does not fit"):
        render_scene([dict(objects[0], at=[10, 10])])


def test_pixels_determine_every_scene_and_its_answer(task):
    """parse_scene reads each scene back from its pixels; the answer re-derived from what it reads is the reference."""
    def answer(spec, scenes):
        objs = scenes[0]
        if spec.kind == "count":
            return ONES[len(objs)]
        if spec.kind == "colour":
            (colour,) = [o["colour"] for o in objs if o["shape"] == spec.params["shape"]]
            return colour
        if spec.kind == "position":
            (a,), (b,) = ([o for o in objs if f"{o['colour']} {o['shape']}" == spec.params[k]] for k in "ab")
            i = 1 if spec.params["axis"] == "horizontal" else 0
            assert a["cell"][i] != b["cell"][i]
            return (("left", "right") if i else ("above", "below"))[a["cell"][i] > b["cell"][i]]
        if spec.kind == "largest":
            (big,) = [o for o in objs if o["size"] == "large"]
            return f"the {big['colour']} {big['shape']}"
        if spec.kind == "compare":
            assert len(scenes[0]) != len(scenes[1])
            return "first" if len(scenes[0]) > len(scenes[1]) else "second"
        raise AssertionError(spec.kind)

    checked = 0
    for p in all_prompts(task, 400):
        if p.spec.kind == "digit":
            continue
        scenes = [parse_scene(im) for im in p.images]
        assert scenes == [d["objects"] for d in p.spec.params["images"]]
        assert answer(p.spec, scenes) == p.spec.reference, p.spec
        checked += 1
    assert checked > 800
    # a cell's objects never touch another cell's: row and column 8 are empty in every scene
    for p in task.train_prompts(200):
        for im in p.images:
            if p.spec.kind != "digit":
                assert not im[8].any() and not im[:, 8].any()


def test_digits_are_sklearns_upscaled():
    from sklearn.datasets import load_digits

    data = load_digits()
    assert len(data.target) == NUM_DIGITS
    for i in (0, 17, 1796):
        image = render_image({"digit": i})
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert np.array_equal(image[::2, ::2, 0], np.round(data.images[i] * 255 / 16).astype(np.uint8))
        assert np.array_equal(image[1::2, 1::2], image[::2, ::2]) and np.array_equal(image[..., 0], image[..., 2])
        assert digit_label(i) == data.target[i]
    assert caption({"digit": 17}) == f"the digit {ONES[data.target[17]]}"


def test_caption_describes_every_object_in_cell_order():
    scene = {"objects": [{"shape": "cross", "colour": "blue", "size": "small", "cell": [1, 1], "at": [12, 12]},
                         {"shape": "square", "colour": "red", "size": "large", "cell": [0, 0], "at": [0, 0]}]}
    assert caption(scene) == ("two shapes: a large red square at the top left and a small blue cross at the bottom "
                              "right")
    assert caption({"objects": scene["objects"][:1]}) == "one shape: a small blue cross at the bottom right"
    assert len(CELL_NAMES) == 4


# ----------------------------------------------------------------------------- prompts and splits
def test_same_seed_same_prompts_and_images():
    a, b, c = ImageTask(3, num_eval=60), ImageTask(3, num_eval=60), ImageTask(4, num_eval=60)
    rows = lambda t: [p.to_row() for p in t.eval_prompts()]  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert all(np.array_equal(x, y) for p, q in zip(a.eval_prompts(), b.eval_prompts())
               for x, y in zip(p.images, q.images))
    assert [p.to_row() for p in a.train_prompts(40)] == [p.to_row() for p in b.train_prompts(40)]
    demos_a, demos_b = a.caption_demos(20), b.caption_demos(20)
    assert [m for m, _ in demos_a] == [m for m, _ in demos_b]
    # asking for more of one split changes no other split
    fresh = ImageTask(3, num_eval=60)
    fresh.train_prompts(500)
    assert rows(fresh) == rows(a)
    assert [p.to_row() for p in fresh.sft_prompts(30)] == [p.to_row() for p in b.sft_prompts(30)]


def test_eval_images_never_in_train_sft_or_captions(task):
    assert set(task.eval_digits).isdisjoint(task.train_digits)
    assert len(task.eval_digits) + len(task.train_digits) == NUM_DIGITS
    eval_keys = {k for p in task.eval_prompts() for k in p.spec.image_keys()}
    eval_pixels = {im.tobytes() for p in task.eval_prompts() for im in p.images}
    for p in task.train_prompts(1000) + task.sft_prompts(1000):
        assert eval_keys.isdisjoint(p.spec.image_keys())
        for d in p.spec.params["images"]:
            assert "digit" not in d or d["digit"] in set(task.train_digits)
    for p in task.eval_prompts():
        for d in p.spec.params["images"]:
            assert "digit" not in d or d["digit"] in set(task.eval_digits)
    assert all(im.tobytes() not in eval_pixels for _, images in task.caption_demos(1000) for im in images)
    assert len({p.spec.key() for p in task.eval_prompts()}) == len(task.eval_prompts())  # no repeated question


def test_held_out_phrasings_only_in_eval(task):
    for kind, (train, held) in TEMPLATES.items():
        assert len(train) >= 3 and len(held) >= 2 and not set(train) & set(held)
        assert all(t.count(IMAGE_MARKER) == (2 if kind == "compare" else 1) for t in train + held)
    evals = task.eval_prompts()
    assert sum(p.spec.held_out for p in evals) == round(0.4 * len(evals))
    assert {p.spec.kind for p in evals if p.spec.held_out} == set(KINDS)
    held_texts = set()
    for p in evals:
        for t in range(len(TEMPLATES[p.spec.kind][1])):
            held_texts.add(question_text(ImageTaskSpec(p.spec.kind, p.spec.params, "", t, True)))
    for p in task.train_prompts(600) + task.sft_prompts(600):
        assert not p.spec.held_out and p.text == question_text(p.spec)
        for t in range(len(TEMPLATES[p.spec.kind][1])):
            assert p.text != question_text(ImageTaskSpec(p.spec.kind, p.spec.params, "", t, True))
    assert all(m[0]["content"] not in held_texts for m, _ in task.sft_demos(300))


def test_markers_match_images_and_fit_sixteen_tokens(task):
    assert IMAGE_TOKENS == (IMAGE_SIZE // PATCH_SIZE) ** 2 == 16
    assert ImageTask(0, num_eval=10).max_images == 1 and task.max_images == 2
    assert set(ImageTask(0, num_eval=10).kinds) == set(DEFAULT_KINDS) and "compare" not in DEFAULT_KINDS
    for p in all_prompts(task):
        images = p.images
        assert count_markers(p.messages) == len(images) == (2 if p.spec.kind == "compare" else 1)
        check_image_markers(p.messages, images, "image_task", task.max_images)
        assert all(im.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and im.dtype == np.uint8 for im in images)
    for messages, images in task.sft_demos(50) + task.caption_demos(50):
        assert [m["role"] for m in messages] == ["user", "assistant"]
        check_image_markers(messages, images, "demo", task.max_images)


def test_kind_mix_and_answers(task):
    evals = task.eval_prompts()
    assert {p.spec.kind for p in evals} == set(KINDS) and len(evals) == 240
    for kind in KINDS:
        answers = {p.spec.reference for p in task.train_prompts(600) if p.spec.kind == kind}
        expected = {"count": 4, "colour": 4, "position": 4, "largest": 12, "digit": 10, "compare": 2}[kind]
        assert len(answers) == expected, (kind, answers)
    with pytest.raises(ValueError, match="kinds"):
        ImageTask(0, kinds=("count", "nope"))


def test_rows_round_trip_and_carry_loadable_images(task, tmp_path):
    for p in task.eval_prompts()[:12]:
        row = json.loads(json.dumps(p.to_row()))
        assert "images" not in row and ImageTaskPrompt.from_row(row) == p
        with_paths = p.to_row(image_dir=str(tmp_path))
        assert len(with_paths["images"]) == len(p.images)
        for path, pixels in zip(with_paths["images"], p.images):
            assert np.array_equal(load_image(path, IMAGE_SIZE), load_image(pixels, IMAGE_SIZE))


def test_sft_demos_habits(task):
    plain = task.sft_demos(80)
    assert all(m[1]["content"] == p.spec.reference for (m, _), p in zip(plain, task.sft_prompts(80)))
    habits = task.sft_demos(80, chatty=0.5, slip=0.5)
    assert [m[0] for m, _ in habits] == [m[0] for m, _ in plain]
    assert sum(a[1] != b[1] for (a, _), (b, _) in zip(habits, plain)) > 40


# ----------------------------------------------------------------------------- the judge
def spec(kind, reference, **params):
    return ImageTaskSpec(kind, {"images": [], **params}, reference, 0, False)


# (spec, response, correctness, format)
WORKED = [
    (spec("count", "three"), "three", 1.0, 1.0),
    (spec("count", "three"), "3", 1.0, 1.0),
    (spec("count", "three"), "two", 0.5 * (1 - 1 / 3), 1.0),
    (spec("count", "three"), "There are three shapes.", 1.0, 0.5),
    (spec("colour", "blue", shape="cross"), "blue", 1.0, 1.0),
    (spec("colour", "blue", shape="cross"), "blue or red", 0.5, 0.5),
    (spec("colour", "blue", shape="cross"), "red", 0.0, 0.0),
    (spec("position", "left", a="red square", b="blue cross", axis="horizontal"), "left", 1.0, 1.0),
    (spec("position", "left", a="red square", b="blue cross", axis="horizontal"), "left or right", 0.5, 0.5),
    (spec("position", "left", a="red square", b="blue cross", axis="horizontal"), "above", 0.0, 0.0),
    (spec("largest", "the blue square"), "the blue square", 1.0, 1.0),
    (spec("largest", "the blue square"), "Blue square.", 1.0, 1.0),
    (spec("largest", "the blue square"), "the blue cross", 0.5, 1.0),
    (spec("largest", "the blue square"), "the red square", 0.5, 1.0),
    (spec("largest", "the blue square"), "the blue squares", 1.0, 0.5),
    (spec("largest", "the blue square"), "the red cross", 0.0, 0.0),
    (spec("digit", "seven"), "seven", 1.0, 1.0),
    (spec("digit", "seven"), "7", 1.0, 1.0),
    (spec("digit", "seven"), "It is a seven or a one.", 0.5, 0.5),
    (spec("digit", "seven"), "one", 0.0, 0.0),
    (spec("compare", "first"), "the first", 1.0, 1.0),
    (spec("compare", "first"), "the first or the second", 0.5, 0.5),
    (spec("compare", "first"), "  ", 0.0, 0.0),
]


@pytest.mark.parametrize("s,response,correctness,fmt", WORKED)
def test_judge_worked_examples(s, response, correctness, fmt):
    score = ImageGoldJudge().score(s, response)
    assert score.correctness == pytest.approx(correctness) and score.format == fmt
    if correctness:
        assert score.total == pytest.approx(0.6 * correctness + 0.25 * fmt + 0.15 * score.verbosity)
    else:
        assert score.total == 0


def test_judge_reference_beats_near_misses_for_every_kind(task):
    judge, rng = ImageGoldJudge(), np.random.default_rng(0)
    seen = set()
    for p in all_prompts(task):
        ref = judge.score(p.spec, p.spec.reference)
        assert (ref.correctness, ref.format, ref.verbosity, ref.total) == (1, 1, 1, 1), p.spec
        near, wrong = near_miss(p.spec, rng), wrong_answer(p.spec, rng)
        assert 0 < judge.score(p.spec, near).total < 1, (p.spec.reference, near)
        assert judge.score(p.spec, wrong).total < judge.score(p.spec, near).total, (p.spec.reference, wrong, near)
        chatty = f"I looked at the picture carefully and I think that the answer is {p.spec.reference} for sure."
        assert judge.score(p.spec, chatty).verbosity < 1 and judge.score(p.spec, chatty).total < 1
        seen.add(p.spec.kind)
    assert seen == set(KINDS)
    responses = [sample_response(p.spec, rng) for p in task.eval_prompts() for _ in range(3)]
    again = ImageGoldJudge()
    assert [judge.score(p.spec, r) for p, r in zip(np.repeat(task.eval_prompts(), 3), responses)] == \
           [again.score(p.spec, r) for p, r in zip(np.repeat(task.eval_prompts(), 3), responses)]


def test_labeler_ranks_image_prompts(task):
    judge = ImageGoldJudge()
    labeler, rng = Labeler(judge, temperature=0.0, flip_rate=0.0, seed=0), np.random.default_rng(1)
    p = next(p for p in task.eval_prompts() if p.spec.kind == "largest")
    responses = [p.spec.reference, near_miss(p.spec, rng), wrong_answer(p.spec, rng), "I do not know."]
    ranking = labeler.rank(p, responses)
    assert isinstance(ranking, Ranking) and ranking.ranks[0] == 1 and ranking.ranks[1] == 2
    assert ranking.ranks[2] == ranking.ranks[3] == 3  # both score 0: a gold tie
    assert np.array_equal(judge.totals(p.spec, responses), labeler.last_totals)
    assert labeler.report()["judge_calls"] == judge.calls == 8
    assert make_prompt("digit", rng).spec.kind == "digit"


# ----------------------------------------------------------------------------- ablation images
def test_blank_images_keep_shapes():
    p = make_prompt("compare", np.random.default_rng(0))
    blank = blank_images(p)
    assert [b.shape for b in blank] == [im.shape for im in p.images] and not any(b.any() for b in blank)
    assert all((b == 128).all() for b in blank_images(p, value=128))


def test_shuffle_images_is_a_deterministic_derangement(task):
    prompts = task.eval_prompts()
    shuffled = shuffle_images(prompts, seed=0)
    assert len(shuffled) == len(prompts)
    own = [b"".join(im.tobytes() for im in p.images) for p in prompts]
    got = [b"".join(im.tobytes() for im in images) for images in shuffled]
    assert all(g in set(own) for g in got)  # every prompt shows some prompt's images ...
    assert sum(g == o for g, o in zip(got, own)) == 0  # ... never its own (eval images are all distinct per prompt)
    assert sorted(got) == sorted(own)  # a permutation: every prompt's images are shown once
    assert all(len(images) == len(p.images) for images, p in zip(shuffled, prompts))
    assert all(np.array_equal(x, y) for a, b in zip(shuffled, shuffle_images(prompts, seed=0)) for x, y in zip(a, b))
    assert got != [b"".join(im.tobytes() for im in images) for images in shuffle_images(prompts, seed=1)]
    with pytest.raises(ValueError, match="nothing to swap"):
        shuffle_images(prompts[:1])
