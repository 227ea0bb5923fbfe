"""The teacher stage: solutions to GSM8K training questions in three strategies (SPEC.md 1.1).

    python data/teacher.py --gold --out runs/teacher/gold.jsonl [--limit N]
    python data/teacher.py --teacher-url http://HOST:PORT/v1 --teacher-model NAME --out FILE
    python data/teacher.py --local ALIAS_OR_FOLDER --out FILE [--n 10 --max-tokens 512]

Three teachers, one output format. Each writes a JSONL of rows
`{"id", "strategy", "text", "answer", "correct", "source"}`: `text` is the solution body (no
strategy tag, what strategies.format_target takes), `answer` the number verify.py extracts from it
(PoT: by running the program), `correct` whether it equals the question's gold answer
(verify.is_correct) and, for L2M, whether it has sub-questions (verify.has_subquestions, SPEC
1.4.2). `source` is "gold", "http:<model>" or "local:<model>". select_teacher() then keeps the
first correct row per (id, strategy): 0 to 3 solutions per question, D_LLM of SPEC 1.1.

1. Gold (offline, no LLM): strategies.gold_cot / gold_pot turn each GSM8K rationale into a CoT and a
   PoT body, gold_l2m turns a socratic rationale into an L2M body. gsm8k/train_socratic.jsonl is not
   on our machines (../shared/data/README.md), so on them the gold teacher says once that L2M is
   skipped and offers CoT and PoT only. Every row is verified like an LLM's.
2. HTTP: any OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, llama.cpp, a hosted
   API), through urllib only. strategies.teacher_messages builds the 8-shot forced-strategy chat;
   n samples per question and strategy at temperature 0.7, top-p 0.95 (SPEC 1.1, 5.7) in one
   request where the server accepts `n`, else one request per sample. Requests run in a bounded
   thread pool; 429, 5xx, dropped connections and timeouts are retried with exponential backoff
   (Retry-After honoured); 401/403, 404, other 4xx, a malformed answer or an unreachable URL stop
   the stage with a one-line TeacherError. The key comes from --teacher-key or OPENAI_API_KEY.
3. Local: a model.py model (alias, HF repo id or folder) prompted with the same messages in its
   tokenizer's chat format (tok.chat) and sampled by sample.generate.

Resumable and atomic: rows go to `<out>.partial`, appended with flush + fsync after each finished
chunk of questions (all of a question's rows in one write), and the file is renamed to `<out>` at
the end. A rerun reads the partial file, drops a torn last line (a kill mid-write) and redoes the
last question in the file (its rows may be incomplete), then skips every finished id: no duplicate,
no lost row. Rerunning over a finished `<out>` skips all its questions and adds any new ones.
Sampling is seeded per chunk, so a resumed LLM run is not bit-identical to an uninterrupted one.
"""

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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


# --------------------------------------------------------------------------------- rows and files


def make_row(
    qid: str,
    strategy: str,
    text: str,
    answer: float | None,
    gold: float,
    source: str,
    rel_tol: float = 1e-4,
) -> dict:
    correct = verify.is_correct(answer, gold, rel_tol=rel_tol)
    if strategy == "l2m":  # an L2M solution must have sub-questions (SPEC 1.4.2)
        correct = correct and verify.has_subquestions(text)
    return {
        "id": qid,
        "strategy": strategy,
        "text": text,
        "answer": answer,
        "correct": bool(correct),
        "source": source,
    }


def clean_text(text: str, strategy: str) -> str:
    """An LLM's reply as a solution body: no strategy tag, no Markdown fence around a program."""
    text = text.strip()
    tagged, body = strategies.parse_solution(text)
    if tagged == strategy:
        text = body.strip()
    if strategy == "pot":  # the program verify.py runs, without the prose around its fence
        text = verify.strip_code_fence(text).strip()
    return text


def verify_rows(
    questions: list[dict],
    texts: dict[str, list[tuple[str, str]]],
    source: str,
    rel_tol: float = 1e-4,
    workers: int | None = None,
) -> list[dict]:
    """Rows for finished questions: texts[id] = [(strategy, body), ...]; PoT runs in one batch."""
    flat = [(q, s, t) for q in questions for s, t in texts.get(q["id"], [])]
    answers = verify.extract_answers(
        [t for _, _, t in flat], [s for _, s, _ in flat], workers=workers
    )
    return [
        make_row(q["id"], s, t, a, q["answer"], source, rel_tol)
        for (q, s, t), a in zip(flat, answers, strict=True)
    ]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a finished teacher file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def select_teacher(rows: Iterable[dict]) -> list[dict]:
    """Keep the first correct row per (id, strategy), in order (SPEC 1.1: one per question and
    strategy, the first one)."""
    seen, out = set(), []
    for row in rows:
        key = (row["id"], row["strategy"])
        if row["correct"] and key not in seen:
            seen.add(key)
            out.append(row)
    return out


class PartialJsonl:
    """`<out>.partial`, appended chunk by chunk and renamed to `<out>` by finish()."""

    def __init__(self, out_path: str | Path, source: str):
        self.out = Path(out_path)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.source = source
        self.file = None

    def resume(self) -> list[dict]:
        """The rows already finished; leaves the partial file holding exactly those rows."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        finished = not self.partial.exists() and self.out.exists()
        if finished:
            shutil.copyfile(self.out, self.partial)  # continue a finished file with more questions
        data = self.partial.read_bytes() if self.partial.exists() else b""
        rows, starts, pos = [], [], 0
        for lineno, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):
                break  # a torn last line (killed mid-write) is dropped
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(
                    f"{self.partial}:{lineno}: not valid JSON; remove the file"
                ) from None
            if row.get("source") != self.source:
                raise ValueError(
                    f"{self.partial}:{lineno}: written by teacher {row.get('source')!r}, not "
                    f"{self.source!r}; remove it or rerun with the same teacher"
                )
            rows.append(row)
            starts.append(pos)
            pos += len(line)
        # The last question's rows may be incomplete (killed between its lines): redo it.
        if rows and not finished:
            last = rows[-1]["id"]
            while rows and rows[-1]["id"] == last:
                rows.pop()
                pos = starts.pop()
        with open(self.partial, "ab") as f:  # truncating in place never loses a kept row
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        self.file = open(self.partial, "ab")  # noqa: SIM115 (closed by finish/close)
        return rows

    def append(self, rows: list[dict]) -> None:
        data = b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)
        self.file.write(data)  # one write per chunk of whole questions
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        self.close()
        os.replace(self.partial, self.out)
        dir_fd = os.open(self.out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def pass_rates(
    rows: list[dict], questions: list[dict], strategies_: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """Per strategy: (questions with a correct row, questions asked)."""
    solved = {(r["id"], r["strategy"]) for r in rows if r["correct"]}
    ids = [q["id"] for q in questions]
    return {s: (sum((i, s) in solved for i in ids), len(ids)) for s in strategies_}


def report(rates: dict[str, tuple[int, int] | None], source: str) -> str:
    lines = []
    for s, rate in rates.items():
        if rate is None:
            lines.append(f"{source} {s}: skipped (no socratic rationales: train_socratic missing)")
        else:
            n, total = rate
            lines.append(
                f"{source} {s}: {n}/{total} questions with a correct solution "
                f"({100 * n / max(total, 1):.2f}%)"
            )
    return "\n".join(lines)


def _run_stage(
    questions: list[dict],
    out_path: str | Path,
    source: str,
    strategies_: tuple[str, ...],
    solve_chunks: Callable[[list[dict]], Iterable[list[dict]]],
    progress: bool,
) -> dict[str, tuple[int, int]]:
    """Resume `out_path`, feed the unfinished questions to solve_chunks (which yields the rows of
    whole questions), append each chunk, rename, and return the pass rates over `questions`."""
    writer = PartialJsonl(out_path, source)
    done = {r["id"] for r in writer.resume()}
    todo = [q for q in questions if q["id"] not in done]
    try:
        with tqdm(
            total=len(questions),
            initial=len(questions) - len(todo),
            desc=source,
            disable=not progress,
        ) as bar:
            for chunk_rows in solve_chunks(todo):
                writer.append(chunk_rows)
                bar.update(len({r["id"] for r in chunk_rows}))
    finally:
        writer.close()
    writer.finish()
    return pass_rates(read_rows(out_path), questions, strategies_)


def _check(questions: list[dict], strategies_: Iterable[str]) -> tuple[str, ...]:
    strategies_ = tuple(strategies_)
    bad = [s for s in strategies_ if s not in STRATEGY_NAMES]
    if bad or not strategies_:
        raise ValueError(f"strategies {bad or strategies_}: expected some of {STRATEGY_NAMES}")
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("questions: expected unique ids")
    return strategies_


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------ gold teacher


def gold_bodies(question: dict, strategies_: Iterable[str]) -> list[tuple[str, str]]:
    """(strategy, body) from a GSM8K row's rationales; converters that give None are left out."""
    convert = {  # prepare.py's rationales stop before `#### N`: the gold number is passed along
        "cot": lambda q: strategies.gold_cot(q["rationale"], answer=q["answer"]),
        "pot": lambda q: strategies.gold_pot(q["rationale"], q["question"], answer=q["answer"]),
        "l2m": lambda q: (
            strategies.gold_l2m(q["socratic"], answer=q["answer"]) if q.get("socratic") else None
        ),
    }
    out = []
    for s in strategies_:
        body = convert[s](question)
        if body is not None:
            out.append((s, body))
    return out


def gold_teacher(
    questions: list[dict],
    out_path: str | Path,
    *,
    strategies_: Iterable[str] = STRATEGY_NAMES,
    chunk_size: int = 256,
    rel_tol: float = 1e-4,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[int, int] | None]:
    """Gold CoT/PoT (and L2M where socratic rationales exist) for GSM8K rows; prints and returns
    the pass rates (None for L2M without socratic rationales)."""
    strategies_ = _check(questions, strategies_)
    has_socratic = any(q.get("socratic") for q in questions)
    if "l2m" in strategies_ and not has_socratic:
        prepare.note(NO_SOCRATIC)
    asked = tuple(s for s in strategies_ if s != "l2m" or has_socratic)

    def solve(todo: list[dict]) -> Iterable[list[dict]]:
        for chunk in _chunks(todo, chunk_size):
            texts = {q["id"]: gold_bodies(q, asked) for q in chunk}
            rows = verify_rows(chunk, texts, "gold", rel_tol, workers=workers)
            if rows:
                yield rows

    rates: dict[str, tuple[int, int] | None] = dict(
        _run_stage(questions, out_path, "gold", asked, solve, progress)
    )
    if "l2m" in strategies_ and not has_socratic:
        rates["l2m"] = None
    elif "l2m" in rates:  # L2M is judged over the questions that have a socratic rationale
        with_socratic = [q for q in questions if q.get("socratic")]
        rates["l2m"] = pass_rates(read_rows(out_path), with_socratic, ["l2m"])["l2m"]
    rates = {s: rates[s] for s in strategies_}
    print(report(rates, "gold"), flush=True)
    return rates


# ------------------------------------------------------------------------------------ HTTP teacher


class _HTTPStatus(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(f"HTTP {code} {detail}")
        self.code, self.detail = code, detail


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (urllib only) with retries."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 300.0,
        retries: int = 5,
        backoff_s: float = 1.0,
    ):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.n_supported = True
        self._lock = threading.Lock()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * 2**attempt * (0.5 + random.random() / 2)  # jittered
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        time.sleep(delay)

    def post(self, body: dict) -> dict:
        """POST body; returns the decoded JSON answer. Retries 429/5xx/timeouts/dropped
        connections; raises _HTTPStatus for other 4xx and TeacherError for the rest."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last, retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(attempt - 1, retry_after)
            retry_after = None
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in (401, 403):
                    raise TeacherError(
                        f"{self.endpoint}: HTTP {e.code} {detail}: check --teacher-key or "
                        "OPENAI_API_KEY"
                    ) from None
                if e.code == 404:
                    raise TeacherError(
                        f"{self.endpoint}: HTTP 404 {detail}: check --teacher-url (the server's "
                        f".../v1) and --teacher-model {self.model!r}"
                    ) from None
                if e.code == 429 or e.code >= 500:
                    last, retry_after = f"HTTP {e.code} {detail}", e.headers.get("Retry-After")
                    continue
                raise _HTTPStatus(e.code, detail) from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"no answer within {self.timeout_s:g} s"
                    continue
                raise TeacherError(f"{self.endpoint}: unreachable ({e.reason})") from None
            except TimeoutError:
                last = f"no answer within {self.timeout_s:g} s"
                continue
            except (ConnectionError, HTTPException) as e:  # reset or closed mid-answer
                last = f"connection dropped ({e.__class__.__name__}: {e})"
                continue
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TeacherError(
                    f"{self.endpoint}: malformed response (not JSON): {raw[:120]!r}"
                ) from None
        raise TeacherError(f"{self.endpoint}: gave up after {self.retries + 1} attempts: {last}")

    def complete(self, messages: list[dict], n: int, **sampling) -> list[str]:
        """n completions of one chat; uses `n` in one request where the server accepts it."""
        texts: list[str] = []
        while len(texts) < n:
            k = n - len(texts) if self.n_supported else 1
            body = {"model": self.model, "messages": messages, **sampling}
            if k > 1:
                body["n"] = k
            try:
                answer = self.post(body)
            except _HTTPStatus as e:
                if e.code == 400 and k > 1:  # perhaps `n` itself: retry with single samples
                    with self._lock:
                        if self.n_supported:
                            self.n_supported = False
                            prepare.note(
                                f"teacher: {self.endpoint} refused n={k} ({e.detail}): "
                                "one request per sample from now on"
                            )
                    continue
                raise TeacherError(f"{self.endpoint}: HTTP {e.code} {e.detail}") from None
            texts += _choice_texts(answer, self.endpoint)[:k]
        return texts


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own error message, on one short line."""
    try:
        body = e.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        err = json.loads(body).get("error", body)
        body = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    body = " ".join(body.split())[:200]
    return f"{e.reason}: {body}" if body else str(e.reason)


def _choice_texts(answer: object, endpoint: str) -> list[str]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    try:
        texts = [c["message"]["content"] or "" for c in choices]
    except (TypeError, KeyError):
        texts = []
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TeacherError(
            f"{endpoint}: malformed response (no choices[].message.content): "
            f"{json.dumps(answer)[:120]}"
        )
    return texts


def http_teacher(
    questions: list[dict],
    out_path: str | Path,
    url: str,
    model: str,
    *,
    api_key: str | None = None,
    strategies_: Iterable[str] = STRATEGY_NAMES,
    n: int = 10,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 512,
    workers: int = 8,
    timeout_s: float = 300.0,
    retries: int = 5,
    backoff_s: float = 1.0,
    rel_tol: float = 1e-4,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Sample n solutions per question and strategy from an OpenAI-compatible server."""
    strategies_ = _check(questions, strategies_)
    if n < 1 or workers < 1:
        raise ValueError(f"n={n}, workers={workers}: expected positive integers")
    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    client = ChatClient(
        url, model, api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s
    )
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    source = f"http:{model}"

    def ask(q: dict, s: str) -> list[str]:
        return client.complete(strategies.teacher_messages(q["question"], s), n, **sampling)

    def solve(todo: list[dict]) -> Iterable[list[dict]]:
        work = iter([(q, s) for q in todo for s in strategies_])
        replies: dict[str, list[tuple[str, str]]] = {}
        pending: dict[Future, tuple[dict, str]] = {}
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            while True:
                while len(pending) < 2 * workers:  # a bounded queue: stop early on an error
                    item = next(work, None)
                    if item is None:
                        break
                    pending[pool.submit(ask, *item)] = item
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    q, s = pending.pop(future)
                    texts = future.result()  # a TeacherError stops the stage here
                    replies.setdefault(q["id"], []).extend((s, clean_text(t, s)) for t in texts)
                    if len(replies[q["id"]]) == n * len(strategies_):
                        got = sorted(replies.pop(q["id"]), key=lambda r: strategies_.index(r[0]))
                        yield verify_rows([q], {q["id"]: got}, source, rel_tol)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    rates = _run_stage(questions, out_path, source, strategies_, solve, progress)
    print(report(rates, source), flush=True)
    return rates


# ----------------------------------------------------------------------------------- local teacher


def local_teacher(
    questions: list[dict],
    out_path: str | Path,
    model_name: str,
    *,
    strategies_: Iterable[str] = STRATEGY_NAMES,
    n: int = 10,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    questions_per_chunk: int = 4,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    rel_tol: float = 1e-4,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Sample n solutions per question and strategy from a local model through sample.py.

    device: default cuda where available, else cpu; dtype: default bfloat16 on cuda, float32 on
    cpu (faster there than bf16 on the CPUs we measured)."""
    strategies_ = _check(questions, strategies_)
    import torch  # torch, model.py and sample.py only for this teacher: the others stay light

    import model as model_py
    import sample

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    m = model_py.Transformer.from_pretrained(model_name, device=device, dtype=getattr(torch, dtype))
    m.eval()
    tok = model_py.Tokenizer.from_pretrained(model_name)
    source = f"local:{Path(model_name).name if Path(model_name).exists() else model_name}"
    options = {"batch_size": batch_size} if batch_size else {}

    def solve(todo: list[dict]) -> Iterable[list[dict]]:
        for start, chunk in zip(
            range(0, len(todo), questions_per_chunk),
            _chunks(todo, questions_per_chunk),
            strict=True,
        ):
            items = [(q, s) for q in chunk for s in strategies_]
            prompts = [tok.chat(strategies.teacher_messages(q["question"], s)) for q, s in items]
            with torch.no_grad():
                completions = sample.generate(
                    m,
                    tok,
                    prompts,
                    n=n,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + start,
                    progress=False,
                    **options,
                )
            texts: dict[str, list[tuple[str, str]]] = {}
            for (q, s), outs in zip(items, completions, strict=True):
                texts.setdefault(q["id"], []).extend((s, clean_text(c.text, s)) for c in outs)
            yield verify_rows(chunk, texts, source, rel_tol)

    rates = _run_stage(questions, out_path, source, strategies_, solve, progress)
    print(report(rates, source), flush=True)
    return rates


# --------------------------------------------------------------------------------------------- CLI


def main(
    out: str,
    gold: bool = False,
    teacher_url: str | None = None,
    teacher_model: str | None = None,
    teacher_key: str | None = None,
    local: str | None = None,
    split: str = "train",
    limit: int | None = None,
    strategies_: tuple[str, ...] = STRATEGY_NAMES,
    n: int = 10,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 512,
    workers: int = 8,
    timeout_s: float = 300.0,
    rel_tol: float = 1e-4,
    data: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    questions = prepare.load("gsm8k", split, source=data, progress=progress)[:limit]
    common = dict(strategies_=strategies_, rel_tol=rel_tol, progress=progress)
    if gold:
        return gold_teacher(questions, out, **common)
    sampling = dict(n=n, temperature=temperature, top_p=top_p)
    if teacher_url:
        if not teacher_model:
            raise ValueError("--teacher-url: expected --teacher-model NAME as well")
        return http_teacher(
            questions, out, teacher_url, teacher_model, api_key=teacher_key,
            max_tokens=max_tokens, workers=workers, timeout_s=timeout_s, **sampling, **common,
        )  # fmt: skip
    return local_teacher(
        questions, out, local, max_new_tokens=max_tokens, seed=seed, dtype=dtype, **sampling,
        **common,
    )  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SIKeD's teacher stage on GSM8K questions.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--gold", action="store_true", help="gold solutions from GSM8K rationales")
    which.add_argument("--teacher-url", help="OpenAI-compatible server, e.g. http://HOST:PORT/v1")
    which.add_argument("--local", help="a local model: alias, HF repo id or folder")
    parser.add_argument("--teacher-model", help="model name on the server (with --teacher-url)")
    parser.add_argument("--teacher-key", help="API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--out", required=True, help="output JSONL (resumed from <out>.partial)")
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
    parser.add_argument(
        "--dtype",
        default=None,
        help="local teacher weights (default: bfloat16 on cuda, else float32)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    try:
        main(
            args.out, gold=args.gold, teacher_url=args.teacher_url,
            teacher_model=args.teacher_model, teacher_key=args.teacher_key, local=args.local,
            split=args.split, limit=args.limit, strategies_=tuple(args.strategies), n=args.n,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
            workers=args.workers, timeout_s=args.timeout, rel_tol=args.rel_tol, data=args.data,
            seed=args.seed, dtype=args.dtype, progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, TeacherError) as e:
        sys.exit(f"teacher.py: {e}")
