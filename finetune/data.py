"""Training data: loading, deterministic splits, per-task processing and collation.

The code lives in `hf_relattn.data` (the bench and calibration read data too, and the library
does not import finetune); its names are re-exported here, where they always were.
"""

from hf_relattn.data import TEXT_SUFFIXES, class_labels, collator, data_format, label_list, load_raw, prepare, split

__all__ = ["TEXT_SUFFIXES", "class_labels", "collator", "data_format", "label_list", "load_raw", "prepare", "split"]
