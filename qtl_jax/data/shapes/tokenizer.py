"""A word-level Hugging Face tokenizer covering every word the shapes corpus can emit.

The demo model uses the same tokenizer code path as real checkpoints (``AutoTokenizer.from_pretrained`` on
a directory), but a vocabulary of a few hundred words instead of 32k BPE pieces keeps the embedding table
and the softmax tiny. The vocabulary is derived from the generator's template and word lists
(``text.text_inventory`` and ``benchmarks.text_inventory``) plus the chat-template words, never
from sampling, so it is complete by construction; a test checks that thousands of generated texts map to
no ``<unk>``.

Text is split on whitespace and every punctuation character becomes its own token. Like Llama's
tokenizer, encoding adds ``<s>`` in front (the TinyLLaVA ``llama`` template relies on it) and ``</s>`` is
a special token the templates write literally. Decoding joins words with spaces and glues punctuation back
(" ." -> "."), so every answer and caption of the corpus decodes to exactly its text.
"""

from __future__ import annotations

import os
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from qtl_jax.data.shapes import benchmarks, text

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, PAD, BOS, EOS, text.IMAGE_TOKEN)

# The TinyLLaVA Factory chat templates the demo may use: `llama` (and `phi`, whose system sentence is the
# same) and `pretrain` (no words). The roles and the system sentence must tokenize without <unk>.
CHAT_TEMPLATE_TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT:",
)
_SLOT = re.compile(r"\{[A-Za-z0-9_]+\}")


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # "'s" stays one token so the decoder can glue it back ("user's"); every other punctuation character
    # is a token of its own.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(r"'s|[^\w\s]"), behavior="isolated")])


def vocabulary() -> list[str]:
    """Specials first (ids 0-4), then every word of the corpus templates, word lists and chat templates.

    Each word also appears capitalised, because templates capitalise a slot at the start of a sentence.
    """
    pt = pre_tokenizer()
    words: set[str] = set()
    for sentence in text.text_inventory() + benchmarks.text_inventory() + CHAT_TEMPLATE_TEXTS:
        for piece, _ in pt.pre_tokenize_str(_SLOT.sub(" ", sentence)):
            words.add(piece)
            words.add(piece[:1].upper() + piece[1:])
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def build_tokenizer_object() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` (WordLevel, BOS post-processor, space-joining decoder)."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama: <s> in front of every sequence, nothing at the end (templates write </s> themselves).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    # WordPiece's decoder puts a space before every token but the first and, with cleanup, drops it again
    # before . , ? ! and 's (the "##" continuation prefix never occurs in this vocabulary); the chat
    # templates' "USER:" needs the same for ":".
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    return tok


def build_shapes_tokenizer(out_dir: str | None = None, *, model_max_length: int = 2048):
    """Builds the tokenizer as a ``transformers`` fast tokenizer; saves it to ``out_dir`` if given.

    The saved directory loads offline with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    """
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(), unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": text.IMAGE_TOKEN}, model_max_length=model_max_length,
        padding_side="right", clean_up_tokenization_spaces=False)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
    return hf
