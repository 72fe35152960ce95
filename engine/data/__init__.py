"""Data pipeline: tokenizers, Megatron-compatible indexed datasets, pretraining samples with
weighted blending, SFT chat data with packing, and preference pairs for DPO."""
from engine.data.errors import DataError
from engine.data.tokenizer import Tokenizer, build_tokenizer, check_vocab
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from engine.data.gpt_dataset import build_train_valid_test_datasets

__all__ = [
    "DataError",
    "Tokenizer",
    "build_tokenizer",
    "check_vocab",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "build_train_valid_test_datasets",
]
