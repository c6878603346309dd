"""Needle-in-a-haystack prompts of an exact token length, with their expected answers and a scorer.

Tokenizer-agnostic: a tokenizer is any object with ``encode(text, add_special_tokens=False) -> list[int]`` and
``decode(ids) -> str`` (Hugging Face tokenizers qualify). A prompt is built in token space::

    prefix (e.g. BOS) | intro | filler ... needle ... filler ... needle ... filler | question

Each piece of text is encoded on its own; the filler is trimmed so that the prompt has exactly the requested number
of tokens. A needle at relative depth ``d`` follows the first ``round(d * n_filler)`` filler tokens.

Tasks (:data:`TASKS`):

- ``passkey``: one five-digit pass key in the filler; the prompt, key and filler offset follow the dense baseline
  of the device notes (key and offset drawn from ``random.Random(1000 + length + depth_index)``).
- ``multikey``: several "magic number for <key>" needles with different keys; the question asks for one key's
  number, the others are distractors (at seeded random depths).
- ``multivalue``: one key with several numbers; every number must be returned. The first sits at the depth, the
  others at seeded random depths.
- ``vartrack``: a chain of variable assignments (``VAR A = 12345``, ``VAR B = VAR A``, ...) starting at the depth,
  plus a distractor chain holding another value; every variable of the first chain must be named.

Filler: :meth:`Filler.from_text` (slices of a long text, e.g. the King James Bible, at a seeded offset) or
:meth:`Filler.repeat` (a repeated neutral sentence).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

DEFAULT_LENGTHS = (4096, 8192, 16384, 24576, 31744)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)

REPEAT_SENTENCE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

MULTIKEY_INTRO = ("Several magic numbers are hidden in the text below, each belonging to a different key. Memorize "
                  "every key with its number; afterwards you will be asked for the number of one key.\n\n")
MULTIKEY_NEEDLE = "\n\nThe magic number for {key} is {value}.\n\n"
MULTIKEY_QUESTION = "\n\nWhat is the magic number for {key}? The magic number for {key} is"

MULTIVALUE_INTRO = ("Magic numbers are hidden in the text below; one key has several of them. Memorize all of "
                    "them; afterwards you will be asked for every number of that key.\n\n")
MULTIVALUE_NEEDLE = "\n\nOne of the magic numbers for {key} is {value}.\n\n"
MULTIVALUE_QUESTION = "\n\nList all the magic numbers for {key}. The magic numbers for {key} are"

VARTRACK_INTRO = ("Variable assignments are hidden in the text below. Follow them; afterwards you will be asked "
                  "which variables end up holding a given value.\n\n")
VARTRACK_VALUE = "\n\nVAR {name} = {value}\n\n"
VARTRACK_COPY = "\n\nVAR {name} = VAR {source}\n\n"
VARTRACK_QUESTION = ("\n\nWhich variables hold the value {value}, directly or through other variables? "
                     "Answer: the variables holding {value} are")

# Words for multi-key keys ("<adjective>-<noun>").
_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "mellow", "noble", "odd", "proud", "quiet", "rusty", "silver", "tidy", "urban", "vivid",
               "windy", "young")
_NOUNS = ("anchor", "badger", "candle", "dragon", "falcon", "garden", "harbor", "island", "jacket", "kettle",
          "lantern", "meadow", "needle", "orchid", "pepper", "quarry", "river", "saddle", "tunnel", "valley",
          "wagon", "walnut", "willow", "zephyr")
_VAR_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """One prompt: ``token_ids`` (exactly ``length`` tokens), the ``answers`` that must all appear in the generated
    text, how many new tokens to generate, and where each needle starts (token positions in ``token_ids``; the
    first is the one placed at ``depth``)."""

    task: str
    length: int
    depth: float
    depth_index: int
    token_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    needle_starts: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"needle/{self.task}/{self.length}/{self.depth_index}"

    def score(self, text: str) -> "Score":
        return score_answers(self.answers, text)


@dataclasses.dataclass(frozen=True)
class Score:
    hit: bool          # every answer found
    found: int         # how many answers were found
    total: int


def _normalize(text: str) -> str:
    """Lower case, digit groups joined ("12,345" and "12 345" read as "12345")."""
    return re.sub(r"(?<=\d)[,\s](?=\d)", "", text.lower())


def score_answers(answers: Sequence[str], text: str) -> Score:
    """Case-insensitive substring match of every answer in ``text`` (digit-group separators ignored)."""
    norm = _normalize(text)
    found = sum(_normalize(a) in norm for a in answers)
    return Score(hit=found == len(answers), found=found, total=len(answers))


class Filler:
    """Token ids to pad prompts with: a long text (sliced at a seeded offset) or a repeated sentence."""

    def __init__(self, name: str, token_ids: Sequence[int], *, seeded_offset: bool,
                 grow: Callable[[int], list[int]] | None = None):
        self.name = name
        self._ids = list(token_ids)
        self._seeded_offset = seeded_offset
        self._grow = grow

    @classmethod
    def from_text(cls, path: str | Path, tokenizer: Tokenizer) -> "Filler":
        """The whole text of ``path`` (UTF-8), tokenized once."""
        text = Path(path).read_text(encoding="utf-8")
        return cls(f"text:{Path(path).name}", tokenizer.encode(text, add_special_tokens=False), seeded_offset=True)

    @classmethod
    def repeat(cls, tokenizer: Tokenizer, sentence: str = REPEAT_SENTENCE) -> "Filler":
        """``sentence`` repeated; the repetition is tokenized as one text (so joins tokenize naturally) and grown
        on demand."""
        def grow(n: int) -> list[int]:
            copies = 16
            while True:
                ids = tokenizer.encode(sentence * copies, add_special_tokens=False)
                if len(ids) >= n:
                    return ids
                copies *= 2
        return cls("repeat", [], seeded_offset=False, grow=grow)

    def __len__(self) -> int:
        return len(self._ids)

    def take(self, n: int, rng: random.Random) -> list[int]:
        """``n`` consecutive filler tokens: a text filler draws the start offset from ``rng``; a repeated filler
        starts at 0 and draws nothing."""
        if len(self._ids) < n and self._grow is not None:
            self._ids = self._grow(n)
        if len(self._ids) < n:
            raise ValueError(f"filler {self.name} has {len(self._ids)} tokens; a prompt needs {n}")
        if not self._seeded_offset:
            return self._ids[:n]
        start = rng.randrange(len(self._ids) - n + 1)
        return self._ids[start:start + n]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def assemble(tokenizer: Tokenizer, filler: Filler, rng: random.Random, *, length: int, intro: str,
             needles: Sequence[tuple[float, str]], question: str, prefix: Sequence[int] = ()
             ) -> tuple[list[int], list[int]]:
    """``prefix + intro + filler with needles + question``, exactly ``length`` tokens.

    ``needles`` are ``(depth, text)`` pairs; needle ``k`` follows the first ``round(depth * n_filler)`` filler tokens
    (needles at the same position keep their order). Returns the token ids and each needle's start position, in
    the order given.
    """
    head = list(prefix) + _encode(tokenizer, intro)
    pieces = [_encode(tokenizer, text) for _, text in needles]
    tail = _encode(tokenizer, question)
    n_filler = length - len(head) - sum(map(len, pieces)) - len(tail)
    if n_filler < 0:
        raise ValueError(f"length {length} is too short: the prompt's fixed text alone takes "
                         f"{length - n_filler} tokens")
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1]; got {depth!r}")
    fill = filler.take(n_filler, rng)
    cuts = [round(depth * n_filler) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda k: cuts[k])
    ids, starts, pos = list(head), [0] * len(needles), 0
    for k in order:
        ids += fill[pos:cuts[k]]
        pos = cuts[k]
        starts[k] = len(ids)
        ids += pieces[k]
    ids += fill[pos:] + tail
    assert len(ids) == length
    return ids, starts


def passkey(tokenizer: Tokenizer, filler: Filler, length: int, depth: float, depth_index: int,
            prefix: Sequence[int] = ()) -> NeedlePrompt:
    """The single pass key prompt; 8 new tokens."""
    rng = random.Random(1000 + length + depth_index)
    key = str(rng.randint(10000, 99999))
    ids, starts = assemble(tokenizer, filler, rng, length=length, intro=PASSKEY_INTRO,
                           needles=[(depth, PASSKEY_NEEDLE.format(key=key))], question=PASSKEY_QUESTION,
                           prefix=prefix)
    return NeedlePrompt("passkey", length, depth, depth_index, tuple(ids), (key,), 8, tuple(starts))


def _task_rng(task: str, length: int, depth_index: int) -> random.Random:
    # str seeds hash with SHA-512: the same on every machine and Python run.
    return random.Random(f"{task}/{length}/{depth_index}")


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def multikey(tokenizer: Tokenizer, filler: Filler, length: int, depth: float, depth_index: int,
             prefix: Sequence[int] = (), num_keys: int = 4) -> NeedlePrompt:
    """``num_keys`` needles with different keys; the target's needle sits at ``depth``; 12 new tokens."""
    rng = _task_rng("multikey", length, depth_index)
    keys = _distinct(lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", num_keys)
    values = _distinct(lambda: _number(rng), num_keys)
    depths = [depth] + [rng.random() for _ in keys[1:]]
    needles = [(d, MULTIKEY_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
    ids, starts = assemble(tokenizer, filler, rng, length=length, intro=MULTIKEY_INTRO, needles=needles,
                           question=MULTIKEY_QUESTION.format(key=keys[0]), prefix=prefix)
    return NeedlePrompt("multikey", length, depth, depth_index, tuple(ids), (values[0],), 12, tuple(starts))


def multivalue(tokenizer: Tokenizer, filler: Filler, length: int, depth: float, depth_index: int,
               prefix: Sequence[int] = (), num_values: int = 4) -> NeedlePrompt:
    """One key with ``num_values`` numbers, the first at ``depth``; all must be returned; 48 new tokens."""
    rng = _task_rng("multivalue", length, depth_index)
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    values = _distinct(lambda: _number(rng), num_values)
    depths = [depth] + [rng.random() for _ in values[1:]]
    needles = [(d, MULTIVALUE_NEEDLE.format(key=key, value=v)) for d, v in zip(depths, values)]
    ids, starts = assemble(tokenizer, filler, rng, length=length, intro=MULTIVALUE_INTRO, needles=needles,
                           question=MULTIVALUE_QUESTION.format(key=key), prefix=prefix)
    return NeedlePrompt("multivalue", length, depth, depth_index, tuple(ids), tuple(values), 48, tuple(starts))


def vartrack(tokenizer: Tokenizer, filler: Filler, length: int, depth: float, depth_index: int,
             prefix: Sequence[int] = (), chain: int = 4) -> NeedlePrompt:
    """A chain of ``chain`` variables holding one value (its first assignment at ``depth``, the copies later, in
    order) and a distractor chain holding another value (anywhere, in order); 32 new tokens."""
    rng = _task_rng("vartrack", length, depth_index)
    names = _distinct(lambda: "".join(rng.choice(_VAR_LETTERS) for _ in range(5)), 2 * chain)
    value, other = _distinct(lambda: _number(rng, 5), 2)
    target = [depth] + sorted(rng.uniform(depth, 1.0) for _ in range(chain - 1))
    distractor = sorted(rng.random() for _ in range(chain))
    needles = _chain(names[:chain], value, target) + _chain(names[chain:], other, distractor)
    ids, starts = assemble(tokenizer, filler, rng, length=length, intro=VARTRACK_INTRO, needles=needles,
                           question=VARTRACK_QUESTION.format(value=value), prefix=prefix)
    return NeedlePrompt("vartrack", length, depth, depth_index, tuple(ids), tuple(names[:chain]), 32, tuple(starts))


def _chain(names: Sequence[str], value: str, depths: Sequence[float]) -> list[tuple[float, str]]:
    """``VAR names[0] = value`` then ``VAR names[k] = VAR names[k - 1]``, at ``depths`` (ascending)."""
    first = [(depths[0], VARTRACK_VALUE.format(name=names[0], value=value))]
    return first + [(d, VARTRACK_COPY.format(name=n, source=s)) for d, n, s in zip(depths[1:], names[1:], names)]


TASKS: dict[str, Callable[..., NeedlePrompt]] = {
    "passkey": passkey, "multikey": multikey, "multivalue": multivalue, "vartrack": vartrack}


def generate(tokenizer: Tokenizer, filler: Filler, *, tasks: Sequence[str] = tuple(TASKS),
             lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
             prefix: Sequence[int] = ()) -> list[NeedlePrompt]:
    """Every (task, length, depth) prompt, in that order."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    return [TASKS[t](tokenizer, filler, L, d, i, prefix=prefix)
            for t in tasks for L in lengths for i, d in enumerate(depths)]
