"""A cached teacher: ``kd-train RECIPE mode=cache-teacher`` runs the frozen teacher once over ``data.train``
and stores its top-k per counted token; a run with ``model.teacher=cache:DIR`` trains from it with no
teacher engine (the loss rule: ``kd.topk``; docs/methods.md, "A cached teacher").

An *item* is what the loader serves: an example, or a packed row with ``data.pack=true``; a *row* is
one counted token of an item (a position whose next-token target is trained on), in the item's order.

- ``fingerprint``: what a cache is valid for (teacher, tokenizer, data and how it is cut), and the items
- ``store``: the files (layout below), written atomically, and ``TeacherCache``, which reads rows back
- ``writer``: the ranks' side of ``mode=cache-teacher`` (``build``), and its ``--dry-run``

DIR holds ``manifest.json`` (the fingerprint, the layout, a digest of the tokenized items, and
``complete`` once every shard is written), ``offsets.safetensors`` (item i's rows are
``offsets[i]:offsets[i + 1]``) and ``shard-NNNNN.safetensors``, the rows of items
``[s * shard_items, (s + 1) * shard_items)``: ``ids [n, B]`` uint8 (each row's k ids bit-packed at
``id_bits`` bits, the fewest that hold the vocabulary: 17 for Llama-3), ``values [n, k]`` (``cache.dtype``:
the logits after any softcap less the row's top one, decreasing) and ``log_tail [n]`` (fp32: the log of
the mass outside the top-k at the cache's temperature, ``-inf`` when k = V).
"""
from .writer import build, plan_text, top_rows
from .fingerprint import (CacheError, counted, data_digest, distill_vocab, fingerprint, items, items_digest,
                          model_digest, tokenizer_digest)
from .store import (FORMAT, MANIFEST, OFFSETS, SHARD_ROWS, TeacherCache, check_out, finish, id_bits, pack_ids,
                    prepare, row_bytes, shard_items, stored, unpack_ids, write_shard)

__all__ = ["build", "top_rows", "CacheError", "counted", "data_digest", "distill_vocab", "fingerprint", "items",
           "items_digest", "model_digest", "tokenizer_digest", "FORMAT", "MANIFEST", "OFFSETS", "SHARD_ROWS",
           "TeacherCache", "check_out", "finish", "id_bits", "pack_ids", "plan_text", "prepare", "row_bytes", "shard_items",
           "stored", "unpack_ids", "write_shard"]
