"""Data input pipeline for LM pre-training (see pipeline.build_data)."""

from scalejax.data.pipeline import build_data, Data, default_config
from scalejax.data.sources import load_tokenizer
