"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023) from the reward model's
rankings, against a frozen reference: the loss (losses.py), the jitted steps (step.py) and the phase on the one
training loop (trainer.py). docs/ALGORITHMS.md describes the algorithm and settings."""
