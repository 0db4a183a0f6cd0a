"""Sampling parameters and requests reject bad input at construction with the failing field named."""

from __future__ import annotations

import pytest

from node.inference import (
    EngineConfig,
    EngineOverloaded,
    GenerationRequest,
    InferenceError,
    InvalidParams,
    ModelLoadError,
    SamplingParams,
    ScoreResult,
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 5000),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -1),
        ("seed", -1),
        ("seed", 2**63),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stop", ["x" * 65]),
        ("stop", 7),
    ],
)
def test_out_of_range_sampling_params_raise_invalid_params_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidParams) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.param == field
    assert info.value.code == "invalid_params"


def test_valid_params_are_normalised() -> None:
    params = SamplingParams(max_tokens=4, temperature=0, stop="\n")  # type: ignore[arg-type]
    assert params.stop == ("\n",)
    assert params.temperature == 0.0 and params.greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"request_id": "", "prompt": "hi"}, "request_id"),
        ({"request_id": "x" * 129, "prompt": "hi"}, "request_id"),
        ({"request_id": "r", "prompt": ""}, "prompt"),
        ({"request_id": "r", "prompt": [1, -2]}, "prompt"),
        ({"request_id": "r", "prompt": [1, 2.0]}, "prompt"),
    ],
)
def test_bad_requests_are_rejected(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidParams) as info:
        GenerationRequest(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param


def test_request_repr_hides_the_prompt() -> None:
    request = GenerationRequest(request_id="r1", prompt="my secret prompt")
    assert "secret" not in repr(request)
    assert GenerationRequest(request_id="r2", prompt=[3, 4]).prompt == (3, 4)  # type: ignore[arg-type]


def test_error_codes_map_to_cli_exit_codes() -> None:
    from cli._main import exit_code_for
    from cli.exit_codes import ExitCode

    assert exit_code_for(InvalidParams(param="p", value=1, reason="r")) == ExitCode.INVALID_INPUT
    assert exit_code_for(ModelLoadError(path="/x", reason="r")) == ExitCode.MODEL_ERROR
    assert isinstance(EngineOverloaded(queued=1, limit=1), InferenceError)


def test_engine_config_rejects_nonsense_bounds() -> None:
    with pytest.raises(InvalidParams) as info:
        EngineConfig(max_queue=0)
    assert info.value.param == "max_queue"


def test_score_result_summaries() -> None:
    result = ScoreResult(token_ids=(1, 2), logprobs=(-1.0, -3.0), prompt_tokens=4)
    assert result.total_logprob == -4.0
    assert result.perplexity == pytest.approx(2.718281828**2, rel=1e-6)
