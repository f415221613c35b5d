"""TinyLLaVA Factory chat templates on offline tokenizers that behave like the real families."""

import logging
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qtl_jax.data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from qtl_jax.data.templates import (
    TEMPLATE_NAMES,
    VICUNA_SYSTEM,
    ConversationError,
    TokenizationMismatchError,
    TokenizedSample,
    get_template,
    tokenize_with_images,
)

WORDS = (
    "what colour is the cat dog square circle how many cats are there describe image a red blue "
    "green orange two three yes no left right of in picture it this next to".split()
)
CORPUS = [
    VICUNA_SYSTEM,
    "USER: What colour is the cat? ASSISTANT: The cat is orange.",
    "USER: How many cats are there? ASSISTANT: Two.",
    "USER: Describe the image. ASSISTANT: A red square next to a blue circle.",
    "Is there a dog?\nNo, there is no dog in the picture.",
    "Yes. No. Red, green, blue, orange; left/right (A) (B) " + " ".join(WORDS),
    # Every ASCII character, so no text maps to <unk>: Llama pads with <unk>, and the Factory's
    # length check counts non-pad tokens, so an <unk> in the text would look like a mismatch there.
    " ".join(string.ascii_letters + string.digits + string.punctuation),
] * 3
# Qwen2's pre-tokenizer split pattern (digits one by one, a leading space kept with letters).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _sentencepiece_like(specials, bos, eos, unk, pad, prepend, extra=()):
    """Llama / Gemma style: byte-fallback BPE over '▁'-prefixed words, BOS added by the tokenizer."""
    tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme=prepend, split=True), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme=prepend)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        additional_special_tokens=list(extra) or None,
    )


def _byte_level(specials, eos, pad, qwen2):
    """GPT-2 / Phi style (no BOS added; <|endoftext|> is bos, eos and pad) or Qwen2 style."""
    tok = Tokenizer(models.BPE())
    if qwen2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    extra = [s for s in specials if s not in (eos, pad)]
    kwargs = {} if qwen2 else dict(bos_token=eos, unk_token=eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, additional_special_tokens=extra or None, **kwargs
    )


QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILDERS = {
    "llama": lambda: _sentencepiece_like(["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", "<unk>", "first"),
    "gemma": lambda: _sentencepiece_like(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<unk>",
        "<pad>", "never", ["<start_of_turn>", "<end_of_turn>"],
    ),
    "phi": lambda: _byte_level(["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", qwen2=False),
    # Qwen2 base ends text with <|endoftext|>; Qwen2-Instruct's eos is <|im_end|>.
    "qwen2_base": lambda: _byte_level(QWEN2_SPECIALS, "<|endoftext|>", "<|endoftext|>", qwen2=True),
    "qwen2_instruct": lambda: _byte_level(QWEN2_SPECIALS, "<|im_end|>", "<|endoftext|>", qwen2=True),
}
TOKENIZER_FOR_TEMPLATE = {
    "llama": "llama", "gemma": "gemma", "phi": "phi", "qwen2_base": "qwen2_base",
    "qwen2_instruct": "qwen2_instruct", "pretrain": "llama",
}


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    """Each family saved with save_pretrained and reloaded through AutoTokenizer (the real code path)."""
    out = {}
    for name, build in BUILDERS.items():
        directory = tmp_path_factory.mktemp(name)
        build().save_pretrained(directory)
        out[name] = AutoTokenizer.from_pretrained(directory)
    return out


def _show(sample, tokenizer):
    """Tokens as strings, '<IMG>' for the image, '*' marking the trained ones."""
    out = []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        text = "<IMG>" if token == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(token)
        out.append(text + ("*" if label != IGNORE_INDEX else ""))
    return out


def _check_label_values(sample):
    trained = sample.labels != IGNORE_INDEX
    np.testing.assert_array_equal(sample.labels[trained], sample.input_ids[trained])
    assert not np.any(trained & (sample.input_ids == IMAGE_TOKEN_INDEX))
    assert sample.input_ids.dtype == np.int32 and sample.labels.dtype == np.int32


MULTI_TURN_IMAGE = [
    {"from": "human", "value": "What colour is the cat?\n<image>"},
    {"from": "gpt", "value": "The cat is orange."},
    {"from": "human", "value": "How many cats are there?"},
    {"from": "gpt", "value": "Two."},
]
TEXT_ONLY = [
    {"from": "human", "value": "Is there a dog?"},
    {"from": "gpt", "value": "No, there is no dog in the picture."},
]
SYSTEM_TOKENS_SP = (
    "▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The ▁assistant "
    "▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁user ' s ▁questions ."
).split()
SYSTEM_TOKENS_BYTE = (
    "A Ġchat Ġbetween Ġa Ġcurious Ġuser Ġand Ġan Ġartificial Ġintelligence Ġassistant . ĠThe Ġassistant "
    "Ġgives Ġhelpful , Ġdetailed , Ġand Ġpolite Ġanswers Ġto Ġthe Ġuser 's Ġquestions ."
).split()


def test_registry():
    assert TEMPLATE_NAMES == ("pretrain", "llama", "phi", "gemma", "qwen2_base", "qwen2_instruct")
    assert [get_template(n).stop_str for n in TEMPLATE_NAMES] == [
        "\n", "</s>", "<|endoftext|>", "<eos>", "<|endoftext|>", "<|im_end|>"
    ]
    with pytest.raises(ValueError, match="Unknown chat template 'vicuna_v1'"):
        get_template("vicuna_v1")


@pytest.mark.parametrize("name,end", [
    ("llama", "</s>"), ("phi", "<|endoftext|>"), ("gemma", "<eos>"), ("qwen2_base", "<|endoftext|>"),
    ("qwen2_instruct", "<|im_end|>"),
])
def test_render_and_prompt_exact(name, end):
    template = get_template(name)
    # The image tag moves to the front of its question, on its own line.
    assert template.render(MULTI_TURN_IMAGE, has_image=True) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the cat? ASSISTANT: The cat is orange.{end}"
        f"USER: How many cats are there? ASSISTANT: Two.{end}"
    )
    assert template.prompt("What is it?", has_image=True) == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    assert template.prompt("What is it?", has_image=False) == f"{VICUNA_SYSTEM} USER: What is it? ASSISTANT:"
    assert template.prompt("What is it? <image>", has_image=True) == template.prompt("What is it?", True)
    # A question that is only the image tag keeps no trailing newline.
    image_only = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A cat."}]
    assert template.render(image_only, has_image=True) == f"{VICUNA_SYSTEM} USER: <image> ASSISTANT: A cat.{end}"


def test_llama_multi_turn_with_image_hand_checked(tokenizers_):
    tok = tokenizers_["llama"]
    sample = get_template("llama").tokenize(MULTI_TURN_IMAGE, tok, has_image=True)
    # The piece after the image is tokenised on its own, so it starts with the sentencepiece '▁'
    # (as real Llama's 29871); after </s> the next word has no '▁' (non-legacy behaviour).
    assert _show(sample, tok) == ["<s>"] + SYSTEM_TOKENS_SP + [
        "▁USER", ":", "▁", "<IMG>", "▁", "\n", "W", "hat", "▁colour", "▁is", "▁the", "▁cat", "?", "▁ASSISTANT", ":",
        "▁The*", "▁cat*", "▁is*", "▁orange*", ".*", "</s>*",
        "U", "SER", ":", "▁How", "▁many", "▁cats", "▁are", "▁there", "?", "▁ASSISTANT", ":",
        "▁Two*", ".*", "</s>*",
    ]
    assert sample.num_images == 1 and sample.input_ids[0] == tok.bos_token_id
    _check_label_values(sample)


def test_gemma_multi_turn_with_image_hand_checked(tokenizers_):
    tok = tokenizers_["gemma"]
    sample = get_template("gemma").tokenize(MULTI_TURN_IMAGE, tok, has_image=True)
    # Gemma adds <bos> but no dummy '▁' prefix; the template does not use <start_of_turn>.
    system = ["A"] + SYSTEM_TOKENS_SP[1:]
    assert _show(sample, tok) == ["<bos>"] + system + [
        "▁", "USER", ":", "▁", "<IMG>", "\n", "W", "hat", "▁colour", "▁is", "▁the", "▁cat", "?", "▁ASSISTANT", ":",
        "▁The*", "▁cat*", "▁is*", "▁orange*", ".*", "<eos>*",
        "USER", ":", "▁How", "▁many", "▁cats", "▁are", "▁there", "?", "▁ASSISTANT", ":",
        "▁Two*", ".*", "<eos>*",
    ]
    _check_label_values(sample)


def test_phi_text_only_hand_checked(tokenizers_):
    tok = tokenizers_["phi"]
    sample = get_template("phi").tokenize(TEXT_ONLY, tok, has_image=False)
    # 'ĠUSER' and 'ĠIs' are not in this small vocabulary, so the space is a token of its own.
    assert _show(sample, tok) == SYSTEM_TOKENS_BYTE + [
        "Ġ", "USER", ":", "Ġ", "Is", "Ġthere", "Ġa", "Ġdog", "?", "ĠASSISTANT", ":",
        "ĠNo*", ",*", "Ġthere*", "Ġis*", "Ġno*", "Ġdog*", "Ġin*", "Ġthe*", "Ġpicture*", ".*", "<|endoftext|>*",
    ]
    assert sample.num_images == 0
    _check_label_values(sample)


def test_qwen2_base_multi_turn_with_image_hand_checked(tokenizers_):
    tok = tokenizers_["qwen2_base"]
    sample = get_template("qwen2_base").tokenize(MULTI_TURN_IMAGE, tok, has_image=True)
    assert _show(sample, tok) == SYSTEM_TOKENS_BYTE + [
        "Ġ", "USER", ":", "Ġ", "<IMG>", "Ċ", "W", "hat", "Ġcolour", "Ġis", "Ġthe", "Ġcat", "?", "ĠASSISTANT", ":",
        "ĠThe*", "Ġcat*", "Ġis*", "Ġorange*", ".*", "<|endoftext|>*",
        "USER", ":", "ĠHow", "Ġmany", "Ġcats", "Ġare", "Ġthere", "?", "ĠASSISTANT", ":",
        "ĠTwo*", ".*", "<|endoftext|>*",
    ]
    _check_label_values(sample)


def test_qwen2_instruct_text_only_multi_turn_hand_checked(tokenizers_):
    tok = tokenizers_["qwen2_instruct"]
    conversation = TEXT_ONLY + [{"from": "human", "value": "Yes?"}, {"from": "gpt", "value": "No."}]
    sample = get_template("qwen2_instruct").tokenize(conversation, tok, has_image=False)
    assert _show(sample, tok) == SYSTEM_TOKENS_BYTE + [
        "Ġ", "USER", ":", "Ġ", "Is", "Ġthere", "Ġa", "Ġdog", "?", "ĠASSISTANT", ":",
        "ĠNo*", ",*", "Ġthere*", "Ġis*", "Ġno*", "Ġdog*", "Ġin*", "Ġthe*", "Ġpicture*", ".*", "<|im_end|>*",
        "USER", ":", "Ġ", "Yes", "?", "ĠASSISTANT", ":", "ĠNo*", ".*", "<|im_end|>*",
    ]
    _check_label_values(sample)


def test_pretrain_hand_checked(tokenizers_):
    template = get_template("pretrain")
    caption = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "The cat is orange."}]
    assert template.render(caption, has_image=True) == "<image>The cat is orange.\n"
    assert template.prompt("ignored", has_image=True) == "<image>"
    llama = template.tokenize(caption, tokenizers_["llama"], has_image=True)
    # Only BOS and the image are masked; the caption and its newline are trained, no end token.
    assert _show(llama, tokenizers_["llama"]) == ["<s>", "<IMG>", "▁The*", "▁cat*", "▁is*", "▁orange*", ".*", "\n*"]
    qwen = template.tokenize(caption, tokenizers_["qwen2_base"], has_image=True)
    assert _show(qwen, tokenizers_["qwen2_base"]) == ["<IMG>", "T*", "he*", "Ġcat*", "Ġis*", "Ġorange*", ".*", "Ċ*"]
    for sample in (llama, qwen):
        _check_label_values(sample)
    with pytest.raises(ConversationError, match="has_image must be True"):
        template.tokenize(TEXT_ONLY, tokenizers_["llama"], has_image=False)
    with pytest.raises(ConversationError, match="one \\(image, caption\\) round"):
        template.tokenize(caption + TEXT_ONLY, tokenizers_["llama"], has_image=True)


def test_tokenize_prompt_for_generation(tokenizers_):
    tok = tokenizers_["llama"]
    template = get_template("llama")
    ids = template.tokenize_prompt("What colour is the cat?", tok, has_image=True)
    train = template.tokenize(MULTI_TURN_IMAGE[:2], tok, has_image=True)
    # The generation prompt is exactly the masked head of the training sample.
    first_trained = int(np.argmax(train.labels != IGNORE_INDEX))
    np.testing.assert_array_equal(ids, train.input_ids[:first_trained])
    assert ids.dtype == np.int32


def test_tokenize_with_images_keeps_one_bos(tokenizers_):
    tok = tokenizers_["llama"]
    ids = tokenize_with_images("a <image> b <image>", tok)
    assert ids == [tok.bos_token_id] + tok("a ").input_ids[1:] + [IMAGE_TOKEN_INDEX] + tok(" b ").input_ids[1:] + [
        IMAGE_TOKEN_INDEX
    ]
    assert tokenize_with_images("<image>", tokenizers_["phi"]) == [IMAGE_TOKEN_INDEX]


def _factory_labels(name, prompt, input_ids, tokenizer, legacy):
    """TinyLLaVA Factory's label algorithm (Template.make_labels/_make_masks @53f12c7), restated.

    It walks the prompt split at the end string, measures each round and its instruction by
    tokenising them on their own, and, when the lengths do not add up to the sample's token count,
    discards the sample (the Factory sets every label to IGNORE_INDEX; here: returns None). For the
    ``llama`` template a non-``legacy`` tokenizer shortens every later round by one token, which is
    right for some vocabularies and wrong for others, hence both variants.
    """
    labels = input_ids.copy()
    if name == "pretrain":
        labels[: len(tokenize_with_images("<image>", tokenizer))] = IGNORE_INDEX
        return labels
    end, separator = get_template(name).end, " ASSISTANT: "
    total = int(np.sum(input_ids != tokenizer.pad_token_id))
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        total += prompt.count(end)
    with_bos = name in ("llama", "gemma")
    cursor = 1 if with_bos else 0
    labels[:cursor] = IGNORE_INDEX
    end_length = 1 if with_bos else len(tokenizer.encode(end))
    for i, round_text in enumerate(prompt.split(end)):
        parts = round_text.split(separator)
        if round_text == "" or len(parts) != 2:
            break
        round_length = len(tokenize_with_images(round_text, tokenizer)) + end_length - with_bos
        instruction_length = len(tokenize_with_images(parts[0] + separator, tokenizer)) - 1 - with_bos
        if name == "llama" and i > 0 and not legacy:
            round_length, instruction_length = round_length - 1, instruction_length - 1
        labels[cursor : cursor + instruction_length] = IGNORE_INDEX
        cursor += round_length
    labels[cursor:] = IGNORE_INDEX
    return labels if cursor == total else None


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_labels_equal_the_factory_on_the_examples(tokenizers_, name):
    tok = tokenizers_[TOKENIZER_FOR_TEMPLATE[name]]
    template = get_template(name)
    conversations = [(MULTI_TURN_IMAGE[:2], True)] if name == "pretrain" else [
        (MULTI_TURN_IMAGE, True), (TEXT_ONLY, False), (TEXT_ONLY * 3, False)
    ]
    for turns, has_image in conversations:
        sample = template.tokenize(turns, tok, has_image=has_image)
        prompt = template.render(turns, has_image)
        accepted = [
            expected for legacy in (True, False)
            if (expected := _factory_labels(name, prompt, sample.input_ids, tok, legacy)) is not None
        ]
        if name == "llama" and len(turns) > 2:
            # 'USER' after '</s>' is two tokens ('U', 'SER') with this vocabulary but one ('▁USER')
            # when a round is tokenised alone, so the Factory's length check drops multi-turn samples
            # (neither legacy variant fits); ours keeps them with the hand-checked labels above.
            assert accepted == []
            continue
        assert accepted, "the Factory accepts these samples"
        for expected in accepted:
            np.testing.assert_array_equal(sample.labels, expected)


@st.composite
def _conversations(draw):
    sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(
        lambda words: " ".join(words).capitalize()
    )
    rounds = draw(st.integers(1, 3))
    has_image = draw(st.booleans())
    image_round = draw(st.integers(0, rounds - 1))
    turns = []
    for i in range(rounds):
        question = draw(sentence) + draw(st.sampled_from(["?", "", " (A) or (B)?"]))
        if has_image and i == image_round:
            question = draw(st.sampled_from(["<image>\n" + question, question + "\n<image>", "<image> " + question]))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": draw(sentence) + "."}]
    return turns, has_image


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(TEMPLATE_NAMES[1:]), conversation=_conversations())
def test_property_labels_cover_exactly_the_answers_and_agree_with_the_factory(tokenizers_, name, conversation):
    turns, has_image = conversation
    tok = tokenizers_[TOKENIZER_FOR_TEMPLATE[name]]
    template = get_template(name)
    sample = template.tokenize(turns, tok, has_image=has_image)
    _check_label_values(sample)
    assert sample.num_images == int(has_image)
    # Wherever the Factory accepts the sample, it computes the same labels.
    for legacy in (True, False):
        expected = _factory_labels(name, template.render(turns, has_image), sample.input_ids, tok, legacy)
        if expected is not None:
            np.testing.assert_array_equal(sample.labels, expected)
    # Each trained span decodes to one answer followed by the end token.
    trained = np.flatnonzero(sample.labels != IGNORE_INDEX)
    spans = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    answers = [t["value"] for t in turns[1::2]]
    assert [tok.decode(sample.input_ids[s]).strip() for s in spans] == [a + template.end for a in answers]


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory):
    """A Llama-like tokenizer with a token spanning 'ASSISTANT:' and the answer, like BPE merges can."""
    directory = tmp_path_factory.mktemp("merging")
    tok = BUILDERS["llama"]()
    tok.add_tokens([AddedToken(": Yes", normalized=False)])
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_tokenization_mismatch_raises_or_skips(merging_tokenizer, caplog):
    template = get_template("llama")
    conversation = [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "Yes."}]
    with pytest.raises(TokenizationMismatchError, match="round 0: the tokens of the text up to the end of the question") as info:
        template.tokenize(conversation, merging_tokenizer, has_image=False)
    assert info.value.reason == "tokenization_mismatch"
    assert (info.value.round_index, info.value.boundary) == (0, "question")
    with caplog.at_level(logging.WARNING, logger="qtl_jax.data.templates"):
        assert template.tokenize(conversation, merging_tokenizer, has_image=False, strict=False) is None
    assert "Skipping a sample (tokenization_mismatch)" in caplog.text
    # Other answers are unaffected by the extra token.
    ok = [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "No."}]
    assert template.tokenize(ok, merging_tokenizer, has_image=False, strict=False) is not None


def test_leading_gpt_turn_is_dropped(tokenizers_):
    template = get_template("llama")
    with_leading = [{"from": "gpt", "value": "Hello."}] + TEXT_ONLY
    assert template.render(with_leading, has_image=False) == template.render(TEXT_ONLY, has_image=False)


@pytest.mark.parametrize("conversation,has_image,reason", [
    ([], False, "empty_conversation"),
    ([{"from": "gpt", "value": "Hi."}], False, "empty_conversation"),
    ([{"from": "human", "value": "Hi?"}], False, "unanswered_question"),
    ([{"from": "human", "value": "Hi?"}, {"from": "human", "value": "Hi?"}], False, "wrong_roles"),
    ([{"from": "human", "value": "Hi?"}, {"from": "assistant", "value": "Hi."}], False, "wrong_roles"),
    ([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": 3}], False, "malformed"),
    ([{"from": "human", "value": "Hi?"}, {"value": "Hi."}], False, "malformed"),
    ([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "<image>"}], False, "image_in_answer"),
    (TEXT_ONLY, True, "no_image_tag"),
    ([{"from": "human", "value": "<image><image>Hi?"}, {"from": "gpt", "value": "Hi."}], True, "multiple_image_tags"),
    (MULTI_TURN_IMAGE, False, "unexpected_image_tag"),
])
def test_malformed_conversations_raise_with_a_reason(tokenizers_, conversation, has_image, reason):
    with pytest.raises(ConversationError) as info:
        get_template("llama").tokenize(conversation, tokenizers_["llama"], has_image=has_image, strict=False)
    assert info.value.reason == reason


def test_tokenized_sample_validates_shapes():
    with pytest.raises(ValueError, match="same length"):
        TokenizedSample(input_ids=np.zeros(3, np.int32), labels=np.zeros(2, np.int32))


@pytest.mark.parametrize("name,tokenizer", [("llama", "qwen2_base"), ("qwen2_instruct", "llama"), ("gemma", "phi")])
def test_template_for_another_llm_is_rejected(tokenizers_, name, tokenizer):
    with pytest.raises(ValueError, match=f"Template '{name}' ends answers with .* not a token of this tokenizer"):
        get_template(name).tokenize(TEXT_ONLY, tokenizers_[tokenizer], has_image=False, strict=False)
