"""Attention: masks.py (the one mask rule), dispatch.py (model.attention -> a kernel), blockwise.py, ring.py, fused.py."""
