"""The one-pass paper-format encoders against the authors' two-pass formula, written out in
tests/test_data_preprocess.authors_reference: ids = tokenizer(p + " " + r) and boundary =
len(tokenizer(p)), on every HumanEval record, adversarial strings and seeded random text. Two
one-pass paths exist, each only where proven: the cut at a word gap for GPT-2-style byte-level BPE
(SmolLM2), the boundary at the added space for SentencePiece-style BPE (Mistral); other tokenizers
keep the two passes."""

from __future__ import annotations

import random

import pytest

from tests.test_data_preprocess import authors_reference, humaneval
from wit_megatron.data.formats import PaperRecord
from wit_megatron.data.tokenize import PaperEncoder, last_word_gap, space_boundary_is_exact, split_at_word_gap_is_exact
from wit_megatron.testing import mistral, smollm2

# Characters around which a cut could go wrong: every kind of whitespace (ASCII, Unicode White_Space,
# the ones only Python calls space, and near-misses), letters, digits, contractions, punctuation runs,
# non-ASCII letters and marks, CJK, emoji, and special-token text.
WHITESPACE_LIKE = [
    " ", "  ", "\n", "\n\n", "\t", "\r\n", "\r", "\v", "\f", "\x1c", "\x1f", "\x85", "\xa0", "\u1680", "\u2000",
    "\u2028", "\u2029", "\u202f", "\u3000", "\u180e", "\u200b", "\ufeff", "\x7f", "\x00",
]
PIECES = WHITESPACE_LIKE + [
    "a", "word", "Word", "x", "'s", "'re", "'ll", "'", "don't", "1", "12", "2024", "3.14", "½", "Ⅻ",
    ":", '"""', "#", "(", ")", "->", "!=", "...", "def f(x):", "    return x",
    "é", "e\u0301", "ß", "Ж", "中文", "日本", "🙂", "👍🏽", "\u0663",
    "<|im_end|>", "<|im_start|>", "###eos_token###",
]

ADVERSARIAL_PROMPTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "x", "x ", "x  ", "x\n", "x\n ", "x \n", "x\t", "x\r\n", "x\r",
    "Question: 2+2?", "Question: 2+2? ", "Answer in French.\n\n", "ends with digits 123", "123 ",
    "it's", "it's ", "they're\n", "a'", "naïve café", "naïve café ", "中文 提示", "中文\n", "emoji 🙂", "emoji 🙂\n",
    "nbsp\xa0", "nbsp\xa0end", "ideographic\u3000space", "line\u2028sep", "next\x85line", "unit\x1fsep",
    "zero\u200bwidth", "mongolian\u180evowel", "combining e\u0301", "combining e\u0301 ", "tab\tthen\ttabs\t",
    "chat <|im_end|> inside", "chat <|im_end|>", "<|im_start|>", "trailing spaces   ", "   leading",
    '    """\n', "def f():\n    ", "x = 1\n\n\n", "###eos_token###",
]
# Every whitespace-like character between a letter, digit, punctuation or non-ASCII character and
# what may follow it: where a wrong notion of "word gap" would cut.
ADVERSARIAL_PROMPTS += [left + ws + right for left in ("a", "1", ":", '"', "é", "中", "🙂") for ws in WHITESPACE_LIKE
                        for right in ("", "b", ":", "\n")]
ADVERSARIAL_RESPONSES = [
    "y", " y", "  y", "\ny", "\n    return 1", "\t\tz", "123", "'s", "🙂", "中文", "\xa0nbsp", "\u2028",
    "e\u0301", "<|im_end|> more", "###eos_token###", "hi###eos_token###", "x ",
]


def random_text(rng: random.Random, max_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def assert_equals_formula(tokenizer, records: list[dict], append_eos: bool = True) -> None:
    encoder = PaperEncoder(tokenizer, append_eos=append_eos)
    pairs = [encoder.texts(PaperRecord(r["prompt"], r["response"])) for r in records]
    ids, boundaries = encoder.ids_and_boundaries(pairs)
    for i, record in enumerate(records):
        expected_ids, expected_boundary = authors_reference(tokenizer, record, append_eos=append_eos)
        assert (ids[i], boundaries[i]) == (expected_ids, expected_boundary), f"record {i}: {record!r}"
    if encoder.split_at_word_gap:
        assert_cuts_are_word_boundaries(tokenizer, pairs)


def assert_cuts_are_word_boundaries(tokenizer, pairs: list[tuple[str, str]]) -> None:
    """The proof's premise, checked on the pre-tokenizer itself (a wrong cut can hide behind a BPE
    vocabulary that happens to have no merge across it): cutting the prompt and the joined text at
    the cut leaves their pre-tokenization (the words BPE sees) unchanged."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer

    def words(text):
        return [w for w, _ in pre.pre_tokenize_str(text)]

    for prompt, joined in pairs:
        cut = last_word_gap(joined, len(prompt))
        for text in (prompt, joined):
            assert words(text) == words(text[:cut]) + words(text[cut:]), (text, cut)


def smollm2_with_bos():
    """SmolLM2's byte-level BPE with a post-processor that puts a BOS in front, as GPT-2-style
    tokenizers with BOS do: the head of a cut must carry it, the tails must not."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(smollm2.load_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")


ENABLED = {"smollm2": smollm2.load_tokenizer, "smollm2 + BOS": smollm2_with_bos}


@pytest.mark.parametrize("name", sorted(ENABLED))
def test_fast_path_equals_the_formula_on_humaneval_and_adversarial_text(name):
    tokenizer = ENABLED[name]()
    assert split_at_word_gap_is_exact(tokenizer)
    assert_equals_formula(tokenizer, humaneval())
    assert_equals_formula(tokenizer, humaneval(), append_eos=False)
    adversarial = [{"prompt": p, "response": r} for p in ADVERSARIAL_PROMPTS for r in ADVERSARIAL_RESPONSES]
    assert_equals_formula(tokenizer, adversarial)
    rng = random.Random(0)
    fuzz = [{"prompt": random_text(rng, 12), "response": random_text(rng, 6) or "r"} for _ in range(3000)]
    assert_equals_formula(tokenizer, fuzz)


def test_fast_path_only_where_proven():
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    assert not split_at_word_gap_is_exact(mistral.load_tokenizer())  # Metaspace (SentencePiece): the other path
    source = smollm2.load_tokenizer().backend_tokenizer.to_str()
    appends_eos = Tokenizer.from_str(source)
    appends_eos.post_processor = processors.TemplateProcessing(single="$A <|im_end|>", special_tokens=[("<|im_end|>", 2)])
    strips = Tokenizer.from_str(source)
    strips.add_tokens([AddedToken("<mask>", lstrip=True)])
    spaced = Tokenizer.from_str(source)
    spaced.add_tokens([AddedToken("two words")])
    for backend in (appends_eos, strips, spaced):
        assert not split_at_word_gap_is_exact(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>"))


def test_two_pass_fallback_equals_the_formula_on_adversarial_text():
    encoder = PaperEncoder(mistral.load_tokenizer())
    encoder.boundary_at_space = False  # the plain two passes, as tokenizers outside both families get them
    adversarial = [{"prompt": p, "response": r} for p in ADVERSARIAL_PROMPTS for r in ADVERSARIAL_RESPONSES[:6]]
    pairs = [encoder.texts(PaperRecord(r["prompt"], r["response"])) for r in adversarial]
    assert encoder.ids_and_boundaries(pairs) == tuple(map(list, zip(*[authors_reference(encoder.tokenizer, r) for r in adversarial])))


def test_space_boundary_equals_the_formula_on_humaneval_and_adversarial_text():
    """SentencePiece-style BPE (Mistral's): one pass, the boundary at the token that starts at the
    added space; it is taken for all HumanEval prompts but two (prompts the proof leaves out)."""
    tokenizer = mistral.load_tokenizer()
    assert space_boundary_is_exact(tokenizer) and not split_at_word_gap_is_exact(tokenizer)
    encoder = PaperEncoder(tokenizer)
    records = humaneval()
    pairs = [encoder.texts(PaperRecord(r["prompt"], r["response"])) for r in records]
    second_pass = []
    real_encode = encoder._encode_texts
    encoder._encode_texts = lambda texts, **kw: second_pass.extend(texts) or real_encode(texts, **kw)
    encoder.ids_and_boundaries(pairs)
    assert len(second_pass) == 2 and all(p.endswith(" ") or not p for p in second_pass)
    assert_equals_formula(tokenizer, records)
    assert_equals_formula(tokenizer, records, append_eos=False)
    adversarial = [{"prompt": p, "response": r} for p in ADVERSARIAL_PROMPTS for r in ADVERSARIAL_RESPONSES]
    assert_equals_formula(tokenizer, adversarial)
    rng = random.Random(0)
    fuzz = [{"prompt": random_text(rng, 12), "response": random_text(rng, 6) or "r"} for _ in range(3000)]
    assert_equals_formula(tokenizer, fuzz)


def test_space_boundary_only_where_proven():
    """A merge across the space (a piece "s▁the") voids the proof: the check refuses it, and that
    tokenizer's prompt tokens are indeed not a prefix of the joined ones."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(mistral.load_tokenizer().backend_tokenizer.to_str())
    spec["model"]["vocab"]["s▁the"] = max(spec["model"]["vocab"].values()) + 1
    spec["model"]["merges"].insert(0, ["s", "▁the"])
    crossing = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>")
    assert not space_boundary_is_exact(crossing)
    prompt, joined = crossing("its").input_ids, crossing("its the").input_ids
    assert joined[: len(prompt)] != prompt
    assert_equals_formula(crossing, [{"prompt": "its", "response": "the end"}, {"prompt": "Is this", "response": "the one?"}])
    assert not space_boundary_is_exact(smollm2.load_tokenizer())
