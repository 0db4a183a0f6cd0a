"""Challenge prompts: fresh draws from the users' distribution (never a fixed list), keyed by the plan and a private
salt, with users' parameters, in the same sealed size classes as user requests."""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path

from node.client import CHAT_STOP, load_tokenizer
from node.overlay._completion import CompletionRequest
from node.privacy._constants import REQUEST_CLASSES
from verifier._epoch import keccak256
from verifier._prompts import (
    KINDS,
    ChallengeGenerator,
    ChallengeRequest,
    PromptDistribution,
    salt_commitment,
    sealed_size_class,
    user_prefix_pool,
    user_request,
)

MODEL = "0x" + "ee" * 32
SALT = bytes(range(32))
#: A voucher of a realistic size: the sealed request carries one (protocol §10.4), users' and audits' alike.
VOUCHER = {
    "chainId": "31337",
    "contract": "0x" + "ab" * 20,
    "channelId": "17",
    "cumulativeAmount": "1234567890123",
    "signature": "0x" + "cd" * 65,
}
#: What the demo and ``ps-client ask`` send (scripts/demo.py, cli/client.py defaults).
_SHOTS = "03+04=07\n10+05=15\n21+08=29\n06+06=12\n"
USER_SHAPES = [
    CompletionRequest(model=MODEL, prompt=_SHOTS + q, max_tokens=8, temperature=0.0, stop=("\n",))
    for q in ("12+07=", "30+04=", "05+09=")
] + [CompletionRequest(model=MODEL, prompt="03+04=07\n10+05=", max_tokens=32, temperature=0.0)]


#: Long enough for the 4 KiB size class: what a model with a 2,048-token context takes in wordy prompts.
LONG = PromptDistribution(max_prompt_chars=4_500)


def _challenges(
    count: int, salt: bytes = SALT, epoch_seed: bytes = b"\x01" * 32, distribution: PromptDistribution = LONG
) -> list[ChallengeRequest]:
    generator = ChallengeGenerator(epoch_seed, salt, distribution)
    return [generator.challenge(keccak256(i.to_bytes(4, "big"))) for i in range(count)]


def _classes(requests: list[ChallengeRequest]) -> collections.Counter[int]:
    return collections.Counter(sealed_size_class(r.completion_request(MODEL).with_voucher(VOUCHER)) for r in requests)


def test_a_challenge_is_a_pure_function_of_its_key_and_the_salt_and_nothing_else_predicts_it() -> None:
    first, again = _challenges(50), _challenges(50)
    assert first == again
    other_salt = _challenges(50, salt=bytes(32))
    other_epoch = _challenges(50, epoch_seed=b"\x02" * 32)
    assert sum(a.prompt == b.prompt for a, b in zip(first, other_salt, strict=True)) <= 3
    assert sum(a.seed == b.seed for a, b in zip(first, other_epoch, strict=True)) == 0
    assert salt_commitment(SALT) == keccak256(SALT) and salt_commitment(SALT) != keccak256(bytes(32))
    for c in first:  # private until published: no prompt or seed in a repr
        assert (len(c.prompt) < 12 or c.prompt not in repr(c)) and str(c.seed) not in repr(c)


def test_prompts_are_fresh_draws_of_the_corpus_grammar_not_a_list() -> None:
    drawn = _challenges(600)
    prompts = [c.prompt for c in drawn]
    assert len(set(prompts)) >= 0.97 * len(prompts)
    kinds = collections.Counter(c.kind for c in drawn)
    assert set(kinds) == set(KINDS) and kinds["addition"] > kinds["sentence"]
    for c in drawn:
        body = c.prompt
        if c.chat:
            assert body.startswith(("### System:\n", "### User:\n")) and body.endswith("### Assistant:\n")
            assert c.stop == (CHAT_STOP,)
            body = body.split("### User:\n", 1)[1].removesuffix("\n### Assistant:\n")
        last = body.rsplit("\n", 1)[-1]
        if c.kind == "addition":
            assert re.fullmatch(r"\d\d\+\d\d=", last), last
        elif c.kind in ("echo", "reverse"):
            assert re.fullmatch(rf"{c.kind}( [a-z]+){{2,4}} :", last), last
        elif c.kind == "fact":
            assert re.fullmatch(r"the (color|home|friend|food) of [a-z]+ is", last), last
        # Worked examples are correct, as users' few-shot examples are.
        for line in body.split("\n"):
            if m := re.fullmatch(r"(\d\d)\+(\d\d)=(\d\d+)", line):
                assert int(m[1]) + int(m[2]) == int(m[3])
    chat_share = sum(c.chat for c in drawn) / len(drawn)
    assert 0.14 < chat_share < 0.26


def test_parameters_are_users_greedy_or_sampled_always_seeded_and_valid_requests() -> None:
    drawn = _challenges(400)
    temperatures = collections.Counter(c.temperature for c in drawn)
    assert set(temperatures) == {0.0, 0.8} and 0.4 < temperatures[0.0] / len(drawn) < 0.6
    assert len({c.seed for c in drawn}) == len(drawn) and all(0 <= c.seed < 2**63 for c in drawn)
    assert all(1 <= c.max_tokens <= 64 and c.top_p == 1.0 for c in drawn)
    for c in drawn:
        request = c.completion_request(MODEL)
        assert request.sampling().seed == c.seed and CompletionRequest.from_bytes(request.to_bytes()) == request


def test_challenges_fall_in_the_same_size_classes_as_user_requests() -> None:
    challenges = _challenges(300)
    rng = random.Random(2026)
    pool = user_prefix_pool(rng, LONG)
    users = [LONG.draw(rng, shared_prefixes=pool) for _ in range(300)]
    ours, theirs = _classes(challenges), _classes(users)
    assert set(ours) <= set(REQUEST_CLASSES) and set(ours) == set(theirs) and len(ours) >= 2, (ours, theirs)
    # The class shares agree (two-proportion z under 4 for each class).
    for size in ours:
        p1, p2 = ours[size] / 300, theirs[size] / 300
        pooled = (ours[size] + theirs[size]) / 600
        assert abs(p1 - p2) <= 4 * math.sqrt(pooled * (1 - pooled) * 2 / 300) + 1e-9, (size, ours, theirs)
    # Every class the demo's and ps-client's requests use is one audits use too.
    shapes = {sealed_size_class(r.with_voucher(VOUCHER)) for r in USER_SHAPES}
    assert shapes <= set(ours)
    assert user_request(random.Random(1)) == user_request(random.Random(1))


def test_the_length_bound_holds_and_shared_prefixes_repeat_within_an_epoch() -> None:
    short = PromptDistribution(max_prompt_chars=300)
    generator = ChallengeGenerator(b"\x03" * 32, SALT, short)
    drawn = [generator.challenge(keccak256(bytes([i]))) for i in range(200)]
    assert all(len(c.prompt) <= 300 for c in drawn)
    full = _challenges(300)
    assert max(len(c.prompt) for c in full) <= LONG.max_prompt_chars
    # Users share prefixes (a system prompt, a few-shot block): so do one epoch's challenges.
    starts = collections.Counter(c.prompt.lstrip("\n")[:40] for c in full if len(c.prompt) > 80)
    assert starts.most_common(1)[0][1] >= 10


def test_with_the_models_tokenizer_every_prompt_and_its_answer_fit_the_context(tiny_model_dir: Path) -> None:
    tokenize = load_tokenizer(tiny_model_dir)
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    fitted = PromptDistribution(max_prompt_chars=4_500, tokenize=tokenize, context_tokens=context)
    drawn = _challenges(150, distribution=fitted)
    lengths = [len(tokenize(c.prompt)) + c.max_tokens for c in drawn]
    assert max(lengths) <= context and max(lengths) > context * 0.8  # trimmed to fit, not far below
    untrimmed = _challenges(150)  # the same draws without the tokenizer: longer ones exist
    assert max(len(tokenize(c.prompt)) + c.max_tokens for c in untrimmed) > context
    assert [c.seed for c in drawn] == [c.seed for c in untrimmed]  # trimming changes the prompt only
