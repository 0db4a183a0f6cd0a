"""The procedural corpus the project's models learn from: arithmetic, copy and reverse tasks, grammar and facts.

Everything is a pure function of a seed, so a model is reproducible from its recipe, and output quality is measurable:
some addition problems and some copy/reverse payloads are held out of training (``is_held_out``,
``is_held_out_text``) and used only for evaluation.

Why these tasks: a verifier can only be judged on a model whose answer depends on its prompt. Addition is written
with both operands and the sum zero-padded to two digits (``07+39=46``): every digit then sits at a fixed offset from
the ``=``, so a tiny model learns the one carry look-ahead the tens digit needs instead of first having to work out
where each operand's digits are (unpadded, the old default model never got past 5% on held-out sums); copy
("echo") and reverse lines force the model to read its prompt (an induction-head task tiny models learn quickly), so
greedy continuations differ from prompt to prompt; facts and sentences keep some ordinary text for perplexity.
"""

from __future__ import annotations

import random
import zlib

_ADJ = ("red", "small", "old", "quiet", "happy", "green", "tall", "cold", "bright", "lazy")
_NOUN = ("cat", "dog", "bird", "river", "tree", "child", "farmer", "ship", "lamp", "horse", "teacher", "stone")
_VERB = ("sees", "likes", "follows", "finds", "paints", "carries", "watches", "helps")
_ATTR = ("color", "home", "friend", "food")
_VALUES = {
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "home": ("the hill", "the lake", "the forest", "the city", "the coast"),
    "friend": ("mira", "tobin", "sela", "corin", "dax"),
    "food": ("bread", "apples", "fish", "rice", "honey"),
}
_SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "vo", "zi", "pa", "dor", "el", "shi", "ba")
#: Operands are 0..MAX_OPERAND.
MAX_OPERAND = 49
#: Number of key-value facts in the (fixed) world.
N_FACTS = 60
#: Version of the line generator; part of a model recipe, so a cached model is rebuilt when the corpus changes.
CORPUS_VERSION = 2
#: Words in a copy/reverse payload: 2..MAX_PAYLOAD_WORDS.
MAX_PAYLOAD_WORDS = 4
#: Most prompts ``held_out_prompts`` returns (40% are additions, and the held-out pairs have 48 distinct sums).
MAX_PROMPTS = 120
#: Share of each line kind in the training mix (addition, echo, reverse, fact, sentence), summing to 1.
_MIX = (0.5, 0.18, 0.14, 0.09, 0.09)


def is_held_out(a: int, b: int) -> bool:
    """Whether ``a+b`` is reserved for evaluation (about 12% of pairs)."""
    return (a * 7 + b * 13) % 8 == 0


def is_held_out_text(payload: str) -> bool:
    """Whether a copy/reverse payload is reserved for evaluation (about 1 in 8, by CRC-32)."""
    return zlib.crc32(payload.encode()) % 8 == 0


def facts() -> list[tuple[str, str, str]]:
    """The fixed world of facts (entity, attribute, value); the same for every model so perplexities compare."""
    rng = random.Random(7)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    while len(out) < N_FACTS:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        if name in seen:
            continue
        seen.add(name)
        attr = rng.choice(_ATTR)
        out.append((name, attr, rng.choice(_VALUES[attr])))
    return out


def _sentence(rng: random.Random) -> str:
    return f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_NOUN)}."


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2)))


def _payload(rng: random.Random, held_out: bool) -> list[str]:
    while True:
        words = [_word(rng) for _ in range(rng.randint(2, MAX_PAYLOAD_WORDS))]
        if is_held_out_text(" ".join(words)) == held_out:
            return words


def _addition(rng: random.Random, held_out: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if is_held_out(a, b) == held_out:
            return a, b


def corpus_lines(seed: int, n_lines: int, *, held_out: bool = False) -> list[str]:
    """``n_lines`` lines of mixed text. ``held_out=True`` draws arithmetic and copy/reverse payloads only from the
    held-out sets (evaluation text)."""
    rng = random.Random(seed)
    world = facts()
    lines: list[str] = []
    bounds = [sum(_MIX[: i + 1]) for i in range(len(_MIX))]
    while len(lines) < n_lines:
        kind = rng.random()
        if kind < bounds[0]:
            a, b = _addition(rng, held_out)
            lines.append(addition_line(a, b))
        elif kind < bounds[1]:
            words = _payload(rng, held_out)
            lines.append(f"echo {' '.join(words)} : {' '.join(words)}")
        elif kind < bounds[2]:
            words = _payload(rng, held_out)
            lines.append(f"reverse {' '.join(words)} : {' '.join(reversed(words))}")
        elif kind < bounds[3]:
            name, attr, value = rng.choice(world)
            lines.append(f"the {attr} of {name} is {value}.")
        else:
            lines.append(_sentence(rng))
    return lines


def addition_line(a: int, b: int) -> str:
    """``a+b=c`` as the corpus writes it: operands and sum zero-padded to two digits."""
    return f"{a:02d}+{b:02d}={a + b:02d}"


def held_out_problems(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    """``n`` held-out addition problems as (prompt "aa+bb=", answer "cc"), deterministic."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if is_held_out(a, b)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [(f"{a:02d}+{b:02d}=", f"{a + b:02d}") for a, b in pairs[:n]]


def held_out_prompts(n: int, seed: int = 4321) -> list[tuple[str, str]]:
    """``n`` held-out prompts of the kinds a user of the demo sends, each with its correct answer, deterministic.

    The mix is 40% addition, 30% echo, 30% reverse, cycling in that order; each prompt starts a line (a leading
    newline, as in training) and ends where the answer begins. No two prompts share a correct answer (an addition
    whose sum is already taken is skipped), so a model that reads its prompt can answer every one differently and
    distinctness measures prompt dependence, not collisions between right answers; one that ignores its prompt gives
    one answer. At most ``MAX_PROMPTS`` (there are fewer distinct held-out sums than that).
    """
    if not 0 <= n <= MAX_PROMPTS:
        raise ValueError(f"n must be in 0..{MAX_PROMPTS}")
    rng = random.Random(seed)
    problems = iter(held_out_problems(10_000, seed=seed))
    used: set[str] = set()
    out: list[tuple[str, str]] = []
    for i in range(n):
        slot = i % 10
        if slot < 4:
            prompt, answer = next((p, a) for p, a in problems if a not in used)
            prompt = "\n" + prompt
        else:
            while True:
                words = _payload(rng, True)
                verb, answer_words = ("echo", words) if slot < 7 else ("reverse", list(reversed(words)))
                prompt, answer = f"\n{verb} {' '.join(words)} :", " " + " ".join(answer_words)
                if answer not in used:
                    break
        used.add(answer)
        out.append((prompt, answer))
    return out
