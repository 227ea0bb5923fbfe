"""verify.py: answer extraction, comparison, and the PoT sandbox.

The sandbox tests follow nanochat's tests/test_execution.py: one adversarial property per test.
Every hostile program must come back as an error, within its timeout, and leave the parent
process and the machine as they were (files not created, a listener not connected to, the
parent's cwd, environment and signal handlers unchanged). Then each layer is tested on its own,
with the others turned off (SandboxConfig flags, for tests only).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import verify
from verify import PotSandbox, SandboxConfig

TIMEOUT = 1.0  # seconds a hostile program may run
SLACK = 1.5  # seconds on top for killing and replacing a worker on a busy 2-core machine
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def box():
    with PotSandbox(workers=2) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def parent_unharmed():
    """After every test: the parent process is as it was."""

    def environ():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    cwd, env = os.getcwd(), environ()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    yield
    assert os.getcwd() == cwd
    assert environ() == env
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def run_hostile(box, code, timeout_s=TIMEOUT):
    """Run one hostile program; it must fail in time and leave the sandbox working."""
    start = time.monotonic()
    value, error = box.run(code, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert value is None, f"a hostile program returned {value!r}"
    assert error, "a hostile program returned no error"
    assert elapsed < timeout_s + SLACK, f"took {elapsed:.2f}s"
    assert box.run("answer = 6 * 7") == (42.0, None), "the sandbox no longer works"
    return error


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1; the test asserts that nothing connected to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.3)
    yield sock, sock.getsockname()[1]
    sock.close()


def assert_no_connection(sock):
    with pytest.raises(TimeoutError):
        sock.accept()


@pytest.fixture
def shared_dir():
    """A root-owned directory under /tmp that the unprivileged worker can reach (tmp_path's
    parents are private to root); the test sets its mode."""
    path = Path(tempfile.mkdtemp(prefix="siked-verify-"))
    yield path
    shutil.rmtree(path)


# -----------------------------------------------------------------------------
# answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final Answer: 1,234", 1234.0),
        ("Final Answer: $1,234.50", 1234.5),
        ("Final Answer: -3", -3.0),
        ("Final Answer: -$3", -3.0),
        ("Final Answer: $-3", -3.0),
        ("Final Answer: −3", -3.0),  # U+2212
        ("The final answer is −3", -3.0),
        ("Final Answer: 3/4", 0.75),
        ("Final Answer: 12%", 12.0),
        ("Final Answer: .75", 0.75),
        ("Final Answer: 12.00 dollars", 12.0),
        ("final answer is: 8", 8.0),
        ("She has 48 + 24 = 72 clips.\n#### 72", 72.0),
        ("So the answer is 5 apples.", 5.0),
        ("She has 3 pens, then 7 pens.", 7.0),
        ("The 5-3 difference is 2.", 2.0),
        ("He is left with 10 - 3", 3.0),
        ("He owes -3 - -4", -4.0),
        ("It ends on 12.", 12.0),
        ("Final Answer: 6\nLater text mentions 9 cats.", 6.0),
        ("Final Answer: 3 / 4 of a cup", 0.75),
        ("He paid $ 1,250 in all.", 1250.0),
        ("Final Answer: 10,000,000", 10_000_000.0),
        ("Final Answer: 40/100*12000 = 4800", 4800.0),  # the result, not 40/100
        # "final answer" in prose is no marker: a colon or a number must follow
        ("To get the final answer we first halve 48.\n48/2 = 24\n48 + 24 = 72", 72.0),
        ("Sub-question 2: What is the final answer?\nAnswer to Sub-question 2: 24 + 48 = 72", 72.0),
        ("Final Answer: 72\nThe final answer is correct because 2 checks.", 72.0),
        ("The final answer is 45", 45.0),
        ("Is the answer is right? 3 + 4 = 7", 7.0),
        ("Final Answer: x = $5.\nThen 7 = 7", 5.0),
        ("Final Answer: 6 = six", 6.0),  # no number after the = of its line
        ("**Final Answer**: 7\n3 more", 7.0),  # Markdown bold around the marker
        ("**Final Answer:** 7\n3 more", 7.0),
    ],
)
def test_extract_answer_number_forms(text, expected):
    assert verify.extract_answer(text, "cot") == expected


def test_extract_answer_without_a_number_is_none():
    assert verify.extract_answer("I do not know.", "l2m") is None


def test_extract_answer_untagged_is_read_like_cot():
    assert verify.extract_answer("so 4 + 5 = 9\nFinal Answer: 9", None) == 9.0


def test_extract_answer_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        verify.extract_answer("Final Answer: 3", "tot")


def test_extract_answer_pot_runs_the_program():
    assert verify.extract_answer("x = 48 / 2\nanswer = x + 48", "pot") == 72.0
    fenced = "Here is the code:\n```python\nanswer = 2 ** 5\n```\nDone."
    assert verify.extract_answer(fenced, "pot") == 32.0
    assert verify.extract_answer("answer = 1 / 0", "pot") is None


@pytest.mark.parametrize(
    "body", [" x = 48 / 2\nanswer = x + 48", "\n\n    x = 48 / 2\n    answer = x + 48\n"]
)
def test_extract_answer_pot_forgives_a_leading_indent(body):
    """After "[pot]:" a small student's program starts with a space, or is indented as a whole."""
    assert verify.extract_answer(body, "pot") == 72.0


def test_extract_answers_keeps_order_across_strategies():
    texts = ["Final Answer: 3", "answer = 4", "Sub-question 1: ...\nFinal Answer: 5", "oops("]
    got = verify.extract_answers(texts, ["cot", "pot", "l2m", "pot"], workers=2)
    assert got == [3.0, 4.0, 5.0, None]
    with pytest.raises(ValueError, match="length"):
        verify.extract_answers(["a"], ["cot", "pot"])


def test_is_correct_tolerance_and_exact_mode():
    assert verify.is_correct(72.0, 72)
    assert verify.is_correct(72.000001, 72)  # within 1e-4 relative
    assert not verify.is_correct(72.01, 72)
    assert verify.is_correct(1 / 3, 0.33333)  # 1e-5 relative
    assert not verify.is_correct(1 / 3, 0.33333, rel_tol=0)  # the paper's exact equality
    assert verify.is_correct(0.5, 0.50, rel_tol=0)
    assert verify.is_correct(1e-12, 0)  # float noise around zero
    # a whole gold number takes rounding noise only: relative slack would pass a wrong integer
    assert verify.is_correct(4 - 1e-15, 4) and verify.is_correct(160_000.0000001, 160_000)
    assert not verify.is_correct(10_001, 10_000) and not verify.is_correct(160_016, 160_000)
    assert not verify.is_correct(72.001, 72)
    assert not verify.is_correct(None, 3)
    with pytest.raises(ValueError, match="rel_tol"):
        verify.is_correct(1.0, 1.0, rel_tol=-1)


def test_command_line_is_one_line():
    """verify.py is a library; run by hand, even with `--worker` (PotSandbox's entry point, which
    needs SIKED_SANDBOX_CONFIG), it says so in one line, not a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "SIKED_SANDBOX_CONFIG"}
    for args in ([], ["--worker"], ["--help"]):
        cmd = [sys.executable, verify.__file__, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.stderr.strip().splitlines() == [
            "verify.py is a library; `--worker` is the PoT sandbox's internal entry point"
        ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sub-question 1: How many?\nAnswer to Sub-question 1: 3", True),
        ("SUBQUESTION: what", True),
        ("sub_question 2", True),
        ("sub question 1", False),  # a space is not punctuation ([R] strips punctuation only)
        ("Just reasoning.\nFinal Answer: 3", False),
    ],
)
def test_has_subquestions(text, expected):
    assert verify.has_subquestions(text) is expected


# -----------------------------------------------------------------------------
# programs that should work


def test_answer_variable(box):
    assert box.run("x = 48 / 2\nanswer = x + 48") == (72.0, None)


def test_solution_function(box):
    assert box.run("def solution():\n    return 3 * 4\n") == (12.0, None)


def test_answer_variable_wins_over_solution(box):
    assert box.run("def solution():\n    return 1\nanswer = 2") == (2.0, None)


def test_main_guard_and_print_are_captured(box):
    code = (
        "def solution():\n    print('six')\n    return 6\n"
        "if __name__ == '__main__':\n    solution()"
    )
    result = box.run(code)
    assert result == (6.0, None)
    assert result.stdout == "six\nsix\n"


def test_fraction_decimal_and_int_become_floats(box):
    codes = [
        "from fractions import Fraction\nanswer = Fraction(1, 4)",
        "from decimal import Decimal\nanswer = Decimal('2.5')",
        "answer = 7",
    ]
    assert [r.value for r in box.run_batch(codes)] == [0.25, 2.5, 7.0]
    assert all(isinstance(r.value, float) for r in box.run_batch(codes))


def test_allowed_modules_work(box):
    code = """
import datetime, math, fractions, decimal, itertools, functools, statistics
d = datetime.datetime.strptime('2020-01-02', '%Y-%m-%d')
stamp = d.strftime('%Y') + str(d.timetuple().tm_yday)
days = (datetime.date(2020, 3, 1) - datetime.date(2020, 2, 1)).days
third = fractions.Fraction(1, 3).limit_denominator(10)
cents = decimal.Decimal('1.005').quantize(decimal.Decimal('0.01'), rounding=decimal.ROUND_HALF_UP)
pairs = len(list(itertools.combinations(range(5), 2)))
fact = functools.reduce(lambda a, b: a * b, range(1, 6))
@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
middle = statistics.median([3, 1, 2]) + statistics.mode([1, 1, 2])
class Box:
    def __init__(self, x):
        self.x = x
answer = int(stamp) + days + float(third) * 3 + float(cents) + pairs + fact + fib(10) + middle
answer += Box(1).x + math.gcd(12, 18)
"""
    expected = 20202 + 29 + 1.0 + 1.01 + 10 + 120 + 55 + 3 + 1 + 6
    value, error = box.run(code, timeout_s=5)
    assert error is None
    assert value == pytest.approx(expected)


def test_the_prefix_defines_math_and_lcm(box):
    """[R]'s programs run after a prefix importing math and defining lcm (SPEC 1.1)."""
    assert box.run("answer = math.ceil(7 / 2) + lcm(4, 6)") == (16.0, None)
    # each program gets its own math: one that changes it changes nothing for the next
    box.run_batch(["math.pi = 3\nanswer = 1"] * 2)
    assert box.run_batch(["answer = math.pi"] * 2)[0].value == pytest.approx(3.14159265)


def test_wrong_answer_is_a_value_not_an_error(box):
    value, error = box.run("answer = 48 / 2 + 47")
    assert error is None and not verify.is_correct(value, 72)


def test_results_come_back_in_order(box):
    codes = [f"answer = {i} * 3" for i in range(50)]
    codes[7], codes[21] = "while True: pass", "import os"
    results = box.run_batch(codes, timeout_s=TIMEOUT)
    for i, (value, error) in enumerate(results):
        if i in (7, 21):
            assert value is None and error
        else:
            assert (value, error) == (i * 3.0, None)


# -----------------------------------------------------------------------------
# values that are not answers


@pytest.mark.parametrize(
    "code, message",
    [
        ("answer = float('nan')", "nan"),
        ("answer = float('inf')", "inf"),
        ("answer = -1e308 * 10", "inf"),
        ("answer = 10 ** 400", "float"),
        ("answer = True", "bool"),  # documented: bool is not a number
        ("answer = '72'", "str"),
        ("answer = [72]", "list"),
        ("answer = None", "NoneType"),
        ("answer = 3 + 4j", "complex"),
        ("x = 3", "no `answer`"),
        ("answer = 1 / 0", "ZeroDivisionError"),
        ("answer = (", "SyntaxError"),
    ],
)
def test_non_answers_are_errors(box, code, message):
    value, error = box.run(code)
    assert value is None and message in error


# -----------------------------------------------------------------------------
# hostile programs, all layers on


def test_infinite_loop(box):
    assert "timeout" in run_hostile(box, "while True:\n    pass")


def test_loop_that_catches_every_exception(box):
    code = (
        "while True:\n    try:\n        while True:\n            pass\n"
        "    except BaseException:\n        pass"
    )
    assert "timeout" in run_hostile(box, code)


def test_deep_recursion(box):
    assert "RecursionError" in run_hostile(box, "def f(n):\n    return f(n + 1)\nanswer = f(0)")


def test_memory_bomb_single_allocation(box):
    assert "MemoryError" in run_hostile(box, "x = 'a' * 10 ** 10\nanswer = 1")


def test_memory_bomb_growing(box):
    code = "x = []\nwhile True:\n    x.append('a' * 10 ** 6)"
    assert "MemoryError" in run_hostile(box, code, timeout_s=5)


def test_fork(box):
    assert "not allowed" in run_hostile(box, "import os\nanswer = os.fork()")


def test_file_write(box, tmp_path):
    target = tmp_path / "written.txt"
    run_hostile(box, f"open({str(target)!r}, 'w').write('x')\nanswer = 1")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_read(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    code = f"answer = len(open({str(secret)!r}).read())"
    error = run_hostile(box, code)
    assert "hunter2" not in error


def test_network(box, listener):
    sock, port = listener
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\nanswer = 1"
    run_hostile(box, code)
    code = f"s = __import__('socket').create_connection(('127.0.0.1', {port}))\nanswer = 1"
    run_hostile(box, code)
    assert_no_connection(sock)


def test_os_system(box, tmp_path):
    marker = tmp_path / "marker"
    run_hostile(box, f"import os\nos.system('touch {marker}')\nanswer = 1")
    assert not marker.exists()


def test_dunder_import(box, tmp_path):
    marker = tmp_path / "marker"
    run_hostile(box, f"__import__('os').system('touch {marker}')\nanswer = 1")
    assert not marker.exists()


def test_subclasses_walk(box, tmp_path):
    marker = tmp_path / "marker"
    code = (
        "for c in ().__class__.__base__.__subclasses__():\n"
        "    if c.__name__ == '_wrap_close':\n"
        f"        c.__init__.__globals__['system']('touch {marker}')\n"
        "answer = 1"
    )
    run_hostile(box, code)
    assert not marker.exists()


def test_format_string_attribute_walk(box):
    run_hostile(box, "answer = len('{0.__class__.__mro__}'.format(1))")


def test_frame_walking_through_a_generator(box):
    code = "def g():\n    yield 1\nx = g()\nf = x.gi_frame.f_back\nanswer = 1"
    assert "rejected" in run_hostile(box, code)


def test_frame_walking_through_a_traceback(box):
    code = "try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame\nanswer = 1"
    run_hostile(box, code)


def test_sys_exit(box):
    assert "not allowed" in run_hostile(box, "import sys\nsys.exit(0)")


def test_raise_system_exit(box):
    assert "SystemExit" in run_hostile(box, "raise SystemExit(0)")


def test_raise_base_exception(box):
    assert "BaseException" in run_hostile(box, "raise BaseException('bye')")


def test_raise_keyboard_interrupt(box):
    assert "KeyboardInterrupt" in run_hostile(box, "raise KeyboardInterrupt")


def test_huge_output_is_capped(box):
    result = box.run("print('x' * 10 ** 7)\nanswer = 1")
    assert result == (1.0, None)
    assert len(result.stdout) == SandboxConfig().max_output


def test_endless_output(box):
    assert "timeout" in run_hostile(box, "while True:\n    print('x' * 1000)")


def test_builtins_not_given(box):
    for code in ("eval('1')", "exec('x = 1')", "getattr(1, 'real')", "globals()", "input()"):
        assert "NameError" in run_hostile(box, code)


def test_allowed_modules_come_without_their_submodules(box):
    assert "AttributeError" in run_hostile(box, "import fractions\nanswer = fractions.sys")
    assert "AttributeError" in run_hostile(box, "import statistics\nanswer = statistics.random")


def test_strip_code_fence():
    program = "x = 3\nanswer = x\n"
    assert verify.strip_code_fence(f"```python\n{program}```\nSo 3.") == program
    assert verify.strip_code_fence(f"Here it is:\n```\n{program}```") == program
    assert verify.strip_code_fence(f"Here it is:\n```py\n{program}") == program  # cut off
    assert verify.strip_code_fence(f"```python3\n{program}```") == program
    assert verify.strip_code_fence(f"``` python\n{program}```") == program
    # a lone closing fence after the program (an opening one would leave it nothing to run)
    assert verify.strip_code_fence(f"{program}```\nSo the answer is 3.") == program
    assert verify.strip_code_fence(f"{program}```") == program
    assert verify.strip_code_fence(program) == program


def test_program_too_long(box):
    error = run_hostile(box, "answer = 1\n" * 10_000)
    assert "longer" in error


def test_changing_a_shared_class_does_not_leak(tmp_path):
    with PotSandbox(workers=1) as one:
        poison = (
            "from fractions import Fraction\nFraction.limit_denominator = lambda *a: 0\nanswer = 1"
        )
        assert one.run(poison) == (1.0, None)
        check = "from fractions import Fraction\nanswer = Fraction(1, 3).limit_denominator(10)"
        assert one.run(check).value == pytest.approx(1 / 3)
        assert one.started == 2  # the poisoned worker retired itself


def test_decimal_context_does_not_leak():
    third = "from decimal import Decimal\nanswer = Decimal(1) / Decimal(3)"
    with PotSandbox(workers=1) as one:
        for poison in (
            "import decimal\ndecimal.getcontext().prec = 2\nanswer = 1",
            "import decimal\ndecimal.DefaultContext.prec = 2\nanswer = 1",  # Context() copies it
            "import decimal\ndecimal.ExtendedContext.prec = 2\nanswer = 1",
        ):
            assert one.run(poison) == (1.0, None)
            assert one.run(third).value == pytest.approx(1 / 3, rel=1e-12)
            both = one.run_batch([poison, "import decimal\nanswer = decimal.Context().prec"])
            assert both[1].value == 28
        assert one.started == 1  # nothing shared changed: the same worker throughout


def test_no_attribute_access_by_a_runtime_name(box):
    # functools.update_wrapper reads any attribute named by a string (statistics.mean's globals,
    # then os and sys), and type(name, bases, dict) builds a class with any dunder method.
    wrapper = (
        "import functools, statistics\nu = '_' * 2\n"
        "functools.update_wrapper(lambda: 0, statistics.mean, assigned=(u + 'globals' + u,))\n"
    )
    assert "AttributeError" in run_hostile(box, wrapper + "answer = 1")
    assert "cannot import name 'wraps'" in run_hostile(
        box, "from functools import wraps\nanswer = 1"
    )
    maker = "u = '_' * 2\nW = type('W', (), {u + 'setattr' + u: lambda s, k, v: 0})\nanswer = 1"
    assert "type() takes exactly one argument" in run_hostile(box, maker)
    assert box.run("answer = 1 if type(3) is int else 0") == (1.0, None)


def test_changing_a_shared_module_retires_the_worker():
    # without the restricted builtins a program imports the real module, not a copy of it
    config = SandboxConfig(restricted_builtins=False)
    with PotSandbox(workers=1, config=config) as one:
        poison = "import statistics\nstatistics.fmean = lambda xs: 999\nanswer = 1"
        check = "import statistics\nanswer = statistics.fmean([1, 2, 3])"
        assert [r.value for r in one.run_batch([poison, check])] == [1.0, 2.0]
        assert one.started == 2


def test_ast_check_rejects_before_running():
    import ast

    for code in (
        "x = ().__class__",
        "x = y._private",
        "def __del__(self): pass",
        "import os",
        "from math import _private",
        "from . import x",
        "f = g.f_back",
        "s = 'a__b'",
        "print(__builtins__)",
    ):
        assert verify._ast_problem(ast.parse(code)) is not None, code
    for code in ("x = math.sqrt(2)", "if __name__ == '__main__':\n    pass", "_ = 3"):
        assert verify._ast_problem(ast.parse(code)) is None, code


# -----------------------------------------------------------------------------
# each layer on its own

# privileges and resource limits only: the layers the kernel enforces
KERNEL_ONLY = SandboxConfig(ast_check=False, restricted_builtins=False, audit_hook=False)
# the audit hook only (no privilege drop, no limits, full builtins, no AST check)
HOOK_ONLY = SandboxConfig(
    ast_check=False, restricted_builtins=False, drop_privileges=False, rlimits=False
)


@pytest.fixture(scope="module")
def kernel_box():
    with PotSandbox(workers=1, config=KERNEL_ONLY) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def hook_box():
    with PotSandbox(workers=1, config=HOOK_ONLY) as sandbox:
        yield sandbox


@pytest.mark.skipif(not IS_ROOT, reason="the privilege drop happens only when started as root")
def test_layer_privileges_worker_is_not_root(kernel_box):
    assert kernel_box.run("import os\nanswer = os.getuid()") == (65534.0, None)
    assert kernel_box.run("import os\nanswer = os.getgid()") == (65534.0, None)


@pytest.mark.skipif(not IS_ROOT, reason="the privilege drop happens only when started as root")
def test_layer_privileges_block_writes_to_root_files(shared_dir):
    # open files are allowed here, so only the uid stands between the program and the file
    config = SandboxConfig(
        ast_check=False, restricted_builtins=False, audit_hook=False, max_open_files=64
    )
    shared_dir.chmod(0o755)  # root's directory: anyone may look, only root may write
    target = shared_dir / "root_only.txt"
    with PotSandbox(workers=1, config=config) as one:
        error = run_hostile(one, f"open({str(target)!r}, 'w').write('x')\nanswer = 1")
    assert "PermissionError" in error
    assert not target.exists()


def test_layer_rlimit_file_size(shared_dir):
    config = SandboxConfig(
        ast_check=False, restricted_builtins=False, audit_hook=False, max_open_files=64
    )
    shared_dir.chmod(0o777)  # the worker may create a file here; it may not put anything in it
    target = shared_dir / "big.txt"
    code = f"f = open({str(target)!r}, 'w')\nf.write('x' * 100)\nf.close()\nanswer = 1"
    with PotSandbox(workers=1, config=config) as one:
        error = run_hostile(one, code)
    assert "File too large" in error
    assert not target.exists() or target.stat().st_size == 0


def test_layer_rlimit_no_new_files(kernel_box, shared_dir):
    shared_dir.chmod(0o777)
    target = shared_dir / "new.txt"
    error = run_hostile(kernel_box, f"open({str(target)!r}, 'w')\nanswer = 1")
    assert "Too many open files" in error
    assert not target.exists()


def test_layer_rlimit_no_new_processes(kernel_box):
    code = "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nanswer = pid"
    assert "BlockingIOError" in run_hostile(kernel_box, code)


def test_layer_rlimit_memory(kernel_box):
    assert "MemoryError" in run_hostile(kernel_box, "x = bytearray(2 * 1024 ** 3)\nanswer = 1")


def test_layer_rlimit_cpu():
    config = SandboxConfig(ast_check=False, restricted_builtins=False, audit_hook=False, cpu_s=1)
    with PotSandbox(workers=1, config=config) as one:
        start = time.monotonic()
        value, error = one.run("while True:\n    pass", timeout_s=30)  # not the wall clock
        # about 2 s of CPU; the bound is loose because the wall clock runs slower on a busy machine
        assert time.monotonic() - start < 20
    assert value is None and error == "worker died (SIGXCPU)"


def test_layer_wall_clock_replaces_a_hung_worker(kernel_box):
    before = kernel_box.started
    code = "import time\ntime.sleep(60)"  # uses no CPU: only the wall clock catches it
    assert "timeout" in run_hostile(kernel_box, code)
    assert kernel_box.started == before + 1


def test_layer_a_dead_worker_is_replaced(kernel_box):
    codes = ["answer = 1", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "answer = 3"]
    results = kernel_box.run_batch(codes)
    assert results[0] == (1.0, None) and results[2] == (3.0, None)
    assert results[1] == (None, "worker died (SIGKILL)")


def test_layer_forged_results_are_refused(kernel_box):
    fake = '{"id": 1, "value": 99.0, "error": null, "stdout": "", "retire": false}\\n'
    code = f"import os\nos.write(1, b'{fake}')\nanswer = 2"
    value, error = kernel_box.run(code)
    assert value is None and error == "worker sent an invalid result"
    assert kernel_box.run("answer = 5") == (5.0, None)


@pytest.mark.parametrize(
    "forged",
    [
        "'[' * 100_000",  # JSON nested too deep to parse
        # the right id, read off the worker's stack, with a value no float can hold
        "json.dumps({'id': f.f_locals['job']['id'], 'value': 10 ** 400, 'error': None})",
    ],
)
def test_layer_forged_lines_do_not_break_the_parent(kernel_box, forged):
    code = (
        "import json, os, sys\nf = sys._getframe()\nwhile 'job' not in f.f_locals:\n"
        f"    f = f.f_back\nos.write(1, ({forged} + '\\n').encode())\nanswer = 2"
    )
    value, error = kernel_box.run(code)
    assert value is None and error == "worker sent an invalid result"
    assert kernel_box.run("answer = 5") == (5.0, None)


def test_layer_hook_refuses_file_open(hook_box, tmp_path):
    target = tmp_path / "written.txt"
    error = run_hostile(hook_box, f"open({str(target)!r}, 'w').write('x')\nanswer = 1")
    assert "open is not allowed" in error
    assert not target.exists()


def test_layer_hook_refuses_os_system(hook_box, tmp_path):
    marker = tmp_path / "marker"
    error = run_hostile(hook_box, f"import os\nos.system('touch {marker}')\nanswer = 1")
    assert "os.system is not allowed" in error
    assert not marker.exists()


def test_layer_hook_refuses_fork(hook_box):
    assert "os.fork is not allowed" in run_hostile(hook_box, "import os\nanswer = os.fork()")


def test_layer_hook_refuses_new_imports(hook_box):
    for module in ("subprocess", "ctypes", "shutil", "pickle"):
        error = run_hostile(hook_box, f"import {module}\nanswer = 1")
        assert "import is not allowed" in error, module


def test_layer_hook_refuses_network(hook_box, listener):
    sock, port = listener
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\nanswer = 1"
    assert "import is not allowed" in run_hostile(hook_box, code)
    assert_no_connection(sock)


def test_layer_hook_refuses_frame_access(hook_box):
    assert "sys._getframe" in run_hostile(hook_box, "import sys\nanswer = sys._getframe()")
    code = "def g():\n    yield 1\nx = g()\nanswer = x.gi_frame"
    assert "object.__getattr__" in run_hostile(hook_box, code)


def test_layer_hook_allows_only_its_own_cpu_limit(hook_box):
    # a tuple subclass equal to everything must not pass for the worker's own limits
    code = (
        "import resource\n"
        "class Limits(tuple):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "resource.setrlimit(resource.RLIMIT_CPU, Limits(resource.getrlimit(resource.RLIMIT_CPU)))\n"
        "answer = 1"
    )
    assert "resource.setrlimit is not allowed" in run_hostile(hook_box, code)
    # ...and nor must a tuple of int subclasses equal to everything (raising the CPU limit)
    code = (
        "import resource\n"
        "class Equal(int):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (Equal(10 ** 6), Equal(10 ** 6)))\n"
        "answer = 1"
    )
    assert "resource.setrlimit is not allowed" in run_hostile(hook_box, code)


def test_layer_hook_refuses_subprocess_via_loaded_posix(hook_box, tmp_path):
    marker = tmp_path / "marker"
    code = f"import posix\nposix.execv('/usr/bin/touch', ['touch', '{marker}'])"
    assert "os.exec is not allowed" in run_hostile(hook_box, code)
    assert not marker.exists()


def test_layer_restricted_builtins_alone(tmp_path):
    config = SandboxConfig(ast_check=False, audit_hook=False, drop_privileges=False, rlimits=False)
    target = tmp_path / "written.txt"
    with PotSandbox(workers=1, config=config) as one:
        assert "NameError" in run_hostile(one, f"open({str(target)!r}, 'w')")
        assert "ImportError" in run_hostile(one, "import os")
        assert "ImportError" in run_hostile(one, "__import__('os')")
    assert not target.exists()


def test_close_reaps_the_workers():
    one = PotSandbox(workers=2)
    one.run_batch(["answer = 1", "answer = 2"])
    procs = [w.proc for w in one.workers]
    one.close()
    assert all(p.returncode is not None for p in procs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        verify.run_pot("answer = 1", timeout_s=0)
    with pytest.raises(ValueError, match="codes"):
        verify.run_pot_batch([b"answer = 1"])
    with pytest.raises(ValueError, match="workers"):
        PotSandbox(workers=-1)


def test_results_are_plain_values(box):
    result = box.run("answer = 2")
    assert type(result.value) is float and result.error is None and result.stdout == ""
