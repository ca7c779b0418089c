import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/dense_reference.py, tests/tiny.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
