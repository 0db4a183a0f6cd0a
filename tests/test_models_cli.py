"""``ps-node model make|make-variant|eval`` end to end in a subprocess: exit codes and JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli.exit_codes import ExitCode


def _ps_node(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PS_DEBUG": "0"}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cli.node import main; sys.argv[0] = 'ps-node'; main()", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_make_then_variant_then_eval_print_json(tmp_path: Path) -> None:
    made = _ps_node("model", "make", "--out", str(tmp_path / "m"), "--quick", "--steps", "3", "--seed", "2", "--json")
    assert made.returncode == ExitCode.OK, made.stderr
    info = json.loads(made.stdout)
    assert info["kind"] == "base" and len(info["revision"]) == 40 and len(info["model_id"]) == 66
    assert info["model"] == f"{info['name']}@{info['revision']}"
    assert "step 3/3 (100%)" in made.stderr and "ETA" in made.stderr  # progress on stderr, never on stdout

    variant = _ps_node(
        "model", "make-variant", "--from", str(tmp_path / "m"), "--kind", "int8", "--out", str(tmp_path / "v"), "--json"
    )
    assert variant.returncode == ExitCode.OK, variant.stderr
    v = json.loads(variant.stdout)
    assert v["kind"] == "int8" and v["model_id"] != info["model_id"]

    evaluated = _ps_node("model", "eval", str(tmp_path / "v"), "--problems", "2", "--json")
    assert evaluated.returncode == ExitCode.OK, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["model_id"] == v["model_id"] and result["arithmetic_n"] == 2 and result["perplexity"] > 1


def test_missing_model_folder_exits_with_model_error(tmp_path: Path) -> None:
    proc = _ps_node("model", "eval", str(tmp_path / "absent"), "--json")
    assert proc.returncode == ExitCode.MODEL_ERROR
    assert proc.stdout == ""
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_variant_kind_and_non_empty_output_exit_with_invalid_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = _ps_node(
        "model", "make-variant", "--from", str(tiny_model_dir), "--kind", "bigger", "--out", str(tmp_path / "v")
    )
    assert proc.returncode == ExitCode.INVALID_INPUT
    assert "kind" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = _ps_node("model", "make", "--out", str(tmp_path / "full"), "--quick")
    assert proc.returncode == ExitCode.INVALID_INPUT


def test_make_for_people_reports_progress_with_eta_and_ends_with_a_copyable_name_at_revision(tmp_path: Path) -> None:
    made = _ps_node("model", "make", "--out", str(tmp_path / "m"), "--quick", "--steps", "4", "--name", "copy-me")
    assert made.returncode == ExitCode.OK, made.stderr
    last = made.stdout.rstrip("\n").splitlines()[-1]
    name, _, revision = last.partition("@")
    assert name == "copy-me" and len(revision) == 40 and int(revision, 16) >= 0
    from node.inference import read_info

    saved = read_info(tmp_path / "m")
    assert saved is not None and last == f"{saved.name}@{saved.revision}"
    # stderr is a pipe here: plain lines (first and last step at least), each with an ETA, never a bar's redraws
    steps = [line for line in made.stderr.splitlines() if ": step " in line]
    assert steps[0].startswith("training copy-me: step 1/4") and "step 4/4 (100%)" in steps[-1]
    assert all("ETA" in line for line in steps) and "\r" not in made.stderr


def test_progress_on_a_terminal_is_a_bar_with_eta() -> None:
    import io

    from cli._progress import StepProgress

    screen = io.StringIO()
    with StepProgress("training x", stream=screen, tty=True) as bar:
        for step in range(1, 11):
            bar.update(step, 10, 2.5 - step / 10)
    drawn = screen.getvalue()
    assert "training x" in drawn and "10/10" in drawn and "ETA" in drawn and "loss 1.500" in drawn

    plain = io.StringIO()
    with StepProgress("training y", stream=plain, tty=False, interval_s=3600) as bar:
        for step in range(1, 101):
            bar.update(step, 100, 1.0)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and "step 1/100" in lines[0] and "step 100/100 (100%)" in lines[1]
