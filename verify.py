"""
Answer checking for SIKeD, and a sandbox for the program-of-thought (PoT) programs a model writes.

SIKeD keeps a solution only if its answer is right, so this file is the filter every iteration's
data goes through: `extract_answer` reads the number a solution ends on, `is_correct` compares it
with the gold number, and `run_pot_batch` runs PoT programs (about 70,000 per iteration).

    from verify import extract_answer, is_correct, run_pot_batch
    extract_answer("... so 6 apples.\\nFinal Answer: 6", "cot")  # 6.0
    run_pot_batch(["answer = 48 / 2 + 48", "while True: pass"])
    # [(72.0, None), (None, 'timeout after 2s')]

Answers (CoT and L2M): the number after the last `Final Answer:`, else after `####`, else after
"the answer is", else the last number in the text. Number forms: `1,234`, `$1,234.50`, `-3`, `3/4`,
`12%` (read as 12: GSM8K writes percent answers as the bare number), `.75`, `12.00 dollars`.
`is_correct` uses a relative tolerance of 1e-4 by default (plus 1e-9 absolute, for float noise
around 0); `rel_tol=0` is the paper's exact float equality (SPEC 3).

PoT programs. A program's value is its variable `answer` after it ran, else what `solution()`
returns if it defines that function. The value must be a number: int, float, Fraction or Decimal
become a float; bool is refused (`answer = x > 3` is a mistake, not the number 1), and so are
nan, inf, an int too large for a float, strings and everything else. `print` works; its output is
captured and capped. Results come back in order as `(value, error)` pairs (`PotResult`, which also
carries `.stdout`); exactly one of the two is None.

The sandbox. Programs run in a pool of persistent worker processes (`python -I -S verify.py
--worker`, a scrubbed environment, its own session); the parent only sends source text and reads
back JSON lines of plain values (it never unpickles anything and never parses or runs model code).
The layers, in the order a program meets them; each one is tested on its own in
tests/test_verify.py, none is enough alone:
1. AST check (a fast first reject): no name, definition or argument that starts with `__` (except
   reading `__name__` and defining `__init__`), no attribute that starts with `_`, no
   frame/code/traceback attributes (`gi_frame`, `f_back`, `tb_frame`, ...), no string constant
   containing `__` other than "__main__" (format-string attribute walks), imports only of the
   allowlisted modules, never relative and never a `_name` from them.
2. Restricted builtins: arithmetic, containers, iteration, `print`, the usual exception classes
   and a guarded `__import__`. No `open`, `eval`, `exec`, `compile`, `getattr`, `setattr`,
   `globals`, `vars`, `input`, `breakpoint`, `exit`. The guarded `__import__` allows only `math`,
   `fractions`, `decimal`, `datetime`, `itertools`, `functools`, `statistics`, and hands out a
   fresh copy of each module's public names without its submodules (so `fractions.sys` does not
   exist). sympy is not available (the paper's PoT prefix imported it; [R] in SPEC 1.1).
3. Audit hook (`sys.addaudithook`, installed after the worker's own imports): once armed it allows
   only the audit events the worker itself needs (compiling and running the program, setting its
   own CPU limit); everything else is refused, which covers file opens, sockets, subprocesses,
   `os.system`, fork/exec/spawn, signals to other processes, ctypes, `sys._getframe` and
   generator/traceback frame access, new code or function objects, and every import of a module
   not already loaded (the allowlisted modules are preloaded; nothing else is).
4. Privileges: a worker started as root drops to uid/gid 65534 (nobody) with no supplementary
   groups, so the kernel refuses writes to root's files even if every layer above were bypassed.
5. Resource limits (setrlimit, after the drop; an unprivileged process cannot raise them back):
   CPU seconds per program (SIGXCPU kills the worker), address space (`memory_mb`), file size 0,
   no new file descriptors, no new processes, no core files.
6. Wall-clock kill: the parent kills a worker that has not answered within `timeout_s`, starts a
   replacement and the batch carries on; a worker that dies is replaced the same way. A worker
   also retires itself if a program changed a class of an allowlisted module (state that would
   leak into the next program), and the decimal context and recursion limit are reset each time.

Not covered: this is not a kernel-level sandbox (no seccomp, namespaces or containers). Workers
share uid 65534 with each other. A program can still use its CPU and memory up to the limits,
and read public attributes of the allowlisted modules' objects. Run untrusted code at scale in a
container as well.

Sources: nanochat/execution.py (Karpathy; adapted from OpenAI human-eval) for the shape of the
sandbox and its result; PEP 578 for audit hooks. Departures from the authors' code [R]: [R] runs
PoT with an in-process `exec` after a prefix importing sympy, with a 10 s timeout, and compares
floats with `==`; here: separate processes, no sympy, a 2 s default timeout (a GSM8K program
takes about a millisecond; one still running after 2 s is looping), and a stated tolerance.
"""

import atexit
import json
import math
import os
import re
import selectors
import signal
import string
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from fractions import Fraction

ALLOWED_MODULES = (
    "math",
    "fractions",
    "decimal",
    "datetime",
    "itertools",
    "functools",
    "statistics",
)
STRATEGY_NAMES = ("cot", "l2m", "pot")
NOBODY = 65534  # uid and gid of `nobody` on Debian/Ubuntu and most Linux distributions


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and layers of the PoT sandbox. Turning a layer off is for tests only."""

    memory_mb: int = 512  # RLIMIT_AS of a worker; an idle worker uses about 20 MB
    max_output: int = 2000  # characters of captured print output kept per program
    max_error: int = 300  # characters of an error message kept
    max_code_chars: int = 50_000  # longer programs are refused without running
    cpu_s: float | None = None  # CPU seconds per program; default ceil(timeout_s) + 1
    cpu_budget_s: int = 600  # a worker's lifetime CPU (hard RLIMIT_CPU); it retires before that
    max_jobs: int = 20_000  # programs a worker runs before it retires
    max_open_files: int = 0  # RLIMIT_NOFILE: 0 = no new file descriptors at all
    uid: int = NOBODY
    gid: int = NOBODY
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
    (?P<sign>-)?(?:\$\s?)?(?P<sign2>-)?  # -3, -$3, $-3, $ 3 (not `- 3`: that is subtraction)
    (?P<num>{_INT}(?:\.\d+)?|\.\d+)     # 1,234.50  12  .75
    (?:\s*/\s*(?P<den>{_INT}(?:\.\d+)?)(?![\d/]))?  # 3/4 (not a date like 1/2/2020)
    """,
    re.X,
)
_MARKERS = (
    re.compile(r"final answer\s*(?:is)?\s*[:：]?", re.I),
    re.compile(r"####"),
    re.compile(r"the answer is\s*[:：]?", re.I),
)
_FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def _number(m: re.Match) -> float | None:
    value = float(m.group("num").replace(",", ""))
    if m.group("den") is not None:
        den = float(m.group("den").replace(",", ""))
        if den == 0:
            return None
        value = value / den
    if m.group("sign") or m.group("sign2"):
        value = -value
    return value


def parse_number(text: str) -> float | None:
    """The first number in `text` (forms listed in the module docstring), or None."""
    for m in _NUMBER_RE.finditer(text):
        value = _number(m)
        if value is not None:
            return value
    return None


def last_number(text: str) -> float | None:
    values = [v for v in map(_number, _NUMBER_RE.finditer(text)) if v is not None]
    return values[-1] if values else None


def strip_code_fence(text: str) -> str:
    """The code inside the first ```python fence of a PoT text, or the text as it is."""
    m = _FENCE_RE.search(text)
    return m.group(1) if m else text


def extract_answer(text: str, strategy: str | None) -> float | None:
    """The final number of a solution body; for "pot" the value of the program (sandboxed).

    strategy None (an output without a known tag) is read like CoT.
    """
    if strategy is not None and strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {STRATEGY_NAMES} or None, got {strategy!r}")
    if strategy == "pot":
        return run_pot(strip_code_fence(text))[0]
    for marker in _MARKERS:
        found = list(marker.finditer(text))
        if found:
            value = parse_number(text[found[-1].end() :])
            if value is not None:
                return value
    return last_number(text)


def extract_answers(texts, strategies, workers=None, timeout_s=2.0) -> list[float | None]:
    """extract_answer for many texts; the PoT ones run as one sandbox batch."""
    texts, strategies = list(texts), list(strategies)
    if len(texts) != len(strategies):
        raise ValueError(
            f"texts and strategies differ in length: {len(texts)} != {len(strategies)}"
        )
    out = [
        None if s == "pot" else extract_answer(t, s) for t, s in zip(texts, strategies, strict=True)
    ]
    pot = [i for i, s in enumerate(strategies) if s == "pot"]
    codes = [strip_code_fence(texts[i]) for i in pot]
    results = run_pot_batch(codes, timeout_s=timeout_s, workers=workers)
    for i, (value, _) in zip(pot, results, strict=True):
        out[i] = value
    return out


def is_correct(pred: float | None, gold: float, rel_tol: float = 1e-4) -> bool:
    """pred matches gold within rel_tol (relative to the larger of the two, plus 1e-9 absolute).

    rel_tol=0 is exact float equality, as the paper ([R], SPEC 3).
    """
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    if pred is None:
        return False
    pred, gold = float(pred), float(gold)
    if rel_tol == 0:
        return pred == gold
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=1e-9)


def has_subquestions(text: str) -> bool:
    """The L2M filter of SPEC 1.4.2: "subquestion" in the lowercased text without punctuation."""
    return "subquestion" in text.lower().translate(str.maketrans("", "", string.punctuation))


# -----------------------------------------------------------------------------
# the worker (runs only in the worker process: `python -I -S verify.py --worker CONFIG`)

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


_INTERNAL_IMPORTS = {
    "_strptime": ("_strptime_datetime", "_strptime_time"),
    "time": ("strftime", "struct_time", "localtime", "gmtime", "mktime", "time"),
}


def _ast_problem(tree) -> str | None:
    """Why the program is refused before it runs, or None. Fast and conservative."""
    import ast

    def bad_name(name):
        return name is not None and name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_") or node.attr in _BLOCKED_ATTRS:
                return f"attribute .{node.attr} is not allowed"
        elif isinstance(node, ast.Name):
            if bad_name(node.id) and not (node.id == "__name__" and isinstance(node.ctx, ast.Load)):
                return f"name {node.id} is not allowed"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if bad_name(node.name) and node.name != "__init__":
                return f"definition of {node.name} is not allowed"
        elif isinstance(node, ast.arg) and bad_name(node.arg):
            return f"argument {node.arg} is not allowed"
        elif isinstance(node, ast.keyword) and bad_name(node.arg):
            return f"keyword {node.arg} is not allowed"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value:
            if node.value == "__main__":  # if __name__ == "__main__":
                continue
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
    """A program's value as a finite float, or an error (see the module docstring)."""
    from decimal import Decimal

    if isinstance(value, bool):
        return None, "answer is a bool, not a number"
    if not isinstance(value, (int, float, Fraction, Decimal)):
        return None, f"answer is a {type(value).__name__}, not a number"
    try:
        value = float(value)
    except (OverflowError, ValueError) as e:
        return None, f"answer does not fit a float: {type(e).__name__}"
    if not math.isfinite(value):
        return None, f"answer is {value}"
    return value, None


class _Capped:
    """A write-only text stream that keeps the first `limit` characters."""

    def __init__(self, limit):
        self.limit, self.parts, self.size = limit, [], 0

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str")
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(len(s), room)
        return len(s)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.parts)


def _worker_main(cfg: SandboxConfig) -> None:
    # Every module a program may use, and every module the worker itself needs, is imported now:
    # once the audit hook is armed, importing anything not yet loaded is refused.
    import _strptime  # noqa: F401 (datetime.strptime imports it lazily)
    import ast
    import builtins
    import datetime  # noqa: F401
    import decimal
    import functools  # noqa: F401
    import gc
    import heapq  # noqa: F401 (Counter.most_common, used by statistics.mode, imports it lazily)
    import io
    import itertools  # noqa: F401
    import resource
    import statistics  # noqa: F401
    import types
    import warnings
    import weakref  # noqa: F401 (functools.singledispatch imports it lazily)

    warnings.simplefilter("ignore")  # showing a warning would open the source file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write over RLIMIT_FSIZE fails (EFBIG)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir("/")
    os.umask(0o077)
    sys.stdin = io.StringIO()
    sys.stdout = sys.stderr = _Capped(0)
    in_fd, out_fd = 0, 1  # requests come on stdin, results go out on stdout (pipes to the parent)

    if cfg.drop_privileges and os.getuid() == 0:
        os.setgroups([])
        os.setgid(cfg.gid)
        os.setuid(cfg.uid)
        assert os.getuid() == cfg.uid and os.geteuid() == cfg.uid
    cpu_hard = cfg.cpu_budget_s
    if cfg.rlimits:
        mem = cfg.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        n_files = cfg.max_open_files  # 0: existing fds (the pipes) still work, no new ones
        resource.setrlimit(resource.RLIMIT_NOFILE, (n_files, n_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # after the drop: root ignores it
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))

    # What `import math` gives a program: the public names of the module, no submodules.
    public = {}
    for name in ALLOWED_MODULES:
        mod = sys.modules[name]
        public[name] = {
            k: v
            for k, v in vars(mod).items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)
        }
    # C code of `datetime` imports these through the program's __import__ (strptime, strftime,
    # timetuple): it gets just the functions it calls. The AST check keeps programs from asking.
    for name, names in _INTERNAL_IMPORTS.items():
        public[name] = {k: getattr(sys.modules[name], k) for k in names}
    # Classes a program could change for the programs after it (C types cannot be changed).
    shared_classes = {v for d in public.values() for v in d.values() if isinstance(v, type)}
    snapshot = {cls: dict(vars(cls)) for cls in shared_classes}
    safe_builtins = {k: getattr(builtins, k) for k in _SAFE_BUILTINS}

    def fresh_builtins():
        if not cfg.restricted_builtins:
            return builtins.__dict__
        modules = {}

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level != 0 or name not in public:
                raise ImportError(f"import of {name} is not allowed")
            if name not in modules:
                modules[name] = types.ModuleType(name)
                vars(modules[name]).update(public[name])
            return modules[name]

        return dict(safe_builtins, __import__=guarded_import)

    def classes_changed():
        for cls, before in snapshot.items():
            now = vars(cls)
            if len(now) != len(before) or any(
                now.get(k, snapshot) is not v for k, v in before.items()
            ):
                return True
        return False

    cpu_soft = [cpu_hard]
    compiling = [None]  # the AST the worker is compiling (compile() of an AST has no filename)

    def audit(event, args):
        # An allowlist: the worker's own parse/compile/exec of "<pot>" and its own CPU limit.
        if event == "compile":
            if args[1] == "<pot>" or (compiling[0] is not None and args[0] is compiling[0]):
                return
        elif event == "exec":
            if getattr(args[0], "co_filename", None) == "<pot>":
                return
        elif event == "resource.setrlimit":
            if args[0] == resource.RLIMIT_CPU and args[1] == (cpu_soft[0], cpu_hard):
                return
        raise RuntimeError(f"sandbox: {event} is not allowed")

    def run(code, timeout_s):
        if len(code) > cfg.max_code_chars:
            return None, f"program longer than {cfg.max_code_chars} characters", ""
        try:
            tree = ast.parse(code, "<pot>")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            return None, f"{type(e).__name__}: {e}", ""
        if cfg.ast_check:
            problem = _ast_problem(tree)
            if problem is not None:
                return None, f"rejected: {problem}", ""
        compiling[0] = tree
        try:
            compiled = compile(tree, "<pot>", "exec")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            return None, f"{type(e).__name__}: {e}", ""
        finally:
            compiling[0] = None
        del tree
        if cfg.rlimits:
            used = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = cfg.cpu_s if cfg.cpu_s is not None else math.ceil(timeout_s) + 1
            cpu_soft[0] = min(math.ceil(used.ru_utime + used.ru_stime + cpu_s), cpu_hard)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft[0], cpu_hard))
        decimal.setcontext(decimal.Context())
        sys.setrecursionlimit(1000)
        out = _Capped(cfg.max_output)
        namespace = {"__builtins__": fresh_builtins(), "__name__": "__main__"}
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
            except BaseException:
                error = type(e).__name__
        finally:
            sys.stdout = sys.stderr
        namespace.clear()
        del compiled
        gc.collect()  # finalizers of the program's objects run now, inside its time
        return value, error, out.getvalue()

    def send(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(out_fd, data) :]

    gc.freeze()  # the preloaded modules never need collecting: keeps gc.collect() cheap
    if cfg.audit_hook:
        sys.addaudithook(audit)
    send({"ready": True, "pid": os.getpid(), "uid": os.getuid()})

    buffer, n_jobs = b"", 0
    while True:
        while b"\n" not in buffer:
            chunk = os.read(in_fd, 1 << 16)
            if not chunk:
                return  # the parent closed the pipe
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        job = json.loads(line)
        value, error, stdout = run(job["code"], job["timeout_s"])
        if error is not None:
            error = error[: cfg.max_error]
        n_jobs += 1
        used = resource.getrusage(resource.RUSAGE_SELF)
        retire = (
            n_jobs >= cfg.max_jobs
            or classes_changed()
            or used.ru_utime + used.ru_stime > cpu_hard / 2
        )
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

    @property
    def value(self):
        return self[0]

    @property
    def error(self):
        return self[1]


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
            close_fds=True,
        )
        self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.rbuf, self.wbuf = b"", b""
        self.ready = False
        self.job = None  # (index, id) of the program it runs
        self.deadline = time.monotonic() + 30.0  # to start up
        self.uid = None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        self.kill()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def death(self) -> str:
        self.kill()
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"worker died ({signal.Signals(-code).name})"
        return f"worker died (exit code {code})"


class PotSandbox:
    """A pool of sandboxed PoT workers. `run_batch(codes)` -> list of PotResult, in order."""

    def __init__(self, workers: int | None = None, config: SandboxConfig | None = None):
        self.n_workers = workers or default_workers()
        if self.n_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config = config or SandboxConfig()
        self.workers: list[_Worker] = []
        self.started = 0  # workers started so far, replacements included
        self.selector = selectors.DefaultSelector()
        self.pid = os.getpid()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.workers:
            self._forget(w)
            w.close()
        self.workers = []

    def _start(self) -> _Worker:
        w = _Worker(self.config)
        self.started += 1
        self.selector.register(w.rfd, selectors.EVENT_READ, w)
        self.workers.append(w)
        return w

    def _forget(self, w):
        for fd in (w.rfd, w.wfd):
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _replace(self, w):
        self._forget(w)
        w.close()
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
        results: list[PotResult | None] = [None] * len(codes)
        pending = deque(range(len(codes)))
        for i in list(pending):  # refused without a round trip
            if len(codes[i]) > self.config.max_code_chars:
                results[i] = PotResult(None, f"program longer than {self.config.max_code_chars}")
        pending = deque(i for i in pending if results[i] is None)
        try:
            self._dispatch(codes, pending, results, timeout_s)
        except BaseException:  # e.g. KeyboardInterrupt: workers in the middle of a job are lost
            self.close()
            raise
        assert all(r is not None for r in results)
        return results

    def _dispatch(self, codes, pending, results, timeout_s):
        n_busy, failed_starts = 0, 0
        while len(self.workers) < min(self.n_workers, max(len(pending), 1)):
            self._start()
        while pending or n_busy:
            now = time.monotonic()
            for w in self.workers:
                if w.ready and w.job is None and pending:
                    i = pending.popleft()
                    job_id = int.from_bytes(os.urandom(6), "little")  # a result must echo it
                    w.job, w.deadline = (i, job_id), now + timeout_s
                    req = {"id": job_id, "code": codes[i], "timeout_s": timeout_s}
                    w.wbuf = (json.dumps(req) + "\n").encode()
                    self._flush(w)
                    n_busy += 1
            wait = min(w.deadline for w in self.workers) - time.monotonic()
            for key, _ in self.selector.select(None if wait == math.inf else max(wait, 0.0)):
                w = key.data
                if w not in self.workers:
                    continue
                if key.fd == w.wfd:
                    self._flush(w)
                    continue
                try:
                    chunk = os.read(w.rfd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:  # it died
                    if w.job is not None:
                        results[w.job[0]] = PotResult(None, w.death())
                        n_busy -= 1
                    elif not w.ready:
                        failed_starts += 1
                        if failed_starts >= 3:
                            raise RuntimeError(f"PoT sandbox workers fail to start: {w.death()}")
                    self._replace(w)
                    continue
                w.rbuf += chunk
                while b"\n" in w.rbuf and w in self.workers:
                    line, w.rbuf = w.rbuf.split(b"\n", 1)
                    done = self._receive(w, line, results)
                    n_busy -= done
                if len(w.rbuf) > 1 << 20 and w in self.workers:  # no newline in 1 MiB: garbage
                    if w.job is not None:
                        results[w.job[0]] = PotResult(None, "worker sent garbage")
                        n_busy -= 1
                    self._replace(w)
            now = time.monotonic()
            for w in list(self.workers):
                if now < w.deadline:
                    continue
                if w.job is not None:
                    results[w.job[0]] = PotResult(None, f"timeout after {timeout_s:g}s")
                    n_busy -= 1
                elif not w.ready:
                    raise RuntimeError("PoT sandbox worker did not start within 30 s")
                else:
                    w.deadline = float("inf")
                    continue
                self._replace(w)
        for w in self.workers:
            if w.job is None and w.ready:
                w.deadline = float("inf")

    def _flush(self, w):
        try:
            n = os.write(w.wfd, w.wbuf)
        except (BlockingIOError, BrokenPipeError):
            n = 0
        w.wbuf = w.wbuf[n:]
        events = selectors.EVENT_WRITE if w.wbuf else 0
        registered = w.wfd in self.selector.get_map()
        if events and not registered:
            self.selector.register(w.wfd, events, w)
        elif not events and registered:
            self.selector.unregister(w.wfd)

    def _receive(self, w, line, results) -> int:
        """Handle one JSON line from a worker; returns 1 if it finished a program."""
        try:
            msg = json.loads(line)
            assert isinstance(msg, dict)
        except (ValueError, AssertionError):
            msg = {}
        if not w.ready:
            if msg.get("ready") is True:
                w.ready, w.uid, w.deadline = True, msg.get("uid"), float("inf")
                return 0
            self._replace(w)
            return 0
        value, error, stdout = msg.get("value"), msg.get("error"), msg.get("stdout", "")
        ok = (
            w.job is not None
            and msg.get("id") == w.job[1]
            and (value is None or (type(value) in (int, float) and math.isfinite(value)))
            and (error is None or isinstance(error, str))
            and (value is None) != (error is None)
            and isinstance(stdout, str)
        )
        if w.job is None:
            self._replace(w)  # it spoke out of turn
            return 0
        i = w.job[0]
        w.job = None
        if not ok:
            results[i] = PotResult(None, "worker sent an invalid result")
            self._replace(w)
            return 1
        results[i] = PotResult(None if value is None else float(value), error, stdout)
        if msg.get("retire") is True:
            self._replace(w)
        return 1


def default_workers() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


_SANDBOXES: dict[tuple, PotSandbox] = {}


def _sandbox(workers: int | None) -> PotSandbox:
    """The process's shared sandbox with `workers` workers (started on first use)."""
    n = workers or default_workers()
    key = (os.getpid(), n)
    if key not in _SANDBOXES:
        for k in [k for k in _SANDBOXES if k[0] != os.getpid()]:
            del _SANDBOXES[k]  # inherited through fork: those workers belong to the parent
        _SANDBOXES[key] = PotSandbox(n)
    return _SANDBOXES[key]


def run_pot(code: str, timeout_s: float = 2.0) -> PotResult:
    """Run one PoT program in the shared sandbox: (value, error)."""
    return _sandbox(None).run(code, timeout_s=timeout_s)


def run_pot_batch(codes, timeout_s: float = 2.0, workers: int | None = None) -> list[PotResult]:
    """Run PoT programs in the shared sandbox (`workers` processes); results in order."""
    return _sandbox(workers).run_batch(codes, timeout_s=timeout_s)


def close_sandboxes():
    for box in _SANDBOXES.values():
        if box.pid == os.getpid():
            box.close()
    _SANDBOXES.clear()


atexit.register(close_sandboxes)

if __name__ == "__main__":
    # Not a user-facing CLI: the entry point of a sandbox worker, started by PotSandbox with
    # `python -I -S verify.py --worker` (no argparse: the worker loads as few modules as it can).
    if sys.argv[1:] != ["--worker"]:
        sys.exit(
            "verify.py is a library; `--worker` is the internal entry point of the PoT sandbox"
        )
    _worker_main(SandboxConfig(**json.loads(os.environ["SIKED_SANDBOX_CONFIG"])))
