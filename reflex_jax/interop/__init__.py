"""Models in and out of other formats: HF GPT-2 checkpoints (hf_gpt2.py), the original PyTorch
code's checkpoints (original.py), and exports (export.py).
"""
