"""Data pipeline: tokenizers, Megatron-compatible indexed datasets, pretraining samples with
weighted blending, SFT chat data with packing, and preference pairs for DPO.

Names are imported lazily so that light users (tools/preprocess_data.py) do not pay for
importing torch, which the dataset modules need.
"""
import importlib

_EXPORTS = {
    "DataError": "engine.data.errors",
    "Tokenizer": "engine.data.tokenizer",
    "build_tokenizer": "engine.data.tokenizer",
    "check_vocab": "engine.data.tokenizer",
    "IndexedDataset": "engine.data.indexed_dataset",
    "IndexedDatasetWriter": "engine.data.indexed_dataset",
    "build_train_valid_test_datasets": "engine.data.gpt_dataset",
    "SFTDataset": "engine.data.sft",
    "collate_packed": "engine.data.sft",
    "PreferenceDataset": "engine.data.preference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
