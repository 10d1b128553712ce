"""Data: records -> examples -> prompt-masked token sequences -> (packed) batches, with an exactly resumable loader.

- ``records``: reading JSONL / JSON / parquet / saved HF ``datasets`` dirs into record dicts
- ``formats``: record formats (chat, ShareGPT, prompt/response, Alpaca, Dolly, GSM8K) and chat templates
  -> ``Example``
- ``tokens``: ``Example`` -> token ids with prompt-masked labels, ``shift_labels``, ``TokenizedDataset``
- ``batches``: packing, the collator, the resumable loader (``make_loader``), ``to_device``

Every public name is re-exported here: ``from train.data import X`` / ``data.X``.
"""
from kd.reduce import IGNORE_INDEX

from .batches import Collator, PackedDataset, ResumableLoader, make_loader, to_device
from .errors import DataError
from .formats import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CHAT_TEMPLATE_MODES, FORMATS, GSM8K_PROMPT,
                      PLAIN_ROLES, Example, detect_format, to_example, uses_chat_template)
from .records import iter_records, load_records
from .tokens import DataStats, TokenizedDataset, TokenizedExample, encode_prompt, shift_labels, tokenize_example

__all__ = ["IGNORE_INDEX", "DataError", "iter_records", "load_records", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT",
           "GSM8K_PROMPT", "PLAIN_ROLES", "FORMATS", "CHAT_TEMPLATE_MODES", "Example", "detect_format",
           "to_example", "uses_chat_template", "TokenizedExample", "encode_prompt", "tokenize_example",
           "shift_labels", "DataStats", "TokenizedDataset", "PackedDataset", "Collator", "ResumableLoader",
           "to_device", "make_loader"]
