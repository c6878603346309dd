"""Needle prompt generators (flashprefill_vllm.eval.needles): exact lengths, needle depths, seeds, scorers.

A word-level tokenizer stands in for a real one (no downloads)."""

from __future__ import annotations

import random
import re

import pytest

from flashprefill_vllm.eval import needles

TEXT = " ".join(f"In the beginning verse {i} spoke of the land and the water, and it was good." for i in range(3000))


class WordTokenizer:
    """Lossless word-level tokenizer: words, single punctuation marks and whitespace runs, ids assigned on first
    sight. ``bos_token_id`` (optional) is prepended with ``add_special_tokens=True``."""

    def __init__(self, bos: bool = False):
        self.vocab: dict[str, int] = {"<s>": 0}
        self.inv = ["<s>"]
        self.bos_token_id = 0 if bos else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(t) for t in re.findall(r"\w+|[^\w\s]|\s+", text)]
        return ([0] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def decode(self, ids) -> str:
        return "".join(self.inv[i] for i in ids)

    def _id(self, token: str) -> int:
        if token not in self.vocab:
            self.vocab[token] = len(self.inv)
            self.inv.append(token)
        return self.vocab[token]


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


@pytest.fixture(scope="module")
def text_filler(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "long.txt"
    path.write_text(TEXT, encoding="utf-8")
    return needles.Filler.from_text(path, tok)


@pytest.mark.parametrize("task", list(needles.TASKS))
@pytest.mark.parametrize("length", [300, 1001, 4096])
def test_exact_length_and_answers_inside(tok, text_filler, task, length):
    for i, depth in enumerate((0.0, 0.5, 1.0)):
        p = needles.TASKS[task](tok, text_filler, length, depth, i)
        assert len(p.token_ids) == length and p.length == length
        body = tok.decode(p.token_ids)
        assert all(a in body for a in p.answers)
        assert len(set(p.answers)) == len(p.answers)


def test_prefix_counts_toward_length(tok, text_filler):
    p = needles.passkey(tok, text_filler, 500, 0.5, 0, prefix=[0])
    assert len(p.token_ids) == 500 and p.token_ids[0] == 0
    assert tok.decode(p.token_ids[1:]).startswith(needles.PASSKEY_INTRO)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_sits_at_depth(tok, text_filler, depth):
    length = 2000
    p = needles.passkey(tok, text_filler, length, depth, 0)
    head = len(tok.encode(needles.PASSKEY_INTRO, add_special_tokens=False))
    needle = len(tok.encode(needles.PASSKEY_NEEDLE.format(key=p.answers[0]), add_special_tokens=False))
    n_filler = length - head - needle - len(tok.encode(needles.PASSKEY_QUESTION, add_special_tokens=False))
    start = p.needle_starts[0]
    assert start == head + round(depth * n_filler)
    assert tok.decode(p.token_ids[start:start + needle]) == needles.PASSKEY_NEEDLE.format(key=p.answers[0])


def test_passkey_matches_baseline_recipe(tok, text_filler):
    """Key, then filler offset, from random.Random(1000 + length + depth_index); prompt = intro, filler with the
    needle, question."""
    length, depth, di = 1500, 0.5, 2
    p = needles.passkey(tok, text_filler, length, depth, di)
    rng = random.Random(1000 + length + di)
    key = str(rng.randint(10000, 99999))
    assert p.answers == (key,) and p.max_new_tokens == 8
    intro, question = (tok.encode(t, add_special_tokens=False) for t in (needles.PASSKEY_INTRO,
                                                                           needles.PASSKEY_QUESTION))
    needle = tok.encode(needles.PASSKEY_NEEDLE.format(key=key), add_special_tokens=False)
    n_filler = length - len(intro) - len(needle) - len(question)
    ids = tok.encode(TEXT, add_special_tokens=False)
    start = rng.randrange(len(ids) - n_filler + 1)
    fill = ids[start:start + n_filler]
    cut = round(depth * n_filler)
    assert list(p.token_ids) == intro + fill[:cut] + needle + fill[cut:] + question
    text = tok.decode(p.token_ids)
    assert "The pass key is " + key + ". Remember it. " + key + " is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is")


def test_deterministic_and_seed_dependent(tok, text_filler):
    for task, fn in needles.TASKS.items():
        a, b = fn(tok, text_filler, 800, 0.5, 1), fn(tok, text_filler, 800, 0.5, 1)
        assert a == b, task
        c = fn(tok, text_filler, 800, 0.5, 2)
        assert c.answers != a.answers or c.token_ids != a.token_ids, task


def test_repeat_filler(tok):
    filler = needles.Filler.repeat(tok)
    p = needles.passkey(tok, filler, 3000, 0.5, 0)
    assert len(p.token_ids) == 3000
    body = tok.decode(p.token_ids)
    assert body.count("The grass is green.") > 60 and "verse" not in body
    assert p.answers[0] in body


def test_multikey_distractors(tok, text_filler):
    p = needles.multikey(tok, text_filler, 1500, 0.5, 0)
    body = tok.decode(p.token_ids)
    numbers = re.findall(r"The magic number for (\S+) is (\d+)\.", body)
    assert len(numbers) == 4 and len({k for k, _ in numbers}) == 4
    target_key = re.search(r"What is the magic number for (\S+)\?", body).group(1)
    assert dict(numbers)[target_key] == p.answers[0]
    assert body.endswith(f"The magic number for {target_key} is")


def test_multivalue_all_values(tok, text_filler):
    p = needles.multivalue(tok, text_filler, 1500, 0.1, 0)
    body = tok.decode(p.token_ids)
    found = re.findall(r"One of the magic numbers for (\S+) is (\d+)\.", body)
    assert sorted(v for _, v in found) == sorted(p.answers) and len({k for k, _ in found}) == 1
    assert len(p.answers) == 4


def test_vartrack_chain(tok, text_filler):
    p = needles.vartrack(tok, text_filler, 2000, 0.3, 0)
    body = tok.decode(p.token_ids)
    value = re.search(r"hold the value (\d+)", body).group(1)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", body))
    # Follow every variable back to its number: exactly the answers hold the asked value.
    def resolve(name):
        src = assigned[name]
        return resolve(src[4:]) if src.startswith("VAR ") else src
    holders = {n for n in assigned if resolve(n) == value}
    assert holders == set(p.answers) and len(assigned) == 8
    # Each copy comes after its source.
    for name, src in assigned.items():
        if src.startswith("VAR "):
            assert body.index(f"VAR {src[4:]} =") < body.index(f"VAR {name} =")


def test_multi_needle_first_at_depth(tok, text_filler):
    for fn in (needles.multikey, needles.multivalue, needles.vartrack):
        lo, hi = fn(tok, text_filler, 3000, 0.1, 0), fn(tok, text_filler, 3000, 0.9, 2)
        assert lo.needle_starts[0] < 0.2 * 3000 < 0.8 * 3000 < hi.needle_starts[0]


def test_too_short_and_bad_depth(tok, text_filler):
    with pytest.raises(ValueError, match="too short"):
        needles.passkey(tok, text_filler, 20, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        needles.passkey(tok, text_filler, 500, 1.5, 0)
    with pytest.raises(ValueError, match="has .* tokens"):
        needles.passkey(tok, text_filler, len(text_filler) + 500, 0.5, 0)
    with pytest.raises(ValueError, match="unknown task"):
        needles.generate(tok, text_filler, tasks=["passkey", "nope"], lengths=[500], depths=[0.5])


def test_generate_grid(tok, text_filler):
    ps = needles.generate(tok, text_filler, tasks=["passkey", "vartrack"], lengths=[400, 600], depths=[0.1, 0.9])
    assert [(p.task, p.length, p.depth) for p in ps] == [
        (t, n, d) for t in ("passkey", "vartrack") for n in (400, 600) for d in (0.1, 0.9)]
    assert len({p.id for p in ps}) == len(ps)


@pytest.mark.parametrize("answers, text, hit, found", [
    (["48213"], " 48213. Remember it.", True, 1),
    (["48213"], " 48,213.", True, 1),
    (["48213"], " 4821", False, 0),
    (["48213"], " 48312 is the key", False, 0),
    (["silver-otter"], "SILVER-OTTER!", True, 1),
    (["1111111", "2222222", "3333333"], "1111111, 3333333 and 2222222", True, 3),
    (["1111111", "2222222", "3333333"], "1111111, 3333333", False, 2),
    (["QXWPB", "ABCDE"], "qxwpb, abcde", True, 2),
])
def test_score(answers, text, hit, found):
    s = needles.score_answers(answers, text)
    assert (s.hit, s.found, s.total) == (hit, found, len(answers))
