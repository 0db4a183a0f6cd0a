"""``ps-node list`` shows model names: the chain stores only ``keccak(name@revision)``, so the names come from
``--model NAME@REVISION`` (repeat; ``PS_LIST_MODELS``) and an id nobody named is shown as its short 0x form."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.exit_codes import ExitCode
from planetserve import ModelId
from tests._cli import REGISTER, InProcess, assert_failed, cli_env, ok_json
from tests.fixtures.chain import ChainEnv

NAME = REGISTER[REGISTER.index("--model") + 1]


def test_list_names_the_models_it_is_told_and_shortens_the_others(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = InProcess(monkeypatch, capsys)
    env = cli_env(chain, tmp_path)
    ok_json(run("node", [*REGISTER, "--stake", "1.5", "--json"], env))
    (named,) = ok_json(run("node", ["list", "--model", NAME, "--model", "other@v2", "--json"], env))
    assert named["model"] == NAME and named["model_id"] == ModelId.of(NAME)
    (unnamed,) = ok_json(run("node", ["list", "--json"], env))
    assert unnamed["model"] is None and unnamed["model_id"] == named["model_id"]
    table = run("node", ["list", "--model", NAME], env)
    assert table.returncode == 0 and NAME in table.stdout
    plain = run("node", ["list"], env)
    assert plain.returncode == 0 and NAME not in plain.stdout and str(ModelId.of(NAME))[:10] in plain.stdout
    assert_failed(run("node", ["list", "--model", "no-revision"], env), ExitCode.INVALID_INPUT, "no-revision")
