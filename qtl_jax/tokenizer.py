"""Loads a checkpoint's own tokenizer files offline with ``transformers.AutoTokenizer``."""

from __future__ import annotations

import os
from typing import Any

# Files any transformers tokenizer directory has at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str, **kwargs: Any):
    """The tokenizer saved in the local directory ``path``; never contacts a model hub.

    ``kwargs`` go to ``AutoTokenizer.from_pretrained`` (e.g. ``padding_side='left'``).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a local directory (qtl_jax never downloads tokenizers)")
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); copy the tokenizer of the "
            "checkpoint's LLM into it (tokenizer.save_pretrained(path))"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
