"""TinyLLaVA Factory chat templates: render a LLaVA conversation, tokenise it, and mask the labels.

Every template except ``pretrain`` renders a conversation as

    {system} USER: <image>\\n{question 1} ASSISTANT: {answer 1}{end}USER: {question 2} ASSISTANT: ...

with the Vicuna-style system prompt and an end string that is the LLM's end-of-turn token (``</s>``
for TinyLlama/OpenELM, ``<|endoftext|>`` for Phi and Qwen2 base, ``<eos>`` for Gemma, ``<|im_end|>``
for Qwen2 instruct). Only the answers and their end token are trained (labels elsewhere are
``IGNORE_INDEX``). The ``pretrain`` template renders ``<image>{caption}\\n`` and trains on everything
after the image.

Tokenisation reproduces the Factory: the text is split at each ``<image>``, every piece is tokenised
on its own with the tokenizer's special tokens (BOS) and re-joined with one ``IMAGE_TOKEN_INDEX``, the
BOS kept only at the start.

Where the labels go is decided by tokenising every prefix of the conversation that ends at a segment
boundary (after each ``ASSISTANT:`` tag and after each end token) and requiring it to be a prefix of
the tokenisation of the whole conversation. When a tokenizer merges text across a boundary this does
not hold, and the labels would be shifted; the Factory then prints a warning and trains on nothing.
Here it is a :class:`TokenizationMismatchError` (or, with ``strict=False``, ``None`` and a logged
reason that the caller counts as a skip).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from qtl_jax.data.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

HUMAN, GPT = "human", "gpt"


class ConversationError(ValueError):
    """The conversation itself is malformed (roles, image tags, types); fix the data.

    Attributes:
      reason: a short stable key for counting skips (e.g. ``'wrong_roles'``).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TokenizationMismatchError(ValueError):
    """Tokenising the conversation segment by segment does not reproduce the full tokenisation.

    Attributes:
      reason: always ``'tokenization_mismatch'``.
      round_index: the question/answer round whose boundary moved.
      boundary: ``'question'`` (the end of ``ASSISTANT:``) or ``'answer'`` (the end token).
    """

    reason = "tokenization_mismatch"

    def __init__(self, message: str, *, round_index: int, boundary: str):
        super().__init__(message)
        self.round_index = round_index
        self.boundary = boundary


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """One conversation as token ids and training labels.

    Attributes:
      input_ids: ``int32 [T]``, one ``IMAGE_TOKEN_INDEX`` (-200) where the image goes.
      labels: ``int32 [T]``, the target id at positions that are trained, ``IGNORE_INDEX`` elsewhere.
        Labels are aligned with ``input_ids`` (not shifted); the loss shifts them.
    """

    input_ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise ValueError(
                f"input_ids and labels must be 1-D and the same length, got {self.input_ids.shape} "
                f"and {self.labels.shape}."
            )

    @property
    def num_images(self) -> int:
        return int(np.sum(self.input_ids == IMAGE_TOKEN_INDEX))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def tokenize_with_images(text: str, tokenizer: Any) -> list[int]:
    """Tokenises ``text``, replacing each ``<image>`` with one ``IMAGE_TOKEN_INDEX``.

    Each piece between image tags is tokenised separately with the tokenizer's special tokens; a BOS
    that the tokenizer puts at the start of every piece is kept once, at the very start.
    """
    return _tokenize_texts([text], tokenizer)[0]


def _tokenize_texts(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """:func:`tokenize_with_images` for several texts, in one (batched) tokenizer call."""
    pieces = [text.split(IMAGE_PLACEHOLDER) for text in texts]
    flat = [chunk for chunks in pieces for chunk in chunks]
    encoded = iter(tokenizer(flat).input_ids)
    bos = tokenizer.bos_token_id
    out = []
    for chunks in pieces:
        chunk_ids = [next(encoded) for _ in chunks]
        keeps_bos = bos is not None and len(chunk_ids[0]) > 0 and chunk_ids[0][0] == bos
        ids: list[int] = [bos] if keeps_bos else []
        for i, chunk in enumerate(chunk_ids):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            if keeps_bos and chunk and chunk[0] == bos:
                chunk = chunk[1:]
            ids.extend(chunk)
        out.append(ids)
    return out


def _split_rounds(conversations: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None]]:
    """LLaVA turns -> [(question, answer)]; a leading non-human turn is dropped like LLaVA does."""
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)):
        raise ConversationError(
            "malformed", f"conversations must be a list of dicts, got {type(conversations).__name__}."
        )
    turns = list(conversations)
    if turns and isinstance(turns[0], Mapping) and turns[0].get("from") != HUMAN:
        turns = turns[1:]
    if not turns:
        raise ConversationError("empty_conversation", "The conversation has no human/gpt turns.")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ConversationError(
                "malformed", f"Turn {i} must be a dict with 'from' and 'value', got {turn!r}."
            )
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ConversationError(
                "wrong_roles",
                f"Turn {i} is from {turn['from']!r} but LLaVA conversations alternate "
                f"'human'/'gpt' starting with 'human'; expected {expected!r}.",
            )
        if not isinstance(turn["value"], str):
            raise ConversationError(
                "malformed", f"Turn {i} has a {type(turn['value']).__name__} value; expected a string."
            )
    if len(turns) % 2:
        raise ConversationError(
            "unanswered_question", "The conversation ends with a human turn that has no gpt answer."
        )
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _check_images(rounds: Sequence[tuple[str, str]], has_image: bool) -> None:
    per_question = [q.count(IMAGE_PLACEHOLDER) for q, _ in rounds]
    in_answers = sum(a.count(IMAGE_PLACEHOLDER) for _, a in rounds)
    if in_answers:
        raise ConversationError("image_in_answer", "An answer (gpt turn) contains '<image>'.")
    total = sum(per_question)
    if has_image and total != 1:
        raise ConversationError(
            "no_image_tag" if total == 0 else "multiple_image_tags",
            f"has_image=True needs exactly one '<image>' in the human turns, found {total}; put "
            f"'<image>\\n' at the start of the first question (only one image per sample is supported).",
        )
    if not has_image and total:
        raise ConversationError(
            "unexpected_image_tag",
            f"has_image=False but the conversation contains {total} '<image>' tag(s); pass "
            f"has_image=True with the image, or remove the tag.",
        )


@dataclasses.dataclass(frozen=True)
class Template:
    """A TinyLLaVA Factory conversation template (``USER: ... ASSISTANT: ...{end}``).

    Attributes:
      name: the Factory's ``conv_version`` name.
      end: the string closing each answer; it must tokenise to the LLM's end-of-turn token.
      system: prepended once, followed by a space.
    """

    name: str
    end: str
    system: str = VICUNA_SYSTEM

    user_tag: ClassVar[str] = "USER: "
    assistant_tag: ClassVar[str] = "ASSISTANT:"

    @property
    def stop_str(self) -> str:
        """Generation stops when the model emits this."""
        return self.end

    def _question(self, question: str) -> str:
        # The Factory moves the image tag to the front of the question, on its own line.
        if IMAGE_PLACEHOLDER in question:
            rest = question.replace(IMAGE_PLACEHOLDER, "").strip()
            return f"{IMAGE_PLACEHOLDER}\n{rest}".strip()
        return question

    def _segments(self, rounds: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces, in order."""
        pieces = []
        for i, (question, answer) in enumerate(rounds):
            prefix = self.system + " " if i == 0 else ""
            pieces.append((f"{prefix}{self.user_tag}{self._question(question)} {self.assistant_tag}", False))
            pieces.append((f" {answer}{self.end}", True))
        return pieces

    def render(self, conversations: Sequence[Mapping[str, Any]], has_image: bool) -> str:
        """The full training text of a conversation (what the tokenizer sees)."""
        rounds = _split_rounds(conversations)
        _check_images(rounds, has_image)
        return "".join(text for text, _ in self._segments(rounds))

    def prompt(self, question: str, has_image: bool) -> str:
        """The generation prompt for one question, ending with the assistant tag.

        With ``has_image=True`` a question without ``<image>`` gets one (at the front, as in the
        Factory's evaluation scripts).
        """
        if has_image and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        rounds = [(question, "")]
        _check_images(rounds, has_image)
        return self._segments(rounds)[0][0]

    def tokenize_prompt(self, question: str, tokenizer: Any, has_image: bool) -> np.ndarray:
        """``int32`` ids of :meth:`prompt`, with ``IMAGE_TOKEN_INDEX`` for the image."""
        return np.asarray(tokenize_with_images(self.prompt(question, has_image), tokenizer), np.int32)

    def tokenize(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        has_image: bool,
        *,
        strict: bool = True,
    ) -> TokenizedSample | None:
        """Tokenises a LLaVA conversation and masks everything but the answers.

        Args:
          conversations: ``[{'from': 'human'|'gpt', 'value': str}, ...]``.
          tokenizer: a Hugging Face tokenizer (``tokenizer(text).input_ids``, ``bos_token_id``).
          has_image: whether the sample comes with an image; then exactly one ``<image>`` must be in
            the human turns, otherwise none.
          strict: on a tokenisation mismatch, raise (True) or log the reason and return None (False).

        Raises:
          ConversationError: malformed conversation (raised whatever ``strict`` is).
          TokenizationMismatchError: with ``strict=True``, see the module docstring.
          ValueError: the tokenizer has no ``end`` token, i.e. the template is for another LLM.
        """
        self._check_tokenizer(tokenizer)
        rounds = _split_rounds(conversations)
        _check_images(rounds, has_image)
        try:
            return self._tokenize_segments(self._segments(rounds), tokenizer)
        except TokenizationMismatchError as error:
            if strict:
                raise
            logger.warning("Skipping a sample (%s): %s", error.reason, error)
            return None

    def _check_tokenizer(self, tokenizer: Any) -> None:
        # Without it the end string would be split into ordinary pieces and the model would never
        # learn to stop.
        token_id = tokenizer.convert_tokens_to_ids(self.end)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != self.end:
            raise ValueError(
                f"Template {self.name!r} ends answers with {self.end!r}, which is not a token of this "
                f"tokenizer (eos is {tokenizer.eos_token!r}); pick the template that matches the LLM: "
                f"{ {name: t.end for name, t in _TEMPLATES.items()} }."
            )

    def _tokenize_segments(self, segments: Sequence[tuple[str, bool]], tokenizer: Any) -> TokenizedSample:
        # Every prefix ending at a segment boundary; the last one is the whole conversation.
        prefixes, text = [], ""
        for piece, _ in segments:
            text += piece
            prefixes.append(text)
        tokenized = _tokenize_texts(prefixes, tokenizer)
        input_ids = np.asarray(tokenized[-1], dtype=np.int32)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        start = 0
        for index, ((_, trained), prefix, prefix_text) in enumerate(zip(segments, tokenized, prefixes)):
            end = len(prefix)
            if end > len(input_ids) or not np.array_equal(input_ids[:end], prefix):
                boundary = "answer" if trained else "question"
                raise TokenizationMismatchError(
                    f"Template {self.name!r}, round {index // 2}: the tokens of the text up to the end "
                    f"of the {boundary} are not a prefix of the full tokenisation, so the label mask "
                    f"would be shifted. Prefix ends with {prefix[-4:]}, full has "
                    f"{input_ids[max(0, end - 4) : end + 2].tolist()} there. Text up to the boundary "
                    f"ends with {prefix_text[-60:]!r}. Use the template that matches the tokenizer, or "
                    f"a tokenizer that does not merge across '{self.assistant_tag}' / the end token.",
                    round_index=index // 2,
                    boundary=boundary,
                )
            if trained:
                labels[start:end] = input_ids[start:end]
            start = end
        return TokenizedSample(input_ids=input_ids, labels=labels)


@dataclasses.dataclass(frozen=True)
class PretrainTemplate(Template):
    """Stage-1 captioning: ``<image>{caption}\\n``; the question text is not used.

    Only the BOS (if any) and the image are masked; the caption and its newline are trained. There is
    no end token, as in the Factory.
    """

    end: str = "\n"
    system: str = ""

    def _segments(self, rounds):
        if len(rounds) != 1:
            raise ConversationError(
                "multi_turn_pretrain",
                f"The pretrain template takes one (image, caption) round, got {len(rounds)}.",
            )
        caption = rounds[0][1]
        return [(IMAGE_PLACEHOLDER, False), (f"{caption}\n", True)]

    def render(self, conversations, has_image):
        self._require_image(has_image)
        return super().render(conversations, has_image)

    def prompt(self, question: str, has_image: bool) -> str:
        """The captioning prompt: just the image (the question is ignored, as in training)."""
        self._require_image(has_image)
        return IMAGE_PLACEHOLDER

    def tokenize(self, conversations, tokenizer, has_image, *, strict=True):
        self._require_image(has_image)
        return super().tokenize(conversations, tokenizer, has_image, strict=strict)

    def _check_tokenizer(self, tokenizer):
        # The caption ends with a plain newline, which every tokenizer can encode.
        pass

    @staticmethod
    def _require_image(has_image: bool) -> None:
        if not has_image:
            raise ConversationError(
                "no_image_tag", "The pretrain template captions an image; has_image must be True."
            )


_TEMPLATES: dict[str, Template] = {
    "pretrain": PretrainTemplate(name="pretrain"),
    "llama": Template(name="llama", end="</s>"),
    "phi": Template(name="phi", end="<|endoftext|>"),
    "gemma": Template(name="gemma", end="<eos>"),
    "qwen2_base": Template(name="qwen2_base", end="<|endoftext|>"),
    "qwen2_instruct": Template(name="qwen2_instruct", end="<|im_end|>"),
}

TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


def get_template(name: str) -> Template:
    """The TinyLLaVA Factory template called ``name`` (its ``conv_version``)."""
    if name not in _TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; available: {list(_TEMPLATES)}.")
    return _TEMPLATES[name]
