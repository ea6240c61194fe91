import pytest
import tokenizers
from tokenizers import models

from lmforge.data.tokenizer import EOT, EncoderTokens, Tokenizer
from lmforge.errors import UserError

TRAIN = ["def main():\n    print('hello world')\n", "Ünïcödé ∑ 𝔘 日本語 😀\r\n\ttabs\tand  spaces",
         "the quick brown fox jumps over the lazy dog. " * 20]
TRICKY = ["", " ", "\n\n\n", "\t\ta\r\n", "  leading and trailing  ", "日本語のテキスト",
          "emoji 😀👍🏽 zwj 👩‍👩‍👧", "e\u0301 combining", "\x00 nul \x7f del", "\ufffd replacement",
          "a <|endoftext|> b", "never seen: ʘ‿ʘ Ωμέγα"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(iter(TRAIN), vocab_size=300)


def test_bpe_roundtrip_is_exact_on_arbitrary_unicode(bpe):
    for text in TRICKY:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)


def test_bpe_vocab_has_all_bytes_and_eot(bpe):
    assert 257 <= bpe.vocab_size <= 300
    assert bpe.hf.token_to_id(EOT) == bpe.eot_id
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned


def test_special_token_text_in_a_document_is_plain_text(bpe):
    assert bpe.eot_id not in bpe.encode("a <|endoftext|> b")
    assert bpe.decode(bpe.encode("a") + [bpe.eot_id]) == "a" + EOT


def test_bpe_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size=100"):
        Tokenizer.train_bpe(TRAIN, vocab_size=100)


def test_char_tokenizer_has_one_sorted_id_per_character_plus_eot():
    tok = Tokenizer.train_char(["ba\n", "c a"])
    assert tok.vocab_size == 6 and tok.eot_id == 5
    assert tok.encode("\n abc") == [0, 1, 2, 3, 4]


def test_char_roundtrip_is_exact_for_seen_characters():
    tok = Tokenizer.train_char(TRICKY)
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text, repr(text)
        assert len(tok.encode(text)) == len(text)


def test_char_tokenizer_encodes_unseen_characters_as_eot():
    tok = Tokenizer.train_char(["ab"])
    assert tok.encode("axb") == [0, tok.eot_id, 1]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_and_string_forms_encode_alike(tmp_path, bpe, kind):
    tok = bpe if kind == "bpe" else Tokenizer.train_char(TRAIN)
    tok.save(tmp_path / "tokenizer.json")
    for other in (Tokenizer.from_file(tmp_path / "tokenizer.json"), Tokenizer.from_str(tok.to_str())):
        assert other.vocab_size == tok.vocab_size and other.eot_id == tok.eot_id
        assert other.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.json' does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="bad.json' is not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def _word_level(*words: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))


def test_external_tokenizer_uses_its_own_end_of_text_token():
    tok = Tokenizer(_word_level("<unk>", "hello", "</s>"))
    assert tok.eot_id == 2 and tok.vocab_size == 3


def test_external_tokenizer_without_end_of_text_gets_eot_added():
    tok = Tokenizer(_word_level("<unk>", "hello"))
    assert tok.eot_id == 2 and tok.vocab_size == 3
    assert tok.hf.id_to_token(tok.eot_id) == EOT


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return Tokenizer.train_wordpiece(iter(TRAIN), vocab_size=120)


def test_wordpiece_has_bert_specials_first_and_sep_ends_a_text(wordpiece):
    assert [wordpiece.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert wordpiece.eot_id == 3 and wordpiece.vocab_size == 120
    vocab = wordpiece.hf.get_vocab_size()
    assert wordpiece.encoder_tokens() == EncoderTokens(cls=2, sep=3, mask=4, pad=0, special=(0, 1, 2, 3, 4))
    assert wordpiece.hf.get_vocab_size() == vocab  # nothing added: the vocabulary has them all
    assert wordpiece.encode("the quick brown fox") == [wordpiece.token_to_id(w) for w in
                                                       ("the", "quick", "brown", "fox")]  # cased words learned
    assert wordpiece.encode("The") != wordpiece.encode("the")


def test_wordpiece_special_tokens_spelled_in_text_are_plain_text(wordpiece):
    ids = wordpiece.encode("a [SEP] b [CLS] [MASK] [PAD]")
    assert not set(ids) & {0, 2, 3, 4}
    assert wordpiece.encode("a [SEP] b", allow_special=True) == [*wordpiece.encode("a"), 3, *wordpiece.encode("b")]
    framed, cut = wordpiece.encode_texts(["the fox", "", "the " * 10], max_len=6, framed=True)
    fox = wordpiece.encode("the fox")
    assert framed == [[2, *fox, 3], [2, 3], [2, *wordpiece.encode("the " * 4), 3]] and cut == 1
    assert wordpiece.pad_id(framed=True) == 0 and wordpiece.pad_id() == 3


def test_wordpiece_vocab_too_small_for_the_characters_is_a_user_error():
    with pytest.raises(UserError, match=r"data.vocab_size=20 is too small for WordPiece on this corpus \(at least "
                                        r"\d+: 5 special tokens"):
        Tokenizer.train_wordpiece(TRAIN, vocab_size=20)


def test_transformers_bert_tokenizer_from_our_file_frames_like_bert(tmp_path, wordpiece):
    transformers = pytest.importorskip("transformers")
    wordpiece.save(tmp_path / "tokenizer.json")
    hf = transformers.BertTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id) == (2, 3, 0, 4)
    for text in (*TRAIN, "def  f(x):\n\treturn x. the lazy Dog", ""):
        assert hf(text, add_special_tokens=True)["input_ids"] == [2, *wordpiece.encode(text), 3], repr(text)
    pair = hf("the fox", "lazy dog")
    a, b = wordpiece.encode("the fox"), wordpiece.encode("lazy dog")
    assert pair["input_ids"] == [2, *a, 3, *b, 3]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.eot_id == 3 and loaded.encode_batch(TRICKY) == [wordpiece.encode(t) for t in TRICKY]
