"""strategies.py: the three strategies, prompts, the round trip of tags, the teacher prompts, and
the gold converters measured on the real GSM8K data (all 7,473 training rationales).

Oracles: hand-written expected programs and texts, GSM8K's own gold answers, and the PoT
sandbox of verify.py to run the compiled programs.
"""

import ast
import json
import os
from collections import Counter
from pathlib import Path

import pytest

import strategies as S
import verify

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SIKED_DATA") or ROOT.parent / "shared" / "data")


def gsm8k(split: str) -> list[dict]:
    """Rows {"id", "question", "rationale", "answer"} of a GSM8K split. From the raw file in
    $SIKED_DATA (the rationale then ends with `#### N`), else through data/prepare.py (the
    rationale stops before `####` and the gold number comes as `answer`)."""
    path = SHARED / "gsm8k" / f"{split}.jsonl"
    if path.exists():
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            d = json.loads(line)
            gold = float(d["answer"].split("####")[-1].replace(",", "").replace("$", ""))
            rows.append(
                {"id": f"gsm8k-{split}-{i}", "question": d["question"], "rationale": d["answer"]}
                | {"answer": gold}
            )
        return rows
    from data import prepare

    try:
        return prepare.load("gsm8k", split.replace("_socratic", ""))
    except OSError as e:
        pytest.skip(f"GSM8K is not available here ({e})")


@pytest.fixture(scope="module")
def train():
    return gsm8k("train")


@pytest.fixture(scope="module")
def sandbox():
    with verify.PotSandbox(workers=2) as box:
        yield box


NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?"
)


# -----------------------------------------------------------------------------
# strategies and prompts


def test_strategies_are_the_papers_three():
    assert list(S.STRATEGIES) == ["cot", "l2m", "pot"]
    for name, s in S.STRATEGIES.items():
        assert s.name == name and s.tag == f"[{name}]: "
        assert s.instruction and "\n" not in s.instruction
        assert s.layout


def test_student_prompt_is_alpaca_shaped():
    p = S.student_prompt("  How many apples?  ")
    i, q, r = p.index("### Instruction:\n"), p.index("### Input:\n"), p.index("### Response:\n")
    assert 0 < i < q < r
    assert p.endswith("### Response:\n")
    assert "\n### Input:\nHow many apples?\n\n### Response:\n" in p
    for tag in ("[cot]", "[l2m]", "[pot]"):  # the model is told which tags it may write
        assert tag in p[i:q]


def test_forced_prompt_is_the_student_prompt_plus_the_tag():
    for name, s in S.STRATEGIES.items():
        assert S.forced_prompt("Q?", name) == S.student_prompt("Q?") + s.tag.rstrip()


def test_forced_tag_tokens_begin_the_trained_response(smollm2_dir):
    """At sampling the forced tag's tokens must be those the student was trained on: with the tag's
    trailing space, SmolLM2's BPE ends the prompt on a lone " " that training never had."""
    from model import Tokenizer

    tok = Tokenizer.from_pretrained(smollm2_dir)
    for name, body in [("cot", "Natalia sold 48 clips."), ("pot", "minute = 12 / 60")]:
        trained = tok.encode(S.format_target(name, body))
        forced = tok.encode(S.forced_tag(name))
        assert trained[: len(forced)] == forced, name
        assert tok.encode(S.STRATEGIES[name].tag) != trained[: len(forced) + 1]  # the old bug


def test_single_prompt_has_no_tag_and_names_the_strategy():
    for name, s in S.STRATEGIES.items():
        p = S.single_prompt("Q?", name)
        assert p.endswith("### Response:\n") and s.instruction in p
        assert "[cot]" not in p and "[pot]" not in p and "[l2m]" not in p


def test_prompts_reject_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        S.forced_prompt("Q?", "tot")
    with pytest.raises(ValueError, match="question"):
        S.student_prompt("   ")


def test_stop_strings_start_a_new_section():
    assert "### Input" in S.STOP and "### Instruction" in S.STOP
    for stop in S.STOP:  # a stop string never occurs inside the response part of a prompt
        assert stop not in S.forced_prompt("Q?", "cot").split("### Response:\n")[-1]


@pytest.mark.parametrize("strategy", ["cot", "l2m", "pot"])
@pytest.mark.parametrize("body", ["x = 1\nanswer = x", "  leading spaces", "\nnewline first", ""])
def test_format_target_and_parse_solution_round_trip(strategy, body):
    assert S.parse_solution(S.format_target(strategy, body)) == (strategy, body)


@pytest.mark.parametrize(
    "generated", ["[cot]: Step 1", "[cot]:\n\nStep 1", "[pot]:\nx = 1", "[l2m]:  two", "[cot]: \nA"]
)
def test_a_students_response_is_trained_on_as_generated(generated):
    # D_self: the sample is parsed into (strategy, body), the target rebuilt from them
    assert S.format_target(*S.parse_solution(generated)) == generated


def test_parse_solution_forgives_case_and_spacing_and_reports_no_tag():
    assert S.parse_solution("[COT]:so 3") == ("cot", "so 3")
    assert S.parse_solution("  [ pot ] : answer = 1") == ("pot", "answer = 1")
    assert S.parse_solution("cot: 3 apples") == (None, "cot: 3 apples")
    assert S.parse_solution("[cot]\n\nStep 1: 3") == ("cot", "\n\nStep 1: 3")  # no colon
    assert S.parse_solution("[tot]: 3") == (None, "[tot]: 3")


def test_training_example():
    prompt, response = S.training_example("Q?", "pot", "answer = 1")
    assert prompt == S.student_prompt("Q?") and response == "[pot]: answer = 1"
    prompt, response = S.training_example("Q?", "pot", "answer = 1", tagged=False)
    assert prompt == S.single_prompt("Q?", "pot") and response == "answer = 1"


# -----------------------------------------------------------------------------
# gold converters on hand-made rationales


def test_gold_cot_strips_annotations_and_states_the_answer():
    assert S.gold_cot(NATALIA) == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\nFinal Answer: 72"
    )
    without_gold_line = NATALIA.rsplit("\n", 1)[0]
    assert S.gold_cot(without_gold_line, answer=72.0) == S.gold_cot(NATALIA)
    assert S.gold_cot(without_gold_line) is None


def test_gold_pot_names_steps_and_refers_to_earlier_results():
    assert S.gold_pot(NATALIA, NATALIA_Q) == (
        "clips_may = 48 / 2\nclips_april_may = 48 + clips_may\nanswer = clips_april_may"
    )


def test_gold_pot_reads_an_unannotated_last_step():
    rationale = "He buys 3*4 = <<3*4=12>>12 apples.\nSo he has 12 apples + 5 apples = 17 apples.\n"
    program, why = S.gold_pot_explain(rationale + "#### 17")
    assert why == "ok" and "+ 5" in program and "17" not in program


def test_gold_pot_mirrors_the_rationales_rounding():
    rationale = "Each gets 10/3 = <<10/3=3.33>>3.33 cups.\nIn all 3.33*4 = <<3.33*4=13.32>>13.32.\n"
    program = S.gold_pot(rationale + "#### 13.32")
    assert "round(10 / 3, 2)" in program
    assert verify.run_pot(program).value == pytest.approx(13.32)


def test_gold_pot_takes_the_arithmetic_before_a_bare_annotation():
    rationale = "The record is 287 x 4 = <<1148=1148>>1,148 points.\n#### 1148"
    assert S.gold_pot(rationale) == "points = 287 * 4\nanswer = points"


def test_gold_pot_refuses_to_copy_the_gold_number():
    # `<<30*1=30>>` computes nothing: the program would pass the gold 30 straight through
    rationale = "At least two: 60/100*120 = <<60/100*120=72>>72.\nOnly one: <<30*1=30>>30.\n#### 30"
    assert S.gold_pot_explain(rationale) == (None, "gold_literal")
    # ...unless the question gives that number
    program, why = S.gold_pot_explain(rationale, question="There are 30 flats and 120 rooms.")
    assert (program, why) == ("one = 30 * 1\nanswer = one", "ok")


def test_gold_pot_explains_what_it_cannot_do():
    assert S.gold_pot_explain("Let x be the age.\n3x = 27\nx = 9\n#### 9")[1] == "no_steps"
    assert S.gold_pot_explain("He has 2+3=<<2+3=5>>5.\n#### 6")[1] == "gold_not_reached"
    assert S.gold_pot_explain("He has 2+3=<<2+3=5>>5.")[1] == "no_gold"
    # `**` is not arithmetic GSM8K writes: refused, so no step can compute a huge power
    assert S.gold_pot_explain("It is 9**9**9 = <<9**9**9=9>>9.\n#### 9")[1] == "no_steps"
    # a product too large for a float is skipped as a step, not an OverflowError
    huge = "*".join(["99999999999999999999"] * 17)
    assert S.gold_pot_explain(f"It is <<{huge}=5>>5.\n#### 5")[1] == "no_steps"


def test_gold_l2m_from_a_socratic_rationale():
    socratic = (
        "How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n"
        "How much does she make? ** She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    )
    assert S.gold_l2m(socratic) == (
        "Sub-question 1: How many eggs does Janet sell?\n"
        "Answer to Sub-question 1: Janet sells 16 - 3 - 4 = 9 duck eggs.\n"
        "Sub-question 2: How much does she make?\n"
        "Answer to Sub-question 2: She makes 9 * 2 = $18.\n"
        "Final Answer: 18"
    )
    assert S.gold_l2m(NATALIA) is None  # not a socratic rationale


# -----------------------------------------------------------------------------
# teacher prompts


def test_teacher_messages_are_eight_shot_chat():
    for name in S.STRATEGIES:
        messages = S.teacher_messages("What is 2 + 2?", name)
        assert len(messages) == 1 + 2 * 8 + 1
        roles = [m["role"] for m in messages]
        assert roles == ["system"] + ["user", "assistant"] * 8 + ["user"]
        assert messages[-1]["content"] == "What is 2 + 2?"
        assert S.STRATEGIES[name].instruction in messages[0]["content"]
        assert not any(m["content"].startswith("[") for m in messages)  # bodies carry no tag


def test_teacher_exemplars_are_gsm8k_train_rows_with_correct_solutions(train, sandbox):
    assert len(S.TEACHER_EXEMPLAR_IDS) == len(set(S.TEACHER_EXEMPLAR_IDS)) == 8
    by_id = {r["id"]: r for r in train}
    golds = []
    for e in S._EXEMPLARS:
        row = by_id[e["id"]]
        assert row["question"] == e["question"]
        assert row["rationale"].split("####")[0].strip() == e["rationale"].split("####")[0].strip()
        golds.append(row["answer"])
    for name in ("cot", "l2m"):
        bodies = [m["content"] for m in S.teacher_messages("Q?", name)[2:-1:2]]
        assert [verify.extract_answer(b, name) for b in bodies] == golds
        if name == "l2m":
            assert all(verify.has_subquestions(b) for b in bodies)
    programs = [m["content"] for m in S.teacher_messages("Q?", "pot")[2:-1:2]]
    assert [r.value for r in sandbox.run_batch(programs)] == golds


# -----------------------------------------------------------------------------
# gold converters on all of GSM8K train


def _gold_literal_copied(program: str, question: str, gold: float) -> list[str]:
    """Versions of `program` with one gold-valued literal nudged, for the literals the question
    does not give; the program copied the gold if its answer moves with the nudge one for one."""
    given = {float(n.replace(",", "")) for n in S._PLAIN_NUMBER_RE.findall(question)}
    tree = ast.parse(program)
    skip = {id(n.args[1]) for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) > 1}
    nudged = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and id(node) not in skip
            and not isinstance(node.value, str)
        ):
            if abs(node.value - gold) <= 1e-6 * max(1.0, abs(gold)) and node.value not in given:
                node.value, original = gold + 1.375, node.value
                nudged.append(ast.unparse(tree))
                node.value = original
    return nudged


def test_gold_pot_and_cot_on_all_of_gsm8k_train(train, sandbox):
    programs, indices, reasons = [], [], Counter()
    for i, row in enumerate(train):
        program, why = S.gold_pot_explain(row["rationale"], row["question"], answer=row["answer"])
        reasons[why] += 1
        if program is not None:
            programs.append(program)
            indices.append(i)
    results = sandbox.run_batch(programs)
    wrong = Counter()
    for i, program, (value, error) in zip(indices, programs, results, strict=True):
        if not verify.is_correct(value, train[i]["answer"]):
            wrong[error or "wrong value"] += 1
        assert program.splitlines()[-1].startswith("answer = ")
        assert program.splitlines()[-1][len("answer = ") :].isidentifier()  # a named result
    n = len(train)
    pot_ok = len(programs) - sum(wrong.values())
    # the honesty check, independent of the converter's own: nudge every gold-valued literal the
    # question does not give; the answer must not follow it
    nudged, owners = [], []
    for i, program in zip(indices, programs, strict=True):
        for version in _gold_literal_copied(program, train[i]["question"], train[i]["answer"]):
            nudged.append(version)
            owners.append(i)
    copied = [
        i
        for i, r in zip(owners, sandbox.run_batch(nudged), strict=True)
        if r.value is not None and abs(r.value - (train[i]["answer"] + 1.375)) < 1e-6
    ]
    cot_ok = sum(
        verify.is_correct(
            verify.extract_answer(S.gold_cot(r["rationale"], answer=r["answer"]), "cot"),
            r["answer"],
        )
        for r in train
    )
    print(
        f"\nGSM8K train, {n} rationales: PoT {pot_ok} correct = {pot_ok / n:.2%}; "
        f"left out: {dict(reasons - Counter(ok=reasons['ok']))}; wrong when run: {dict(wrong)}; "
        f"{len(nudged)} gold-valued literals checked, {len(copied)} copied. "
        f"CoT {cot_ok} correct = {cot_ok / n:.2%}"
    )
    assert n == 7473
    assert not wrong, wrong
    assert not copied, [train[i]["id"] for i in copied]
    assert pot_ok / n >= 0.95
    assert cot_ok / n >= 0.99
    assert sandbox.started == 2, "ordinary programs made a worker retire or die"


def test_gold_l2m_on_gsm8k_test_socratic():
    path = SHARED / "gsm8k" / "test_socratic.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pairs = [(r["answer"], float(r["answer"].split("####")[-1].replace(",", ""))) for r in rows]
    else:
        rows = [r for r in gsm8k("test") if r.get("socratic")]
        if not rows:
            pytest.skip("gsm8k/test_socratic.jsonl is not available here")
        pairs = [(r["socratic"], r["answer"]) for r in rows]
    ok = 0
    for socratic, gold in pairs:
        body = S.gold_l2m(socratic, answer=gold)
        lines = body.splitlines()
        k = (len(lines) - 1) // 2
        assert [line.split(":")[0] for line in lines[:-1]] == [
            f"{kind}Sub-question {j}" for j in range(1, k + 1) for kind in ("", "Answer to ")
        ]
        assert verify.has_subquestions(body)
        ok += verify.is_correct(verify.extract_answer(body, "l2m"), gold)
    print(f"\nGSM8K test socratic: L2M {ok}/{len(pairs)} extract the gold answer")
    assert ok == len(pairs)
