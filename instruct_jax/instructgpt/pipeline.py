"""The whole InstructGPT recipe on the built-in task, end to end, with a report that shows whether it aligned.

    python -m instruct_jax pipeline --experiment experiments/tiny_cpu.py --workdir runs/pipeline

Stages (each in <workdir>/<stage>/, finished when <stage>/DONE.json exists):

    task      generate the built-in task from `seed`: pretraining corpus, demonstrations written by
              simulated demonstrators, training / PPO / evaluation prompts; train the tokenizer
    pretrain  the base LM on the plain-text corpus (`pretrain` phase)
    sft       supervised fine-tuning on the demonstrations, from the base model (`sft` phase)
    label     K samples per training prompt from the SFT policy (at `sample_temperature`), ranked by the labeler
              (a Plackett-Luce sample of the gold totals + random flips; gold ties stay ties)
    rm        the reward model on those rankings, from the SFT model (`rm` phase)
    ppo       PPO against the reward model, from the SFT policy; policy snapshots along the way
    dpo, rloo, grpo, rft, rloo_dpo
              (pipeline.algorithms, opt-in) the other methods from the same SFT policy, compared in the
              report's algorithms table (docs/ALGORITHMS.md); rft: rejection-sampling fine-tuning;
              rloo_dpo: RLOO rewarded by the dpo stage's implicit reward instead of the reward model
    oracle    (pipeline.oracle) the upper reference: the same PPO run with the gold judge itself as the reward,
              standardized on SFT samples; it measures the headroom of this policy, KL
              coefficient and step budget (pipeline.oracle_algorithm=rloo|grpo: the verifier case of the
              critic-free methods, with their stage's budget). Never the headline nor in the methods table; its
              gold calls are counted apart
    eval      every policy decoded the same way on held-out prompts; report.md / report.json / plots

Re-running skips finished stages, and a stage interrupted mid-training resumes from its newest
checkpoint (every training stage is a resumable phase). `--stage NAME` runs one stage alone (its
inputs must exist). The gold judge is called only by the labeler, the oracle run and the evaluation, and
every call is counted. Settings: `cfg.pipeline` (config.py PipelineConfig); docs/PIPELINE.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from instruct_jax.config import Config, StageConfig, save_config
from instruct_jax.data.config import DataConfig
from instruct_jax.errors import ConfigError
from instruct_jax.instructgpt.gold import GoldJudge, Labeler
from instruct_jax.instructgpt.image_task import KINDS as IMAGE_KINDS
from instruct_jax.instructgpt.report import ALGORITHM_ORDER
from instruct_jax.instructgpt.statistics import agreement_rate, ranking_agreement
from instruct_jax.instructgpt.task import DEMO_PHRASES, KINDS, Task, TaskPrompt, phrase_twins
from instruct_jax.metrics import log
from instruct_jax.rl.ppo.trainer import ALGORITHMS as PPO_ALGORITHMS
from instruct_jax.rl.ppo.trainer import prompt_len as ppo_prompt_len

STAGES = ("task", "pretrain", "sft", "label", "rm", "ppo", "dpo", "rloo", "grpo", "rft", "rloo_dpo", "oracle",
          "eval")
METHODS = ALGORITHM_ORDER  # pipeline.algorithms: the methods trained from SFT and compared (ppo ... rloo_dpo)
ONLINE = ("ppo", "rloo", "grpo", "rloo_dpo")  # the PPO phase's methods: sampling while training
GROUPED = {"rloo": "rloo", "grpo": "grpo", "rloo_dpo": "rloo"}  # critic-free method -> its ppo.algorithm
DONE_FILE = "DONE.json"
TASKS = ("text", "images")  # pipeline.task: the built-in text task (here) or the image task (image_pipeline.py)


# ----------------------------------------------------------------------------- validation
def validate_pipeline(cfg: Config) -> None:
    """The pipeline's own checks; ConfigError names the field."""
    p = cfg.pipeline
    for name in ("pretrain_paragraphs", "sft_demos", "eval_prompts", "label_prompts", "ppo_prompts",
                 "max_new_tokens", "kl_samples"):
        if getattr(p, name) <= 0:
            raise ConfigError(f"pipeline.{name}", f"must be > 0, got {getattr(p, name)}")
    for name in ("demo_chatty", "demo_slip", "held_out_fraction", "labeler_flip_rate", "demo_follow"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise ConfigError(f"pipeline.{name}", f"must be in [0, 1], got {getattr(p, name)}")
    if p.tau1_samples != 0 and p.tau1_samples < 4:
        raise ConfigError("pipeline.tau1_samples", f"must be 0 (off) or >= 4 samples per prompt, got {p.tau1_samples}")
    if not 0.0 <= p.format_fraction <= 0.5:
        raise ConfigError("pipeline.format_fraction", f"must be in [0, 0.5] (at least half of the eval prompts stay "
                          f"plain requests), got {p.format_fraction}")
    p.kinds = tuple(p.kinds) if isinstance(p.kinds, (list, tuple)) else p.kinds
    if p.task not in TASKS:
        raise ConfigError("pipeline.task", f"expected one of {list(TASKS)}, got {p.task!r}")
    kinds = KINDS if p.task == "text" else IMAGE_KINDS
    if (not isinstance(p.kinds, tuple) or not p.kinds or len(set(p.kinds)) != len(p.kinds)
            or any(k not in kinds for k in p.kinds)):
        raise ConfigError("pipeline.kinds", f"expected distinct kinds from {list(kinds)} (pipeline.task="
                          f"{p.task!r}), got {p.kinds!r}")
    if p.demo_phrase not in DEMO_PHRASES:
        raise ConfigError("pipeline.demo_phrase", f"expected one of {list(DEMO_PHRASES)}, got {p.demo_phrase!r}")
    if not 2 <= p.responses_per_prompt <= 9:
        raise ConfigError("pipeline.responses_per_prompt", f"K must be in 2..9, got {p.responses_per_prompt}")
    if not 0 <= p.twins <= 3 or p.responses_per_prompt + p.twins > 9:
        raise ConfigError("pipeline.twins", f"must be in 0..3 with responses_per_prompt + twins <= 9, got {p.twins} "
                          f"(K = {p.responses_per_prompt})")
    if p.sample_temperature <= 0:
        raise ConfigError("pipeline.sample_temperature", f"must be > 0 (the labeler ranks distinct samples), "
                          f"got {p.sample_temperature}")
    for name in ("labeler_temperature", "decode_temperature", "kl_budget", "max_comparisons", "snapshots"):
        if getattr(p, name) < 0:
            raise ConfigError(f"pipeline.{name}", f"must be >= 0, got {getattr(p, name)}")
    try:
        p.best_of = tuple(int(n) for n in p.best_of)
    except (TypeError, ValueError):
        raise ConfigError("pipeline.best_of", f"expected a list of integers, got {p.best_of!r}") from None
    if any(n < 1 for n in p.best_of):
        raise ConfigError("pipeline.best_of", f"every n must be >= 1, got {p.best_of}")
    p.algorithms = tuple(p.algorithms) if isinstance(p.algorithms, (list, tuple)) else p.algorithms
    if (not isinstance(p.algorithms, tuple) or "ppo" not in p.algorithms or len(set(p.algorithms)) != len(p.algorithms)
            or any(a not in METHODS for a in p.algorithms)):
        raise ConfigError("pipeline.algorithms", f"expected distinct methods from {list(METHODS)}, ppo among them "
                          f"(the main job), got {p.algorithms!r}")
    if p.rft_samples < 2:
        raise ConfigError("pipeline.rft_samples", f"best-of-n needs n >= 2 samples per prompt, got {p.rft_samples}")
    if not p.rft_temperature > 0:
        raise ConfigError("pipeline.rft_temperature", f"must be > 0 (sampled candidates), got {p.rft_temperature}")
    for name in ("rft_prompts", "rft_rounds"):
        if getattr(p, name) < 1:
            raise ConfigError(f"pipeline.{name}", f"must be >= 1, got {getattr(p, name)}")
    if p.group_size < 2:
        raise ConfigError("pipeline.group_size", f"rloo / grpo need >= 2 samples per prompt, got {p.group_size}")
    if p.oracle_algorithm not in PPO_ALGORITHMS:
        raise ConfigError("pipeline.oracle_algorithm", f"expected one of {list(PPO_ALGORITHMS)}, got "
                          f"{p.oracle_algorithm!r}")
    if "rloo_dpo" in p.algorithms and "dpo" not in p.algorithms:
        raise ConfigError("pipeline.algorithms", f"rloo_dpo is rewarded by the dpo stage's policy: add dpo, got "
                          f"{p.algorithms!r}")
    for method in GROUPED:
        if ((method in p.algorithms or (p.oracle and p.oracle_algorithm == method))
                and getattr(p, method).global_batch_size % p.group_size):
            raise ConfigError(f"pipeline.{method}.global_batch_size", f"counts samples: must be a multiple of "
                              f"pipeline.group_size={p.group_size}, got {getattr(p, method).global_batch_size}")
    for stage in ("pretrain", "sft", "rm") + METHODS:
        st: StageConfig = getattr(p, stage)
        for name in ("steps", "global_batch_size", "seq_len", "learning_rate"):
            if getattr(st, name) <= 0:
                raise ConfigError(f"pipeline.{stage}.{name}", f"must be > 0, got {getattr(st, name)}")
        if st.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"pipeline.{stage}.seq_len", f"exceeds model.max_seq_len={cfg.model.max_seq_len}, "
                              f"got {st.seq_len}")
    if prompt_len(cfg) + p.max_new_tokens + 1 > cfg.model.max_seq_len:
        raise ConfigError("pipeline.max_new_tokens", f"prompt {prompt_len(cfg)} + {p.max_new_tokens} new tokens "
                          f"+ 1 exceeds model.max_seq_len={cfg.model.max_seq_len}")


def prompt_len(cfg: Config) -> int:
    """Tokens per left-padded prompt everywhere in the pipeline (sampling, PPO, evaluation): PPO's one rule
    (rl/ppo/trainer.py) at the PPO stage's sequence length."""
    return ppo_prompt_len(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=cfg.pipeline.ppo.seq_len)))


# ----------------------------------------------------------------------------- paths and markers
@dataclasses.dataclass(frozen=True)
class Paths:
    root: str
    vocab_size: int

    def stage(self, name: str) -> str:
        return os.path.join(self.root, name)

    def file(self, name: str) -> str:
        return os.path.join(self.root, "task", name)

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "task", "tokenizer", f"spm_{self.vocab_size}.model")


def is_done(paths: Paths, stage: str) -> bool:
    return os.path.isfile(os.path.join(paths.stage(stage), DONE_FILE))


def mark_done(paths: Paths, stage: str, result: dict) -> None:
    os.makedirs(paths.stage(stage), exist_ok=True)
    tmp = os.path.join(paths.stage(stage), DONE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=float)
    os.replace(tmp, os.path.join(paths.stage(stage), DONE_FILE))


def record_stage(paths: Paths, stage: str, out: Optional[dict], start: float) -> dict:
    """A finished stage's result with its wall time (since `start`, a perf_counter), marked done."""
    out = dict(out or {})
    out["seconds"] = time.perf_counter() - start
    mark_done(paths, stage, out)
    return out


def read_done(paths: Paths, stage: str) -> dict:
    with open(os.path.join(paths.stage(stage), DONE_FILE)) as f:
        return json.load(f)


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- stage configs
def stage_config(cfg: Config, stage: str, paths: Paths) -> Config:
    """The experiment's config with the stage's steps / batch / lr, data and init paths filled in."""
    c = copy.deepcopy(cfg)
    st: StageConfig = getattr(cfg.pipeline, cfg.pipeline.oracle_algorithm if stage == "oracle" else stage)
    c.name = f"{cfg.name}-{stage}"
    c.train.steps, c.train.global_batch_size, c.train.seq_len = st.steps, st.global_batch_size, st.seq_len
    c.train.eval_every, c.train.microbatches = st.eval_every, 1
    c.train.early_stop_patience = st.early_stop_patience
    c.optim.learning_rate, c.optim.warmup_steps = st.learning_rate, st.warmup_steps
    common = dict(tokenizer=paths.tokenizer, vocab_size=cfg.data.vocab_size, chat_template="builtin")
    corpus = dict(source=paths.file("corpus.txt"), format="text", text_unit="paragraph", **common)
    if stage == "pretrain":
        c.data = DataConfig(eval_fraction=0.05, **corpus)
    elif stage == "sft":
        c.data = DataConfig(source=paths.file("demos.jsonl"), format="sft", messages_field="messages",
                            eval_fraction=0.1, **common)
        c.train.init_from = paths.stage("pretrain")
    elif stage in ("rm", "dpo"):  # the same rankings and the same held-out split
        c.data = DataConfig(source=os.path.join(paths.stage("label"), "rankings.jsonl"), format="ranking",
                            eval_fraction=0.1, max_responses=cfg.pipeline.responses_per_prompt + cfg.pipeline.twins,
                            **common)
        c.reward.synthetic = 0
        c.reward.reference = DataConfig(format="sft")  # source "": the best-ranked training responses
        c.train.init_from = paths.stage("sft")
    elif stage == "rft":  # supervised fine-tuning on the best samples; stage_rft sets each round's source and init
        c.data = DataConfig(source=os.path.join(paths.stage("rft"), "best_0.jsonl"), format="sft",
                            messages_field="messages", eval_fraction=0.1, **common)
        c.train.init_from = paths.stage("sft")
    elif stage in ONLINE + ("oracle",):  # the oracle run is the PPO run with another reward
        c.data = DataConfig(source=paths.file("ppo_prompts.jsonl"), format="prompt", max_prompt_len=prompt_len(cfg),
                            **common)
        c.ppo.reward, c.ppo.reward_model, c.ppo.synthetic_prompts = "model", paths.stage("rm"), 0
        c.ppo.export_every = max(1, st.steps // cfg.pipeline.snapshots) if cfg.pipeline.snapshots else 0
        if c.ppo.ptx_coef > 0 and not c.ppo.ptx.source:  # PPO-ptx mixes in the base model's own corpus
            c.ppo.ptx = DataConfig(eval_fraction=0.0, **corpus)
        c.train.init_from = paths.stage("sft")
        if stage in GROUPED or (stage == "oracle" and cfg.pipeline.oracle_algorithm != "ppo"):
            # critic-free: the ppo section's settings, a group of samples per prompt
            algorithm = cfg.pipeline.oracle_algorithm if stage == "oracle" else GROUPED[stage]
            c.ppo.algorithm, c.ppo.group_size, c.ppo.export_every = algorithm, cfg.pipeline.group_size, 0
        if stage == "rloo_dpo":  # the DPO policy's implicit reward; its reference is the same SFT export
            c.ppo.reward, c.ppo.reward_model = "dpo", paths.stage("dpo")
        if stage == "oracle":
            c.ppo.reward, c.ppo.reward_model, c.ppo.export_every = "host", "", 0
    else:
        raise ValueError(f"no training config for stage {stage!r}")
    return c


def stage_task(cfg: Config, paths: Paths) -> dict:
    """Write the task's data files and train the tokenizer on the corpus and the demonstrations."""
    from instruct_jax.data.build import build_tokenizer

    p = cfg.pipeline
    task = Task(cfg.seed, num_eval=p.eval_prompts, held_out_fraction=p.held_out_fraction, kinds=p.kinds,
                format_fraction=p.format_fraction)
    os.makedirs(paths.stage("task"), exist_ok=True)
    corpus = task.pretrain_corpus(p.pretrain_paragraphs)
    with open(paths.file("corpus.txt"), "w") as f:
        f.write("\n\n".join(corpus) + "\n")
    demos = task.sft_demos(p.sft_demos, chatty=p.demo_chatty, slip=p.demo_slip,
                           phrases=DEMO_PHRASES[p.demo_phrase], follow=p.demo_follow)
    _write_jsonl(paths.file("demos.jsonl"), [{"messages": d} for d in demos])
    # Label and PPO prompts come from one draw, split: the reward model never rates PPO's prompts.
    train = task.train_prompts(p.label_prompts + p.ppo_prompts)
    _write_jsonl(paths.file("label_prompts.jsonl"), [t.to_row() for t in train[:p.label_prompts]])
    _write_jsonl(paths.file("ppo_prompts.jsonl"), [t.to_row() for t in train[p.label_prompts:]])
    _write_jsonl(paths.file("eval_prompts.jsonl"), [t.to_row() for t in task.eval_prompts()])
    # The tokenizer reads the corpus and every prompt and answer text the pipeline will show it.
    texts = paths.file("tokenizer_text.txt")
    with open(texts, "w") as f:
        f.write("\n".join(corpus) + "\n")
        for d in demos:
            f.write("\n".join(m["content"] for m in d) + "\n")
        for t in train[:1000]:
            f.write(t.text + "\n")
    build_tokenizer(DataConfig(format="text", tokenizer_train_files=(texts,), vocab_size=cfg.data.vocab_size),
                    paths.stage("task"))  # -> task/tokenizer/spm_<vocab>.model (paths.tokenizer)
    references = {t.text: t.spec.reference for t in task.sft_prompts(p.sft_demos)}
    habits = sum(1 for d in demos if d[-1]["content"] != references[d[0]["content"]])
    return {"corpus_paragraphs": len(corpus), "demos": len(demos), "label_prompts": p.label_prompts,
            "ppo_prompts": p.ppo_prompts, "eval_prompts": len(task.eval_prompts()),
            "eval_held_out_templates": sum(t.spec.held_out for t in task.eval_prompts()),
            "demos_not_the_reference": habits, "kinds": list(p.kinds)}


def stage_train(cfg: Config, paths: Paths, stage: str, c: Optional[Config] = None) -> dict:
    """pretrain / sft / rm / ppo: the phase's own resumable trainer on the stage config (`c`, default
    `stage_config`'s)."""
    c = c or stage_config(cfg, stage, paths)
    workdir = paths.stage(stage)
    if stage in ("pretrain", "sft"):
        from instruct_jax.train.lm.trainer import run_lm

        return run_lm(c, workdir, phase="sft" if c.data.format == "sft" else stage)  # images: captioning is sft
    if stage == "rm":
        from instruct_jax.train.rm.trainer import run_rm

        return run_rm(c, workdir)
    if stage == "dpo":
        from instruct_jax.train.dpo.trainer import run_dpo

        return run_dpo(c, workdir)
    from instruct_jax.rl.ppo.trainer import run_ppo  # ppo, rloo, grpo

    return run_ppo(c, workdir)


def stage_rft(cfg: Config, paths: Paths) -> dict:
    """Rejection-sampling fine-tuning (Llama 2's rejection sampling, RAFT): each of `pipeline.rft_rounds` rounds
    samples `pipeline.rft_samples` responses per prompt for the first `pipeline.rft_prompts` PPO prompts from the
    current policy (at pipeline.rft_temperature, ppo.response_len tokens), keeps the reward model's best non-empty
    one and fine-tunes the current policy on those (the sft phase with pipeline.rft's settings); the next round samples
    from the result. Round r lives in rft/round_<r>/ (the last in rft/ itself, the stage's policy); a round with
    rft/round_<r>.json finished, and an interrupted one resumes its training from its checkpoint."""
    from instruct_jax.inference.scorer import RewardScorer
    from instruct_jax.train.lm.trainer import run_lm

    p = cfg.pipeline
    rows = read_jsonl(paths.file("ppo_prompts.jsonl"))
    if len(rows) < p.rft_prompts:
        raise ConfigError("pipeline.rft_prompts", f"{p.rft_prompts} asked for, but the task stage wrote {len(rows)} "
                          f"to {paths.file('ppo_prompts.jsonl')}")
    prompts = [list(TaskPrompt.from_row(r).messages) for r in rows[:p.rft_prompts]]
    root = paths.stage("rft")
    os.makedirs(root, exist_ok=True)
    runner, scorer = None, None
    policy, rounds = paths.stage("sft"), []
    for r in range(p.rft_rounds):
        workdir = root if r == p.rft_rounds - 1 else os.path.join(root, f"round_{r}")
        marker, data = os.path.join(root, f"round_{r}.json"), os.path.join(root, f"best_{r}.jsonl")
        if os.path.isfile(marker):
            with open(marker) as f:
                rounds.append(json.load(f))
            policy = workdir
            continue
        if not os.path.isfile(data):  # sampling is deterministic for a seed; an interrupted round skips it
            if runner is None:
                runner = _runner(cfg, paths, stage_config(cfg, "sft", paths))
                scorer = RewardScorer(stage_config(cfg, "rm", paths), paths.stage("rm"))
            best, info = best_of_samples(runner, runner.load(policy), scorer, prompts, p.rft_samples,
                                         temperature=p.rft_temperature, max_new_tokens=cfg.ppo.response_len,
                                         seed=cfg.seed * 7919 + 5000 + 100 * r)
            with open(os.path.join(root, f"sampled_{r}.json"), "w") as f:  # before the data: its presence skips this
                json.dump(info, f, indent=2)
            _write_jsonl(data, [{"messages": m + [{"role": "assistant", "content": t}]} for m, t in best])
        with open(os.path.join(root, f"sampled_{r}.json")) as f:
            info = json.load(f)
        c = stage_config(cfg, "rft", paths)
        c.data.source, c.train.init_from, c.name = data, policy, f"{cfg.name}-rft-{r}"
        out = run_lm(c, workdir, phase="sft")
        info = {"round": r, **info, "eval_loss": out.get("eval_loss")}
        log(f"rft: round {r}: {info['kept']} best of {p.rft_samples} kept (reward model: all samples "
            f"{info['rm_all']:.3f}, kept {info['rm_kept']:.3f}); fine-tuned from {policy}")
        with open(marker, "w") as f:
            json.dump(info, f, indent=2, default=float)
        rounds.append(info)
        policy = workdir
    return {"rounds": rounds, "generated_tokens": int(sum(x["generated_tokens"] for x in rounds)),
            "rm_kept_first": rounds[0]["rm_kept"], "rm_kept_last": rounds[-1]["rm_kept"]}


def best_of_samples(runner, params, scorer, prompts: Sequence[list], n: int, *, temperature: float,
                    max_new_tokens: int, seed: int) -> tuple[list[tuple[list, str]], dict]:
    """n samples per prompt (sample k with seed + k), the reward model's best non-empty one of each:
    ([(messages, best text)] for the prompts with one, counts and mean reward-model scores)."""
    texts, lengths = [], 0
    for k in range(n):
        gen = runner.generate(params, prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + k)
        texts.append(gen.texts)
        lengths += int(gen.lengths.sum())
    scores = scorer.score([(m, texts[k][i]) for k in range(n) for i, m in enumerate(prompts)])
    scores = np.asarray(scores, np.float64).reshape(n, len(prompts))
    empty = np.array([[not texts[k][i].strip() for i in range(len(prompts))] for k in range(n)])
    masked = np.where(empty, -np.inf, scores)
    pick = masked.argmax(axis=0)
    keep = [i for i in range(len(prompts)) if not empty[:, i].all()]
    best = [(prompts[i], texts[pick[i]][i]) for i in keep]
    info = {"prompts": len(prompts), "samples_per_prompt": n, "kept": len(best),
            "skipped_all_empty": len(prompts) - len(best), "generated_tokens": lengths,
            "rm_all": float(scores[~empty].mean()) if (~empty).any() else float("nan"),
            "rm_kept": float(np.mean([masked[pick[i], i] for i in keep])) if keep else float("nan"),
            "distinct_kept": len({t for _, t in best})}
    return best, info


def stage_oracle(cfg: Config, paths: Paths) -> dict:
    """PPO with the gold judge as the reward: the upper reference for the reward-model run."""
    from instruct_jax.rl.ppo.trainer import run_ppo

    c = stage_config(cfg, "oracle", paths)
    reward, info = gold_reward(cfg, paths, c)
    out = run_ppo(c, paths.stage("oracle"), host_reward=reward)
    return {**out, **info, "gold_calls_oracle": reward.judge.calls}


ORACLE_SCALE_PROMPTS = 256


class GoldReward:
    """The oracle's host reward: each PPO prompt's gold total, standardized with (mean, std) of the gold totals
    of SFT samples on the PPO prompts (so its scale is that of a reward model normalized on SFT answers).
    Prompts are recognised by their token ids, encoded exactly as the PPO prompt loader encodes them."""

    def __init__(self, specs: dict, mean: float, std: float):
        self.specs, self.mean, self.std, self.judge = specs, mean, std, GoldJudge()

    def __call__(self, prompts: Sequence[np.ndarray], responses: Sequence[str]) -> np.ndarray:
        totals = []
        for ids, text in zip(prompts, responses):
            spec = self.specs.get(tuple(int(i) for i in ids))
            if spec is None:
                raise ValueError(f"the oracle reward got a prompt that is not one of the PPO prompts: {list(ids)}")
            totals.append(self.judge.score(spec, text).total)
        return (np.asarray(totals, np.float64) - self.mean) / self.std


def gold_reward(cfg: Config, paths: Paths, c: Config) -> tuple[GoldReward, dict]:
    from instruct_jax.data.build import build_chat_template, build_tokenizer
    from instruct_jax.data.examples import encode_prompt
    from instruct_jax.data.stats import DataStats

    tokenizer = build_tokenizer(c.data)
    template = build_chat_template(c.data, tokenizer)
    specs, stats = {}, DataStats(name="oracle prompts")
    for row in read_jsonl(c.data.source):
        prompt = TaskPrompt.from_row(row)
        example = encode_prompt(list(prompt.messages), template, c.data.max_prompt_len, "truncate", stats)
        specs[tuple(int(i) for i in example.ids)] = prompt.spec
    # The scale: gold totals of SFT samples (pipeline.sample_temperature) on the first ORACLE_SCALE_PROMPTS prompts.
    rows = read_jsonl(c.data.source)[:ORACLE_SCALE_PROMPTS]
    runner = _runner(cfg, paths, stage_config(cfg, "sft", paths))
    gen = runner.generate(runner.load(paths.stage("sft")), [list(TaskPrompt.from_row(r).messages) for r in rows],
                          temperature=cfg.pipeline.sample_temperature, max_new_tokens=c.ppo.response_len,
                          seed=cfg.seed * 7919 + 101)
    judge = GoldJudge()  # the labeler's count stays the labeler's
    totals = [judge.score(TaskPrompt.from_row(r).spec, t).total for r, t in zip(rows, gen.texts)]
    mean, std = float(np.mean(totals)), float(np.std(totals))
    if not std > 0:
        raise ValueError(f"every SFT sample has gold total {mean}: nothing to standardize the oracle reward with")
    log(f"oracle: gold totals of {len(totals)} SFT samples on PPO prompts: mean {mean:.4f} std {std:.4f} "
        f"(the oracle reward is (gold - mean) / std)")
    return GoldReward(specs, mean, std), {"gold_mean_sft_samples": mean, "gold_std_sft_samples": std,
                                          "gold_calls_standardize": judge.calls}


def _runner(cfg: Config, paths: Paths, c: Config):
    from instruct_jax.data.build import build_chat_template, build_tokenizer
    from instruct_jax.inference.runner import PolicyRunner

    tokenizer = build_tokenizer(c.data)
    return PolicyRunner(c, tokenizer, build_chat_template(c.data, tokenizer), prompt_len(cfg),
                        batch_size=max(cfg.pipeline.ppo.global_batch_size, 64))


def stage_label(cfg: Config, paths: Paths, judge: GoldJudge) -> dict:
    """K samples per label prompt from the SFT policy (pipeline.sample_temperature), ranked by the labeler.

    rankings.jsonl is what the reward model trains on; ranking_gold.jsonl (row i for ranking i) keeps, for
    the evaluation only, the noiseless gold totals the labeler ranked from (no extra judge call) and each
    response's summed SFT log-prob at temperature 1.
    """
    from instruct_jax.metrics import progress

    p = cfg.pipeline
    c = stage_config(cfg, "sft", paths)
    runner = _runner(cfg, paths, c)
    params = runner.load(paths.stage("sft"))
    prompts = [TaskPrompt.from_row(r) for r in read_jsonl(paths.file("label_prompts.jsonl"))]
    if len(prompts) < p.label_prompts:
        raise ConfigError("pipeline.label_prompts", f"{p.label_prompts} asked for, but the task stage wrote "
                          f"{len(prompts)} to {paths.file('label_prompts.jsonl')}")
    if len(prompts) > p.label_prompts:  # a task stage written for a larger budget (e.g. copied from another run)
        log(f"label: the first {p.label_prompts} of the task's {len(prompts)} label prompts (pipeline.label_prompts)")
        prompts = prompts[:p.label_prompts]
    messages = [list(t.messages) for t in prompts]
    bar = progress(p.responses_per_prompt, desc="label: sample")
    samples, logps = [], []
    for k in range(p.responses_per_prompt):
        gen = runner.generate(params, messages, temperature=p.sample_temperature, max_new_tokens=cfg.ppo.response_len,
                              seed=cfg.seed * 7919 + k)
        samples.append(gen.texts)
        logps.append(gen.logprob if p.sample_temperature == 1.0 else runner.logprob(params, gen, temperature=1.0))
        bar.update(1)
    bar.close()
    twins = _twins(cfg, runner, params, prompts, samples[0]) if p.twins else None
    labeler = Labeler(judge, p.labeler_temperature, p.labeler_flip_rate, p.max_comparisons, seed=cfg.seed)
    rows, gold_rows, counts, empty, budget_left = [], [], [], 0, True
    for i, prompt in enumerate(prompts):
        responses = [samples[k][i] for k in range(p.responses_per_prompt)]
        sft_logp = [float(logps[k][i]) for k in range(p.responses_per_prompt)]
        if twins:
            responses, sft_logp = responses + twins[0][i], sft_logp + twins[1][i]
        if any(not r.strip() for r in responses):
            # An empty sample can't be shown to a labeler (nor stored as a ranking row); count and skip.
            empty += 1
            continue
        if p.max_comparisons and labeler.comparisons + len(responses) * (len(responses) - 1) // 2 > p.max_comparisons:
            budget_left = False
            break
        ranking = labeler.rank(prompt, responses)
        if ranking is None:
            continue
        counts.append(ranking_agreement(ranking.ranks, labeler.last_totals))
        rows.append({"prompt": prompt.text, "responses": list(ranking.responses), "ranks": list(ranking.ranks),
                     "spec": prompt.spec.to_dict()})
        gold_rows.append({"gold": [float(t) for t in labeler.last_totals], "sft_logp": sft_logp,
                          "sampled": p.responses_per_prompt})
    os.makedirs(paths.stage("label"), exist_ok=True)
    _write_jsonl(os.path.join(paths.stage("label"), "rankings.jsonl"), rows)
    _write_jsonl(os.path.join(paths.stage("label"), "ranking_gold.jsonl"), gold_rows)
    distinct = float(np.mean([len(set(r["responses"])) for r in rows])) if rows else 0.0
    result = {"rankings": len(rows), "labeler_agreement": agreement_rate(counts),
              "agreement_pairs": int(sum(c[1] for c in counts)), "skipped_all_tied": labeler.all_tied,
              "skipped_empty_sample": empty, "budget_exhausted": not budget_left,
              "comparisons": labeler.comparisons, "gold_calls": judge.calls, "mean_distinct_responses": distinct,
              "twins": p.twins}
    log(f"label: {len(rows)} rankings of K={p.responses_per_prompt}"
        f"{f' samples + {p.twins} twins' if p.twins else ''}; labeler agrees with gold on "
        f"{result['labeler_agreement']:.3f} of {result['agreement_pairs']} non-tied pairs; skipped "
        f"{labeler.all_tied} all-tied and {empty} with an empty sample; {judge.calls} gold calls")
    return result


def _twins(cfg: Config, runner, params, prompts: Sequence[TaskPrompt], first: Sequence[str]):
    """Design (a): `pipeline.twins` twins of each prompt's first sample (task.phrase_twins, a side random stream)
    and their summed SFT log-probs at temperature 1: ([P][twins] texts, [P][twins] log-probs)."""
    p = cfg.pipeline
    rng = np.random.default_rng([cfg.seed, 25])
    texts = [phrase_twins(t.spec, s, DEMO_PHRASES[p.demo_phrase], rng)[:p.twins] for t, s in zip(prompts, first)]
    messages = [list(t.messages) for t in prompts for _ in range(p.twins)]
    logp = runner.logprob_texts(params, messages, [x for row in texts for x in row], cfg.ppo.response_len)
    return texts, [[float(x) for x in logp[i * p.twins:(i + 1) * p.twins]] for i in range(len(prompts))]


def stage_eval(cfg: Config, paths: Paths, judge: GoldJudge) -> dict:
    """Decode base / SFT / PPO (+ tau = 1 samples, best-of-n, KL, snapshots) on held-out prompts; score the
    reward model on the labeler's held-out rankings; write eval_samples.jsonl and eval_label_rankings.jsonl."""
    from instruct_jax.inference.scorer import RewardScorer
    from instruct_jax.instructgpt.evaluate import (EvalPrompt, EvalSettings, evaluate, generate_scored,
                                                   heldout_label_summary, heldout_rankings, tau1_policy_count)
    from instruct_jax.metrics import progress

    p = cfg.pipeline
    c = stage_config(cfg, "sft", paths)
    runner = _runner(cfg, paths, c)
    scorer = RewardScorer(stage_config(cfg, "rm", paths), paths.stage("rm"))
    prompts = [EvalPrompt.from_task(TaskPrompt.from_row(r)) for r in read_jsonl(paths.file("eval_prompts.jsonl"))]
    named = (("base", "pretrain"), ("sft", "sft")) + tuple((m, m) for m in METHODS) + (("oracle", "oracle"),)
    policies = {name: runner.load(paths.stage(stage)) for name, stage in named
                if is_done(paths, stage) and (stage not in METHODS or stage in p.algorithms)}
    methods = tuple(m for m in METHODS if m in policies)
    settings = EvalSettings(temperature=p.decode_temperature, max_new_tokens=p.max_new_tokens, best_of=p.best_of,
                            best_of_policy="sft", best_of_temperature=p.sample_temperature,
                            kl_pairs=tuple((m, "sft") for m in methods), kl_samples=p.kl_samples,
                            win_pairs=(("ppo", "sft"), ("sft", "base"), ("ppo", "base"), ("oracle", "sft")) +
                            tuple((m, "sft") for m in methods if m != "ppo"),
                            tau1_samples=p.tau1_samples, tau1_policies=("base", "sft") + methods, seed=cfg.seed)
    snapshots = _snapshot_dirs(paths)
    bar = progress(len(policies) + 2 + tau1_policy_count(policies, settings) + len(snapshots), desc="eval")
    calls_before = judge.calls
    rows, summary = evaluate(runner, policies, prompts, settings, scorer=scorer, judge=judge, progress=bar.update)
    # Gold vs proxy as KL grows: temperature-1 samples of each PPO snapshot on the held-out prompts.
    curve = []
    for step, path in snapshots:
        outs = generate_scored(runner, runner.load(path), prompts, temperature=1.0, max_new_tokens=p.max_new_tokens,
                               seed=cfg.seed * 1000 + 300 + step, scorer=scorer, judge=judge,
                               logprob_under=policies["sft"])
        curve.append({"step": step, "kl": float(np.mean([o["logp"] - o["logp_ref"] for o in outs])),
                      "gold": float(np.mean([o["gold"]["total"] for o in outs])),
                      "rm": float(np.mean([o["rm"] for o in outs]))})
        for row, o in zip(rows, outs):
            row.setdefault("snapshots", {})[str(step)] = o
        bar.update(1)
    bar.close()
    summary["overoptimization"] = curve
    summary["gold_calls_eval"] = judge.calls - calls_before
    # The reward model on the labeler's rankings of its own held-out split (gold totals from the label stage).
    rm_cfg = stage_config(cfg, "rm", paths)
    extras = os.path.join(paths.stage("label"), "ranking_gold.jsonl")
    held = heldout_rankings(read_jsonl(os.path.join(paths.stage("label"), "rankings.jsonl")), read_jsonl(extras),
                            rm_cfg.data, cfg.seed) if os.path.isfile(extras) else []
    scores = iter(scorer.score([(r["messages"], t) for r in held for t in r["responses"]]))
    for r in held:
        r["rm"] = [float(next(scores)) for _ in r["responses"]]
    summary["heldout_labels"] = heldout_label_summary(held, scorer.norm["gain"]) if held else None
    summary["rm_truncated_sequences"] = scorer.stats.truncated
    log(f"eval: {summary['truncated_prompts']} of {len(prompts)} prompts longer than {runner.prompt_len} tokens "
        f"(kept their end); {scorer.stats.truncated} reward-model inputs cut to {rm_cfg.train.seq_len} tokens")
    os.makedirs(paths.stage("eval"), exist_ok=True)
    _write_jsonl(os.path.join(paths.root, "eval_samples.jsonl"), rows)
    _write_jsonl(os.path.join(paths.root, "eval_label_rankings.jsonl"), held)
    return summary


def _snapshot_dirs(paths: Paths) -> list[tuple[int, str]]:
    """(iteration, export) of PPO's snapshots, then its final policy."""
    folder = os.path.join(paths.stage("ppo"), "snapshots")
    found = sorted((int(d), os.path.join(folder, d)) for d in os.listdir(folder) if d.isdigit()) \
        if os.path.isdir(folder) else []
    final = read_done(paths, "ppo").get("step") if is_done(paths, "ppo") else None
    return found + ([(int(final), paths.stage("ppo"))] if final else [])


# ----------------------------------------------------------------------------- the run
def run_pipeline(cfg: Config, workdir: str, only: Optional[str] = None) -> dict:
    """Run (or resume) every stage in order, or just `only`; returns the report dict."""
    from instruct_jax.instructgpt.report import build_report, console_summary, write_report

    validate_pipeline(cfg)
    if only is not None and only not in STAGES:
        raise ConfigError("stage", f"expected one of {list(STAGES)}, got {only!r}")
    paths = Paths(workdir, cfg.data.vocab_size)
    save_config(cfg, workdir)
    judge = GoldJudge()
    results = {}
    for stage in STAGES:
        if stage == "oracle" and not cfg.pipeline.oracle and only != "oracle":
            continue
        if stage in METHODS and stage not in cfg.pipeline.algorithms:
            continue
        if only is not None and stage != only:
            if is_done(paths, stage):
                results[stage] = read_done(paths, stage)
            continue
        if is_done(paths, stage) and only is None:
            results[stage] = read_done(paths, stage)
            log(f"[{stage}] finished earlier: skipped")
            continue
        _require_inputs(paths, stage)
        log(f"[{stage}] running")
        start = time.perf_counter()
        if stage == "task":
            out = stage_task(cfg, paths)
        elif stage == "label":
            out = stage_label(cfg, paths, judge)
        elif stage == "oracle":
            out = stage_oracle(cfg, paths)
        elif stage == "rft":
            out = stage_rft(cfg, paths)
        elif stage == "eval":
            out = stage_eval(cfg, paths, judge)
        else:
            out = stage_train(cfg, paths, stage)
        results[stage] = record_stage(paths, stage, out, start)
    if "eval" not in results:
        return {}
    report = build_report(cfg, results)
    write_report(report, results, paths.root)
    log(console_summary(report))
    return report


def _require_inputs(paths: Paths, stage: str) -> None:
    """A stage run alone needs the stages before it to have finished."""
    needs = {"pretrain": ("task",), "sft": ("task", "pretrain"), "label": ("task", "sft"),
             "rm": ("task", "label", "sft"), "ppo": ("task", "sft", "rm"), "dpo": ("task", "label", "sft"),
             "rloo": ("task", "sft", "rm"), "grpo": ("task", "sft", "rm"), "rft": ("task", "sft", "rm"),
             "rloo_dpo": ("task", "sft", "dpo"),
             "oracle": ("task", "sft"), "eval": ("task", "pretrain", "sft", "rm", "ppo")}
    missing = [s for s in needs.get(stage, ()) if not is_done(paths, s)]
    if missing:
        raise ConfigError("stage", f"stage {stage!r} needs {missing} finished first in {paths.root} "
                          "(run the pipeline without --stage, or those stages)")


def run_seeds(cfg: Config, workdir: str, seeds: Sequence[int], only: Optional[str] = None) -> dict:
    """One pipeline per seed in <workdir>/seed_<S>/, then mean +- std over seeds in <workdir>/report.*."""
    from instruct_jax.instructgpt.report import aggregate_seeds, write_seed_report

    reports = []
    for s in seeds:
        c = copy.deepcopy(cfg)
        c.seed = int(s)
        reports.append(run_pipeline(c, os.path.join(workdir, f"seed_{s}"), only))
    if only is not None and only != "eval":
        return {}
    combined = aggregate_seeds(reports)
    write_seed_report(combined, reports, workdir)
    return combined
