"""The InstructGPT recipe on image + text prompts (issue 29, item 4): the built-in image task end to end.

    python -m instruct_jax pipeline --experiment experiments/tiny_multimodal_cpu.py --workdir runs/mm

`pipeline.task = "images"` runs these stages (each in <workdir>/<stage>/, finished when DONE.json exists; re-running
resumes, `--stage NAME` runs one), with the text pipeline's stage configs (pipeline.py `stage_config`) and trainers:

    task      the image task from `seed` (instructgpt/image_task.py): PNG files under task/images/, caption
              conversations, demonstrations, label / PPO / evaluation prompts (rows with "images"); the tokenizer
    pretrain  the captioning stage a tower trained from scratch needs: SFT from random weights on "<image>
              Describe the picture." -> the full caption (pipeline.pretrain's budget); it aligns the tower and
              projector with words, and is the "base model" of the report
    sft       supervised fine-tuning on the demonstrations (questions about scenes and digits), from the base
    label     K samples per training prompt from the SFT policy (with its images), ranked by the labeler on the
              image gold judge's totals
    rm        the reward model on those rankings (each read with its images), from the SFT model
    ppo       PPO against the reward model, from the SFT policy, on prompts with images
    eval      base, SFT and PPO decoded greedily on the held-out prompts with their images and scored by the gold
              judge: win rates (SFT vs base, PPO vs SFT) with bootstrap CIs, and the image ablation: each trained
              policy decoded again with blank and with shuffled images, the gold drop and its CI

The report (report.json / report.md in the workdir) has the text pipeline's win-rate form plus `image_ablation`:
policy -> gold mean with real, blank and shuffled images and the per-prompt drop (real - other) with its CI.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from instruct_jax.config import Config, save_config
from instruct_jax.data.images import IMAGE_MARKER, ImageLayout, load_image
from instruct_jax.errors import ConfigError
from instruct_jax.instructgpt.gold import Labeler
from instruct_jax.instructgpt.image_task import (KINDS, ImageGoldJudge, ImageTask, ImageTaskPrompt, blank_images,
                                                 image_key, shuffle_images, write_png)
from instruct_jax.instructgpt.pipeline import (Paths, _write_jsonl, is_done, prompt_len, read_done, read_jsonl,
                                               record_stage, stage_train)
from instruct_jax.instructgpt.statistics import head_to_head, mean_with_ci
from instruct_jax.metrics import log

STAGES = ("task", "pretrain", "sft", "label", "rm", "ppo", "eval")
POLICIES = ("base", "sft", "ppo")  # the report's policies: base = the captioning stage's model
_NEEDS = {"pretrain": ("task",), "sft": ("task", "pretrain"), "label": ("task", "sft"), "rm": ("task", "label", "sft"),
          "ppo": ("task", "sft", "rm"), "eval": ("task", "pretrain", "sft", "ppo")}


def validate_image_pipeline(cfg: Config) -> None:
    """The image task's own checks (pipeline.py's `validate_pipeline` runs first); ConfigError names the field."""
    p, v = cfg.pipeline, cfg.model.vision
    if not v.enabled:
        raise ConfigError("model.vision.image_size", "pipeline.task='images' needs a vision tower (image_size > 0)")
    if p.caption_demos <= 0:
        raise ConfigError("pipeline.caption_demos", f"must be > 0, got {p.caption_demos}")
    if any(k not in KINDS for k in p.kinds):
        raise ConfigError("pipeline.kinds", f"expected image kinds from {list(KINDS)}, got {list(p.kinds)}")
    needed = 2 if "compare" in p.kinds else 1
    if v.max_images < needed:
        raise ConfigError("model.vision.max_images", f"the kinds {list(p.kinds)} show {needed} image(s) per prompt, "
                          f"got {v.max_images}")
    if v.image_token_id < cfg.data.vocab_size:
        raise ConfigError("model.vision.image_token_id", f"must be an id the task's tokenizer never produces "
                          f"(>= data.vocab_size={cfg.data.vocab_size}), got {v.image_token_id}")


# ----------------------------------------------------------------------------- data files
def _image_paths(images: Sequence[np.ndarray], descriptions: Sequence[dict], folder: str) -> list[str]:
    """PNG files for the images (named by their description, written once), relative to the task folder."""
    import hashlib

    paths = []
    for desc, pixels in zip(descriptions, images):
        name = os.path.join("images", hashlib.sha1(image_key(desc).encode()).hexdigest()[:16] + ".png")
        if not os.path.exists(os.path.join(folder, name)):
            write_png(os.path.join(folder, name), pixels)
        paths.append(name)
    return paths


def prompt_row(prompt: ImageTaskPrompt, folder: str) -> dict:
    """A prompt row ("prompt", "spec", "images" relative to the task folder)."""
    return {**prompt.to_row(), "images": _image_paths(prompt.images, prompt.spec.params["images"], folder)}


def stage_task(cfg: Config, paths: Paths) -> dict:
    """Write the image task's files and train the tokenizer on their text (markers left out)."""
    from instruct_jax.data.build import build_tokenizer
    from instruct_jax.data.config import DataConfig

    p = cfg.pipeline
    task = ImageTask(cfg.seed, num_eval=p.eval_prompts, held_out_fraction=p.held_out_fraction, kinds=p.kinds)
    folder = paths.stage("task")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    captions = []
    for messages, images in task.caption_demos(p.caption_demos):
        names = [f"images/caption_{len(captions)}_{i}.png" for i in range(len(images))]
        for name, pixels in zip(names, images):
            write_png(os.path.join(folder, name), pixels)
        captions.append({"messages": messages, "images": names})
    _write_jsonl(paths.file("captions.jsonl"), captions)
    sft = task.sft_prompts(p.sft_demos)
    demos = task.sft_demos(p.sft_demos, chatty=p.demo_chatty, slip=p.demo_slip)
    _write_jsonl(paths.file("demos.jsonl"), [
        {"messages": messages, "images": _image_paths(images, prompt.spec.params["images"], folder)}
        for (messages, images), prompt in zip(demos, sft)])
    train = task.train_prompts(p.label_prompts + p.ppo_prompts)
    _write_jsonl(paths.file("label_prompts.jsonl"), [prompt_row(t, folder) for t in train[:p.label_prompts]])
    _write_jsonl(paths.file("ppo_prompts.jsonl"), [prompt_row(t, folder) for t in train[p.label_prompts:]])
    _write_jsonl(paths.file("eval_prompts.jsonl"), [prompt_row(t, folder) for t in task.eval_prompts()])
    texts = paths.file("tokenizer_text.txt")
    with open(texts, "w") as f:
        for row in captions + [{"messages": m} for m, _ in demos]:
            f.write("\n".join(m["content"].replace(IMAGE_MARKER, " ") for m in row["messages"]) + "\n")
        for t in train[:1000]:
            f.write(t.text.replace(IMAGE_MARKER, " ") + "\n")
    build_tokenizer(DataConfig(format="text", tokenizer_train_files=(texts,), vocab_size=cfg.data.vocab_size),
                    folder)
    evals = task.eval_prompts()
    return {"captions": len(captions), "demos": len(demos), "label_prompts": p.label_prompts,
            "ppo_prompts": p.ppo_prompts, "eval_prompts": len(evals),
            "eval_held_out_templates": sum(t.spec.held_out for t in evals), "kinds": list(p.kinds)}


def stage_config(cfg: Config, stage: str, paths: Paths) -> Config:
    """pipeline.py's stage config with the image task's data: captions for the base stage, and every row's images."""
    from instruct_jax.instructgpt.pipeline import stage_config as text_stage_config

    c = text_stage_config(cfg, stage, paths)
    if stage == "pretrain":  # captioning from scratch, in the sft format
        c.data.source, c.data.format, c.data.messages_field = paths.file("captions.jsonl"), "sft", "messages"
        c.data.text_unit = "paragraph"
    c.ppo.ptx_coef = 0.0  # the captioning mix as PPO-ptx is not wired for images
    return c


# ----------------------------------------------------------------------------- decoding with images
def load_prompts(paths: Paths, name: str) -> tuple[list[ImageTaskPrompt], list[list[str]]]:
    rows = read_jsonl(paths.file(name))
    return [ImageTaskPrompt.from_row(r) for r in rows], [r["images"] for r in rows]


def image_slots(layout: ImageLayout, images: Sequence[Sequence], folder: str = "") -> np.ndarray:
    """[P, M, H, W, C] image slots from each prompt's images (paths relative to `folder`, or uint8 arrays)."""
    out = np.zeros((len(images),) + layout.slot_shape, np.float32)
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            source = os.path.join(folder, image) if isinstance(image, str) else image
            out[i, j] = load_image(source, layout.size, layout.channels)
    return out


def _runner(cfg: Config, paths: Paths):
    from instruct_jax.data.build import build_chat_template, build_tokenizer
    from instruct_jax.inference.runner import PolicyRunner

    c = stage_config(cfg, "ppo", paths)
    tokenizer = build_tokenizer(c.data)
    return PolicyRunner(c, tokenizer, build_chat_template(c.data, tokenizer), prompt_len(cfg),
                        batch_size=max(cfg.pipeline.ppo.global_batch_size, 64))


def stage_label(cfg: Config, paths: Paths, judge: ImageGoldJudge) -> dict:
    """K samples per label prompt from the SFT policy, with the prompt's images, ranked by the labeler."""
    p = cfg.pipeline
    runner = _runner(cfg, paths)
    params = runner.load(paths.stage("sft"))
    prompts, image_files = load_prompts(paths, "label_prompts.jsonl")
    slots = image_slots(runner.layout, image_files, paths.stage("task"))
    samples = [runner.generate(params, [t.messages for t in prompts], temperature=p.sample_temperature,
                               max_new_tokens=p.max_new_tokens, seed=cfg.seed * 1000 + k, images=slots).texts
               for k in range(p.responses_per_prompt)]
    labeler = Labeler(judge, p.labeler_temperature, p.labeler_flip_rate, p.max_comparisons, seed=cfg.seed)
    rows, empty = [], 0
    for i, prompt in enumerate(prompts):
        responses = [s[i] for s in samples]
        if any(not r.strip() for r in responses):  # an empty sample can't be shown to a labeler: counted, skipped
            empty += 1
            continue
        ranking = labeler.rank(prompt, responses)
        if ranking is None:
            continue
        rows.append({"prompt": list(ranking.prompt), "responses": list(ranking.responses), "ranks": list(ranking.ranks),
                     "images": [os.path.join("..", "task", f) for f in image_files[i]]})
    os.makedirs(paths.stage("label"), exist_ok=True)
    _write_jsonl(os.path.join(paths.stage("label"), "rankings.jsonl"), rows)
    log(f"{len(rows)} rankings of {len(prompts)} prompts; {labeler.all_tied} all-tied and {empty} with an empty "
        f"sample skipped")
    return {"rankings": len(rows), "skipped_empty_sample": empty, **labeler.report()}


def gold_totals(judge: ImageGoldJudge, prompts: Sequence[ImageTaskPrompt], texts: Sequence[str]) -> np.ndarray:
    return np.array([judge.score(t.spec, text).total for t, text in zip(prompts, texts)], float)


def stage_eval(cfg: Config, paths: Paths, judge: ImageGoldJudge) -> dict:
    """Every policy greedily on the held-out prompts with their images (and the trained ones with blank and
    shuffled images); gold totals per prompt; win rates and the ablation's drops with bootstrap CIs."""
    p = cfg.pipeline
    runner = _runner(cfg, paths)
    prompts, image_files = load_prompts(paths, "eval_prompts.jsonl")
    messages = [t.messages for t in prompts]
    real = image_slots(runner.layout, image_files, paths.stage("task"))
    ablations = {"blank": image_slots(runner.layout, [blank_images(t) for t in prompts]),
                 "shuffled": image_slots(runner.layout, shuffle_images(prompts, seed=cfg.seed))}
    decode = dict(temperature=p.decode_temperature, max_new_tokens=p.max_new_tokens, seed=cfg.seed)
    gold, texts, ablation = {}, {}, {}
    for name in POLICIES:
        params = runner.load(paths.stage({"base": "pretrain"}.get(name, name)))
        texts[name] = runner.generate(params, messages, images=real, **decode).texts
        gold[name] = gold_totals(judge, prompts, texts[name])
        if name == "base":
            continue
        ablation[name] = {"real": float(gold[name].mean())}
        for kind, images in ablations.items():
            other = gold_totals(judge, prompts, runner.generate(params, messages, images=images, **decode).texts)
            ablation[name][kind] = float(other.mean())
            ablation[name][f"drop_{kind}"] = mean_with_ci(gold[name] - other, seed=cfg.seed)
    rows = [{"prompt": t.text, "kind": t.spec.kind, "held_out": t.spec.held_out, "reference": t.spec.reference,
             **{f"{n}_text": texts[n][i] for n in POLICIES}, **{f"{n}_gold": float(gold[n][i]) for n in POLICIES}}
            for i, t in enumerate(prompts)]
    os.makedirs(paths.stage("eval"), exist_ok=True)
    _write_jsonl(os.path.join(paths.stage("eval"), "responses.jsonl"), rows)
    return {"gold": {n: mean_with_ci(gold[n], seed=cfg.seed) for n in POLICIES},
            "gold_by_kind": {n: {k: float(np.mean([g for g, t in zip(gold[n], prompts) if t.spec.kind == k]))
                                 for k in p.kinds} for n in POLICIES},
            "win_rates": {"sft_vs_base": head_to_head(gold["sft"], gold["base"], seed=cfg.seed),
                          "ppo_vs_sft": head_to_head(gold["ppo"], gold["sft"], seed=cfg.seed),
                          "ppo_vs_base": head_to_head(gold["ppo"], gold["base"], seed=cfg.seed)},
            "image_ablation": ablation, "judge_calls": judge.calls, "eval_prompts": len(prompts)}


# ----------------------------------------------------------------------------- report
def build_report(cfg: Config, results: dict) -> dict:
    ev = results["eval"]
    return {"seed": cfg.seed, "task": "images", "kinds": list(cfg.pipeline.kinds), "gold": ev["gold"],
            "gold_by_kind": ev["gold_by_kind"], "win_rates": ev["win_rates"], "image_ablation": ev["image_ablation"],
            "rm_eval_accuracy": results.get("rm", {}).get("eval_accuracy"),
            "stage_seconds": {s: results[s].get("seconds") for s in STAGES if s in results},
            "total_seconds": float(sum(results[s].get("seconds", 0.0) for s in STAGES if s in results))}


def _ci(d: dict, key: str = "win_rate") -> str:
    return f"{d[key]:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def report_markdown(report: dict) -> str:
    lines = [f"# Image + text pipeline, seed {report['seed']}", "",
             f"Kinds: {', '.join(report['kinds'])}. Greedy decoding on the held-out prompts, gold judge "
             f"(instructgpt/image_task.py). Total {report['total_seconds']:.0f} s.", "",
             "| policy | gold mean [95% CI] |", "|---|---|"]
    lines += [f"| {n} | {_ci(report['gold'][n], 'mean')} |" for n in POLICIES]
    lines += ["", "| comparison | win rate [95% CI] | wins / ties / losses |", "|---|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_ci(w)} | {w['wins']} / {w['ties']} / {w['losses']} |"
              for k, w in report["win_rates"].items()]
    lines += ["", "Image ablation (gold with real, blank and shuffled images; drop = real - other per prompt):", "",
              "| policy | real | blank | shuffled | drop blank [95% CI] | drop shuffled [95% CI] |",
              "|---|---|---|---|---|---|"]
    for n, a in report["image_ablation"].items():
        lines.append(f"| {n} | {a['real']:.3f} | {a['blank']:.3f} | {a['shuffled']:.3f} | "
                     f"{_ci(a['drop_blank'], 'mean')} | {_ci(a['drop_shuffled'], 'mean')} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, root: str) -> None:
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(report_markdown(report))


# ----------------------------------------------------------------------------- the run
def run_image_pipeline(cfg: Config, workdir: str, only: Optional[str] = None) -> dict:
    """Run (or resume) every stage in order, or just `only`; returns the report dict."""
    from instruct_jax.instructgpt.pipeline import validate_pipeline

    validate_pipeline(cfg)
    validate_image_pipeline(cfg)
    if only is not None and only not in STAGES:
        raise ConfigError("stage", f"expected one of {list(STAGES)} (pipeline.task='images'), got {only!r}")
    paths = Paths(workdir, cfg.data.vocab_size)
    save_config(cfg, workdir)
    judge = ImageGoldJudge()
    results = {}
    for stage in STAGES:
        if (only is not None and stage != only) or (is_done(paths, stage) and only is None):
            if is_done(paths, stage):
                results[stage] = read_done(paths, stage)
                if only is None:
                    log(f"[{stage}] finished earlier: skipped")
            continue
        missing = [s for s in _NEEDS.get(stage, ()) if not is_done(paths, s)]
        if missing:
            raise ConfigError("stage", f"stage {stage!r} needs {missing} finished first in {workdir}")
        log(f"[{stage}] running")
        start = time.perf_counter()
        if stage == "task":
            out = stage_task(cfg, paths)
        elif stage == "label":
            out = stage_label(cfg, paths, judge)
        elif stage == "eval":
            out = stage_eval(cfg, paths, judge)
        else:
            out = stage_train(cfg, paths, stage, stage_config(cfg, stage, paths))
        results[stage] = record_stage(paths, stage, out, start)
    if "eval" not in results:
        return {}
    report = build_report(cfg, results)
    write_report(report, paths.root)
    log(report_markdown(report))
    return report


def run_image_seeds(cfg: Config, workdir: str, seeds: Sequence[int], only: Optional[str] = None) -> dict:
    """One image pipeline per seed in <workdir>/seed_<S>/, and every seed's report in <workdir>/report.json."""
    reports = {}
    for s in seeds:
        c = copy.deepcopy(cfg)
        c.seed = int(s)
        reports[str(s)] = run_image_pipeline(c, os.path.join(workdir, f"seed_{s}"), only)
    if only is None or only == "eval":
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(reports, f, indent=2, default=float)
    return reports

