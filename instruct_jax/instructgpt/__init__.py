"""The built-in InstructGPT task, end to end.

    task.py          the seeded task: corpus, instruction kinds, demonstrators, held-out templates
    gold.py          GoldJudge (correctness / format / verbosity / total, every call counted) and Labeler
    statistics.py    pairwise agreement, head-to-head win rate with bootstrap CI, best-of-n KL
    evaluate.py      decode and score every policy; report.py: report.md / report.json / plots
    instructgpt/pipeline.py      the stages (task -> pretrain -> sft -> label -> rm -> ppo -> eval), resumable
    eval_command.py  the `eval` command on any checkpoints
"""
