"""One tokenizer interface over byte-level BPE, WordPiece and character-level vocabularies.

All three are Hugging Face ``tokenizers`` pipelines saved as a ``tokenizer.json``, so a single loader
handles them, and any external ``tokenizer.json`` (GPT-2, Llama, BERT, ...) works too. WordPiece is BERT's
(for encoders): its ``[SEP]`` is the end-of-text token, and its ``tokenizer.json`` carries BERT's
``[CLS] ... [SEP]`` template, so ``transformers`` frames texts as BERT does. Text written in a document that
happens to spell a special token (``<|endoftext|>``, ``[SEP]``) is encoded as plain text: the end-of-text id
only ever appears where it is added on purpose, between documents.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import UserError

EOT = "<|endoftext|>"
EOT_FALLBACKS = ("</s>", "<|end_of_text|>", "<eos>", "[SEP]")
"""End-of-text tokens of common external tokenizers (Llama 2, Llama 3, Gemma, BERT), tried after EOT."""
ENCODER_SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
"""The special tokens an encoder reads (BERT's): a text is ``[CLS] ... [SEP]``, padded with ``[PAD]``; masked-LM
training replaces tokens with ``[MASK]``."""


@dataclass(frozen=True)
class EncoderTokens:
    """The ids of an encoder's special tokens (:meth:`Tokenizer.encoder_tokens`)."""

    cls: int
    sep: int
    mask: int
    pad: int
    special: tuple[int, ...]
    """Every special (added) token's id, these and the end-of-text one: never masked, never a random replacement."""


MIN_BPE_VOCAB = 257
"""The 256 byte tokens plus EOT: below this, byte-level BPE cannot represent every text."""
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens of a trained WordPiece vocabulary: ids 0..4, in this order."""


class Tokenizer:
    """Encode/decode text; ``eot_id`` separates documents in the token stream."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        # Training text must never produce control tokens; the EOT id is added explicitly.
        self.hf.encode_special_tokens = True
        # allow_special switches that setting around one call: one call at a time may switch it (the server
        # encodes on several threads at once).
        self._switch = threading.Lock()
        eot = next((t for t in (EOT, *EOT_FALLBACKS) if hf.token_to_id(t) is not None), None)
        if eot is None:  # an external tokenizer without any end-of-text token: give it ours
            hf.add_special_tokens([AddedToken(EOT, special=True)])
            eot = EOT
        self._eot_id: int = hf.token_to_id(eot)
        # The embedding needs max id + 1 rows, which is more than the token count if ids have gaps.
        self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        self.source = "tokenizer"
        """Where the tokenizer was read from (its file), for messages."""

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer (GPT-2 style) on a stream of texts.

        Every byte is in the initial alphabet, so any text round-trips exactly; the vocabulary may
        end up smaller than ``vocab_size`` when the texts have fewer distinct merges to offer.
        """
        if vocab_size < MIN_BPE_VOCAB:
            raise UserError(f"data.vocab_size={vocab_size} is too small for byte-level BPE "
                            f"(at least {MIN_BPE_VOCAB}: 256 bytes + end-of-text)")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
        """Train a cased WordPiece tokenizer (BERT's, for encoders) on a stream of texts.

        Cased and accents kept, since the corpora are code and prose. Words split at whitespace and punctuation;
        whitespace is not kept (decoding is not the exact inverse) and a word of a character never seen, or of
        over 100 characters, becomes ``[UNK]``. The special tokens are ids 0..4 (:data:`WORDPIECE_SPECIALS`);
        ``[SEP]`` separates documents. UserError if ``vocab_size`` cannot hold every character of ``texts``
        (the trainer would silently return a larger vocabulary than asked).
        """
        hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=False, lowercase=False)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS),
                                            show_progress=show_progress)
        hf.train_from_iterator(texts, trainer)
        # Below the alphabet's size the trainer keeps every character (and its "##" continuation) anyway.
        if hf.get_vocab_size() > vocab_size:
            raise UserError(f"data.vocab_size={vocab_size} is too small for WordPiece on this corpus (at least "
                            f"{hf.get_vocab_size()}: {len(WORDPIECE_SPECIALS)} special tokens + every character, "
                            f"alone and continuing a word)")
        # Only add_special_tokens=True uses it (transformers' default), never our encode: BERT's framing.
        cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One id per distinct character of ``texts`` (sorted, so ids are deterministic), then EOT.

        A character never seen in ``texts`` has no id of its own and encodes as EOT.
        """
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        vocab[EOT] = len(vocab)
        hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=EOT))
        # Every character is its own pre-token (newlines too: onig's "." would skip them), and the
        # decoder concatenates without separators, so decode(encode(s)) == s.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([AddedToken(EOT, special=True)])
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``; UserError if it is missing or not a valid one."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"tokenizer file '{p}' does not exist")
        try:
            hf = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"'{p}' is not a valid tokenizer.json: {first}") from None
        tok = cls(hf)
        tok.source = str(p)
        return tok

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        self.hf.save(str(path))

    def to_str(self) -> str:
        """The tokenizer as a JSON string (how it is shipped to worker processes)."""
        return self.hf.to_str()

    @classmethod
    def from_str(cls, s: str) -> Tokenizer:
        """Inverse of :meth:`to_str`."""
        return cls(tokenizers.Tokenizer.from_str(s))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``, with no special tokens added.

        allow_special: special tokens spelled in the text become their ids (chat templates write
        ``<|endoftext|>`` or ``<|im_end|>`` on purpose); otherwise they are encoded as plain text.
        """
        with self._specials(allow_special):
            return self.hf.encode(text, add_special_tokens=False).ids

    @contextlib.contextmanager
    def _specials(self, allow_special: bool) -> Iterator[None]:
        """Special tokens spelled in the text become their ids inside the block if ``allow_special``."""
        with self._switch:
            if not allow_special:
                yield
                return
            self.hf.encode_special_tokens = False
            try:
                yield
            finally:
                self.hf.encode_special_tokens = True

    def token_to_id(self, token: str) -> int | None:
        """Id of a token (e.g. a special token), or None if the vocabulary lacks it."""
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def encoder_tokens(self) -> EncoderTokens:
        """The ids of ``[CLS] [SEP] [MASK] [PAD]``; a tokenizer without some of them (byte-level BPE, characters)
        gets them added as special tokens, after its last id, in that order: the same ids every time for the same
        tokenizer, so a run's saved tokenizer.json (which holds them) and a resumed run agree."""
        missing = [t for t in ENCODER_SPECIALS if self.hf.token_to_id(t) is None]
        if missing:
            self.hf.add_special_tokens([AddedToken(t, special=True) for t in missing])
            self._vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
        cls, sep, mask, pad = (self.hf.token_to_id(t) for t in ENCODER_SPECIALS)
        special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        return EncoderTokens(cls, sep, mask, pad, tuple(sorted(special | {self.eot_id, cls, sep, mask, pad})))

    def check_fits(self, vocab_size: int, model: str = "the model's vocabulary") -> None:
        """UserError unless every id has a row in a model vocabulary of ``vocab_size`` (named ``model``)."""
        if self.vocab_size > vocab_size:
            raise UserError(f"'{self.source}' has {self.vocab_size} tokens but {model} has {vocab_size}: "
                            f"they do not belong together")

    def encode_texts(self, texts: list[str], max_len: int, framed: bool = False) -> tuple[list[list[int]], int]:
        """Token ids of each text cut to its first ``max_len`` (and how many were cut); an empty text
        becomes the end-of-text token, so that every text has at least one. ``framed`` (for an encoder):
        each as ``[CLS] ids [SEP]``, the ids cut to leave room for both."""
        out, truncated = [], 0
        marks = self.encoder_tokens() if framed else None
        room = max_len - 2 if framed else max_len
        for ids in self.encode_batch(texts):
            if marks is None:
                ids = ids or [self.eot_id]
            truncated += len(ids) > room
            out.append([marks.cls, *ids[:room], marks.sep] if marks is not None else ids[:room])
        return out, truncated

    def pad_id(self, framed: bool = False) -> int:
        """The id that pads a batch: ``[PAD]`` for an encoder's (framed) texts, else end-of-text (a decoder never
        reads past a text's last token)."""
        return self.encoder_tokens().pad if framed else self.eot_id

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts (parallel inside ``tokenizers`` unless disabled).

        Unlike :meth:`encode`, the batch call releases the GIL while it works (a 1 MB text held it for seconds,
        measured), so other threads, such as the server's event loop, keep running meanwhile.
        """
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets: ~30% faster, less memory.
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        with self._specials(allow_special):
            return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are kept, so decoding is the exact inverse of encoding."""
        return self.hf.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids (the largest id + 1): the rows a model's embedding needs."""
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        return self._eot_id
