"""SIKeD's three reasoning strategies, the prompts built from them, and the gold-teacher converters.

Strategies (SPEC 1.1): chain of thought `cot`, least-to-most `l2m` (sub-questions in turn), program
of thought `pot`. A student's response is the strategy's tag (`[cot]: `) then the body: CoT and L2M
bodies end with `Final Answer: <number>`, a PoT body is a program that sets `answer`.

    student_prompt(question)            # the model writes the tag itself
    forced_prompt(question, "pot")      # the tag is already written (SIKeD's per-strategy sampling)
    parse_solution("[pot]: answer = 3") # ("pot", "answer = 3")

Prompts use SPEC 1.2's Alpaca layout in our own wording. Departure from [R]: the single-strategy
baselines' instruction names the strategy, not only "solve the problem" (the answer format is
learnt from the targets).
Teacher prompts are 8-shot chats on GSM8K train exemplars (TEACHER_EXEMPLAR_IDS, never evaluated
on) with L2M solutions written for this project (GSM8K's train_socratic file is not available).
The gold converters turn a GSM8K rationale (annotations `<<48/2=24>>`, `#### 72`) into bodies.
"""

import ast
import builtins
import keyword
import math
import re
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Strategy:
    name: str  # "cot", "l2m" or "pot"
    tag: str  # what a multi-strategy response starts with (SPEC 1.2)
    instruction: str  # one line, used for single-strategy prompts
    layout: str  # how a solution is laid out and how its final answer is marked


STRATEGIES = {
    "cot": Strategy(
        "cot",
        "[cot]: ",
        "Solve the math word problem by reasoning through it one step at a time.",
        "Plain sentences, one calculation per line, each showing its arithmetic. The last "
        "line is `Final Answer: <number>`.",
    ),
    "l2m": Strategy(
        "l2m",
        "[l2m]: ",
        "Solve the math word problem by splitting it into smaller sub-questions and "
        "answering them in order.",
        "Pairs of lines `Sub-question k: <question>` and `Answer to Sub-question k: "
        "<answer with its arithmetic>`, k = 1, 2, ..., the last sub-question being the "
        "problem's own question. The last line is `Final Answer: <number>`.",
    ),
    "pot": Strategy(
        "pot",
        "[pot]: ",
        "Solve the math word problem by writing a Python program that computes it.",
        "A Python program, one named variable per quantity, computing the result from the "
        "numbers in the problem and storing it in a variable named `answer`. It may import "
        "math, fractions, decimal, datetime, itertools, functools and statistics.",
    ),
}

# Student sampling stops at the start of another Alpaca section (SPEC 1.4.1 stops at "Input").
STOP = ("### Input", "### Instruction", "### Response")

_MULTI_INSTRUCTION = (
    "Solve the math word problem. Begin your response with the tag of the strategy you choose: "
    "[cot] to reason step by step, [l2m] to split it into sub-questions, or [pot] to write a "
    "Python program; then solve it that way."
)


def _strategy(strategy: str) -> Strategy:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    return STRATEGIES[strategy]


def _question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    return question.strip()


def _alpaca(instruction: str, question: str) -> str:
    return (
        "Read the instruction and the input that goes with it, then write a response that does "
        f"what the instruction asks.\n\n### Instruction:\n{instruction}\n\n"
        f"### Input:\n{_question(question)}\n\n### Response:\n"
    )


def student_prompt(question: str) -> str:
    """The multi-strategy prompt (Combined and SIKeD students): the model writes the tag."""
    return _alpaca(_MULTI_INSTRUCTION, question)


def forced_tag(strategy: str) -> str:
    """The tag a forced sample starts from, without its trailing space: BPE tokenizers fold that
    space into the next word (" minute"), so a prompt ending in " " forces tokens never trained."""
    return _strategy(strategy).tag.rstrip()


def forced_prompt(question: str, strategy: str) -> str:
    """The multi-strategy prompt with the strategy's tag already written."""
    return student_prompt(question) + forced_tag(strategy)


def single_prompt(question: str, strategy: str) -> str:
    """The prompt of a single-strategy baseline: no tag, the response is the bare solution."""
    return _alpaca(_strategy(strategy).instruction, question)


def format_target(strategy: str, body: str) -> str:
    """The tagged response; a body that starts with whitespace (a student's "\n\n...") follows the
    tag's colon as it was generated, so a D_self row trains on the student's own tokens."""
    tag = _strategy(strategy).tag
    return (tag.rstrip() if body[:1].isspace() else tag) + body


# small students drop the ":"; one space after it belongs to the tag unless more whitespace follows
_TAG_RE = re.compile(r"\s*\[\s*(cot|l2m|pot)\s*\](?:\s*:(?: (?!\s))?)?", re.I)


def parse_solution(text: str) -> tuple[str | None, str]:
    """(strategy, body) of a tagged response, the inverse of format_target; (None, text) when it
    has no known tag. Case and spaces around the tag are forgiven."""
    m = _TAG_RE.match(text)
    return (None, text) if m is None else (m.group(1).lower(), text[m.end() :])


def training_example(question: str, strategy: str, body: str, tagged: bool = True):
    """(prompt, response) for SFT; the trainer appends EOS. tagged=False: a baseline example."""
    if tagged:
        return student_prompt(question), format_target(strategy, body)
    return single_prompt(question, strategy), body


# -----------------------------------------------------------------------------
# gold converters

_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
_GOLD_RE = re.compile(r"####\s*(\S+)")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,200 or 1200.5
_PLAIN_NUMBER_RE = re.compile(rf"-?{_NUM}|-?\.\d+")
_UNIT = r"(?:\s?(?!x\b)[a-zA-Z]+){0,2}"  # `600 points + 250 points`, `8km / 4hrs`
_OPERAND = rf"(?:\(\s*)*(?:\$?\s?{_NUM}%?|\$?\.\d+%?){_UNIT}\s*\)*"
_JOIN = r"(?:\s*[-+*/x×÷–−]\s*|\s*(?=\())"  # an operator, or `14(2)`: a product
_EXPR = rf"{_OPERAND}(?:{_JOIN}{_OPERAND})+"  # two or more numbers joined by operators
# `3 x $4 + 2 = 14`: an expression, then `=` and a number.
_EQUATION_RE = re.compile(rf"(?<![\w.$])({_EXPR})\s*=\s*\$?\s?(-?{_NUM})(?![\d/])")
_EXPR_TAIL_RE = re.compile(rf"({_EXPR})\s*=\s*\$?\s?$")

_STOPWORDS = frozenset(
    """a an the to of in on at for and or is are was were be been being he she it they them
    his her hers its their theirs we us our you your i me my that this these those with from by
    each will would can could has have had do does did so then if than as there here which who
    what when where how all also after before into out up down over only just still total
    altogether together now per more less""".split()
)
_RESERVED = frozenset(dir(builtins)) | {"answer", "math", "solution"}  # no shadowed round()


def _gold(rationale: str, answer: float | None) -> tuple[float | None, str | None]:
    """The gold number and how to write it: from `#### N`, else from `answer`."""
    m = _GOLD_RE.search(rationale)
    if m is None and answer is not None:
        answer = float(answer)
        return answer, str(int(answer)) if answer.is_integer() else repr(answer)
    text = m.group(1).replace(",", "").replace("$", "") if m else ""
    try:
        return float(text), text
    except ValueError:  # no gold number
        return None, None


def _body_lines(rationale: str) -> list[str]:
    return [line for line in rationale.strip().split("\n") if not line.startswith("####")]


def gold_cot(rationale: str, answer: float | None = None) -> str | None:
    """CoT body from a GSM8K rationale: annotations removed, then `Final Answer: <gold>`."""
    _, gold = _gold(rationale, answer)
    if gold is None:
        return None
    lines = [_ANNOTATION_RE.sub("", line).rstrip() for line in _body_lines(rationale)]
    return "\n".join([line for line in lines if line] + [f"Final Answer: {gold}"])


def gold_l2m(socratic_rationale: str, answer: float | None = None) -> str | None:
    """L2M body from a GSM8K socratic rationale (`Sub-question? ** step` lines)."""
    _, gold = _gold(socratic_rationale, answer)
    lines = _body_lines(socratic_rationale)
    if gold is None or not lines or any(" ** " not in line for line in lines):
        return None
    out = []
    for k, line in enumerate(lines, 1):
        question, step = line.split(" ** ", 1)
        out.append(f"Sub-question {k}: {question.strip()}")
        out.append(f"Answer to Sub-question {k}: {_ANNOTATION_RE.sub('', step).strip()}")
    return "\n".join(out + [f"Final Answer: {gold}"])


# the nodes a parsed expression may hold: numbers, signs and operators
_ARITHMETIC = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.USub, ast.UAdd)
_ARITHMETIC += (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)  # no **: GSM8K never writes it


def _parse_arithmetic(text: str, percent: str) -> ast.expr | None:
    """An arithmetic expression written in text (`$1,200 x 3`, `20% * 50`) as a Python AST."""
    text = text.replace("$", "").replace(",", "")
    text = re.sub(r"(?<=[\d)\s])[x×](?=[\s\d(.$])", "*", text)
    text = re.sub(r"[a-zA-Z]+", " ", text)  # units
    text = text.replace("÷", "/").replace("–", "-").replace("−", "-")
    text = re.sub(r"(\d*\.?\d+)%", r"(\1" + percent + ")", text)
    text = re.sub(r"(?<=[\d)])\s*\(", "*(", text)  # 14(2) and (1/4)(160) are products
    if not re.fullmatch(r"[\d.+\-*/() ]+", text):
        return None
    # canonical literals: `08` -> `8`, `.5` -> `0.5`
    text = re.sub(r"\d*\.?\d+", lambda m: repr(float(m[0]) if "." in m[0] else int(m[0])), text)
    try:
        nodes = list(ast.walk(ast.parse(text.strip(), mode="eval").body))
    except SyntaxError:
        return None
    if not all(isinstance(n, _ARITHMETIC) for n in nodes):
        return None
    # `<<27=27>>` states a number, it does not compute one
    return nodes[0] if any(isinstance(n, ast.BinOp) for n in nodes) else None


def _evaluate(node: ast.expr, env: dict[str, float]) -> float:
    """Value of a converted expression, computed by Python as the program will compute it. Safe:
    its nodes are _ARITHMETIC, names of earlier steps, and the round/int/math.ceil calls we add."""
    code = compile(ast.fix_missing_locations(ast.Expression(node)), "<gold_pot>", "eval")
    return eval(code, {"math": math}, env)


def _close(a: float, b: float, rel_tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


_GOLD_TOL = 1e-6  # a step reaches the gold number within this relative tolerance


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOPWORDS and len(w) > 1]


def _name_for(line: str, start: int, end: int, taken: dict) -> str:
    """A variable name from the words around a step: what follows its result (`24 clips in
    May` -> clips_may), else the clause before its arithmetic (`the base fine: 90 + 50`)."""
    after = _ANNOTATION_RE.sub("", line[end:])
    after = re.sub(r"^\s*\$?\s?[\d,]*\.?\d*%?", "", after)  # the result as the text writes it
    words = _words(re.split(r"[.,;:!?()\n]", after + ".", maxsplit=1)[0])[:3]
    if not words:
        before = _ANNOTATION_RE.sub("", line[:start])
        tail = _EXPR_TAIL_RE.search(before) or re.search(r"[\d\s$.,+\-*/x×()=%]*$", before)
        words = _words(re.split(r"[.;!?]", before[: tail.start()])[-1])[-2:]
    base = "_".join(words) or "step"
    if keyword.iskeyword(base) or base in _RESERVED:
        base = f"{base}_value"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _raw_steps(rationale: str):
    """(line, start, end, expression text, stated result, is_annotation) for every step."""
    for line in _body_lines(rationale):
        annotations = list(_ANNOTATION_RE.finditer(line))
        for m in annotations:
            if "=" not in m.group(1):
                continue
            expr, result = m.group(1).rsplit("=", 1)
            if not re.search(r"\d\s*[-+*/]", expr):
                # `287 x 4 = <<1148=1148>>`: the arithmetic is in the text before the annotation
                tail = _EXPR_TAIL_RE.search(_ANNOTATION_RE.sub("", line[: m.start()]))
                expr = tail.group(1) if tail else expr
            yield line, m.start(), m.end(), expr, result, True
        if not annotations:  # a step written without an annotation: parse the text itself
            for m in _EQUATION_RE.finditer(line):
                yield line, m.start(), m.end(), m.group(1), m.group(2), False


def gold_pot_explain(
    rationale: str, question: str | None = None, answer: float | None = None
) -> tuple[str | None, str]:
    """(program, "ok") or (None, why): see gold_pot. Why is one of no_gold, no_steps (nothing to
    compute from), gold_not_reached (no step computes the gold number) and gold_literal (a literal
    equal to the gold number, not given by the question, passes unchanged into `answer`)."""
    gold, _ = _gold(rationale, answer)
    if gold is None:
        return None, "no_gold"
    # numbers the question states: a literal with such a value stays a literal
    given = {float(n.replace(",", "")) for n in _PLAIN_NUMBER_RE.findall(question or "")}
    exprs: dict[str, ast.expr] = {}  # step name -> expression, operands named by earlier steps
    env: dict[str, float] = {}  # step name -> value
    for line, start, end, expr_text, result_text, annotated in _raw_steps(rationale):
        try:
            stated = float(result_text.replace(",", ""))
        except ValueError:
            continue
        for percent in ("/ 100", ""):
            expr = _parse_arithmetic(expr_text, percent)
            if expr is None:
                continue
            for node in ast.walk(expr):  # refer to earlier results by name (the latest one)
                for field, child in ast.iter_fields(node):
                    if isinstance(child, ast.Constant) and child.value not in given:
                        if match := [n for n, v in env.items() if _close(v, child.value)]:
                            setattr(node, field, ast.Name(match[-1], ast.Load()))
            try:
                value = _evaluate(expr, env)
                if not math.isfinite(value):  # a huge int raises OverflowError here
                    continue
            except (ZeroDivisionError, OverflowError):
                continue
            if _close(value, stated) or annotated:
                break
        else:
            continue  # a text equation that does not add up was misread: skip it
        if not _close(value, stated):  # the rationale rounded this result: so does the program
            digits = len(result_text.partition(".")[2])
            places = [ast.Constant(digits)] if digits else []
            for fn, extra in (("round", places), ("int", []), ("math.ceil", [])):
                call = ast.Call(ast.parse(fn, mode="eval").body, [expr, *extra], [])
                if _close(rounded := _evaluate(call, env), stated):
                    expr, value = call, rounded
                    break
        name = _name_for(line, start, end, env)
        exprs[name], env[name] = expr, value
    final = next((n for n in reversed(env) if _close(env[n], gold, _GOLD_TOL)), None)
    if final is None:
        return None, "gold_not_reached" if exprs else "no_steps"
    # keep the steps the answer depends on
    needed = {final}
    for name in reversed(exprs):  # a step refers only to earlier steps
        if name in needed:
            needed.update(n.id for n in ast.walk(exprs[name]) if isinstance(n, ast.Name))
    kept = [n for n in exprs if n in needed]
    # The program must compute the answer: a literal equal to the gold number that the question
    # does not give must not reach `answer` unchanged (`<<30*1=30>>`). Nudge each such literal
    # and re-evaluate: if the answer moves with it one for one, the program copied the answer.
    nudge = gold + 1.375
    nodes = [n for k in kept for n in ast.walk(exprs[k])]
    digits = {id(n.args[1]) for n in nodes if isinstance(n, ast.Call) and len(n.args) == 2}
    for node in nodes:
        if not isinstance(node, ast.Constant) or id(node) in digits or node.value in given:
            continue
        if _close(node.value, gold, _GOLD_TOL):
            node.value, original = nudge, node.value
            try:
                nudged = {}
                for k in kept:
                    nudged[k] = _evaluate(exprs[k], nudged)
                if _close(nudged[final], nudge):
                    return None, "gold_literal"
            except (ZeroDivisionError, OverflowError, ValueError):
                pass  # the nudge broke the arithmetic: the answer does not follow it
            node.value = original
    lines = ["import math"] if any(isinstance(n, ast.Attribute) for n in nodes) else []
    lines += [f"{k} = {ast.unparse(exprs[k])}" for k in kept]
    return "\n".join(lines + [f"answer = {final}"]), "ok"


def gold_pot(
    rationale: str, question: str | None = None, answer: float | None = None
) -> str | None:
    """PoT body compiled from a GSM8K rationale, or None when it cannot be done honestly. Numbers
    the `question` states stay literals and may reach `answer` unchanged; without it, none may."""
    return gold_pot_explain(rationale, question, answer)[0]


# -----------------------------------------------------------------------------
# teacher prompts

# GSM8K train rows (question and rationale as published, MIT license) used as 8-shot exemplars,
# with L2M solutions written for this project in GSM8K's socratic layout (read by gold_l2m).
_EXEMPLARS = (
    {
        "id": "gsm8k-train-1235",
        "question": "Penny has $20. Penny buys 4 pairs of socks for $2 a pair and a hat for $7. "
        "How much money does Penny have left?",
        "rationale": "Penny buys 4 pairs of socks for $2 x 4 = $<<4*2=8>>8.\n"
        "In total, Penny spent $8 + $7 = $<<8+7=15>>15 on 4 pairs of socks and a hat.\n"
        "Penny has $20 -$15 = $<<20-15=5>>5 left after buying 4 pairs of socks and a hat.\n#### 5",
        "socratic": "How much do the 4 pairs of socks cost? ** A pair costs $2, so the socks cost "
        "4 * 2 = $8.\nHow much does Penny spend altogether? ** The socks and the hat cost 8 + 7 = "
        "$15.\nHow much money does Penny have left? ** She started with $20, so 20 - 15 = $5 is "
        "left.\n#### 5",
    },
    {
        "id": "gsm8k-train-6727",
        "question": "Martha's cat catches 3 rats and 7 birds. Cara's cat catches 3 less than five "
        "times as many animals as Martha's cat. How many animals does Cara's cat catch?",
        "rationale": "First find the total number of animals Martha's cat catches: 3 rats + 7 "
        "birds = <<3+7=10>>10 animals\nThen multiply that number by 5: 10 animals * 5 = "
        "<<10*5=50>>50 animals\nThen subtract 3 to find the total number of animals Cara's cat "
        "catches: 50 animals - 3 animals = <<50-3=47>>47 animals\n#### 47",
        "socratic": "How many animals does Martha's cat catch? ** It catches 3 + 7 = 10 animals.\n"
        "What is five times that many? ** Five times 10 is 5 * 10 = 50 animals.\nHow many animals "
        "does Cara's cat catch? ** Three fewer than 50, so 50 - 3 = 47 animals.\n#### 47",
    },
    {
        "id": "gsm8k-train-771",
        "question": "Jimmy decides to make sandwiches for a picnic.  He makes 8 sandwiches in "
        "total, using two slices of bread each.  How many packs of bread does he need to buy to "
        "make these sandwiches, assuming he starts with no bread and each pack has 4 slices of "
        "bread in it?",
        "rationale": "First, we need to determine how many slices of bread Jimmy will use to make "
        "the sandwiches. We determine this by performing 8*2=<<8*2=16>>16 slices of bread needed."
        "\nWe then divide the number of slices needed by the number of slices per bread pack, "
        "performing 16/4=<<16/4=4>>4 packs of bread needed.\n#### 4",
        "socratic": "How many slices of bread do the 8 sandwiches take? ** Each takes 2 slices, "
        "so 8 * 2 = 16 slices.\nHow many packs of bread does Jimmy need to buy? ** A pack holds 4 "
        "slices, so 16 / 4 = 4 packs.\n#### 4",
    },
    {
        "id": "gsm8k-train-475",
        "question": "Maggie picked 40 apples. Kelsey picked 28 apples. Layla picked some apples, "
        "too. The three averaged 30 apples picked. How many did Layla pick?",
        "rationale": "Together, they picked 30*3=<<30*3=90>>90.\nThere are 40+28=<<40+28=68>>68 "
        "accounted for.\nThen Layla picked 90-68=<<90-68=22>>22.\n#### 22",
        "socratic": "How many apples did the three pick in all? ** Three people averaging 30 "
        "apples picked 30 * 3 = 90 apples.\nHow many apples did Maggie and Kelsey pick together? "
        "** They picked 40 + 28 = 68 apples.\nHow many apples did Layla pick? ** The rest of the "
        "90: 90 - 68 = 22 apples.\n#### 22",
    },
    {
        "id": "gsm8k-train-3425",
        "question": "The population of Mojave was 4000 a decade ago. If the town's population has "
        "increased three times, and the population analysis firm predicts that it will increase "
        "by 40% after five years, how many people will be in Mojave in five years?",
        "rationale": "Since the population of Mojave has increased three times the number it was a "
        "decade ago, there are 3*4000 = <<3*4000=12000>>12000 people in Mojave now.\nIt's "
        "predicted that the population will increase by 40/100*12000 = <<40/100*12000=4800>>4800 "
        "people after five years.\nThis means there will be 12000+4800 = <<12000+4800=16800>>16800"
        " people living in Mojave in five years.\n#### 16800",
        "socratic": "How many people live in Mojave now? ** Three times 4000, so 3 * 4000 = 12000 "
        "people.\nBy how many people will the town grow in five years? ** 40% of 12000 is 40 / "
        "100 * 12000 = 4800 people.\nHow many people will be in Mojave in five years? ** 12000 + "
        "4800 = 16800 people.\n#### 16800",
    },
    {
        "id": "gsm8k-train-4514",
        "question": "Betty ordered 18 items in an online shop via cash on delivery. She ordered 6 "
        "pieces of slippers that cost $2.5 each, 4 pieces of lipstick for $1.25 each, and 8 pieces "
        "of hair color for $3 each. How much did Betty pay in total when it was delivered?",
        "rationale": "Betty paid 6 x $2.5 = $<<6*2.5=15>>15 for the slippers.\nShe paid 4 x $1.25 "
        "= $<<4*1.25=5>>5 for the lipsticks.\nShe paid 8 x $3 = $<<8*3=24>>24 for the hair color."
        "\nTherefore, Betty paid $15 + $5 + $24 = $<<15+5+24=44>>44 in total.\n#### 44",
        "socratic": "How much did the slippers cost? ** 6 pieces at $2.5 cost 6 * 2.5 = $15.\nHow "
        "much did the lipsticks cost? ** 4 pieces at $1.25 cost 4 * 1.25 = $5.\nHow much did the "
        "hair color cost? ** 8 pieces at $3 cost 8 * 3 = $24.\nHow much did Betty pay in total? "
        "** 15 + 5 + 24 = $44.\n#### 44",
    },
    {
        "id": "gsm8k-train-307",
        "question": "There are 110 calories in a serving of cheese.  Rick buys the large blocks "
        "that have 16 servings per block.  If Rick has already eaten 5 servings of cheese, how "
        "many calories are remaining in the block?",
        "rationale": "The block has 16 servings and he has eaten 5 servings leaving 16-5 = "
        "<<16-5=11>>11 servings of cheese\nThere are 11 servings of cheese left and each serving "
        "is 110 calories for a total of 11*110 = <<11*110=1210>>1,210 calories\n#### 1210",
        "socratic": "How many servings are left in the block? ** 16 - 5 = 11 servings.\nHow many "
        "calories are remaining in the block? ** Each serving has 110 calories, so 11 * 110 = "
        "1210 calories.\n#### 1210",
    },
    {
        "id": "gsm8k-train-1014",
        "question": "Hazel walked 2 kilometers in the first hour. If she walked twice as far in "
        "the second hour, how far did she walk for 2 hours?",
        "rationale": "Hazel walked 2 x 2 = <<2*2=4>>4 kilometers in the second hour.\nSo, she "
        "walked 2 + 4 = <<2+4=6>>6 kilometers for 2 hours.\n#### 6",
        "socratic": "How far did Hazel walk in the second hour? ** Twice 2 kilometers: 2 * 2 = 4 "
        "kilometers.\nHow far did she walk in the 2 hours? ** 2 + 4 = 6 kilometers.\n#### 6",
    },
)
TEACHER_EXEMPLAR_IDS = [e["id"] for e in _EXEMPLARS]

_TEACHER_SYSTEM = (
    "You solve grade-school math word problems. {instruction} Layout: {layout} Follow the "
    "layout of the worked examples exactly and write nothing after the solution."
)


@cache
def _exemplar_bodies(strategy: str) -> tuple[str, ...]:
    convert = {"cot": gold_cot, "l2m": gold_l2m, "pot": gold_pot}[strategy]
    bodies = tuple(convert(e["socratic" if strategy == "l2m" else "rationale"]) for e in _EXEMPLARS)
    assert all(bodies), f"an exemplar does not convert to {strategy}"
    return bodies


def teacher_messages(question: str, strategy: str) -> list[dict]:
    """8-shot chat messages asking an LLM teacher for one solution body (no tag) to `question`."""
    s = _strategy(strategy)
    messages = [{"role": "system", "content": _TEACHER_SYSTEM.format(**vars(s))}]
    for e, body in zip(_EXEMPLARS, _exemplar_bodies(strategy), strict=True):
        messages.append({"role": "user", "content": e["question"]})
        messages.append({"role": "assistant", "content": body})
    messages.append({"role": "user", "content": _question(question)})
    return messages
