"""The teacher stage: GSM8K training questions solved in three strategies (SPEC.md 1.1).

    python data/teacher.py --gold --out runs/teacher/gold.jsonl [--limit N]
    python data/teacher.py --teacher-url http://HOST:PORT/v1 --teacher-model NAME --out FILE
    python data/teacher.py --local ALIAS_OR_FOLDER --out FILE [--n 10 --max-tokens 512]

Rows {"id", "strategy", "text", "answer", "correct", "source"}: `text` is the body without its
strategy tag (what strategies.format_target takes), `answer` the number verify.py extracts (PoT: by
running it), `correct` whether it is the gold answer and, for L2M, has sub-questions (SPEC 1.4.2);
`source` is "gold", "http:<model>" or "local:<model>". select_teacher() keeps the first correct row
per (id, strategy): D_LLM.
- gold (no LLM; stands in for the paper's LLaMA-3 70B): strategies.gold_cot / gold_pot convert the
  GSM8K rationales, gold_l2m the socratic ones. gsm8k/train_socratic.jsonl is not on our machines
  (../shared/data/README.md): there L2M is skipped, said once.
- http: an OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, a hosted API) via urllib:
  strategies.teacher_messages' 8-shot chat, n samples at temperature 0.7, top-p 0.95 (SPEC 1.1,
  5.7), with `n` in one request where the server accepts it; `workers` questions at a time. 429,
  5xx, dropped connections and timeouts are retried with backoff (Retry-After honoured), anything
  else is a one-line TeacherError. The key: --teacher-key or OPENAI_API_KEY.
- local: a model.py model (alias, HF id or folder) in its chat format, sampled by sample.generate.
Resumable and atomic: each chunk of whole questions is written as one atomic file in
`<out>.parts/`; at the end all rows are written atomically to `<out>` and the folder is removed. A
rerun skips the finished (question, strategy) pairs, those of a finished `<out>` too (so it can
be extended, also by strategies).
Sampling is seeded per chunk, so a resumed LLM run is not bit-identical to an uninterrupted one.
"""

import argparse
import contextlib
import email.utils
import json
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python data/teacher.py` puts data/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

import strategies  # noqa: E402
import verify  # noqa: E402
from data import prepare  # noqa: E402

STRATEGY_NAMES = tuple(strategies.STRATEGIES)  # ("cot", "l2m", "pot")
NO_SOCRATIC = (
    "gold teacher: no socratic rationales in these rows (gsm8k/train_socratic.jsonl is missing): "
    "L2M skipped, CoT and PoT only"
)


class TeacherError(RuntimeError):
    """A teacher server failed in a way retrying does not fix; the message is one line."""


read_rows = prepare.read_jsonl  # the rows of a finished teacher file


def select_teacher(rows: Iterable[dict]) -> list[dict]:
    """The first correct row per (id, strategy), in order (SPEC 1.1)."""
    seen, out = set(), []
    for row in rows:
        key = (row["id"], row["strategy"])
        if row["correct"] and key not in seen:
            seen.add(key)
            out.append(row)
    return out


# --------------------------------------------------------------------------------- rows and files
def clean_text(text: str, strategy: str) -> str:
    """An LLM's reply as a solution body: no strategy tag, no Markdown fence around a program."""
    text = text.strip()
    tagged, body = strategies.parse_solution(text)
    text = body.strip() if tagged == strategy else text
    return verify.strip_code_fence(text).strip() if strategy == "pot" else text


def verify_rows(questions, texts, source, rel_tol=1e-4, workers=None) -> list[dict]:
    """Rows for finished questions, texts[id] = [(strategy, body or None)]; PoT in one batch."""
    flat = [(q, s, t) for q in questions for s, t in texts.get(q["id"], []) if t is not None]
    bodies, kinds = [t for *_, t in flat], [s for _, s, _ in flat]
    answers = verify.extract_answers(bodies, kinds, workers=workers)
    rows = []
    for (q, s, t), a in zip(flat, answers, strict=True):
        ok = verify.is_correct(a, q["answer"], rel_tol=rel_tol)
        if s == "l2m":  # an L2M solution must have sub-questions (SPEC 1.4.2)
            ok = ok and verify.has_subquestions(t)
        rows.append(dict(id=q["id"], strategy=s, text=t, answer=a, correct=bool(ok), source=source))
    return rows


def _read_checked(path: Path, source: str) -> list[dict]:
    """The rows of a teacher file or chunk; a one-line error if it is damaged or not source's."""
    try:
        rows = read_rows(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); remove it") from None
    others = {r.get("source") for r in rows} - {source}
    if others:
        raise ValueError(
            f"{path}: written by teacher {others.pop()!r}, not {source!r}; "
            "remove it or rerun with the same teacher"
        )
    return rows


def _run_stage(questions, out_path, source, solve, progress, judged) -> dict:
    """Extend out_path with the (questions done, rows) solve([(question, strategies it lacks)])
    yields, chunk by chunk via `<out>.parts/`; prints, returns (solved, len(judged[s])) or None."""
    out = Path(out_path)
    parts = out.with_name(out.name + ".parts")
    rows = _read_checked(out, source) if out.exists() else []  # a finished file is extended
    done = {(r["id"], r["strategy"]) for r in rows}
    chunks = sorted(parts.glob("*.jsonl"))
    # chunk rows already in out: the last run was killed after writing out, before rmtree(parts)
    rows += [
        r for p in chunks for r in _read_checked(p, source) if (r["id"], r["strategy"]) not in done
    ]
    done = {(r["id"], r["strategy"]) for r in rows}
    # by (question, strategy): a rerun that asks for more strategies solves just those (a pair
    # that gave no row, e.g. a rationale gold_pot cannot convert, is tried again: it is cheap)
    todo = [(q, [s for s in judged if (q["id"], s) not in done]) for q in questions]
    todo = [(q, missing) for q, missing in todo if missing]
    first = max((int(p.stem) for p in chunks if p.stem.isdigit()), default=-1) + 1  # gaps kept
    initial, total = len(questions) - len(todo), len(questions)
    # made before the progress bar, so that an unwritable out is a one-line error
    created = [d for d in (parts, *parts.parents) if not d.exists()]  # innermost first
    parts.mkdir(parents=True, exist_ok=True)
    try:
        with tqdm(total=total, initial=initial, desc=source, disable=not progress) as bar:
            for i, (n_done, new) in enumerate(solve(todo), first):
                prepare.write_jsonl(parts / f"{i:06d}.jsonl", new)
                rows += new
                bar.update(n_done)
        order = {q["id"]: i for i, q in enumerate(questions)}  # not the order answers came in
        rows.sort(key=lambda r: order.get(r["id"], -1))
        prepare.write_jsonl(out, rows)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # out's rename is on disk before the chunks are removed
        finally:
            os.close(dir_fd)
    except BaseException:
        for d in created:  # this run's empty folders; rmdir refuses one holding finished chunks
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    shutil.rmtree(parts)
    solved = {(r["id"], r["strategy"]) for r in rows if r["correct"]}
    rates = {}
    for s, asked in judged.items():
        if asked is None:
            rates[s] = None
            print(f"{source} {s}: skipped (no socratic rationales: train_socratic missing)")
            continue
        n = sum((q["id"], s) in solved for q in asked)
        rates[s] = (n, len(asked))
        pct = 100 * n / max(len(asked), 1)
        print(f"{source} {s}: {n}/{len(asked)} questions with a correct solution ({pct:.2f}%)")
    sys.stdout.flush()
    return rates


def _check(questions: list[dict], strategies_: Iterable[str]) -> tuple[str, ...]:
    strategies_ = tuple(strategies_)
    bad = [s for s in strategies_ if s not in STRATEGY_NAMES]
    if bad or not strategies_:
        raise ValueError(f"strategies {bad or strategies_}: expected some of {STRATEGY_NAMES}")
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("questions: expected unique ids")
    return strategies_


# ------------------------------------------------------------------------------------ gold teacher
def gold_teacher(
    questions: list[dict], out_path: str | Path, *, strategies_: Iterable[str] = STRATEGY_NAMES,
    chunk_size: int = 256, rel_tol: float = 1e-4, workers: int | None = None, progress: bool = True,
) -> dict[str, tuple[int, int] | None]:  # fmt: skip
    """Gold CoT/PoT (and L2M where socratic rationales exist) for GSM8K rows; prints and returns
    the pass rates (None for L2M without socratic rationales)."""
    strategies_ = _check(questions, strategies_)
    with_socratic = [q for q in questions if q.get("socratic")]
    if "l2m" in strategies_ and not with_socratic:
        prepare.note(NO_SOCRATIC)
    convert = {  # the rationales stop before `#### N`: the gold number is passed along
        "cot": lambda q: strategies.gold_cot(q["rationale"], answer=q["answer"]),
        "pot": lambda q: strategies.gold_pot(q["rationale"], q["question"], answer=q["answer"]),
        "l2m": lambda q: (
            strategies.gold_l2m(q["socratic"], answer=q["answer"]) if q.get("socratic") else None
        ),
    }

    def solve(todo: list[tuple[dict, list[str]]]) -> Iterable[tuple[int, list[dict]]]:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            texts = {q["id"]: [(s, convert[s](q)) for s in asked] for q, asked in chunk}
            qs = [q for q, _ in chunk]
            yield len(chunk), verify_rows(qs, texts, "gold", rel_tol, workers=workers)

    # L2M is judged over the questions with a socratic rationale, and skipped where none has one.
    judged = {s: (with_socratic or None) if s == "l2m" else questions for s in strategies_}
    return _run_stage(questions, out_path, "gold", solve, progress, judged)


# ------------------------------------------------------------------------------------ HTTP teacher
class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (urllib only) with retries."""

    def __init__(self, url, model, api_key, timeout_s, retries, backoff_s):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model, self.timeout_s = model, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.n_supported = True
        self.stopped = threading.Event()  # set: no new requests (the stage is over)

    def post(self, body: dict) -> list[str] | None:
        """The answer's texts, or None where a 400 refused `n`. Retries 429, 5xx, timeouts and
        dropped connections with backoff; anything else is a TeacherError."""
        url, data, last, wait_s = self.endpoint, json.dumps(body).encode(), "", 0.0
        for attempt in range(self.retries + 1):
            if self.stopped.is_set():
                raise TeacherError(f"{url}: stopped")
            if attempt:
                backoff = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                time.sleep(max(backoff, wait_s))  # jittered, and never before Retry-After
            wait_s = 0.0
            req = urllib.request.Request(url, data, self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                last = f"HTTP {e.code} {detail}"
                if e.code == 429 or e.code >= 500:
                    wait_s = _retry_after_s(e.headers.get("Retry-After", ""))
                    continue
                if e.code == 400 and "n" in body:  # perhaps `n` itself: single samples from now on
                    self.n_supported = False
                    msg = f"refused n={body['n']} ({detail}): one request per sample from now on"
                    prepare.note(f"teacher: {url} {msg}")
                    return None
                key = "--teacher-key or OPENAI_API_KEY"
                where = f"--teacher-url (the server's .../v1) and --teacher-model {self.model!r}"
                check = {401: key, 403: key, 404: where}.get(e.code)
                hint = f": check {check}" if check else ""
                raise TeacherError(f"{url}: {last}{hint}") from None
            except (urllib.error.URLError, TimeoutError) as e:  # a timeout, or no server at all
                if not isinstance(getattr(e, "reason", e), TimeoutError):
                    raise TeacherError(f"{url}: unreachable ({e.reason})") from None
                last = f"no answer within {self.timeout_s:g} s"
            except (ConnectionError, HTTPException) as e:  # reset or closed mid-answer
                last = f"connection dropped ({e.__class__.__name__}: {e})"
        else:
            raise TeacherError(f"{url}: gave up after {self.retries + 1} attempts: {last}")
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherError(f"{url}: malformed response (not JSON): {raw[:120]!r}") from None
        try:
            texts = [c["message"]["content"] or "" for c in answer["choices"]]
        except (TypeError, KeyError):
            texts = []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TeacherError(
                f"{url}: malformed response (no choices[].message.content): "
                f"{json.dumps(answer)[:120]}"
            )
        return texts

    def complete(self, messages: list[dict], n: int, **sampling) -> list[str]:
        """n completions of one chat, in one request where the server accepts `n`."""
        texts: list[str] = []
        while len(texts) < n:
            k = n - len(texts) if self.n_supported else 1
            body = {"model": self.model, "messages": messages, **sampling}
            if k > 1:
                body["n"] = k
            texts += (self.post(body) or [])[:k]  # None (n refused) or too few: ask again
        return texts


def _retry_after_s(value: str) -> float:
    """The wait a Retry-After header asks for, seconds or an HTTP date (RFC 9110), in [0, 60]."""
    try:
        wait_s = float(value)
    except ValueError:
        date = email.utils.parsedate_tz(value)  # None: not a date
        wait_s = email.utils.mktime_tz(date) - time.time() if date else 0.0
    return min(wait_s, 60.0) if wait_s > 0 else 0.0  # nan and the past: no wait


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own error message, on one short line."""
    body = ""
    try:
        body = e.read().decode("utf-8", "replace")
        err = json.loads(body).get("error", body)
        body = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (OSError, json.JSONDecodeError, AttributeError):  # no body, or not a JSON error
        pass
    body = " ".join(body.split())[:200]
    return f"{e.reason}: {body}" if body else str(e.reason)


def http_teacher(
    questions: list[dict], out_path: str | Path, url: str, model: str, *,
    api_key: str | None = None, strategies_: Iterable[str] = STRATEGY_NAMES, n: int = 10,
    temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 512, workers: int = 8,
    timeout_s: float = 300.0, retries: int = 5, backoff_s: float = 1.0, rel_tol: float = 1e-4,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:  # fmt: skip
    """Sample n solutions per question and strategy from an OpenAI-compatible server."""
    strategies_ = _check(questions, strategies_)
    if n < 1 or workers < 1:
        raise ValueError(f"n={n}, workers={workers}: expected positive integers")
    if not timeout_s > 0:  # urllib's own errors for 0 or less name no setting
        raise ValueError(f"timeout_s={timeout_s}: expected seconds > 0")
    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    client = ChatClient(url, model, api_key, timeout_s, retries, backoff_s)
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    source = f"http:{model}"

    def ask(q: dict, asked: list[str]) -> dict[str, list[tuple[str, str]]]:
        replies = {
            s: client.complete(strategies.teacher_messages(q["question"], s), n, **sampling)
            for s in asked
        }
        return {q["id"]: [(s, clean_text(t, s)) for s in asked for t in replies[s]]}

    def solve(todo: list[tuple[dict, list[str]]]) -> Iterable[tuple[int, list[dict]]]:
        # workers questions at a time, each written as soon as it is answered (a chunk of one)
        pool = ThreadPoolExecutor(max_workers=workers)
        running = {pool.submit(ask, q, asked): q for q, asked in todo}
        try:
            for future in as_completed(running):
                q = running.pop(future)
                yield 1, verify_rows([q], future.result(), source, rel_tol)  # may raise
        except (Exception, KeyboardInterrupt):
            client.stopped.set()  # running questions send no more requests
            for future in [f for f in running if f.done() and not f.cancelled()]:
                if future.exception() is None:  # answered before the error: keep, not re-pay
                    yield 1, verify_rows([running[future]], future.result(), source, rel_tol)
            raise
        finally:
            client.stopped.set()
            pool.shutdown(wait=False, cancel_futures=True)  # questions not started are dropped

    judged = dict.fromkeys(strategies_, questions)
    return _run_stage(questions, out_path, source, solve, progress, judged)


# ----------------------------------------------------------------------------------- local teacher
def local_teacher(
    questions: list[dict], out_path: str | Path, model_name: str, *,
    strategies_: Iterable[str] = STRATEGY_NAMES, n: int = 10, temperature: float = 0.7,
    top_p: float = 0.95, max_new_tokens: int = 512, questions_per_chunk: int = 4,
    batch_size: int = 64, seed: int = 0, device: str | None = None, dtype: str | None = None,
    rel_tol: float = 1e-4, progress: bool = True,
) -> dict[str, tuple[int, int]]:  # fmt: skip
    """Sample n solutions per question and strategy from a local model through sample.py; by
    default bfloat16 on cuda if available, else float32 on cpu (faster than bf16 there)."""
    strategies_ = _check(questions, strategies_)
    import torch  # torch, model.py and sample.py only for this teacher: the others stay light

    import model as model_py
    import sample

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    m = model_py.Transformer.from_pretrained(model_name, device=device, dtype=getattr(torch, dtype))
    tok = model_py.Tokenizer.from_pretrained(model_name)
    source = f"local:{Path(model_name).name if Path(model_name).exists() else model_name}"
    sampling = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    sampling.update(batch_size=batch_size, progress=False)

    def solve(todo: list[tuple[dict, list[str]]]) -> Iterable[tuple[int, list[dict]]]:
        for start in range(0, len(todo), questions_per_chunk):
            chunk = todo[start : start + questions_per_chunk]
            items = [(q, s) for q, asked in chunk for s in asked]
            prompts = [tok.chat(strategies.teacher_messages(q["question"], s)) for q, s in items]
            with torch.no_grad():
                outs = sample.generate(m, tok, prompts, seed=seed + start, **sampling)
            texts: dict[str, list[tuple[str, str]]] = {}
            for (q, s), samples in zip(items, outs, strict=True):
                texts.setdefault(q["id"], []).extend((s, clean_text(c.text, s)) for c in samples)
            yield len(chunk), verify_rows([q for q, _ in chunk], texts, source, rel_tol)

    judged = dict.fromkeys(strategies_, questions)
    return _run_stage(questions, out_path, source, solve, progress, judged)


# --------------------------------------------------------------------------------------------- CLI
def main(args: argparse.Namespace) -> dict:
    if args.limit is not None and args.limit < 0:  # questions[:-3] would be all but three
        raise ValueError(f"--limit {args.limit}: expected a number of questions >= 0")
    if not args.rel_tol >= 0:  # nan too
        raise ValueError(f"--rel-tol {args.rel_tol}: expected >= 0")
    if args.teacher_url == "":  # falsy: it would fall through to the local teacher
        raise ValueError("--teacher-url '': expected a server URL such as http://HOST:PORT/v1")
    if args.local == "":  # it would be the current folder: ".: no config.json"
        raise ValueError("--local '': expected a model alias, HF repo id or checkpoint folder")
    if args.teacher_model is not None and args.teacher_url is None:  # it would be ignored
        mode = "--gold" if args.gold else "--local"
        raise ValueError(f"--teacher-model: only used with --teacher-url, not with {mode}")
    # prepare.load reads an already prepared data/gsm8k split and looks at source only when it
    # must prepare one: a wrong --data would pass unnoticed
    if args.data is not None and not (args.data and Path(args.data).expanduser().is_dir()):
        raise ValueError(f"--data {args.data!r}: expected an existing dataset folder")
    progress = not args.quiet
    questions = prepare.load("gsm8k", args.split, source=args.data, progress=progress)
    questions = questions[: args.limit]
    common = dict(strategies_=tuple(args.strategies), rel_tol=args.rel_tol, progress=progress)
    if args.gold:
        return gold_teacher(questions, args.out, **common)
    common.update(n=args.n, temperature=args.temperature, top_p=args.top_p)
    if args.teacher_url:
        if not args.teacher_model:
            raise ValueError("--teacher-url: expected --teacher-model NAME as well")
        return http_teacher(
            questions, args.out, args.teacher_url, args.teacher_model, api_key=args.teacher_key,
            max_tokens=args.max_tokens, workers=args.workers, timeout_s=args.timeout, **common,
        )  # fmt: skip
    return local_teacher(
        questions, args.out, args.local, max_new_tokens=args.max_tokens, seed=args.seed,
        dtype=args.dtype, **common,
    )  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SIKeD's teacher stage on GSM8K questions.")
    parser.error = lambda m: parser.exit(2, f"{parser.prog}: {m} (see --help)\n")  # no usage block
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--gold", action="store_true", help="gold solutions from GSM8K rationales")
    which.add_argument("--teacher-url", help="OpenAI-compatible server, e.g. http://HOST:PORT/v1")
    which.add_argument("--local", help="a local model: alias, HF repo id or folder")
    parser.add_argument("--teacher-model", help="model name on the server (with --teacher-url)")
    parser.add_argument("--teacher-key", help="API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--out", required=True, help="output JSONL (resumed from <out>.parts/)")
    parser.add_argument("--split", default="train", help="GSM8K split the questions come from")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGY_NAMES), choices=STRATEGY_NAMES,
        help="strategies to ask for",
    )  # fmt: skip
    parser.add_argument("--n", type=int, default=10, help="samples per question and strategy")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling top-p")
    parser.add_argument("--max-tokens", type=int, default=512, help="new tokens per sample")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP requests")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    parser.add_argument(
        "--rel-tol", type=float, default=1e-4, help="answer tolerance (0: exact, as the paper)"
    )
    parser.add_argument("--data", default=None, help="dataset folder (default: $SIKED_DATA)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (local teacher)")
    dtypes = ["float32", "bfloat16", "float16"]
    parser.add_argument("--dtype", choices=dtypes, help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    try:
        main(parser.parse_args())
    except (ValueError, TeacherError, OSError) as e:  # OSError: e.g. an unwritable --out
        sys.exit(f"teacher.py: {e}")
