"""Language-model phases (pretraining, SFT): build.py sets up mesh, model and state; trainer.py is the loop."""
