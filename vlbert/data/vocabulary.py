"""The tokenizer against the model it feeds.

A token id is a row of the word-embedding matrix. A tokenizer whose ids do not index the rows
the model was trained with (another checkpoint's vocabulary, a cased tokenizer for an uncased
BERT, a vocabulary grown after pretraining) trains without an error, on wrong words. So a run
checks, before its first step:

- every id the tokenizer can produce has a row (``len(tokenizer) <= num_embeddings``);
- where the model's weights come with a tokenizer of their own (the BERT checkpoint's folder),
  both map every token to the same id;
- where they come from a pretraining run, the run's vocabulary fingerprint (written into
  ``model.json``) equals the tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from vlbert.config import ConfigError


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's token -> id map (order-independent)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def check_vocabulary(tokenizer: Any, num_embeddings: int, where: str, reference: Optional[Any] = None,
                     expected_fingerprint: str = "") -> None:
    """Raise ``ConfigError`` (naming ``where``, the setting to fix) when ``tokenizer`` does not fit
    a model with ``num_embeddings`` word embeddings trained with ``reference`` (a tokenizer) or
    with a vocabulary whose fingerprint is ``expected_fingerprint``."""
    size = len(tokenizer)
    if size > num_embeddings:
        raise ConfigError(f"{where}: the tokenizer has {size} tokens but the model only {num_embeddings} word "
                          "embeddings: ids past the end would index nothing (a tokenizer of another model?)")
    if reference is not None:
        mine, theirs = tokenizer.get_vocab(), reference.get_vocab()
        differ = sorted((tok for tok, i in theirs.items() if mine.get(tok) != i), key=theirs.get)
        if differ or len(mine) != len(theirs):
            shown = ", ".join(f"{t!r}: {theirs[t]} vs {mine.get(t)}" for t in differ[:3])
            raise ConfigError(f"{where}: the tokenizer maps tokens to other ids than the model's checkpoint "
                              f"({len(differ)} of {len(theirs)} differ{': ' + shown if shown else ''}; "
                              f"{len(mine)} vs {len(theirs)} tokens): the model would read wrong words")
    if expected_fingerprint and expected_fingerprint != vocabulary_fingerprint(tokenizer):
        raise ConfigError(f"{where}: the tokenizer is not the one the pretrained model was trained with "
                          "(its vocabulary fingerprint differs from model.json's tokenizer_vocab_sha256)")


def checkpoint_tokenizer(bert: str, tokenizer_name: str) -> Optional[Any]:
    """The tokenizer shipped with the BERT checkpoint ``bert``, when the run reads another one
    (``tokenizer_name``) and the checkpoint has one; else None (nothing to compare)."""
    if not bert or not tokenizer_name or tokenizer_name == bert:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(bert)
    except (OSError, ValueError):  # a checkpoint folder with weights only
        return None
