"""
Answer checking for SIKeD, and a sandbox for the program-of-thought (PoT) programs a model writes:
the filter every iteration's data goes through (about 70,000 PoT programs per iteration).

    from verify import extract_answer, is_correct, run_pot_batch
    extract_answer("... so 6 apples.\\nFinal Answer: 6", "cot")  # 6.0
    run_pot_batch(["answer = 48 / 2 + 48", "while True: pass"])
    # [(72.0, None), (None, 'timeout after 2s')]

Answers (CoT, L2M): the number after the last `Final Answer:` (after the last `=` of its line, if
any), else `####`, else "the answer is", likewise, else the last number (`1,234`, `$1,234.50`,
`-3`, `3/4`, `12%` is 12 as in GSM8K, `.75`). PoT: the program's `answer` variable, else what
`solution()` returns, as a float; bool, nan, str etc. are errors. Results are `PotResult` pairs
`(value, error)`, one of them None, with the `.stdout`.

The sandbox: persistent worker processes (`python -I -S verify.py --worker`, scrubbed environment,
own session) get source text and answer with JSON lines; the parent never unpickles, parses or runs
model code. Layers, each tested alone in tests/test_verify.py, none enough alone:
1. AST check: no `__` names, `_` attributes, frame attributes, `__` strings or other imports.
2. Restricted builtins; `__import__` hands out copies of the allowlisted modules' public names.
3. Audit hook (PEP 578): only compiling and running the program and setting its CPU limit.
4. A worker started as root drops to uid/gid 65534 (nobody) with no supplementary groups.
5. setrlimit after the drop: CPU per program, memory, file size 0, no new fds, processes or cores.
6. The parent replaces a worker that misses its deadline or dies; a worker retires if a program
   changed a class or module of the allowlist; decimal context and recursion limit are reset.
   No gadget reads an attribute by a runtime name (functools.wraps/update_wrapper are not given,
   type() takes one argument), which would get past the AST check.
Not covered: kernel-level isolation (seccomp, namespaces); workers share uid 65534; programs may
use CPU and memory up to the limits. Run untrusted code at scale in a container as well.

Sources: nanochat/execution.py (Karpathy, after OpenAI human-eval) for the sandbox's shape; PEP 578.
Departures from [R]: [R] `exec`s PoT in-process after a prefix that imports sympy and math and
defines `lcm` and `solve_it`, with a 10 s timeout, and compares floats with `==`; here separate
processes, `math` and `lcm` predefined but no sympy (SPEC 1.1), a 2 s default timeout (a
GSM8K program takes about 1 ms) and a relative tolerance of 1e-4 for a fractional gold answer
(a whole one takes only rounding noise, 1e-6; `rel_tol=0` is [R]'s exact `==`, SPEC 3).
"""

import ast
import atexit
import decimal
import io
import json
import math
import os
import re
import select
import signal
import string
import sys
import textwrap
import time
from collections import deque
from dataclasses import asdict, dataclass
from fractions import Fraction

ALLOWED_MODULES = tuple("math fractions decimal datetime itertools functools statistics".split())
STRATEGY_NAMES = ("cot", "l2m", "pot")
NOBODY = 65534  # uid and gid of `nobody` on most Linux distributions


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and layers of the PoT sandbox. Turning a layer off is for tests only."""

    memory_mb: int = 512  # RLIMIT_AS of a worker; an idle worker uses about 20 MB
    max_output: int = 2000  # characters of print output kept per program
    max_error: int = 300  # characters of an error message kept
    max_code_chars: int = 50_000  # longer programs are refused without running
    cpu_s: float | None = None  # CPU seconds per program; default ceil(timeout_s) + 1
    cpu_budget_s: int = 600  # a worker's lifetime CPU (hard RLIMIT_CPU); it retires before that
    max_jobs: int = 20_000  # programs a worker runs before it retires
    max_open_files: int = 0  # RLIMIT_NOFILE: 0 = no new file descriptors at all
    ast_check: bool = True
    restricted_builtins: bool = True
    audit_hook: bool = True
    drop_privileges: bool = True
    rlimits: bool = True


# -----------------------------------------------------------------------------
# answers

_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUMBER_RE = re.compile(
    rf"""
    (?<![\w.])                          # not in the middle of a word or a number
    (?P<sign>[-−])?(?:\$\s?)?(?P<sign2>[-−])?  # -3, -$3, $-3, $ 3, −3 (U+2212); `- 3` subtracts
    (?P<num>{_INT}(?:\.\d+)?|\.\d+)     # 1,234.50  12  .75
    (?:\s*/\s*(?P<den>{_INT}(?:\.\d+)?)(?![\d/]))?  # 3/4 (not a date like 1/2/2020)
    """,
    re.X,
)
# a marker ends in a colon or is followed by a number: "the final answer we need is..." is prose
_NUMBER_NEXT = r"(?=\s*[-−$\d.])"
_MARKERS = (
    re.compile(rf"final answer\**\s*(?::|：|is\s*[:：]?{_NUMBER_NEXT})", re.I),  # ** : Markdown
    re.compile(r"####"),
    re.compile(rf"the answer is\s*(?:[:：]|{_NUMBER_NEXT})", re.I),
)
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*(?:\n|\Z)(.*?)(?:```|\Z)", re.S | re.I)


def _numbers(text: str):
    """The numbers in `text`, in order (a fraction over 0 is skipped)."""
    for m in _NUMBER_RE.finditer(text):
        den = float(m["den"].replace(",", "")) if m["den"] else 1.0
        if den:
            value = float(m["num"].replace(",", "")) / den
            yield -value if m["sign"] or m["sign2"] else value


def strip_code_fence(text: str) -> str:
    """The code inside the first ```python fence of a PoT text, or the text as it is, dedented; a
    lone closing fence after a program ends it."""
    m = _FENCE_RE.search(text)
    if m and text.count("```") == 1 and _parses(text[: m.start()]):
        code = text[: m.start()]  # "x = 3\nanswer = x\n```\nSo...": the fence closes, not opens
    else:
        code = m.group(1) if m else text
    code = textwrap.dedent(code.lstrip("\n"))
    # a student's program often starts on its tag's line after a space: " x = 1\ny = 2"
    return code.lstrip(" \t")


def _parses(code: str) -> bool:
    try:
        ast.parse(textwrap.dedent(code.lstrip("\n")))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return bool(code.strip())


def extract_answer(text: str, strategy: str | None) -> float | None:
    """The final number of a solution body (strategy None reads like CoT); for "pot" the value of
    the program, run in the sandbox."""
    if strategy is not None and strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {STRATEGY_NAMES} or None, got {strategy!r}")
    if strategy == "pot":
        return run_pot(strip_code_fence(text))[0]
    for marker in _MARKERS:
        found = list(marker.finditer(text))
        if not found:
            continue
        tail = text[found[-1].end() :]
        line = tail.split("\n", 1)[0]
        # "Final Answer: 40/100*12000 = 4800": the result, not the expression's first number
        after_eq = next(_numbers(line.rsplit("=", 1)[1]), None) if "=" in line else None
        value = after_eq if after_eq is not None else next(_numbers(tail), None)
        if value is not None:
            return value
    values = list(_numbers(text))
    return values[-1] if values else None


def extract_answers(texts, strategies, workers=None, timeout_s=2.0) -> list[float | None]:
    """extract_answer for many texts; the PoT ones run as one sandbox batch."""
    texts, strategies = list(texts), list(strategies)
    if len(texts) != len(strategies):
        raise ValueError(f"texts and strategies differ in length: {len(texts)}, {len(strategies)}")
    pairs = list(zip(texts, strategies, strict=True))
    codes = [strip_code_fence(t) for t, s in pairs if s == "pot"]
    values = iter(run_pot_batch(codes, timeout_s=timeout_s, workers=workers))
    return [next(values).value if s == "pot" else extract_answer(t, s) for t, s in pairs]


def is_correct(pred: float | None, gold: float, rel_tol: float = 1e-4) -> bool:
    """pred matches gold: rel_tol=0 is exact float equality, as the paper ([R], SPEC 3); else within
    rel_tol of a fractional gold (1/3 ~ 0.3333), and within rounding noise of a whole one."""
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    if pred is None:
        return False
    pred, gold = float(pred), float(gold)
    if rel_tol and gold.is_integer():  # relative slack would pass 10,001 for 10,000
        return math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-6)
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=1e-9 if rel_tol else 0)


def has_subquestions(text: str) -> bool:
    """The L2M filter of SPEC 1.4.2: "subquestion" in the lowercased text without punctuation."""
    return "subquestion" in text.lower().translate(str.maketrans("", "", string.punctuation))


# -----------------------------------------------------------------------------
# the worker (runs only in the worker process: `python -I -S verify.py --worker`)

_BLOCKED_ATTRS = frozenset(
    "gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await cr_origin ag_frame ag_code ag_await "
    "tb_frame tb_next tb_lasti f_back f_globals f_locals f_builtins f_code f_trace mro".split()
)
_SAFE_BUILTINS = (
    "abs all any bin bool callable chr complex dict divmod enumerate filter float format frozenset "
    "hash hex int isinstance issubclass iter len list map max min next object oct ord pow print "
    "property range repr reversed round set slice sorted staticmethod classmethod str sum super "
    "tuple type zip __build_class__ "
    "ArithmeticError AssertionError AttributeError BaseException Exception GeneratorExit "
    "IndexError KeyError KeyboardInterrupt LookupError NameError NotImplementedError "
    "OverflowError RecursionError RuntimeError StopIteration SystemExit TypeError ValueError "
    "ZeroDivisionError"
).split()
# C code of `datetime` imports these through the program's __import__ (strptime, strftime,
# timetuple): it gets just the functions it calls. The AST check keeps programs from asking.
_INTERNAL = {
    "_strptime": ("_strptime_datetime", "_strptime_time"),
    "time": ("strftime", "struct_time", "localtime", "gmtime", "mktime", "time"),
}


def _ast_problem(tree) -> str | None:
    """Why the program is refused before it runs, or None. Fast and conservative."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_") or node.attr in _BLOCKED_ATTRS:
                return f"attribute .{node.attr} is not allowed"
        elif isinstance(node, ast.Name) and node.id.startswith("__"):
            if node.id != "__name__" or not isinstance(node.ctx, ast.Load):
                return f"name {node.id} is not allowed"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("__") and node.name != "__init__":
                return f"definition of {node.name} is not allowed"
        elif isinstance(node, (ast.arg, ast.keyword)) and (node.arg or "").startswith("__"):
            return f"argument {node.arg} is not allowed"  # (keyword.arg is None for **kwargs)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "__" in node.value and node.value != "__main__":  # if __name__ == "__main__":
                return "strings containing '__' are not allowed"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in ALLOWED_MODULES:
                    return f"import of {alias.name} is not allowed"
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module not in ALLOWED_MODULES:
                return f"import from {'.' * node.level}{node.module} is not allowed"
            for alias in node.names:
                if alias.name.startswith("_"):
                    return f"import of {node.module}.{alias.name} is not allowed"
    return None


def _to_float(value) -> tuple[float | None, str | None]:
    """A program's value as a finite float, or an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction, decimal.Decimal)):
        return None, f"answer is a {type(value).__name__}, not a number"
    try:
        value = float(value)
    except (OverflowError, ValueError) as e:
        return None, f"answer does not fit a float: {type(e).__name__}"
    if not math.isfinite(value):
        return None, f"answer is {value}"
    return value, None


class _Capped(io.StringIO):
    """A text stream that keeps the first `limit` characters written to it."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def write(self, s):
        super().write(s[: max(self.limit - self.tell(), 0)])
        return len(s)


def _worker_main(cfg: SandboxConfig) -> None:
    import builtins
    import gc
    import resource
    import types
    import warnings

    # Once the audit hook is armed, importing a module not yet loaded is refused: preload the
    # allowlist and what it imports lazily (datetime.strptime: _strptime; statistics.mode: heapq;
    # functools.singledispatch: weakref).
    for name in (*ALLOWED_MODULES, "_strptime", "heapq", "weakref"):
        __import__(name)

    warnings.simplefilter("ignore")  # showing a warning would open the source file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write over RLIMIT_FSIZE fails (EFBIG)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.umask(0o077)  # (the parent starts it in cwd "/")
    requests = os.fdopen(0, "rb")  # results go out on fd 1
    sys.stdin = io.StringIO()
    sys.stdout = sys.stderr = _Capped(0)

    if cfg.drop_privileges and os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        assert os.getuid() == NOBODY and os.geteuid() == NOBODY
    cpu_hard = cfg.cpu_budget_s
    if cfg.rlimits:  # after the drop: an unprivileged process cannot raise them back
        mem, n_files = cfg.memory_mb * 2**20, cfg.max_open_files  # 0 files: the pipes still work
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n_files, n_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # root would ignore it
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))

    # What `import math` gives a program: the module's public names, no submodules.
    public = {}
    for name in ALLOWED_MODULES:
        items = vars(sys.modules[name]).items()
        public[name] = {
            k: v for k, v in items if not k.startswith("_") and not isinstance(v, types.ModuleType)
        }
    for name, names in _INTERNAL.items():
        public[name] = {k: getattr(sys.modules[name], k) for k in names}
    # update_wrapper (and wraps) copy an attribute named by a runtime string: getattr by another
    # name, past the AST check (e.g. a function's globals, and through them os and sys)
    for k in ("update_wrapper", "wraps"):
        del public["functools"][k]
    # Classes and modules a program could change for the programs after it (C types cannot be
    # changed): a live view of each namespace, and a copy to compare it with.
    shared_classes = {v for d in public.values() for v in d.values() if isinstance(v, type)}
    namespaces = [vars(c) for c in shared_classes] + [vars(sys.modules[m]) for m in public]
    snapshot = [(ns, dict(ns)) for ns in namespaces]
    decimal_context = decimal.Context()  # the default, before any program could change it
    safe_builtins = {k: getattr(builtins, k) for k in _SAFE_BUILTINS}

    def type_of(*args):  # type(name, bases, dict) would build a class with any dunder method
        if len(args) != 1:
            raise TypeError("type() takes exactly one argument in the sandbox")
        return type(args[0])

    safe_builtins["type"] = type_of

    def fresh_builtins():
        if not cfg.restricted_builtins:
            return builtins.__dict__
        modules = {}  # this program's copies: what it changes in them dies with it

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level != 0 or name not in public:
                raise ImportError(f"import of {name} is not allowed")
            if name not in modules:
                modules[name] = types.ModuleType(name)
                vars(modules[name]).update(public[name])
                if name == "decimal":  # shared objects: Context() copies DefaultContext
                    for k in ("DefaultContext", "BasicContext", "ExtendedContext"):
                        setattr(modules[name], k, getattr(decimal, k).copy())
            return modules[name]

        return dict(safe_builtins, __import__=guarded_import)

    def classes_changed():  # by identity: a program's __eq__ must not run here
        return any(
            len(now) != len(before) or any(now.get(k, now) is not v for k, v in before.items())
            for now, before in snapshot
        )

    def cpu_used():
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime

    cpu_soft = [cpu_hard]

    def audit(event, args):
        # An allowlist: the worker's own parse/compile/exec of "<pot>" and its own CPU limit.
        if event == "compile" and args[1] == "<pot>":
            return
        if event == "exec" and getattr(args[0], "co_filename", None) == "<pot>":
            return
        # exactly a tuple of ints: a program's subclasses could make their own == say yes
        limits = args[1] if event == "resource.setrlimit" else None
        exact = type(limits) is tuple and all(type(x) is int for x in limits)
        if exact and limits == (cpu_soft[0], cpu_hard) and args[0] == resource.RLIMIT_CPU:
            return
        raise RuntimeError(f"sandbox: {event} is not allowed")

    def run(code, timeout_s):
        try:  # compile(code) costs what compile(tree) does, and its audit event names "<pot>"
            problem = _ast_problem(ast.parse(code, "<pot>")) if cfg.ast_check else None
            if problem is not None:
                return None, f"rejected: {problem}", ""
            compiled = compile(code, "<pot>", "exec")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            return None, f"{type(e).__name__}: {e}", ""
        if cfg.rlimits:
            cpu_s = cfg.cpu_s if cfg.cpu_s is not None else math.ceil(timeout_s) + 1
            cpu_soft[0] = min(math.ceil(cpu_used() + cpu_s), cpu_hard)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft[0], cpu_hard))
        decimal.setcontext(decimal_context.copy())
        sys.setrecursionlimit(1000)
        out = _Capped(cfg.max_output)
        program_builtins = fresh_builtins()
        # [R]'s fixed prefix (SPEC 1.1), less sympy: math imported, lcm defined
        math_ = program_builtins["__import__"]("math") if cfg.restricted_builtins else math
        namespace = dict(__builtins__=program_builtins, __name__="__main__", math=math_)
        namespace["lcm"] = math_.lcm
        value = error = None
        sys.stdout = out
        try:
            exec(compiled, namespace)
            if "answer" in namespace:
                value, error = _to_float(namespace["answer"])
            elif callable(namespace.get("solution")):
                value, error = _to_float(namespace["solution"]())
            else:
                error = "the program sets no `answer` and defines no solution()"
        except BaseException as e:  # the program's own exceptions, SystemExit included
            try:
                error = f"{type(e).__name__}: {e}"
            except BaseException:  # its __str__ raised
                error = type(e).__name__
        finally:
            sys.stdout = sys.stderr
        namespace.clear()
        gc.collect()  # finalizers of the program's objects run now, inside its time
        return value, error, out.getvalue()

    def send(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(1, data) :]

    gc.freeze()  # the preloaded modules never need collecting: keeps gc.collect() cheap
    if cfg.audit_hook:
        sys.addaudithook(audit)
    send({"ready": True})

    for n_jobs, line in enumerate(requests, 1):  # until the parent closes the pipe
        job = json.loads(line)
        value, error, stdout = run(job["code"], job["timeout_s"])
        retire = n_jobs >= cfg.max_jobs or classes_changed() or cpu_used() > cpu_hard / 2
        error = None if error is None else error[: cfg.max_error]
        send({"id": job["id"], "value": value, "error": error, "stdout": stdout, "retire": retire})
        if retire:
            return


# -----------------------------------------------------------------------------
# the parent: a pool of workers


class PotResult(tuple):
    """(value, error): unpacks as a pair; `.stdout` holds the captured print output."""

    def __new__(cls, value, error, stdout=""):
        self = super().__new__(cls, (value, error))
        self.stdout = stdout
        return self

    value = property(lambda self: self[0])
    error = property(lambda self: self[1])


class _Worker:
    def __init__(self, cfg: SandboxConfig):
        import subprocess  # parent-only imports stay out of the workers

        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"SIKED_SANDBOX_CONFIG": json.dumps(asdict(cfg))},  # scrubbed environment
            cwd="/",
            start_new_session=True,  # no Ctrl-C from the terminal; killed by the parent
        )
        self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        os.set_blocking(self.wfd, False)  # reads wait for poll; a write takes what the pipe takes
        self.rbuf, self.wbuf, self.ready = b"", b"", False
        self.job = None  # (index, id) of the program it runs
        self.deadline = time.monotonic() + 30.0  # to start up; math.inf while idle

    def close(self) -> str:
        """Kill the worker if it still runs and close its pipes; says how it ended."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        return f"worker died ({signal.Signals(-code).name if code < 0 else f'exit code {code}'})"


class PotSandbox:
    """A pool of sandboxed PoT workers. `run_batch(codes)` -> list of PotResult, in order."""

    def __init__(self, workers: int | None = None, config: SandboxConfig | None = None):
        self.n_workers = workers or default_workers()
        if self.n_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config = config or SandboxConfig()
        self.workers: list[_Worker] = []
        self.started = 0  # workers started so far, replacements included
        self.pid = os.getpid()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.workers:
            w.close()
        self.workers = []

    def _start(self):
        self.workers.append(_Worker(self.config))
        self.started += 1

    def _replace(self, w, results=None, error=None):
        """Kill worker w and start another; its program gets `error`, else how w ended."""
        ended = w.close()
        if w.job is not None:
            results[w.job[0]] = PotResult(None, error or ended)
        self.workers.remove(w)
        self._start()

    def run(self, code: str, timeout_s: float = 2.0) -> PotResult:
        return self.run_batch([code], timeout_s=timeout_s)[0]

    def run_batch(self, codes, timeout_s: float = 2.0) -> list[PotResult]:
        codes = list(codes)
        if not all(isinstance(c, str) for c in codes):
            raise ValueError("codes must be a list of str")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if os.getpid() != self.pid:
            raise RuntimeError("a PotSandbox cannot be used from a forked child; make a new one")
        limit = self.config.max_code_chars
        too_long = PotResult(None, f"program longer than {limit}")
        results = [too_long if len(c) > limit else None for c in codes]
        pending = deque(i for i, r in enumerate(results) if r is None)
        try:
            self._dispatch(codes, pending, results, timeout_s)
        except BaseException:  # e.g. KeyboardInterrupt: workers in the middle of a job are lost
            self.close()
            raise
        return results

    def _dispatch(self, codes, pending, results, timeout_s):
        failed_starts = 0
        while len(self.workers) < min(self.n_workers, max(len(pending), 1)):
            self._start()
        while pending or any(w.job is not None for w in self.workers):
            poll = select.poll()
            for w in self.workers:
                if w.ready and w.job is None and pending:
                    i = pending.popleft()
                    job_id = int.from_bytes(os.urandom(6), "little")  # a result must echo it
                    w.job, w.deadline = (i, job_id), time.monotonic() + timeout_s
                    req = {"id": job_id, "code": codes[i], "timeout_s": timeout_s}
                    w.wbuf = (json.dumps(req) + "\n").encode()
                if w.wbuf:  # as much as the pipe takes: a worker that stops reading can't block us
                    try:
                        w.wbuf = w.wbuf[os.write(w.wfd, w.wbuf) :]
                    except (BlockingIOError, BrokenPipeError):  # full, or dead (see its read end)
                        pass
                poll.register(w.rfd, select.POLLIN)
                if w.wbuf:
                    poll.register(w.wfd, select.POLLOUT)
            by_fd = {fd: w for w in self.workers for fd in (w.rfd, w.wfd)}
            wait = min(w.deadline for w in self.workers) - time.monotonic()
            for fd, _ in poll.poll(None if wait == math.inf else max(wait, 0.0) * 1000):
                w = by_fd[fd]
                if w not in self.workers or fd == w.wfd:  # replaced, or writable: written above
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # it died
                    if not w.ready:
                        failed_starts += 1
                        if failed_starts >= 3:
                            raise RuntimeError(f"PoT sandbox workers fail to start: {w.close()}")
                    self._replace(w, results)
                    continue
                w.rbuf += chunk
                while b"\n" in w.rbuf and w in self.workers:
                    line, w.rbuf = w.rbuf.split(b"\n", 1)
                    self._receive(w, line, results)
                if len(w.rbuf) > 1 << 20 and w in self.workers:  # no newline in 1 MiB: garbage
                    self._replace(w, results, "worker sent garbage")
            now = time.monotonic()
            for w in [w for w in self.workers if w.deadline <= now]:
                if not w.ready:
                    raise RuntimeError("PoT sandbox worker did not start within 30 s")
                self._replace(w, results, f"timeout after {timeout_s:g}s")

    def _receive(self, w, line, results):
        """Handle one JSON line from a worker."""
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested too deep
            msg = None
        if not isinstance(msg, dict):
            msg = {}
        if not w.ready and msg.get("ready") is True:
            w.ready, w.deadline = True, math.inf
            return
        if w.job is None:  # garbage before it was ready, or it spoke out of turn
            return self._replace(w)
        value, error, stdout = msg.get("value"), msg.get("error"), msg.get("stdout", "")
        finite = type(value) is float and math.isfinite(value)  # JSON reads 10**400 as an int
        ok = isinstance(error, str) if value is None else finite and error is None
        if not ok or msg.get("id") != w.job[1] or not isinstance(stdout, str):
            return self._replace(w, results, "worker sent an invalid result")
        results[w.job[0]] = PotResult(value, error, stdout)
        w.job, w.deadline = None, math.inf
        if msg.get("retire") is True:
            self._replace(w)


def default_workers() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_SANDBOXES: dict[int, PotSandbox] = {}  # the shared sandboxes, by number of workers


def _sandbox(workers: int | None) -> PotSandbox:
    n = workers or default_workers()
    if n not in _SANDBOXES or _SANDBOXES[n].pid != os.getpid():  # a fork's belong to its parent
        _SANDBOXES[n] = PotSandbox(n)
    return _SANDBOXES[n]


def run_pot(code: str, timeout_s: float = 2.0) -> PotResult:
    """Run one PoT program in the shared sandbox: (value, error)."""
    return _sandbox(None).run(code, timeout_s=timeout_s)


def run_pot_batch(codes, timeout_s: float = 2.0, workers: int | None = None) -> list[PotResult]:
    """Run PoT programs in the shared sandbox (`workers` processes); results in order."""
    return _sandbox(workers).run_batch(codes, timeout_s=timeout_s)


@atexit.register
def close_sandboxes():
    for box in _SANDBOXES.values():
        if box.pid == os.getpid():
            box.close()


if __name__ == "__main__":  # the worker's entry point (no argparse: it loads few modules)
    # PotSandbox starts it with SIKED_SANDBOX_CONFIG set; by hand, without it: one line
    if sys.argv[1:] != ["--worker"] or "SIKED_SANDBOX_CONFIG" not in os.environ:
        sys.exit("verify.py is a library; `--worker` is the PoT sandbox's internal entry point")
    _worker_main(SandboxConfig(**json.loads(os.environ["SIKED_SANDBOX_CONFIG"])))
