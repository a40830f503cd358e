"""The built-in instruction task: eleven small instruction types, all data generated from one seed.

Nothing is downloaded. `Task(seed)` makes, deterministically,

    pretrain_corpus(n)      plain-text paragraphs over the same words and facts, never in
                            instruction -> response form (no questions, no imperatives)
    sft_demos(n)            conversations [user: instruction, assistant: reference answer]
    train_prompts(n)        TaskPrompts for reward-model labelling and PPO (training templates only)
    eval_prompts(n)         held-out TaskPrompts; `held_out_fraction` of them use paraphrase
                            templates that no training prompt or demonstration ever uses

A different seed changes every instance (words, numbers, which template, which reference list of
items); the templates themselves are fixed here so "held out" means the same thing for every seed.
Eval instances are drawn first; no train prompt or demo repeats an eval prompt's text, nor (except
for the 12 possible "list" questions) asks an eval instance in other words.

Each prompt carries its structured `TaskSpec`, so the gold judge (instruct_jax/instructgpt/gold.py) can
score any response to it. Worked example (seed 0 draws other words):

    TaskSpec(kind="reverse", params={"word": "lemon"}, reference="nomel", template=1, held_out=False)
    user:      "Write lemon backwards."
    assistant: "nomel"

The vocabulary is small (about 290 distinct words, numbers 0-99) and answers are a few tokens, so
a ~1k-piece sentencepiece model and a tiny transformer learn it on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# ----------------------------------------------------------------------------- vocabulary
CATEGORIES = {
    "animals": ("cat", "dog", "cow", "fox", "owl", "hen", "pig", "bee", "rat", "bat", "duck", "goat", "horse",
                "sheep", "mouse", "tiger"),
    "fruits": ("apple", "pear", "plum", "fig", "lime", "lemon", "grape", "melon", "mango", "peach", "banana",
               "cherry"),
    "colors": ("red", "blue", "green", "pink", "brown", "black", "white", "gray", "yellow", "purple", "orange"),
    "tools": ("saw", "axe", "drill", "hammer", "rake", "shovel", "wrench", "knife", "brush", "ladder"),
}
FRUIT_COLOR = {"apple": "red", "pear": "green", "plum": "purple", "fig": "purple", "lime": "green",
               "lemon": "yellow", "grape": "purple", "melon": "green", "mango": "orange", "peach": "pink",
               "banana": "yellow", "cherry": "red"}
WORDS = tuple(w for items in CATEGORIES.values() for w in items)
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NUMBER_WORDS = frozenset(ONES + TENS[2:])
ADD_MAX = 9  # "add" sums two numbers in 0..ADD_MAX: 100 facts, few enough for a tiny model to learn
SORT_MAX, SORT_SIZES = 29, (3, 4)  # "sort" orders 3 or 4 distinct numbers in 0..SORT_MAX
SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 5)  # the words "reverse" and "count" ask about


def spell_number(n: int) -> str:
    """0 <= n <= 99 in words, no hyphen: spell_number(42) = "forty two", spell_number(13) = "thirteen"."""
    if not 0 <= n <= 99:
        raise ValueError(f"spell_number covers 0..99, got {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])


# ----------------------------------------------------------------------------- demonstrators' habit
# A few chat phrases, each common, before the answer (the default) or after it
# (pipeline.demo_phrase = "after"; docs/PIPELINE.md measures both).
DEMO_WRAPPERS = ("The answer is {}.", "Sure! {}.")
DEMO_TAILS = ("{}. Hope this helps!", "{}. I think so.")
DEMO_PHRASES = {"before": DEMO_WRAPPERS, "after": DEMO_TAILS}


# ----------------------------------------------------------------------------- templates
# kind -> (training templates, held-out paraphrases). Constrained templates name their constraint.
TEMPLATES = {
    "reverse": (("Reverse the word {word}.", "Write {word} backwards.", "Spell the word {word} in reverse order.",
                 "What is {word} written backwards?"),
                ("Flip the letters of {word} so the last one comes first.", "Give me {word} read from right to left.")),
    "sort": (("Sort these numbers from smallest to largest: {nums}.", "Put {nums} in increasing order.",
              "Order the numbers {nums} from low to high.", "Arrange in ascending order: {nums}."),
             ("Rewrite the list {nums} so that each number is bigger than the one before.",
              "Starting with the smallest, list {nums}.")),
    "add": (("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "Find the sum of {a} and {b}."),
            ("If you have {a} and get {b} more, how many do you have?", "Tell me the total of {a} and {b}.")),
    "count": (("How many times does the letter {letter} appear in {word}?",
               "Count the letter {letter} in the word {word}.",
               "How many {letter}s are in {word}?", "In the word {word}, how often does {letter} occur?"),
              ("Tell me the number of {letter} letters in {word}.", "What is the count of {letter} in {word}?")),
    "spell": (("Write the number {n} in words.", "Spell out {n}.", "How do you write {n} in words?",
               "Give the English name of the number {n}."),
              ("Express {n} using words instead of digits.", "Say {n} in letters, not digits.")),
    "list": (("Name {count} {category}.", "List {count} {category}.", "Give me {count} different {category}.",
              "Write {count} kinds of {category}."),
             ("Which {count} {category} can you think of?", "Tell me any {count} {category}, separated by commas.")),
    "pick": (("Which of these is {a_thing}: {options}?", "Pick the {thing} from {options}.",
              "Name the {thing} among {options}.", "Of {options}, which one is {a_thing}?"),
             ("Out of {options}, tell me the one that is {a_thing}.", "I have {options}. Which of them is {a_thing}?")),
    "repeat": (("Repeat the word {word} {count} times.", "Write {word} {count} times.", "Say {word} {count} times.",
                "Give me the word {word} {count} times."),
               ("I want to see {word} written {count} times in a row.",
                "Copy the word {word} until it appears {count} times.")),
    "reverse_list": (("Reverse the order of {items}.", "Write {items} in reverse order.", "List {items} backwards.",
                      "Put {items} in the opposite order."),
                     ("Start from the end and rewrite {items}.", "Turn the list {items} around.")),
    "count_items": (("How many words are in the list {items}?", "Count the words in {items}.",
                     "How many items does {items} have?", "Count the items in the list {items}."),
                    ("Tell me how many things I named in {items}.", "What is the number of words in {items}?")),
    "constrained": (("max_words:Describe a {fruit} in at most {n} words.",
                     "max_words:In {n} words or fewer, describe a {fruit}.",
                     "upper:What color is a {fruit}? Answer in capital letters.",
                     "upper:Using only capital letters, name the color of a {fruit}."),
                    ("max_words:Use no more than {n} words to tell me about a {fruit}.",
                     "upper:Shout the color of a {fruit} in all caps.")),
}
KINDS = tuple(TEMPLATES)
# The seven kinds of the first design: skills and facts a model must recall (sums, spellings,
# letters). The four after them copy from the prompt (pick, repeat, reverse_list, count_items),
# which a tiny model can master; `Task(kinds=...)` and `pipeline.kinds` choose the mix.
ORIGINAL_KINDS = ("reverse", "sort", "add", "count", "spell", "list", "constrained")
COPY_KINDS = ("pick", "repeat", "reverse_list", "count_items")
# Format instructions (IFEval-style, issue 25): a sentence after the request asking for a form of the answer
# that the judge checks on the surface of the response, whatever the answer's correctness. kind -> (training
# sentences, held-out paraphrases). A prompt with one is of a new kind of instruction; `Task(format_fraction)`.
FORMATS = {
    "only": (("Give only the answer.", "Reply with the answer alone."), ("Answer with nothing but the answer.",)),
    "end": (("End your reply with the word done.", "Finish your reply with the word done."),
            ("Make done the last word of your reply.",)),
    "start": (("Begin your reply with the word ok.", "Start your reply with the word ok."),
              ("Make ok the first word of your reply.",)),
}
FORMAT_WORD = {"end": "done", "start": "ok"}
UNFORMATTED_KINDS = ("constrained",)  # a kind that has its own constraint takes no format instruction
CATEGORY_NOUN = {"animals": "animal", "fruits": "fruit", "colors": "color", "tools": "tool"}
SHARED_KINDS = ("list",)  # too few distinct questions to hold instances out: eval shares them, not wordings


def template_text(kind: str, template: int, held_out: bool) -> tuple[str, str]:
    """(constraint or "", template string); `template` indexes the training or the held-out list."""
    text = TEMPLATES[kind][int(held_out)][template]
    constraint, _, body = text.rpartition(":") if kind == "constrained" else ("", "", text)
    return constraint, body


@dataclass(frozen=True)
class TaskSpec:
    """One task instance: what the gold judge needs to score any response to it."""

    kind: str  # one of KINDS
    params: dict = field(hash=False)  # the slots, e.g. {"a": 12, "b": 7}
    reference: str  # a full-marks answer
    template: int  # index into the training or held-out template list of `kind`
    held_out: bool  # True: a paraphrase template never used in training

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "reference": self.reference, "template": self.template,
                "held_out": self.held_out}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(d["kind"], dict(d["params"]), d["reference"], int(d["template"]), bool(d["held_out"]))

    def key(self) -> str:
        """The instance without its wording: two prompts with one key ask the same question."""
        return json.dumps([self.kind, {k: v for k, v in self.params.items() if k != "format"}], sort_keys=True)


@dataclass(frozen=True)
class TaskPrompt:
    messages: tuple  # ({"role": "user", "content": instruction},), the repo's message format
    spec: TaskSpec

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]

    def demo(self) -> list[dict]:
        """The SFT conversation: the prompt answered with the reference."""
        return list(self.messages) + [{"role": "assistant", "content": self.spec.reference}]

    def to_row(self) -> dict:
        """A prompt row (docs/DATA.md format "prompt") that also carries the spec for the judge."""
        return {"prompt": self.text, "spec": self.spec.to_dict()}

    @classmethod
    def from_row(cls, row: dict) -> "TaskPrompt":
        return cls(({"role": "user", "content": row["prompt"]},), TaskSpec.from_dict(row["spec"]))


# ----------------------------------------------------------------------------- instances
def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _instance(kind: str, rng: np.random.Generator) -> tuple[dict, str, str]:
    """(params, reference, constraint) of a fresh instance of `kind`."""
    if kind == "reverse":
        word = _pick(rng, SHORT_WORDS)
        return {"word": word}, word[::-1], ""
    if kind == "sort":
        nums = [int(x) for x in rng.choice(SORT_MAX + 1, size=_pick(rng, SORT_SIZES), replace=False)]
        return {"nums": nums}, " ".join(map(str, sorted(nums))), ""
    if kind == "add":
        a, b = (int(x) for x in rng.integers(0, ADD_MAX + 1, size=2))
        return {"a": a, "b": b}, str(a + b), ""
    if kind == "count":
        word = _pick(rng, SHORT_WORDS)
        letters = sorted(set(word)) if rng.random() < 0.85 else sorted(set("abcdefghilmnoprstuwy") - set(word))
        letter = _pick(rng, letters)
        return {"word": word, "letter": letter}, str(word.count(letter)), ""
    if kind == "spell":
        n = int(rng.integers(0, 100))
        return {"n": n}, spell_number(n), ""
    if kind == "list":
        category = _pick(rng, tuple(CATEGORIES))
        count = int(rng.integers(2, 5))
        items = rng.choice(CATEGORIES[category], size=count, replace=False)
        return {"category": category, "count": count}, ", ".join(items), ""
    if kind == "pick":
        category = _pick(rng, tuple(CATEGORIES))
        others = [w for c, items in CATEGORIES.items() if c != category for w in items]
        answer = _pick(rng, CATEGORIES[category])
        options = [answer] + [str(w) for w in rng.choice(others, size=2, replace=False)]
        options = [options[i] for i in rng.permutation(3)]
        return {"category": category, "options": options}, answer, ""
    if kind == "repeat":
        word, count = _pick(rng, WORDS), int(rng.integers(2, 5))
        return {"word": word, "count": count}, " ".join([word] * count), ""
    if kind in ("reverse_list", "count_items"):
        size = 3 if kind == "reverse_list" else int(rng.integers(2, 6))
        items = [str(w) for w in rng.choice(WORDS, size=size, replace=False)]
        return {"items": items}, (", ".join(items[::-1]) if kind == "reverse_list" else str(size)), ""
    if kind == "constrained":
        fruit = _pick(rng, tuple(FRUIT_COLOR))
        return {"fruit": fruit, "n": int(rng.integers(4, 8))}, "", ""  # reference depends on the template
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _fill(kind: str, body: str, params: dict) -> str:
    slots = dict(params)
    if kind == "sort":
        slots["nums"] = ", ".join(map(str, params["nums"]))
    if kind in ("list", "repeat"):
        slots["count"] = ONES[params["count"]]
    if kind == "pick":
        thing = CATEGORY_NOUN[params["category"]]
        slots.update(thing=thing, a_thing=("an " if thing[0] in "aeiou" else "a ") + thing,
                     options=", ".join(params["options"]))
    if kind in ("reverse_list", "count_items"):
        slots["items"] = ", ".join(params["items"])
    return body.format(**slots)


def make_prompt(kind: str, rng: np.random.Generator, held_out: bool = False) -> TaskPrompt:
    """A fresh instance of `kind` worded with a random training (or held-out) template."""
    params, reference, _ = _instance(kind, rng)
    template = int(rng.integers(len(TEMPLATES[kind][int(held_out)])))
    constraint, body = template_text(kind, template, held_out)
    if kind == "constrained":
        params = {**params, "constraint": constraint}
        color = FRUIT_COLOR[params["fruit"]]
        reference = f"a {params['fruit']} is {color}" if constraint == "max_words" else color.upper()
    spec = TaskSpec(kind, params, reference, template, held_out)
    return TaskPrompt(({"role": "user", "content": _fill(kind, body, params)},), spec)


def apply_format(fmt: str, answer: str) -> str:
    """The answer in the form a format instruction asks for: only -> as is, end -> "<answer> done",
    start -> "ok <answer>"."""
    if fmt == "end":
        return f"{answer} {FORMAT_WORD['end']}"
    if fmt == "start":
        return f"{FORMAT_WORD['start']} {answer}"
    return answer


def with_format(prompt: TaskPrompt, fmt: str, sentence: int) -> TaskPrompt:
    """`prompt` followed by format instruction `fmt` (training or held-out sentence as the prompt's template);
    the reference then satisfies it, and params["format"] names it."""
    spec = prompt.spec
    text = f"{prompt.text} {FORMATS[fmt][int(spec.held_out)][sentence]}"
    formatted = TaskSpec(spec.kind, {**spec.params, "format": fmt}, apply_format(fmt, spec.reference), spec.template,
                         spec.held_out)
    return TaskPrompt(({"role": "user", "content": text},), formatted)


def request_text(prompt: TaskPrompt) -> str:
    """The prompt's text without its format instruction."""
    fmt = prompt.spec.params.get("format")
    if fmt:
        for sentence in FORMATS[fmt][int(prompt.spec.held_out)]:
            if prompt.text.endswith(" " + sentence):
                return prompt.text[:-len(sentence) - 1]
    return prompt.text


def unformatted(spec: TaskSpec) -> TaskSpec:
    """The spec without its format instruction (the request alone, its reference the bare answer)."""
    fmt = spec.params.get("format")
    if not fmt:
        return spec
    reference = spec.reference
    if fmt == "end":
        reference = reference[:-len(FORMAT_WORD["end"]) - 1]
    elif fmt == "start":
        reference = reference[len(FORMAT_WORD["start"]) + 1:]
    return TaskSpec(spec.kind, {k: v for k, v in spec.params.items() if k != "format"}, reference, spec.template,
                    spec.held_out)


# ----------------------------------------------------------------------------- the task
_STREAMS = {"eval": 0, "sft": 1, "train": 2, "pretrain": 3, "demonstrators": 4}


class Task:
    """All the built-in task's data from one seed. Each split has its own random stream, so asking
    for more train prompts never changes the eval prompts or the demos."""

    def __init__(self, seed: int = 0, num_eval: int = 240, held_out_fraction: float = 0.4,
                 kinds: Sequence[str] = ORIGINAL_KINDS, format_fraction: float = 0.0):
        if num_eval < 1 or not 0.0 <= held_out_fraction <= 1.0:
            raise ValueError(f"need num_eval >= 1 and 0 <= held_out_fraction <= 1, got {num_eval}, {held_out_fraction}")
        if not 0.0 <= format_fraction <= 1.0:
            raise ValueError(f"need 0 <= format_fraction <= 1, got {format_fraction}")
        self.format_fraction = format_fraction
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or len(set(kinds)) != len(kinds) or not kinds:
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {list(kinds)}")
        self.seed = seed
        self.kinds = tuple(kinds)
        self._eval = self._draw("eval", num_eval, held_out_fraction, exclude=set())
        # "list" has only 12 (category, count) questions, so training asks them all and only the
        # exact eval wordings are excluded; every other kind's eval instances are never trained on.
        self._eval_keys = {p.spec.key() for p in self._eval if p.spec.kind not in SHARED_KINDS}
        self._eval_keys |= {request_text(p) for p in self._eval}

    def _rng(self, split: str, sub: int = 0) -> np.random.Generator:
        """The split's random stream; `sub` > 0: a side stream (format instructions), so that the main
        stream's draws, and so every prompt and habit of a task without them, stay the same."""
        return np.random.default_rng([self.seed, _STREAMS[split]] + ([sub] if sub else []))

    def _draw(self, split: str, n: int, held_out_fraction: float, exclude: set) -> list[TaskPrompt]:
        """n prompts cycling through the kinds in a shuffled order; the first round(n * fraction)
        positions (then shuffled) use held-out templates. Excluded instances (key or text) are redrawn."""
        rng, side = self._rng(split), self._rng(split, sub=1)
        held = np.zeros(n, bool)
        held[:round(n * held_out_fraction)] = True
        held = rng.permutation(held)
        out = []
        for i in range(n):
            kind = self.kinds[(i + int(self.seed)) % len(self.kinds)]
            while True:
                prompt = make_prompt(kind, rng, held_out=bool(held[i]))
                if prompt.spec.key() not in exclude and prompt.text not in exclude:
                    break
            u, fmt = side.random(), tuple(FORMATS)[int(side.integers(len(FORMATS)))]
            sentence = int(side.integers(len(FORMATS[fmt][int(held[i])])))
            if u < self.format_fraction and kind not in UNFORMATTED_KINDS:
                prompt = with_format(prompt, fmt, sentence)
            out.append(prompt)
        order = rng.permutation(n)
        return [out[i] for i in order]

    def eval_prompts(self) -> list[TaskPrompt]:
        """The held-out evaluation prompts (num_eval of them, held_out_fraction with paraphrase templates)."""
        return list(self._eval)

    def train_prompts(self, n: int) -> list[TaskPrompt]:
        """Prompts for reward-model labelling and PPO: training templates, no eval instance."""
        return self._draw("train", n, 0.0, self._eval_keys)

    def sft_prompts(self, n: int) -> list[TaskPrompt]:
        return self._draw("sft", n, 0.0, self._eval_keys)

    def sft_demos(self, n: int = 400, chatty: float = 0.0, slip: float = 0.0,
                  phrases: Sequence[str] = DEMO_WRAPPERS, follow: float = 0.5) -> list[list[dict]]:
        """n SFT conversations [user, assistant] in the repo's message format.

        By default every answer is the reference. `chatty` and `slip` simulate human demonstrators'
        habits (InstructGPT's demonstrations came from people, not from the judge): that fraction of
        answers is put in one of the chat `phrases`, and that fraction carries a typical slip
        (`near_miss`). The habits draw from their own random stream, so the prompts are the same for
        any mix. A prompt with a format instruction is followed with probability `follow`, independently
        of the slip (a side stream): following writes the answer in the asked form ("only": no chat
        phrase); not following ignores the instruction ("only": the answer always in a chat phrase).
        """
        if not (0.0 <= chatty <= 1.0 and 0.0 <= slip <= 1.0 and 0.0 <= follow <= 1.0):
            raise ValueError(f"need chatty, slip and follow in [0, 1], got {chatty}, {slip}, {follow}")
        rng, side = self._rng("demonstrators"), self._rng("demonstrators", sub=1)
        demos = []
        for p in self.sft_prompts(n):
            spec = unformatted(p.spec)
            core = near_miss(spec, rng) if rng.random() < slip else spec.reference
            answer = chat_wrap(core, rng, phrases) if rng.random() < chatty else core
            follows, phrase = side.random() < follow, _pick(side, phrases)
            fmt = p.spec.params.get("format")
            if fmt == "only":
                answer = core if follows else (answer if answer != core else phrase.format(core))
            elif fmt and follows:
                answer = apply_format(fmt, answer)
            demos.append(list(p.messages) + [{"role": "assistant", "content": answer}])
        return demos

    def pretrain_corpus(self, n: int = 2000, sentences: int = 6) -> list[str]:
        """n plain-text paragraphs of `sentences` statements each: the words, facts and skills of the
        task (sums, spellings, reversed words, letter counts, sorted lists, category members) stated
        as prose, never as an instruction followed by an answer."""
        rng = self._rng("pretrain")
        exclude = frozenset(self._eval_keys)
        facts = sorted({_FACTS[k] for k in self.kinds} | {_FILLER})
        return [" ".join(_sentence(rng, exclude, self.kinds, facts) for _ in range(sentences)) for _ in range(n)]


# Which kind of prose fact (the branches of `_sentence`) each instruction kind draws on; the copying
# kinds need only the words (pick: the categories). _FILLER = short narrative sentences.
_FACTS = {"add": 0, "spell": 1, "reverse": 2, "count": 3, "sort": 4, "list": 5, "pick": 5, "constrained": 6,
          "repeat": 7, "reverse_list": 7, "count_items": 7}
_FILLER = 7


def _sentence(rng: np.random.Generator, exclude: frozenset = frozenset(), kinds: Sequence[str] = ORIGINAL_KINDS,
              facts: Sequence[int] = tuple(range(8))) -> str:
    """One plain-text statement. Facts come in several phrasings, as text on the web states them: a
    model that learns "the sum of 12 and 7 is 19" and "12 plus 7 is 19" can later answer either
    question. A third of the statements report how a request of the training templates is answered
    ("to add 12 and 7, you say 19.", "asked what is 12 plus 7, people say 19."), as prose about
    answering, never as a turn of the chat format. Neither the held-out paraphrases nor the
    evaluation instances (`exclude`: their keys and texts) appear in these. Only the `facts` the
    task's `kinds` draw on are stated (all eight for the original seven kinds)."""
    if rng.random() < 1 / 3:
        return _reported_answer(rng, exclude, kinds)
    kind = facts[int(rng.integers(len(facts)))]
    word, n = _pick(rng, WORDS), int(rng.integers(0, 100))
    if kind == 0:
        a, b = (int(x) for x in rng.integers(0, ADD_MAX + 1, size=2))
        return _pick(rng, (f"{a} and {b} together make {a + b}.", f"{a} plus {b} is {a + b}.",
                           f"the sum of {a} and {b} is {a + b}.", f"the total of {a} and {b} is {a + b}.",
                           f"{a} + {b} = {a + b}.", f"adding {a} and {b} gives {a + b}."))
    if kind == 1:
        return _pick(rng, (f"the number {n} is written {spell_number(n)}.", f"{spell_number(n)} is {n}.",
                           f"in words, {n} is {spell_number(n)}.", f"we say {spell_number(n)} for {n}."))
    word = _pick(rng, SHORT_WORDS) if kind in (2, 3) else word
    if kind == 2:
        return _pick(rng, (f"backwards, {word} reads {word[::-1]}.", f"the word {word} turned around is {word[::-1]}.",
                           f"{word} written backwards is {word[::-1]}.", f"{word} in reverse order is {word[::-1]}."))
    if kind == 3:
        letter = _pick(rng, sorted(set(word)) if rng.random() < 0.85 else "abcdefghilmnoprstuwy")
        k = word.count(letter)
        return _pick(rng, (f"the word {word} has {ONES[k]} {letter}.", f"the letter {letter} appears {k} times in {word}.",
                           f"there are {k} {letter}s in {word}."))
    if kind == 4:
        nums = [int(x) for x in rng.choice(SORT_MAX + 1, size=_pick(rng, SORT_SIZES), replace=False)]
        ordered = " ".join(map(str, sorted(nums)))
        return _pick(rng, (f"from small to large the numbers {', '.join(map(str, nums))} go {ordered}.",
                           f"in increasing order, {', '.join(map(str, nums))} become {ordered}."))
    if kind == 5:
        category = _pick(rng, tuple(CATEGORIES))
        items = list(rng.choice(CATEGORIES[category], size=3, replace=False))
        return f"some {category} are {items[0]}, {items[1]} and {items[2]}."
    if kind == 6:
        fruit = _pick(rng, tuple(FRUIT_COLOR))
        color = FRUIT_COLOR[fruit]
        return _pick(rng, (f"a {fruit} is {color}.", f"the {fruit} was {color} and sweet.",
                           f"the color of a {fruit} is {color}.", f"a {fruit} is {color.upper()}, people shout."))
    animal, tool = _pick(rng, CATEGORIES["animals"]), _pick(rng, CATEGORIES["tools"])
    color = _pick(rng, CATEGORIES["colors"])
    return _pick(rng, (f"the {animal} sat by the {color} {tool}.", f"a {color} {animal} ran past the {tool}.",
                       f"the old {animal} found a {tool} near the {color} door."))


def _reported_answer(rng: np.random.Generator, exclude: frozenset, kinds: Sequence[str]) -> str:
    """A training-template request of one of `kinds` and its reference answer, told as a statement."""
    kind = kinds[int(rng.integers(len(kinds)))]
    while True:
        prompt = make_prompt(kind, rng)
        if prompt.spec.key() not in exclude and prompt.text not in exclude:
            break
    return f"{reported_request(prompt.text)} {prompt.spec.reference}."


def reported_request(text: str) -> str:
    """How prose reports a request, up to its answer: "Add 3 and 4." -> "to add 3 and 4, you say";
    "What is 3 plus 4?" -> "asked what is 3 plus 4, people say" (no question marks in the corpus)."""
    request = text.rstrip(".?").replace("?", ",")
    request = request[0].lower() + request[1:]
    return f"asked {request}, people say" if text.endswith("?") else f"to {request}, you say"


# ----------------------------------------------------------------------------- simulated responses
def sample_response(spec: TaskSpec, rng: np.random.Generator) -> str:
    """A plausible policy sample: a mix of exact, partly right, wrong, chatty and off-format answers.
    For testing the judge and labeler without a model (about 30% exact, 30% near misses, the rest worse)."""
    ref = spec.reference
    style = rng.choice(["exact", "near", "wrong", "chatty", "echo"], p=[0.3, 0.3, 0.15, 0.15, 0.1])
    if style == "exact":
        return ref
    if style == "echo":
        return _fill(spec.kind, template_text(spec.kind, 0, False)[1], spec.params)
    if style == "near":
        return near_miss(spec, rng)
    if style == "wrong":
        return make_prompt(spec.kind, rng).spec.reference  # the answer to another question of the same kind
    return chat_wrap(near_miss(spec, rng) if rng.random() < 0.7 else ref, rng)


CHAT_WRAPPERS = ("The answer is {}.", "Sure! {}. I hope this helps you today.", "{}, I think, but I am not sure about it.")


def chat_wrap(answer: str, rng: np.random.Generator, wrappers: Sequence[str] = CHAT_WRAPPERS) -> str:
    """The answer inside a chat phrase: readable (format 1/2), longer (verbosity), never all caps."""
    return _pick(rng, wrappers).format(answer)


def split_phrase(response: str, phrases: Sequence[str]) -> tuple[str, Optional[str]]:
    """(core, phrase): the answer inside one of the chat `phrases` ("The answer is {}.") and that phrase, or
    (response, None) when the response is not in one of them."""
    for phrase in phrases:
        head, tail = phrase.split("{}")
        if len(response) > len(head) + len(tail) and response.startswith(head) and response.endswith(tail):
            return response[len(head):len(response) - len(tail)], phrase
    return response, None


def phrase_twins(spec: TaskSpec, sample: str, phrases: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Design (a) of issue 25: three responses that vary the chat phrase and the correctness of `sample`
    independently, for the labeler to rank beside it:

        [the sample with its chat phrase stripped (or, without one, put in one of `phrases`),
         the reference in the sample's phrasing, a near miss of the reference in the sample's phrasing]

    The reference and near miss are the request's (a format instruction is left to the judge). On the
    `constrained` kind a phrase can break the constraint (the word limit, the capitals): there the judge
    counts the phrase in correctness, and the twins say so in their gold totals."""
    core, phrase = split_phrase(sample, phrases)
    twin = core if phrase is not None else _pick(rng, phrases).format(sample)
    spec = unformatted(spec)
    dress = (lambda answer: phrase.format(answer)) if phrase is not None else (lambda answer: answer)
    return [twin, dress(spec.reference), dress(near_miss(spec, rng))]


def near_miss(spec: TaskSpec, rng: np.random.Generator) -> str:
    """The reference with one small mistake of the kind's typical sort."""
    p, ref = spec.params, spec.reference
    if spec.kind in ("reverse", "spell") or (spec.kind == "constrained" and p["constraint"] == "upper"):
        chars = list(ref)
        i = int(rng.integers(len(chars)))
        chars[i] = _pick(rng, "aeioustr") if spec.kind != "constrained" else chars[i].lower()
        return "".join(chars)
    if spec.kind == "sort":
        nums = ref.split()
        i = int(rng.integers(len(nums) - 1))
        nums[i], nums[i + 1] = nums[i + 1], nums[i]
        return " ".join(nums)
    if spec.kind in ("add", "count"):
        return str(max(0, int(ref) + int(_pick(rng, (-2, -1, 1, 2)))))
    if spec.kind == "pick":  # the right item and a wrong one
        return f"{ref}, {_pick(rng, [o for o in p['options'] if o != ref])}"
    if spec.kind == "repeat":  # one repetition too many or too few
        return " ".join([p["word"]] * (p["count"] + _pick(rng, (-1, 1))))
    if spec.kind == "reverse_list":  # the first two in the original order
        items = ref.split(", ")
        return ", ".join([items[1], items[0]] + items[2:])
    if spec.kind == "count_items":
        return str(int(ref) + _pick(rng, (-1, 1)))
    if spec.kind == "list":
        items = ref.split(", ")
        others = [w for c, ws in CATEGORIES.items() if c != p["category"] for w in ws]
        items[int(rng.integers(len(items)))] = _pick(rng, others)
        return ", ".join(items)
    return f"a {p['fruit']} is very sweet and {FRUIT_COLOR[p['fruit']]} and soft and round"  # breaks the limit
