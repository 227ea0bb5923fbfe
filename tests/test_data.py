"""data/prepare.py on the real datasets: counts, hand-checked answers, checksums, download path.

Oracles: the row counts of ../shared/data/README.md and answers read off the raw files by hand
(GSM8K train line 346 ends "#### 1,080"; ASDiv nluds-0176 answers "0.46 (dollars)", etc.).
"""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data import prepare

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SIKED_DATA") or ROOT.parent / "shared" / "data")
ASDIV_NUMERIC = 2096  # of 2305: 2084 plain numbers + 9 fractions + 3 from Formula; 209 skipped


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare.main(source=str(SHARED), out_dir=str(out), progress=False)
    return out


def rows_by_id(out: Path, name: str, split: str) -> dict[str, dict]:
    rows = prepare.load(name, split, out_dir=out)
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), f"duplicate ids in {name}/{split}"
    return by_id


def test_row_counts(prepared):
    counts = {
        (name, split): len(prepare.read_jsonl(prepared / name / f"{split}.jsonl"))
        for name, splits in prepare.SPLITS.items()
        for split in splits
    }
    assert counts == {
        ("gsm8k", "train"): 7473,
        ("gsm8k", "test"): 1319,
        ("svamp", "test"): 1000,
        ("asdiv", "test"): ASDIV_NUMERIC,
        ("multiarith", "test"): 600,
    }


def test_asdiv_summary_line(capsys):
    rows, skipped = prepare.parse_asdiv(SHARED / "asdiv" / "ASDiv.xml")
    assert (len(rows), len(skipped)) == (ASDIV_NUMERIC, 209)
    line = capsys.readouterr().out
    assert "2305 problems, 2096 with a numeric answer kept (3 of them from Formula)" in line
    assert "209 non-numeric skipped" in line


def test_gsm8k_answers(prepared):
    train = rows_by_id(prepared, "gsm8k", "train")
    first = train["gsm8k-train-0"]
    assert first["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first["answer"] == 72.0
    assert first["rationale"].startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    assert "####" not in first["rationale"] and "socratic" not in first  # train_socratic missing
    assert train["gsm8k-train-345"]["answer"] == 1080.0  # "#### 1,080"
    assert train["gsm8k-train-644"]["answer"] == 109200000.0  # "#### 109,200,000"
    assert train["gsm8k-train-5715"]["answer"] == -7.0  # "#### -7"
    test = rows_by_id(prepared, "gsm8k", "test")
    assert test["gsm8k-test-489"]["answer"] == -10.0
    assert test["gsm8k-test-611"]["answer"] == 1450000.0  # "#### 1,450,000"
    # test_socratic.jsonl is in ../shared/data: its sub-question rationale rides along.
    assert test["gsm8k-test-0"]["socratic"].startswith("How many eggs does Janet sell? ** Janet")
    assert test["gsm8k-test-0"]["answer"] == 18.0


def test_svamp_answers(prepared):
    svamp = rows_by_id(prepared, "svamp", "test")
    assert svamp["svamp-chal-1"] == {
        "id": "svamp-chal-1",
        "question": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
        "each pack How much do you have to pay to buy each pack?",
        "answer": 51.0,
        "equation": "( 76.0 - 25.0 )",
    }
    # The largest answer; SVAMP has no decimal or negative answers.
    assert svamp["svamp-chal-71"]["answer"] == 22090603.0
    assert all(r["answer"] == int(r["answer"]) >= 0 for r in svamp.values())


def test_asdiv_answers(prepared):
    asdiv = rows_by_id(prepared, "asdiv", "test")
    assert asdiv["asdiv-nluds-0001"]["question"] == (
        "Seven red apples and two green apples are in the basket. "
        "How many apples are in the basket?"
    )
    assert asdiv["asdiv-nluds-0001"]["answer"] == 9.0  # "9 (apples)"
    assert asdiv["asdiv-nluds-0003"]["question"].endswith("have together?")  # trailing space cut
    assert asdiv["asdiv-nluds-0176"]["answer"] == 0.46  # "0.46 (dollars)"
    assert asdiv["asdiv-nluds-1092"]["answer"] == 1102609.0  # 578,833 + 523,776
    assert asdiv["asdiv-nluds-1331"]["answer"] == -1 / 3  # "-(1/3)"
    assert asdiv["asdiv-nluds-1496"]["answer"] == 1 / 6  # "1/6"
    assert asdiv["asdiv-nluds-0189"]["answer"] == 6.0  # "6th", Formula "...; 3+3=6 (th)"
    assert asdiv["asdiv-nluds-0167"]["answer"] == 3.0  # "February 3rd", Formula "(20+14)-31=3"
    for skipped in ("nluds-0030", "nluds-0850", "nluds-1053", "nluds-1310", "nluds-1295"):
        # "Mrs. Hilt", "5:6", "They are equal", "11; 12; 13", "5 (years old); 15 (...); 20 (...)"
        assert f"asdiv-{skipped}" not in asdiv


def test_multiarith_answers(prepared):
    multiarith = rows_by_id(prepared, "multiarith", "test")
    assert list(multiarith) == [f"multiarith-{i}" for i in range(600)]
    first = multiarith["multiarith-0"]
    assert first["question"].startswith("For Halloween Debby and her sister combined the candy")
    assert first["question"].endswith("how many pieces do they have left?")  # spaces trimmed
    assert first["answer"] == 39.0
    assert multiarith["multiarith-599"]["answer"] == 2.0  # (41 - 37) / 2


@pytest.mark.parametrize(
    "text, value",
    [
        ("72", 72.0),
        ("1,080", 1080.0),
        (" $5 ", 5.0),
        ("-7", -7.0),
        ("0.46", 0.46),
        ("5/2", 2.5),
        ("-(1/3)", -1 / 3),
        ("2:3", None),
        ("Yes", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, value):
    assert prepare.parse_number(text) == value


def test_load_prepares_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("SIKED_DATA", str(SHARED))
    rows = prepare.load("multiarith", "test", out_dir=tmp_path)
    assert len(rows) == 600 and (tmp_path / "multiarith" / "test.jsonl").is_file()
    monkeypatch.setenv("SIKED_DATA", str(tmp_path / "nowhere"))  # the cached file is used as is
    assert prepare.load("multiarith", "test", out_dir=tmp_path) == rows
    with pytest.raises(ValueError, match="dataset 'mnist': expected one of gsm8k"):
        prepare.load("mnist", "test", out_dir=tmp_path)
    with pytest.raises(ValueError, match="split 'train' of svamp: expected one of test"):
        prepare.load("svamp", "train", out_dir=tmp_path)


def test_load_names_a_damaged_prepared_file(tmp_path):
    """data/<name>/<split>.jsonl edited or damaged by hand: one line naming it, not a KeyError or a
    silently empty split in teacher.py or siked.py."""
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    row = {"id": "gsm8k-train-0", "question": "q", "answer": 2.0, "rationale": "1 + 1 = 2"}
    for text, needle in [
        (json.dumps(row) + "\n{oops\n", "not valid JSON"),
        ("", "no rows"),
        (json.dumps({"id": "gsm8k-train-0"}) + "\n", "'question' field"),
        (json.dumps(dict(row, answer="two")) + "\n", "'answer' field"),
        (json.dumps({k: v for k, v in row.items() if k != "rationale"}) + "\n", "'rationale'"),
        ("[1, 2]\n", "'id' field"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            prepare.load("gsm8k", "train", out_dir=tmp_path)
        msg = str(e.value)
        assert msg.startswith(str(path)) and needle in msg and "\n" not in msg, msg
    path.write_text(json.dumps(row) + "\n")
    assert prepare.load("gsm8k", "train", out_dir=tmp_path) == [row]


def copy_source(dst: Path, rels: list[str]) -> Path:
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / rel, dst / rel)
    return dst


def test_checksum_mismatch(tmp_path):
    src = copy_source(tmp_path / "src", ["svamp/SVAMP.json"])
    path = src / "svamp" / "SVAMP.json"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        prepare.prepare("svamp", source=src, out_dir=tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: sha256 ")
    assert prepare.FILES["svamp/SVAMP.json"].sha256 in msg
    assert not (tmp_path / "out" / "svamp").exists()


def test_missing_file(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match=r"src/asdiv/ASDiv\.xml: missing \(expected asdiv/"):
        prepare.prepare("asdiv", source=tmp_path / "src", out_dir=tmp_path / "out")


def test_malformed_rows_name_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "so 2\n#### 2"})
    gsm = tmp_path / "train.jsonl"
    gsm.write_text(good + "\n" + good + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    with pytest.raises(
        ValueError, match=rf"^{gsm}:3: expected an answer ending in '#### <number>'$"
    ):
        prepare.parse_gsm8k(gsm, "train")
    gsm.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"^{gsm}:2: not valid JSON"):
        prepare.parse_gsm8k(gsm, "train")

    item = {"ID": "x-1", "Body": "b", "Question": "q", "Equation": "e", "Answer": 1.0}
    svamp = tmp_path / "SVAMP.json"
    broken = {k: v for k, v in item.items() if k != "Answer"}
    svamp.write_text(json.dumps([item, item, broken], indent=4))  # the third item starts on line 16
    with pytest.raises(ValueError, match=rf"^{svamp}:16: expected a problem with a 'Answer' field"):
        prepare.parse_svamp(svamp)
    multiarith = tmp_path / "MultiArith.json"
    item = {"iIndex": 0, "sQuestion": "q", "lEquations": ["x=1"], "lSolutions": [1.0]}
    multiarith.write_text(json.dumps([item, item | {"lSolutions": []}], indent=4))  # 2nd: line 12
    with pytest.raises(ValueError, match=rf"^{multiarith}:12: expected a number in lSolutions"):
        prepare.parse_multiarith(multiarith)

    xml = tmp_path / "ASDiv.xml"
    problem = (
        '<Problem ID="{}">\n<Body>b</Body>\n<Question>q</Question>\n{}<Formula>1=1</Formula>\n'
    )
    xml.write_text(
        "<Root>\n<ProblemSet>\n"
        + problem.format("p-1", "<Answer>1 (cat)</Answer>\n")
        + "</Problem>\n"
        + problem.format("p-2", "")
        + "</Problem>\n</ProblemSet>\n</Root>\n"
    )
    with pytest.raises(ValueError, match=rf"^{xml}:9: Problem 'p-2' lacks \['Answer'\]$"):
        prepare.parse_asdiv(xml)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CutHandler(http.server.BaseHTTPRequestHandler):
    """Sends 1,000 bytes of a longer file, then closes: by Content-Length or mid-chunked."""

    def do_GET(self):
        body = b"x" * 1000
        self.send_response(200)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % 5000 + body)  # a 5,000-byte chunk, 1,000 sent
        else:
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    """Serve a folder on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_path(tmp_path, monkeypatch, file_server, capsys, prepared):
    base = file_server(SHARED)
    # The same files at the same relative paths, at a local URL (train_socratic is absent: 404).
    files = {
        rel: prepare.Remote(base + rel, r.sha256, r.optional) for rel, r in prepare.FILES.items()
    }
    monkeypatch.setattr(prepare, "FILES", files)
    monkeypatch.delenv("SIKED_DATA", raising=False)
    raw, out = tmp_path / "raw", tmp_path / "out"
    counts = prepare.prepare("gsm8k", raw_dir=raw, out_dir=out, progress=False)
    assert counts == {"train": 7473, "test": 1319}
    for rel in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "gsm8k/test_socratic.jsonl"):
        assert prepare.sha256_file(raw / rel) == files[rel].sha256
    assert not (raw / "gsm8k" / "train_socratic.jsonl").exists()
    assert capsys.readouterr().out == (
        "prepare: gsm8k/train_socratic.jsonl is not available (HTTP 404 File not found): "
        "carrying on without it\n"
    )
    for split in ("train", "test"):  # the same rows as from the local folder
        rel = f"gsm8k/{split}.jsonl"
        assert prepare.read_jsonl(out / rel) == prepare.read_jsonl(prepared / rel)
    assert prepare.prepare("multiarith", raw_dir=raw, out_dir=out) == {"test": 600}
    # with no raw_dir, downloads land beside the output, not in the repo's data/raw
    assert prepare.prepare("multiarith", out_dir=tmp_path / "o2", progress=False) == {"test": 600}
    assert (tmp_path / "o2" / "raw" / "multiarith" / "MultiArith.json").is_file()

    # A server with a corrupted copy: the download is refused and nothing is left in the cache.
    bad = copy_source(tmp_path / "bad", ["svamp/SVAMP.json"])
    (bad / "svamp" / "SVAMP.json").write_text("[]")
    bad_base = file_server(bad)
    files["svamp/SVAMP.json"] = prepare.Remote(
        bad_base + "svamp/SVAMP.json", files["svamp/SVAMP.json"].sha256
    )
    with pytest.raises(ValueError, match=r"svamp/SVAMP\.json: sha256 [0-9a-f]{64} does not match"):
        prepare.prepare("svamp", raw_dir=raw, out_dir=out, progress=False)
    assert not list((raw / "svamp").glob("*"))
    # A transfer cut short, with a Content-Length or chunked: refused, nothing kept, one line.
    cut = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutHandler)
    threading.Thread(target=cut.serve_forever, daemon=True).start()
    try:
        for path, want in [
            ("/length", "download cut short [(]1000 of 5000 bytes[)]"),
            ("/chunked", "cannot download [(]IncompleteRead"),
        ]:
            url = f"http://127.0.0.1:{cut.server_address[1]}{path}"
            files["svamp/SVAMP.json"] = prepare.Remote(url, files["svamp/SVAMP.json"].sha256)
            with pytest.raises(ValueError, match=f"^{url}: {want}") as e:
                prepare.prepare("svamp", raw_dir=raw, out_dir=out, progress=False)
            assert "\n" not in str(e.value)
            assert not list((raw / "svamp").glob("*"))
    finally:
        cut.shutdown()
        cut.server_close()
    # An unreachable server: one line naming the URL.
    files["asdiv/ASDiv.xml"] = prepare.Remote("http://127.0.0.1:9/asdiv/ASDiv.xml", "0" * 64)
    with pytest.raises(
        ValueError, match=r"^http://127\.0\.0\.1:9/asdiv/ASDiv\.xml: cannot download"
    ):
        prepare.prepare("asdiv", raw_dir=raw, out_dir=out, progress=False)
    assert not list((raw / "asdiv").glob("*"))


def test_cli(tmp_path):
    script = ROOT / "data" / "prepare.py"
    cmd = [sys.executable, str(script), "--from", str(SHARED), "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--only", "svamp", "asdiv"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "svamp: test 1000" in proc.stdout and f"asdiv: test {ASDIV_NUMERIC}" in proc.stdout
    proc = subprocess.run(
        [sys.executable, str(script), "--from", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"prepare.py: {tmp_path / 'none' / 'gsm8k' / 'train.jsonl'}: missing (expected "
        "gsm8k/train.jsonl, as listed in data/prepare.py FILES)"
    ]
    blocker = tmp_path / "a_file"  # an --out under a file: one line, not a traceback
    blocker.write_text("")
    cmd = [sys.executable, str(script), "--from", str(SHARED), "--out", str(blocker / "out")]
    proc = subprocess.run(cmd + ["--only", "svamp"], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("prepare.py: [Errno 20] Not a directory")
    # siked.py's import, from the repo root.
    code = "from data import prepare; print(sorted(prepare.SPLITS))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "['asdiv', 'gsm8k', 'multiarith', 'svamp']", proc.stderr
