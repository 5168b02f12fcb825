"""Data sources: labelled texts for fitting (:class:`TextDataset`) and references for evaluation.

Label convention everywhere: **1 = undesirable** (false answer, toxic statement). Local copies are
found through ``data_dir`` / ``--data-dir`` / ``$OTGUARD_DATA_DIR``; TruthfulQA falls back to the
Hugging Face Hub. Splits are by group so that related texts never straddle train and test.
"""

from otguard.data._base import DATA_DIR_ENV, TextDataset, resolve_data_dir
from otguard.data.files import SUPPORTED_SUFFIXES, from_file
from otguard.data.nqopen import nqopen_items
from otguard.data.qa import QAItem, qa_items_from_csv
from otguard.data.registry import DATASETS, load_dataset
from otguard.data.splits import Split, group_kfold, group_split_by_names
from otguard.data.toxigen import toxigen_groups, toxigen_prompts, toxigen_statements
from otguard.data.truthfulqa import DEFAULT_TEMPLATE, truthfulqa_items, truthfulqa_mc2

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_TEMPLATE",
    "SUPPORTED_SUFFIXES",
    "QAItem",
    "Split",
    "TextDataset",
    "from_file",
    "group_kfold",
    "group_split_by_names",
    "load_dataset",
    "nqopen_items",
    "qa_items_from_csv",
    "resolve_data_dir",
    "toxigen_groups",
    "toxigen_prompts",
    "toxigen_statements",
    "truthfulqa_items",
    "truthfulqa_mc2",
]
