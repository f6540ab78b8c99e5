"""Train a sentencepiece BPE tokenizer the way LLaMA's was trained, and Meta's wrapper shape.

LLaMA's tokenizer.model records its trainer settings: BPE, byte fallback (no
unknown characters, ever), digits split one by one, identity normalisation
(the text is taken as it is, whitespace included), unk=0 bos=1 eos=2 and no pad.
We train with the same ones, so the file drops into Meta's code unchanged.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer, set_random_generator_seed

from llama_dist.errors import UserError
from llama_dist.sources import Corpus, parse_size

TOKENIZER_FILE = "tokenizer.model"
# sentencepiece keeps a uniform sample of this many lines; more buys little and costs minutes
DEFAULT_INPUT_SENTENCE_SIZE = 1_000_000
MAX_SENTENCE_BYTES = 4192  # LLaMA's setting; longer lines are left out of training
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")  # Llama 3's tokenizer.model: "IQ== 0"

LLAMA_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single pieces
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=MAX_SENTENCE_BYTES,
    shuffle_input_sentence=True,
)


def tiktoken_base_size(path: Path) -> Optional[int]:
    """How many BPE ranks `path` holds if it is Llama 3's tokenizer.model (tiktoken's format: one
    base64 token and its rank a line, not sentencepiece), else None."""
    with open(path, "rb") as f:
        if not TIKTOKEN_LINE.fullmatch(f.readline().rstrip(b"\r\n")):
            return None
        f.seek(0)
        lines = [line.rstrip(b"\r\n") for line in f if line.strip()]
    return len(lines) if all(TIKTOKEN_LINE.fullmatch(line) for line in lines) else None


class Tokenizer:
    """Meta's tokenizer shape: encode(s, bos, eos), decode(ids), n_words, bos_id, eos_id, pad_id."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"tokenizer {path} not found; train one with `llama-dist tokenizer --input SRC "
                            f"--vocab-size N --out DIR`")
        try:
            self.sp_model = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            if tiktoken_base_size(path) is not None:
                raise UserError(f"{path} is Llama 3's tiktoken tokenizer, and llama_dist reads sentencepiece "
                                f"models only; export the checkpoint (llama-dist export-hf) and use it with "
                                f"the release's tokenizer.json in transformers") from None
            raise UserError(f"{path} is not a sentencepiece model ({err})") from None
        self.path = path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        assert self.sp_model.vocab_size() == self.sp_model.get_piece_size()

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp_model.decode(list(ids))


def make_out_dir(out: Path) -> None:
    """Create --out (and its parents); a file in the way is the user's mistake, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--out {out} is a file; give a directory") from None
    except NotADirectoryError:
        raise UserError(f"--out {out} lies under a file, not a directory; give a directory") from None


def _too_long(line: str) -> bool:
    """Longer than sentencepiece's max_sentence_length, which it counts in UTF-8 bytes."""
    return len(line) > MAX_SENTENCE_BYTES or (4 * len(line) > MAX_SENTENCE_BYTES
                                              and len(line.encode()) > MAX_SENTENCE_BYTES)


def _sentences(corpus: Corpus, counter: list[int], progress: bool) -> Iterator[str]:
    """Non-blank lines of every document: sentencepiece's unit of training text.

    counter[0] counts them and counter[1] those too long for sentencepiece to keep.
    """
    from tqdm import tqdm

    bar = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
               desc="read corpus", disable=not progress)
    seen = 0
    try:
        for doc in corpus.documents():
            for line in doc.split("\n"):
                if line.strip():
                    counter[0] += 1
                    counter[1] += _too_long(line)
                    yield line
            bar.update(corpus.stats.bytes - seen)
            seen = corpus.stats.bytes
    finally:
        bar.close()


def _keeping_error(sentences: Iterator[str], errors: list[BaseException]) -> Iterator[str]:
    """The sentences, remembering what stopped them: sentencepiece hands an exception raised
    here back as its own INTERNAL error, with the message mangled and a stack fragment added."""
    try:
        yield from sentences
    except (Exception, KeyboardInterrupt) as err:  # not GeneratorExit: closing it is no error
        errors.append(err)
        raise


def _training_failure(err: RuntimeError, vocab_size: int, counter: list[int]) -> UserError:
    """One line on why sentencepiece refused to train."""
    if counter[0] and counter[1] == counter[0]:
        return UserError(
            f"every line of the corpus is longer than {MAX_SENTENCE_BYTES} bytes, the longest sentencepiece "
            "trains on; give it text with line breaks (not one-line JSON, nor CR-only line ends)")
    # sentencepiece's checks read "INTERNAL: file(line) [condition] message": keep the message
    message = str(err).split("] ", 1)[-1].strip() or str(err).strip()
    return UserError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {message}")


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
    max_bytes: Optional[int] = None,
    text_field: Optional[str] = None,
    seed: int = 0,
    num_threads: Optional[int] = None,
    progress: bool = True,
) -> Path:
    """Train on the inputs, write `out_dir/tokenizer.model` atomically, return its path.

    sentencepiece samples `input_sentence_size` lines uniformly, so a big corpus costs
    reading time, not training memory; `max_bytes` reads only a prefix.
    """
    if vocab_size < 260:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 259 ids "
                        "(256 bytes + unk, bos, eos)")
    if input_sentence_size <= 0:
        raise UserError(f"input_sentence_size must be positive, got {input_sentence_size}")
    corpus = Corpus(inputs, text_field=text_field, max_bytes=max_bytes)
    out = Path(out_dir)
    make_out_dir(out)
    start = time.perf_counter()
    model = io.BytesIO()
    counter = [0, 0]
    errors: list[BaseException] = []
    set_random_generator_seed(seed)  # the sentence sample, hence the vocabulary, is reproducible
    try:
        SentencePieceTrainer.train(
            sentence_iterator=_keeping_error(_sentences(corpus, counter, progress), errors),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # sentencepiece otherwise logs thousands of lines
            **LLAMA_TRAINER_SETTINGS,
        )
    except RuntimeError as err:
        if errors:  # the corpus's own error (a bad JSON line, Ctrl-C), as it was raised
            raise errors[0] from None
        raise _training_failure(err, vocab_size, counter) from None
    if errors:  # in case sentencepiece took the error for the end of the input
        raise errors[0]
    path = out / TOKENIZER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    if warning := corpus.stats.warning():
        print(warning)
    if progress:
        sampled = min(counter[0], input_sentence_size)
        print(f"tokenizer: {vocab_size} tokens learned from {sampled:,} of {counter[0]:,} lines "
              f"({corpus.stats.bytes / 2**20:.1f} MiB, {corpus.stats.documents:,} documents) "
              f"in {time.perf_counter() - start:.1f}s -> {path}")
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-dist tokenizer",
        description="Train a sentencepiece BPE tokenizer with LLaMA's settings; writes DIR/tokenizer.model.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC",
                        help="files, directories, globs, 'stdlib' or 'tinystories'")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--max-bytes", metavar="B", help="read only this much of the corpus (e.g. 50M)")
    parser.add_argument("--input-sentence-size", type=int, default=DEFAULT_INPUT_SENTENCE_SIZE, metavar="N",
                        help="lines sampled for training (default %(default)s)")
    parser.add_argument("--text-field", metavar="NAME", help="JSON field with the text (default: text / story)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_tokenizer(args.input, args.vocab_size, args.out, input_sentence_size=args.input_sentence_size,
                    max_bytes=parse_size(args.max_bytes), text_field=args.text_field, seed=args.seed)
    return 0
