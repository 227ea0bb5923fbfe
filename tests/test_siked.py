"""siked.py's SIKeD loop: the mix and alpha, the biased variant, the CLI's errors, and the whole
loop end to end on the real SmolLM2-135M-Instruct with the gold teacher, killed and resumed.

Oracles: hand-made rows (which pairs get teacher rows, alpha by hand), the Wilson interval's
textbook value, and, for resumption, an uninterrupted run with the same seed: sampling is seeded
per chunk and training resumes from its exact state, so the files must be equal byte for byte.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import sample
import siked
import strategies
import verify

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def row(qid, strategy, source, text="x"):
    return {"id": qid, "strategy": strategy, "text": text, "source": source}


# ------------------------------------------------------------------------------------------- mix


def hand_made():
    # the teacher solved q1 with cot and pot, q2 with cot, q3 with pot (D_LLM, 4 rows)
    teacher = [
        row("q1", "cot", "teacher"),
        row("q1", "pot", "teacher"),
        row("q2", "cot", "teacher"),
        row("q3", "pot", "teacher"),
    ]
    # the student solved q1/cot, q2/cot and q2/pot (D_self, 3 rows)
    student = [
        row("q1", "cot", "student"),
        row("q2", "cot", "student"),
        row("q2", "pot", "student"),
    ]
    return teacher, student


def pairs(rows, source):
    return sorted((r["id"], r["strategy"]) for r in rows if r["source"] == source)


def test_adaptive_mix_adds_teacher_rows_only_where_the_student_failed():
    teacher, student = hand_made()
    rows, alpha = siked.mix(teacher, student, "adaptive")
    assert pairs(rows, "student") == [("q1", "cot"), ("q2", "cot"), ("q2", "pot")]
    assert pairs(rows, "teacher") == [("q1", "pot"), ("q3", "pot")]
    assert alpha == pytest.approx(2 / 5)


def test_mix_all_is_the_union():
    teacher, student = hand_made()
    rows, alpha = siked.mix(teacher, student, "all")
    assert len(rows) == 7 and alpha == pytest.approx(4 / 7)


def test_mix_rate_forces_alpha_by_sampling_the_teacher_part():
    teacher = [row(f"t{i}", "cot", "teacher") for i in range(40)]
    student = [row(f"s{i}", "cot", "student") for i in range(10)]
    rows, alpha = siked.mix(teacher, student, "adaptive", mix_rate=0.5)
    assert alpha == pytest.approx(0.5) and len(rows) == 20
    rows, alpha = siked.mix(teacher, student, "adaptive", mix_rate=0.8)
    assert alpha == pytest.approx(0.8) and len(rows) == 50
    _, alpha = siked.mix(teacher, student, "adaptive", mix_rate=0.9)  # needs 90 teacher rows
    assert alpha == pytest.approx(40 / 50)  # as close as the 40 teacher rows allow
    rows, alpha = siked.mix(teacher, student, "adaptive", mix_rate=0.0)
    assert alpha == 0.0 and pairs(rows, "teacher") == []
    rows, alpha = siked.mix(teacher, student, "adaptive", mix_rate=1.0)
    assert alpha == 1.0 and len(rows) == 40
    with pytest.raises(ValueError, match="mix_rate"):
        siked.mix(teacher, student, "adaptive", mix_rate=1.5)


def test_mix_rate_takes_the_nearest_alpha_and_keeps_the_pool_without_d_self():
    teacher = [row(f"t{i}", "cot", "teacher") for i in range(100)]
    rows, alpha = siked.mix(teacher, [], "adaptive", mix_rate=0.3)
    assert len(rows) == 100 and alpha == 1.0  # no D_self: every teacher row, as without a rate
    # one student row: 0 teacher rows give alpha 0, 1 gives 0.5, which is nearer 0.3
    rows, alpha = siked.mix(teacher, [row("s0", "cot", "student")], "adaptive", mix_rate=0.3)
    assert len(rows) == 2 and alpha == 0.5


def test_biased_selection_follows_the_priority_orders():
    rows = [
        row("q1", "cot", "teacher"),
        row("q1", "pot", "student"),
        row("q1", "l2m", "teacher"),
        row("q2", "l2m", "student"),
        row("q2", "cot", "teacher"),
        row("q3", "l2m", "teacher"),
    ]
    chosen = lambda b: [
        (r["id"], r["strategy"]) for r in siked.apply_bias(rows, siked.BIAS_ORDERS[b])
    ]
    assert chosen("cot") == [("q1", "cot"), ("q2", "cot"), ("q3", "l2m")]
    assert chosen("pot") == [("q1", "pot"), ("q2", "cot"), ("q3", "l2m")]
    assert chosen("l2m") == [("q1", "l2m"), ("q2", "l2m"), ("q3", "l2m")]


def test_off_policy_puts_other_teacher_samples_in_the_students_place(tmp_path):
    (tmp_path / "teacher").mkdir()
    teacher_file = [
        dict(row("q1", "cot", "local:m", "t1"), answer=1.0, correct=True),
        dict(row("q1", "cot", "local:m", "t2"), answer=1.0, correct=True),
        dict(row("q1", "cot", "local:m", "t3"), answer=2.0, correct=False),
        dict(row("q2", "pot", "local:m", "t4"), answer=3.0, correct=True),
    ]
    siked.write_jsonl(tmp_path / "teacher" / "teacher.jsonl", teacher_file)
    d_llm = [dict(teacher_file[0], source="teacher"), dict(teacher_file[3], source="teacher")]
    student = [row("q1", "cot", "student", "s1"), row("q2", "pot", "student", "s2"),
               row("q3", "cot", "student", "s3")]  # fmt: skip
    questions = {"q1": {"answer": 1.0}, "q2": {"answer": 3.0}}
    R = SimpleNamespace(
        dir=tmp_path, log=lambda m: None, cfg=siked.RunConfig(), questions=questions
    )
    rows, info = siked.off_policy_rows(R, student, d_llm)
    assert [(r["id"], r["text"], r["source"]) for r in rows] == [
        ("q1", "t2", "teacher"),  # the teacher's other correct sample of q1/cot
        ("q2", "t4", "teacher"),  # no other one for q2/pot: D_LLM's own
    ]  # q3/cot: the teacher never solved it, so no teacher row can stand in
    assert info == {"extra_teacher": 1, "reused_teacher": 1, "dropped": 1}


def test_off_policy_judges_the_teacher_file_at_rel_tol(tmp_path):
    """teacher.jsonl holds data/teacher.py's verdicts at its default tolerance; --rel-tol 0 judges
    the other samples exactly, as the teacher stage judged D_LLM."""
    (tmp_path / "teacher").mkdir()
    teacher_file = [
        dict(row("q1", "cot", "local:m", "t1"), answer=2.5, correct=True),
        dict(row("q1", "cot", "local:m", "t2"), answer=2.5001, correct=True),  # within 1e-4
    ]
    siked.write_jsonl(tmp_path / "teacher" / "teacher.jsonl", teacher_file)
    d_llm = [dict(teacher_file[0], source="teacher")]
    for rel_tol, text in ((1e-4, "t2"), (0.0, "t1")):  # 0: t2 is wrong, D_LLM's own stands in
        cfg, questions = siked.RunConfig(rel_tol=rel_tol), {"q1": {"answer": 2.5}}
        R = SimpleNamespace(dir=tmp_path, log=lambda m: None, cfg=cfg, questions=questions)
        rows, _ = siked.off_policy_rows(R, [row("q1", "cot", "student", "s1")], d_llm)
        assert [r["text"] for r in rows] == [text], rel_tol


def stage_run(folder, strategies, questions=None):
    """A Run in folder whose teacher stage kept `strategies`, for the stages after it."""
    cfg = siked.RunConfig(model="m", iterations=2, lr=2e-4, dtype="float32")
    siked.write_json(
        folder / "teacher" / "DONE", {"source": "gold", "strategies": strategies, "wall_s": 1.0}
    )
    questions = questions or {"q1": {"answer": 5.0}}
    return siked.Run(cfg, folder, siked.Dist(), None, None, questions, list(questions), [])


def test_filter_keeps_the_first_correct_sample_per_question_and_strategy(tmp_path):
    R = stage_run(tmp_path, ["cot", "l2m", "pot"], {"q1": {"answer": 5.0}, "q2": {"answer": 6.0}})
    l2m = "Sub-question 1: What is 2 + 3?\nAnswer to Sub-question 1: 5.\nFinal Answer: 5"
    samples = [  # (sample, its verdict by SPEC 1.4.2's rules, worked out by hand)
        (row("q1", "cot", "student", "2 + 2 = 4\nFinal Answer: 4"), "wrong"),
        (row("q1", "cot", "student", "2 + 3 = 5\nFinal Answer: 5"), "kept"),
        (row("q1", "cot", "student", "So 5.\nFinal Answer: 5"), "correct_duplicate"),
        (row("q1", "l2m", "student", "2 + 3 = 5\nFinal Answer: 5"), "no_subquestions"),
        (row("q1", "l2m", "student", l2m), "kept"),
        (row("q1", None, "student", "Final Answer: 5"), "no_tag"),
        (row("q1", "pot", "student", "answer = 2 + 3"), "kept"),
        (row("q2", "pot", "student", "answer = 2 + 3"), "wrong"),  # right for q1, not for q2
        (row("q2", "pot", "student", "import os\nanswer = 6"), "wrong"),  # refused by the sandbox
        (row("q2", "cot", "student", "3 + 3 = 6\nFinal Answer: 6"), "kept"),
    ]
    siked.write_jsonl(tmp_path / "iter2" / "sample" / "samples.jsonl", [s for s, _ in samples])
    (tmp_path / "iter2" / "filter").mkdir()
    info = siked.stage_filter(R, tmp_path / "iter2" / "filter", 2)
    rows = siked.read_jsonl(tmp_path / "iter2" / "filter" / "samples.jsonl")
    assert [r["verdict"] for r in rows] == [v for _, v in samples]
    assert [r["pred"] for r in rows] == [4, 5, 5, 5, 5, 5, 5, 5, None, 6]
    kept = siked.read_jsonl(tmp_path / "iter2" / "filter" / "kept.jsonl")
    assert kept == [r for r in rows if r["verdict"] == "kept"]
    assert (info["samples"], info["kept"]) == (10, 4)


def test_filter_drops_samples_of_a_strategy_the_teacher_dropped(tmp_path):
    R = stage_run(tmp_path, ["cot", "pot"])  # l2m dropped (no train_socratic)
    samples = [  # --sampling free: the student may still pick l2m
        row("q1", "l2m", "student", "Sub-question 1: 2 + 3?\nFinal Answer: 5"),
        row("q1", "cot", "student", "2 + 3 = 5\nFinal Answer: 5"),
    ]
    siked.write_jsonl(tmp_path / "iter2" / "sample" / "samples.jsonl", samples)
    (tmp_path / "iter2" / "filter").mkdir()
    siked.stage_filter(R, tmp_path / "iter2" / "filter", 2)
    rows = siked.read_jsonl(tmp_path / "iter2" / "filter" / "samples.jsonl")
    assert [r["verdict"] for r in rows] == ["strategy_dropped", "kept"]
    kept = siked.read_jsonl(tmp_path / "iter2" / "filter" / "kept.jsonl")
    assert [r["strategy"] for r in kept] == ["cot"]


def test_eval_scores_each_answer_with_the_strategy_the_student_chose(tmp_path, monkeypatch):
    """stage_eval on scripted greedy outputs: tag, prediction, verdict and per-set counts."""
    R = stage_run(tmp_path, ["cot", "l2m", "pot"])
    R.cfg = dataclasses.replace(R.cfg, eval_sets=("svamp",))
    golds = [5.0, 6.0, 7.0, 8.0]
    items = [
        ("svamp", {"id": f"s{i}", "question": f"Q{i}?", "answer": a}) for i, a in enumerate(golds)
    ]
    items.append((siked.HELDOUT, {"id": "h0", "question": "Q9?", "answer": 4.0}))
    outputs = {  # question -> the student's greedy text, and (tag, prediction, correct) by hand
        "Q0?": ("[cot]: 2 + 3 = 5\nFinal Answer: 5", ("cot", 5.0, True)),
        "Q1?": ("[pot]: answer = 2 * 3", ("pot", 6.0, True)),
        "Q2?": ("[cot]: 3 + 3 = 6\nFinal Answer: 6", ("cot", 6.0, False)),
        "Q3?": ("Final Answer: 8", (None, 8.0, True)),  # untagged: read like CoT
        "Q9?": ("[l2m]: Sub-question 1: 2 + 2?\nFinal Answer: 4", ("l2m", 4.0, True)),
    }

    def generate(model, prompts, n, max_new_tokens, temperature=0.0, seed=None):
        texts = [next(t for q, (t, _) in outputs.items() if q in p) for p in prompts]
        return [[sample.Completion(t, [1, 2], "eos", -1.0)] for t in texts]

    monkeypatch.setattr(siked, "eval_items", lambda R: items)
    monkeypatch.setattr(R, "load_model", lambda path: None)
    monkeypatch.setattr(R, "generate", generate)
    (tmp_path / "iter1" / "eval").mkdir(parents=True)
    siked.stage_eval(R, tmp_path / "iter1" / "eval", 1)
    rows = siked.read_jsonl(tmp_path / "iter1" / "eval" / "predictions.jsonl")
    assert [(r["strategy"], r["pred"], r["correct"]) for r in rows] == [
        want for _, want in outputs.values()
    ]
    ev = json.loads((tmp_path / "iter1" / "eval" / "eval.json").read_text())["sets"]
    assert (ev["svamp"]["correct"], ev["svamp"]["n"]) == (3, 4)
    assert ev["svamp"]["strategies"]["cot"] == dict(n=2, correct=1, share=0.5, accuracy=0.5)
    assert (ev[siked.HELDOUT]["correct"], ev[siked.HELDOUT]["n"]) == (1, 1)


def test_report_shows_a_trained_strategy_the_mix_did_not_count(tmp_path):
    """A run whose filter kept a strategy the teacher dropped: the report lists it, no KeyError."""
    R = stage_run(tmp_path, ["cot", "pot"])
    done = lambda stage, **info: siked.write_json(tmp_path / stage / "DONE", dict(info, wall_s=1))
    mixed = {s: {"teacher": n, "student": 0} for s, n in (("cot", 1), ("pot", 0))}
    done("iter2/mix", rows=2, alpha=0.5, per_strategy=mixed)
    done("iter2/train", rows=2, sequences=1, steps=1, per_strategy={"cot": 1, "l2m": 1})
    siked.write_report(R)
    report = (tmp_path / "report.md").read_text()
    assert "iter2 train       l2m" in report and "(teacher 0, student 0)" in report


def test_wilson_interval():
    lo, hi = siked.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert siked.wilson(0, 10)[0] == 0.0 and siked.wilson(0, 0) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- CLI


def test_flags_fill_the_config_and_quick_fills_only_what_no_flag_gives():
    argv = ["--model", "m", "--strategies", "cot,pot", "--max-new-tokens", "7", "--off-policy",
            "--lr", "1e-3", "--bias", "pot", "--train-limit", "5"]  # fmt: skip
    cfg = siked.parse_args(argv)
    assert cfg.strategies == ("cot", "pot") and cfg.bias == "pot" and cfg.off_policy
    assert cfg.sample_max_new_tokens == cfg.eval_max_new_tokens == 7  # one flag sets both
    assert cfg.lr == 1e-3 and cfg.train_limit == 5 and cfg.samples == siked.RunConfig.samples
    quick = siked.parse_args([*argv, "--quick"])
    assert quick.train_limit == 5 and quick.sample_max_new_tokens == 7  # the flags win
    assert quick.samples == siked.QUICK["samples"] and quick.epochs == siked.QUICK["epochs"]
    with pytest.raises(SystemExit):
        siked.parse_args(["--model", "m", "--mix", "some"])  # argparse's choices


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategies", "cot,foo"], "--strategies foo"),
        (["--eval-sets", "gsm8k,math"], "--eval-sets math"),
        (["--bias", "pot", "--strategies", "cot,l2m"], "--bias pot"),
        (["--off-policy"], "--off-policy needs an LLM teacher"),
        (["--teacher-url", "http://x"], "--teacher-url needs --teacher-model"),
        (["--mix-rate", "2"], "--mix-rate 2.0"),
        (["--batch-size", "8", "--micro-batch-size", "3"], "--batch-size 8"),
        (["--samples", "0"], "--samples 0"),
        # nan passes `x < 0`; inf trained on with a nan loss
        (["--lr", "nan"], "--lr nan"),
        (["--lr", "inf"], "--lr inf"),
        (["--rel-tol", "nan"], "--rel-tol nan"),
        (["--rel-tol", "inf"], "--rel-tol inf"),
        (["--temperature", "nan"], "--temperature nan"),
        (["--weight-decay", "inf"], "--weight-decay inf"),
        (["--grad-clip", "nan"], "--grad-clip nan"),
        (["--top-p", "nan"], "--top-p nan"),
        (["--mix-rate", "nan"], "--mix-rate nan"),
        (["--heldout-frac", "nan"], "--heldout-frac nan"),
        (["--lora-alpha", "0"], "--lora-alpha 0"),
        (["--seed", str(10**23)], f"--seed {10**23}"),  # was torch's OverflowError
        (["--seed", "-1"], "--seed -1"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0"),  # the flag, not the field
        (["--run-name", "../../x"], "--run-name '../../x'"),  # would land outside --runs-dir
        (["--run-name", "a/b"], "--run-name 'a/b'"),
        (["--run-name", ".."], "--run-name '..'"),
        (["--run-name", "."], "--run-name '.'"),
        (["--run-name", ""], "--run-name ''"),
    ],
)
def test_bad_settings_are_one_line_errors(args, message, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        siked.main(siked.parse_args(["--model", "m", "--runs-dir", str(runs), *args]))
    assert str(e.value).startswith("siked: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == [], "refused before anything is written"


def test_every_field_checked_has_its_flag(capsys):
    """check_config names a field by flag(): each must be a flag the user can type."""
    with pytest.raises(SystemExit):
        siked.parse_args(["--help"])
    shown = capsys.readouterr().out
    for f in dataclasses.fields(siked.RunConfig):
        assert re.search(re.escape(siked.flag(f.name)) + r"[\s\]]", shown), f.name


@pytest.mark.parametrize("runs, run_name", [("f", None), ("f/sub", None), (".", "f")])
def test_a_runs_dir_that_is_a_file_is_a_one_line_error(runs, run_name, tmp_path):
    (tmp_path / "f").write_text("")
    argv = ["--model", "m", "--runs-dir", str(tmp_path / runs)]
    argv += ["--run-name", run_name] if run_name else []
    with pytest.raises(SystemExit) as e:
        siked.main(siked.parse_args(argv))
    assert str(e.value) == (
        f"siked: --runs-dir {tmp_path / runs}: {tmp_path / 'f'} is not a folder"
    )


@pytest.mark.parametrize(
    "text, message", [("{", "not valid JSON"), ('{"model_type": "bert"}', "model_type 'bert'")]
)
def test_a_damaged_model_config_names_its_file(text, message, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(text)
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:  # no --lr: resolve_lr reads config.json for the family
        siked.main(siked.parse_args(["--model", str(model), "--runs-dir", str(runs)]))
    assert str(e.value).startswith(f"siked: {model / 'config.json'}: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not runs.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "report"], "--only report: {} has no finished stage yet, nothing to report"),
        (["--teacher-local", "nope"], "--teacher-local nope: unknown model 'nope'"),
    ],
)
def test_a_mistake_found_after_loading_saves_no_config(
    args, message, smollm2_dir, tmp_path, monkeypatch
):
    """Refused before config.json is saved: else the rerun with the mistake fixed would find "a
    run with other settings" (--only report: an empty report of a run never started)."""
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    runs = tmp_path / "runs"
    cfg = siked.parse_args(["--model", str(smollm2_dir), "--runs-dir", str(runs), *args])
    with pytest.raises(SystemExit) as e:
        siked.main(cfg)
    folder = runs / siked.default_run_name(cfg)
    assert str(e.value).startswith("siked: " + message.format(folder))
    assert "\n" not in str(e.value)
    assert not runs.exists()


@pytest.mark.parametrize(
    "text, message", [("{", "not valid JSON"), ("[1]", "expected a JSON object, got list")]
)
def test_a_damaged_run_config_names_its_file(text, message, smollm2_dir, tmp_path, monkeypatch):
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    cfg = siked.parse_args(["--model", str(smollm2_dir), "--runs-dir", str(tmp_path)])
    config = tmp_path / siked.default_run_name(cfg) / "config.json"
    config.parent.mkdir()
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        siked.main(cfg)
    assert str(e.value).startswith(f"siked: {config}: {message}") and "\n" not in str(e.value)


def test_a_missing_eval_set_stops_the_run_before_it_starts(smollm2_dir, tmp_path, monkeypatch):
    source = tmp_path / "source"  # a local copy of the data that lacks SVAMP
    shutil.copytree(SHARED / "gsm8k", source / "gsm8k")
    monkeypatch.setenv("SIKED_DATA", str(source))
    monkeypatch.setattr(siked.prepare, "DATA_DIR", tmp_path / "data")
    argv = ["--model", str(smollm2_dir), "--runs-dir", str(tmp_path / "runs")]
    cfg = siked.parse_args([*argv, "--eval-sets", "gsm8k,svamp"])
    with pytest.raises(SystemExit) as e:
        siked.main(cfg)
    message = str(e.value)
    assert message.startswith("siked: ") and "svamp" in message and "\n" not in message
    assert not list((tmp_path / "runs").glob("*/config.json"))  # nothing saved, nothing trained


@pytest.mark.parametrize(
    "argv, message",
    [
        (["siked.py", "--model", "m", "--mix", "some"], "argument --mix: invalid choice: 'some'"),
        (["sample.py", "--model", "m"], "the following arguments are required: --prompt"),
        (["sample.py", "--model", "m", "--prompt", "p", "--n", "x"], "invalid int value: 'x'"),
        (["model.py", "--dtype", "float33"], "argument --dtype: invalid choice: 'float33'"),
        (["data/prepare.py", "--only", "nope"], "argument --only: invalid choice: 'nope'"),
        (["data/teacher.py", "--out", "o"], "one of the arguments --gold --teacher-url --local"),
    ],
)
def test_a_bad_flag_is_a_one_line_error_in_every_cli(argv, message):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env())  # fmt: skip
    prog = Path(argv[0]).name
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"{prog}: ") and message in proc.stderr, proc.stderr


def test_a_missing_model_is_a_one_line_error(tmp_path):
    cmd = [
        sys.executable,
        "siked.py",
        "--model",
        str(tmp_path / "nope"),
        "--runs-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode != 0
    assert proc.stderr.startswith("siked: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_a_runs_dir_that_cannot_be_written_is_a_one_line_error(smollm2_dir):
    runs = "/proc/siked-runs"  # /proc takes no new folders, even from root
    cmd = [sys.executable, "siked.py", "--model", str(smollm2_dir), "--runs-dir", runs]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode != 0
    assert proc.stderr.startswith("siked: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert runs in proc.stderr


# ----------------------------------------------------------------------------------- end to end

# --quick, shrunk further so that the whole loop runs in about a minute on 2 idle CPU cores: 4
# training questions, 2 per eval set (gsm8k, svamp and the held-out split), 1 sample, 32 new
# tokens, 1 epoch of 4 batch-2 steps with a checkpoint after every step (so that a kill during
# training has one to resume from), chunks of 4 sequences (2 questions x 2 strategies: sampling
# has 2 chunks).
TINY = [
    "--quick", "--train-limit", "4", "--eval-limit", "2", "--eval-sets", "gsm8k,svamp",
    "--samples", "1", "--max-new-tokens", "32", "--epochs", "1", "--max-seq-len", "192",
    "--batch-size", "2", "--micro-batch-size", "2", "--ckpt-every", "1", "--chunk-size", "4",
]  # fmt: skip


def env():
    # One thread per run: on a shared 2-core machine, 2-thread torch processes side by side
    # slow each other down ~20x (OpenMP threads waiting on each other); alone, 1 is ~1.5x slower.
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if "SIKED_DATA" not in e and SHARED.is_dir():
        e["SIKED_DATA"] = str(SHARED)
    return e


def command(model_dir, runs):
    return [sys.executable, "siked.py", "--model", str(model_dir), "--runs-dir", str(runs), *TINY]


def siked_run(model_dir, runs, *extra):
    proc = subprocess.run(
        [*command(model_dir, runs), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def run_until(model_dir, runs, marker: Path) -> str:
    """Start a run and SIGKILL it as soon as `marker` exists; returns its output so far."""
    proc = subprocess.Popen(
        command(model_dir, runs), cwd=ROOT, env=env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {marker} appeared"
        assert time.time() < deadline, f"{marker} did not appear"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    return out


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


STAGE_FILES = [
    "config.json", "split.json", "log.txt", "report.md",
    "teacher/DONE", "teacher/teacher.jsonl", "teacher/selected.jsonl",
    "iter1/train/DONE", "iter1/train/data.jsonl", "iter1/train/student/model.safetensors",
    "iter1/train/student/config.json", "iter1/eval/DONE", "iter1/eval/eval.json",
    "iter1/eval/predictions.jsonl", "iter2/sample/DONE", "iter2/sample/samples.jsonl",
    "iter2/filter/DONE", "iter2/filter/samples.jsonl", "iter2/filter/kept.jsonl",
    "iter2/mix/DONE", "iter2/mix/train.jsonl", "iter2/train/DONE",
    "iter2/train/student/model.safetensors", "iter2/eval/DONE", "iter2/eval/eval.json",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(smollm2_dir, tmp_path_factory):
    """One uninterrupted --quick run (shrunk), shared by the tests below."""
    runs = tmp_path_factory.mktemp("runs")
    out = siked_run(smollm2_dir, runs)
    (folder,) = [p for p in runs.iterdir() if p.is_dir()]
    return folder, out


def test_quick_run_writes_every_stage_and_the_report(finished_run):
    folder, out = finished_run
    assert "--quick: a scaled-down run" in out
    for f in STAGE_FILES:
        assert (folder / f).is_file(), f
    assert not list(folder.rglob("*.pt")), "training checkpoints are removed once a stage is done"
    report = (folder / "report.md").read_text()
    for section in ("## Config", "## Data per iteration", "## Accuracy", "## Strategy mix",
                    "## Wall time", "## Files"):  # fmt: skip
        assert section in report, section
    assert "| 1 |" in report and "| 2 |" in report and "--quick" in report
    # the eval file: every set, an interval around each accuracy, strategy shares summing to 1
    ev = json.loads((folder / "iter2/eval/eval.json").read_text())
    assert set(ev["sets"]) == {"gsm8k", "svamp", siked.HELDOUT}
    for res in ev["sets"].values():
        assert res["n"] == 2 and res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]
        assert sum(s["share"] for s in res["strategies"].values()) == pytest.approx(1.0)
    # provenance: every training row says where it came from; alpha is the teacher share
    mix = json.loads((folder / "iter2/mix/DONE").read_text())
    rows = [json.loads(x) for x in (folder / "iter2/mix/train.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} <= {"teacher", "student"}
    assert mix["alpha"] == pytest.approx(sum(r["source"] == "teacher" for r in rows) / len(rows))
    samples = (folder / "iter2/filter/samples.jsonl").read_text().splitlines()
    sample = json.loads(samples[0])
    assert {"id", "iteration", "strategy", "seed", "source", "verdict", "pred"} <= set(sample)
    assert len(samples) == 4 * 2  # 4 questions x (cot, pot: no socratic file for l2m) x 1
    samples = [json.loads(x) for x in samples]
    split = json.loads((folder / "split.json").read_text())
    # each question sampled once in each forced strategy; kept exactly when verify says right
    pairs = sorted((r["id"], r["strategy"]) for r in samples)
    assert pairs == sorted((q, s) for q in split["train"] for s in ("cot", "pot"))
    for r in samples:
        right = verify.is_correct(r["pred"], r["answer"])
        assert (r["verdict"] in ("kept", "correct_duplicate")) == right, r
    # eval: each row's tag and verdict, and each set's count, redone from its text
    preds = [
        json.loads(x) for x in (folder / "iter2/eval/predictions.jsonl").read_text().splitlines()
    ]
    for r in preds:
        tag = strategies.parse_solution(r["text"])[0]
        assert r["strategy"] == tag and r["correct"] == verify.is_correct(r["pred"], r["answer"])
    for name, res in ev["sets"].items():
        assert res["correct"] == sum(r["correct"] for r in preds if r["set"] == name)
    assert len(split["train"]) == 4 and not set(split["train"]) & set(split["heldout"])


def test_a_rerun_does_nothing_and_another_config_is_refused(finished_run, smollm2_dir):
    folder, _ = finished_run
    before = tree(folder)
    out = siked_run(smollm2_dir, folder.parent)
    assert "nothing to do" in out
    assert tree(folder) == before
    proc = subprocess.run(
        [*command(smollm2_dir, folder.parent), "--samples", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env(),
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "holds a run with other settings (samples: 1 -> 2)" in proc.stderr


def test_kill_during_training_and_sampling_then_resume(finished_run, smollm2_dir, tmp_path):
    """kill -9 while iteration 1 trains and while iteration 2 samples; the reruns resume, redo
    nothing finished, and end with the same files as the uninterrupted run."""
    reference, _ = finished_run
    runs = tmp_path / "runs"
    folder = runs / reference.name

    run_until(smollm2_dir, runs, folder / "iter1/train/ckpt.pt")
    assert is_done(folder / "teacher") and not is_done(folder / "iter1/train")
    teacher_done = tree(folder / "teacher")

    out = run_until(smollm2_dir, runs, folder / "iter2/sample/chunks/00000.jsonl")
    assert "iter1 train: resuming from" in out
    assert tree(folder / "teacher") == teacher_done  # not redone
    assert not is_done(folder / "iter2/sample")
    kept = tree(folder / "iter1") | {"chunk0": tree(folder / "iter2/sample/chunks")["00000.jsonl"]}

    out = siked_run(smollm2_dir, runs)
    assert "iter2 sample: 1/2 chunks already on disk, resuming" in out
    assert "stage teacher" not in out and "stage iter1" not in out
    after = tree(folder / "iter1") | {"chunk0": tree(folder / "iter2/sample/chunks")["00000.jsonl"]}
    assert after == kept  # nothing finished was redone

    for f in ("iter2/sample/samples.jsonl", "iter2/filter/samples.jsonl", "iter2/mix/train.jsonl",
              "iter1/train/student/model.safetensors", "iter2/train/student/model.safetensors",
              "iter2/eval/predictions.jsonl", "iter2/eval/eval.json"):  # fmt: skip
        assert (folder / f).read_bytes() == (reference / f).read_bytes(), f


def test_a_kill_right_after_the_last_stage_then_a_rerun_closes_it(
    finished_run, smollm2_dir, tmp_path, monkeypatch
):
    """Ctrl-C after the last stage's DONE, before its report: the rerun has no stage to run, but
    must still write the report (else it never shows the last evaluation), and remove what an
    interrupted save_pretrained left in a finished stage."""
    reference, _ = finished_run
    folder = tmp_path / "runs" / reference.name
    shutil.copytree(reference, folder)
    for f in ("DONE", "eval.json", "predictions.jsonl"):  # its chunks stay: no model is loaded
        (folder / "iter2/eval" / f).unlink()
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    cfg = siked.parse_args(command(smollm2_dir, folder.parent)[2:])
    siked.main(dataclasses.replace(cfg, only="report"))  # the report before the last stage
    accuracy = lambda run: (run / "report.md").read_text().split("## Accuracy")[1].split("##")[0]
    assert "| 2 |" not in accuracy(folder)

    def interrupted(R):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(siked, "write_report", interrupted)
        with pytest.raises(KeyboardInterrupt):
            siked.main(cfg)
    assert is_done(folder / "iter2/eval") and "| 2 |" not in accuracy(folder)
    leftover = folder / "iter2/train/.student.k1ll3d"  # save_pretrained's temporary folder
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    siked.main(cfg)
    assert accuracy(folder) == accuracy(reference)  # the last evaluation is in
    assert not leftover.exists()
    before = tree(folder)
    siked.main(cfg)  # closed now: a rerun leaves the folder as it is
    assert tree(folder) == before


@pytest.mark.parametrize(
    "damaged, only",
    [("teacher/DONE", None), ("iter1/eval/DONE", "report"), ("iter2/eval/eval.json", "report")],
)
def test_a_damaged_stage_file_is_a_one_line_error(
    damaged, only, finished_run, smollm2_dir, tmp_path, monkeypatch
):
    """A DONE marker or eval.json that is not a JSON object: the rerun names it in one line."""
    reference, _ = finished_run
    folder = tmp_path / "runs" / reference.name
    shutil.copytree(reference, folder)
    (folder / damaged).write_text("{")  # newer than report.md: the rerun closes its stage again
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    cfg = siked.parse_args(command(smollm2_dir, folder.parent)[2:])
    with pytest.raises(SystemExit) as e:
        siked.main(dataclasses.replace(cfg, only=only))
    assert str(e.value).startswith(f"siked: {folder / damaged}: not valid JSON")
    assert "\n" not in str(e.value)


def test_a_damaged_jsonl_names_its_file_and_line(tmp_path):
    path = tmp_path / "kept.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(SystemExit) as e:
        siked.read_jsonl(path)
    assert str(e.value).startswith(f"siked: {path}:3: not valid JSON")
    path.write_text('{"id": 1}\n\n{"id": 2}\n')  # blank lines are skipped
    assert siked.read_jsonl(path) == [{"id": 1}, {"id": 2}]


def test_stage_files_are_synced_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    siked.write_json(tmp_path / "DONE", {"wall_s": 1.0})
    assert len(synced) == 1  # on disk before it replaces the old file: a power cut keeps one
    with pytest.raises(UnicodeEncodeError):
        siked.atomic_write(tmp_path / "DONE", "\ud800")  # fails halfway through the write
    assert siked.read_json(tmp_path / "DONE") == {"wall_s": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["DONE"]
    # what a kill leaves behind is a finished stage's scratch
    (tmp_path / "samples.jsonl.k3x9.part").write_text('{"id": 1')
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert sorted(p.name for p in siked.scratch(tmp_path)) == ["ckpt.pt", "samples.jsonl.k3x9.part"]


def test_torchrun_fsdp_saves_the_student_of_one_process(finished_run, smollm2_dir, tmp_path):
    """Two gloo processes with --fsdp: rank 0 gathers the shards and saves iteration 1's student,
    equal to the one-process run's (same global batches); the sharded eval covers every set."""
    reference, _ = finished_run
    runs = tmp_path / "runs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [
        *command(smollm2_dir, runs)[1:],
        "--fsdp",
        "--micro-batch-size",
        "1",
        "--iterations",
        "1",
    ]
    proc = subprocess.run([*torchrun, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env())  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (folder,) = [p for p in runs.iterdir() if p.is_dir()]
    student = "iter1/train/student/model.safetensors"
    two, one = load_file(folder / student), load_file(reference / student)
    assert two.keys() == one.keys()
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, rtol=1e-4, atol=1e-5, msg=name)
    ev = json.loads((folder / "iter1/eval/eval.json").read_text())
    assert {k: v["n"] for k, v in ev["sets"].items()} == {"gsm8k": 2, "svamp": 2, siked.HELDOUT: 2}


def is_done(folder: Path) -> bool:
    return (folder / "DONE").is_file()
