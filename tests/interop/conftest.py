"""Export tests load exports with the real transformers and gguf libraries, never touching the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a local directory must suffice
os.environ["TRANSFORMERS_OFFLINE"] = "1"
