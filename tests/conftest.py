"""Shared test set-up: never touch a hub, and keep `datasets` quiet."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The models in tests are tiny: one thread is faster than two (no spinning, no oversubscription when busy).
torch.set_num_threads(1)
