"""The procedural corpus the project's models learn from: arithmetic, simple grammar and key-value facts.

Everything is a pure function of a seed, so a model is reproducible from its recipe, and output quality is measurable:
some addition problems are held out of training (``is_held_out``) and used only for evaluation.
"""

from __future__ import annotations

import random

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


def is_held_out(a: int, b: int) -> bool:
    """Whether ``a+b`` is reserved for evaluation (about 12% of pairs)."""
    return (a * 7 + b * 13) % 8 == 0


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


def corpus_lines(seed: int, n_lines: int, *, held_out: bool = False) -> list[str]:
    """``n_lines`` lines of mixed text. ``held_out=True`` draws arithmetic only from the held-out pairs (eval text)."""
    rng = random.Random(seed)
    world = facts()
    lines: list[str] = []
    while len(lines) < n_lines:
        kind = rng.random()
        if kind < 0.5:
            a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
            if is_held_out(a, b) != held_out:
                continue
            lines.append(f"{a}+{b}={a + b}")
        elif kind < 0.8:
            lines.append(_sentence(rng))
        else:
            name, attr, value = rng.choice(world)
            lines.append(f"the {attr} of {name} is {value}.")
    return lines


def held_out_problems(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    """``n`` held-out addition problems as (prompt "a+b=", answer "c"), deterministic."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if is_held_out(a, b)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [(f"{a}+{b}=", str(a + b)) for a, b in pairs[:n]]
