"""The four datasets of SIKeD, normalised to one JSONL per split.

    python data/prepare.py --from ../shared/data   # a local folder laid out like ../shared/data
    python data/prepare.py                         # download the canonical URLs (sha256-checked)

siked.py calls `prepare.load("gsm8k", "train")`, which prepares the dataset on first use. Source:
`--from DIR`, else $SIKED_DATA, else the URLs in FILES (into <out>/raw/), each file sha256-checked
(../shared/data/README.md). Output: data/<name>/<split>.jsonl, rows {"id": "<name>-<ID>",
"question", "answer": float, "rationale"?, "socratic"?, "equation"?}. Per dataset (SPEC.md
section 3; [R] = the authors' code, inference_all_chk_all_data.py):
- gsm8k, ids "gsm8k-<split>-<row>": answer = the number after `####`, rationale = the text before
  it. A `<split>_socratic.jsonl` gives "socratic" (the gold L2M teacher's input); train_socratic is
  not in ../shared/data (said once) and has no published sha256: it is checked row by row against
  train.jsonl instead.
- svamp: question = Body + " " + Question, trimmed, exactly as [R] joins them.
- asdiv: question as svamp; the answer without its unit ("9 (apples)" -> 9.0), maybe a fraction
  ("-(1/3)"). A non-numeric answer takes the result after Formula's last `=` only where it equals
  the one number in the answer ("6th", "February 3rd"); [R] always does, turning "They are equal"
  into 0.833. The rest (names, yes/no, "2:3", "9; 11") is skipped and counted: 2096 of 2305 kept.
- multiarith, ids "multiarith-<iIndex>": sQuestion, lSolutions[0]. All 600 rows: the paper's
  180-question split (HF ChilleD/MultiArith) is not reproducible here.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent  # data/<name>/<split>.jsonl; raw downloads in data/raw/
Where = str | Path | None  # a folder argument; None: the default


@dataclass(frozen=True)
class Remote:
    url: str
    sha256: str | None  # None: no published checksum (checked by content instead)
    optional: bool = False


_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
FILES: dict[str, Remote] = {
    "gsm8k/train.jsonl": Remote(
        _GSM8K + "train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    ),
    "gsm8k/test.jsonl": Remote(
        _GSM8K + "test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
    ),
    "gsm8k/train_socratic.jsonl": Remote(_GSM8K + "train_socratic.jsonl", None, optional=True),
    "gsm8k/test_socratic.jsonl": Remote(
        _GSM8K + "test_socratic.jsonl",
        "c96673362fa7a699f4836a9b6474a067448f95fe58064727501ee63ba4c3fdb6",
        optional=True,
    ),
    "svamp/SVAMP.json": Remote(
        "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/SVAMP.json",
        "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e",
    ),
    "asdiv/ASDiv.xml": Remote(
        "https://raw.githubusercontent.com/chaochun/nlu-asdiv-dataset/master/dataset/ASDiv.xml",
        "ef8904068482919ac48c8eeaaf6df344b8a308ba66d048c2d4d87eab82dc4929",
    ),
    "multiarith/MultiArith.json": Remote(
        "https://raw.githubusercontent.com/kojima-tk/zero_shot_cot/main/dataset/MultiArith/MultiArith.json",
        "394590692df77f8fbbfeb11aaa66b206bb70fb30a219a001dcf4032cb7a6d9aa",
    ),
}
SPLITS = dict(gsm8k=("train", "test"), svamp=("test",), asdiv=("test",), multiarith=("test",))

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\(?(\d+)/(\d+)\)?")  # 5/2, -(1/3)
_ASDIV_ANSWER = re.compile(r"(?P<value>-\(\d+/\d+\)|[^()]+?)\s*(?:\((?P<unit>[^()]*)\))?")
_PARENS = re.compile(r"\s*\([^()]*\)")
_noted: set[str] = set()  # messages already printed by note()


def note(message: str) -> None:
    """Print a message once per process (a missing optional file is mentioned once)."""
    if message not in _noted:
        _noted.add(message)
        print(message, flush=True)


def parse_number(text: str) -> float | None:
    """'1,080' -> 1080.0, '$5' -> 5.0, '-7' -> -7.0, '0.46', '5/2' -> 2.5, '-(1/3)' -> -1/3."""
    s = text.replace(",", "").replace("$", "").strip()
    if _NUMBER.fullmatch(s):
        return float(s)
    m = _FRACTION.fullmatch(s)
    if m and int(m.group(3)) != 0:
        sign = -1.0 if m.group(1) else 1.0
        return sign * int(m.group(2)) / int(m.group(3))
    return None


# ---------------------------------------------------------------------------------------- raw files
def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # the largest raw file is 4 MB


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w"):
    """A file beside path, fsynced and renamed over it when the block ends; removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> None:
    """Stream url into dest through atomic_open, with a progress bar; a short or wrong file (sha256)
    is a ValueError and never lands at dest."""
    digest = hashlib.sha256()
    with atomic_open(dest, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm.wrapattr(
            f, "write", total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as out:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
        # a server that closed early: not an error to urllib
        if total is not None and (size := f.tell()) != total:
            raise ValueError(f"{url}: download cut short ({size} of {total} bytes); run again")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256} "
                "(a different or damaged file, or a proxy's page)"
            )


def fetch(
    rel: str, source: Where = None, raw_dir: Where = None, progress: bool = True
) -> Path | None:
    """The checked local path of a raw file (rel as in FILES), from the folder `source`, else
    $SIKED_DATA, else downloaded into raw_dir; None for a missing optional file."""
    remote = FILES[rel]
    source = source or os.environ.get("SIKED_DATA")
    path = Path(source).expanduser() / rel if source else Path(raw_dir or DATA_DIR / "raw") / rel
    if source and not path.is_file():
        if remote.optional:
            note(f"prepare: {path} is missing: carrying on without it")
            return None
        raise ValueError(f"{path}: missing (expected {rel}, as listed in data/prepare.py FILES)")
    if not path.is_file():
        try:
            download(remote.url, path, remote.sha256, progress=progress)
        except (OSError, HTTPException) as e:  # URLError, HTTPError, a timeout, a cut transfer
            reason = str(getattr(e, "reason", None) or e)
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {reason}"
            if remote.optional:
                note(f"prepare: {rel} is not available ({reason}): carrying on without it")
                return None
            raise ValueError(
                f"{remote.url}: cannot download ({reason}); pass --from DIR or set SIKED_DATA "
                "to a local copy"
            ) from None
    if remote.sha256 is not None and (got := sha256_file(path)) != remote.sha256:
        raise ValueError(
            f"{path}: sha256 {got} does not match the expected {remote.sha256} for {rel} "
            "(a corrupted or different copy; remove it to fetch it again)"
        )
    return path


# ----------------------------------------------------------------------------------------- parsers
def _json_items(path: Path) -> list[tuple[int, object]]:
    """The items of a JSON list file with the line each starts on (for one-line errors)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}:1: expected a JSON list of problems, got {type(data).__name__}")
    decoder, skip, items = json.JSONDecoder(), re.compile(r"[\s,]*"), []
    pos, line, counted = text.index("[") + 1, 1, 0
    for item in data:
        pos = skip.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        items.append((line, item))
        pos = decoder.raw_decode(text, pos)[1]
    return items


def _fields(path: Path, line: int, item: object, **kinds: type | tuple) -> list:
    """item[key] for each key=type, in order; a one-line error naming file and line if one lacks."""
    for key, kind in kinds.items():
        if not isinstance(item, dict) or not isinstance(item.get(key), kind):
            raise ValueError(
                f"{path}:{line}: expected a problem with a {key!r} field, got {item!r:.80}"
            )
    return [item[key] for key in kinds]


def parse_gsm8k_file(path: Path) -> list[tuple[str, str, float]]:
    """(question, rationale, answer) per line of a GSM8K JSONL file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            question, solution = _fields(path, lineno, item, question=str, answer=str)
            rationale, sep, final = solution.rpartition("####")
            answer = parse_number(final) if sep else None
            if answer is None:
                raise ValueError(f"{path}:{lineno}: expected an answer ending in '#### <number>'")
            out.append((question.strip(), rationale.strip(), answer))
    return out


def parse_gsm8k(path: Path, split: str, socratic_path: Path | None = None) -> list[dict]:
    rows = [
        {"id": f"gsm8k-{split}-{i}", "question": q, "answer": a, "rationale": r}
        for i, (q, r, a) in enumerate(parse_gsm8k_file(path))
    ]
    if socratic_path is not None:
        socratic = parse_gsm8k_file(socratic_path)
        if len(socratic) != len(rows):
            raise ValueError(f"{socratic_path}: {len(socratic)} rows, expected {len(rows)}")
        for i, (row, (q, r, a)) in enumerate(zip(rows, socratic, strict=True)):
            if q != row["question"] or a != row["answer"]:
                raise ValueError(f"{socratic_path}:{i + 1}: question or answer differs from {path}")
            row["socratic"] = r
    return rows


def parse_svamp(path: Path) -> list[dict]:
    rows = []
    for line, item in _json_items(path):
        answer, pid, body, question, equation = _fields(
            path, line, item, Answer=(int, float), ID=str, Body=str, Question=str, Equation=str
        )
        rows.append(
            dict(id=f"svamp-{pid}", question=f"{body.strip()} {question.strip()}",
                 answer=float(answer), equation=equation.strip())
        )  # fmt: skip
    return rows


def parse_multiarith(path: Path) -> list[dict]:
    rows = []
    for line, item in _json_items(path):
        solutions, equations, index, question = _fields(
            path, line, item, lSolutions=list, lEquations=list, iIndex=int, sQuestion=str
        )
        if not solutions or not isinstance(solutions[0], (int, float)):
            raise ValueError(f"{path}:{line}: expected a number in lSolutions, got {solutions!r}")
        rows.append(
            dict(id=f"multiarith-{index}", question=question.strip(), answer=float(solutions[0]),
                 equation=str(equations[0]).strip() if equations else "")
        )  # fmt: skip
    return rows


def asdiv_answer(answer: str, formula: str) -> tuple[float | None, str]:
    """The numeric answer of an ASDiv problem and how it was found ("answer", "formula", "skip")."""
    m = _ASDIV_ANSWER.fullmatch(answer.strip())
    value = parse_number(m.group("value")) if m else None
    if value is not None:
        return value, "answer"
    # Not a number: take Formula's final result only if it is the one number the answer states.
    stated = _NUMBER.findall(_PARENS.sub("", answer))
    result = parse_number(_PARENS.sub("", formula.rsplit("=", 1)[-1]))
    if len(stated) == 1 and result is not None and float(stated[0]) == result:
        return result, "formula"
    return None, "skip"


def parse_asdiv(path: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, skipped) where skipped lists (ID, answer text) of the non-numeric answers."""
    text = path.read_text(encoding="utf-8")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"{path}:{e.position[0]}: not valid XML ({e})") from None
    rows, skipped, from_formula = [], [], 0
    for problem in root.iter("Problem"):
        pid = problem.get("ID", "")
        fields = {k: problem.findtext(k) for k in ("Body", "Question", "Answer", "Formula")}
        missing = [k for k, v in fields.items() if v is None]
        if not pid or missing:  # ElementTree keeps no line numbers: find the Problem by its ID
            at = re.search(rf'<Problem\b[^>]*\bID="{re.escape(pid)}"', text)
            line = text.count("\n", 0, at.start()) + 1 if at else "?"
            raise ValueError(f"{path}:{line}: Problem {pid!r} lacks {missing or 'ID'}")
        answer, how = asdiv_answer(fields["Answer"], fields["Formula"])
        if answer is None:
            skipped.append((pid, fields["Answer"].strip()))
            continue
        from_formula += how == "formula"
        question = f"{fields['Body'].strip()} {fields['Question'].strip()}"
        rows.append(
            dict(id=f"asdiv-{pid}", question=question, answer=answer,
                 equation=fields["Formula"].strip())
        )  # fmt: skip
    examples = ", ".join(f"{pid} {a!r}" for pid, a in skipped[:3])
    print(
        f"asdiv: {len(rows) + len(skipped)} problems, {len(rows)} with a numeric answer kept "
        f"({from_formula} of them from Formula), {len(skipped)} non-numeric skipped "
        f"(e.g. {examples})",
        flush=True,
    )
    return rows, skipped


# ------------------------------------------------------------------------------------ prepare/load
def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_name(name: str, split: str | None = None) -> None:
    if name not in SPLITS:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(SPLITS)}")
    if split is not None and split not in SPLITS[name]:
        raise ValueError(f"split {split!r} of {name}: expected one of {', '.join(SPLITS[name])}")


def prepare(
    name: str, *, source: Where = None, out_dir: Where = None, raw_dir: Where = None,
    progress: bool = True,
) -> dict[str, int]:  # fmt: skip
    """Write data/<name>/<split>.jsonl for every split of one dataset; returns rows per split."""
    _check_name(name)
    out = Path(out_dir) if out_dir is not None else DATA_DIR
    raw_dir = raw_dir or out / "raw"  # downloads go beside the output
    get = lambda rel: fetch(rel, source=source, raw_dir=raw_dir, progress=progress)
    if name == "gsm8k":
        splits = {
            s: parse_gsm8k(get(f"gsm8k/{s}.jsonl"), s, get(f"gsm8k/{s}_socratic.jsonl"))
            for s in SPLITS[name]
        }
    elif name == "svamp":
        splits = {"test": parse_svamp(get("svamp/SVAMP.json"))}
    elif name == "asdiv":
        splits = {"test": parse_asdiv(get("asdiv/ASDiv.xml"))[0]}
    else:
        splits = {"test": parse_multiarith(get("multiarith/MultiArith.json"))}
    for split, rows in splits.items():
        write_jsonl(out / name / f"{split}.jsonl", rows)
    return {split: len(rows) for split, rows in splits.items()}


def load(
    name: str, split: str, *, source: Where = None, out_dir: Where = None, progress: bool = True
) -> list[dict]:
    """The normalised rows of one split, preparing the dataset first if its file is not there."""
    _check_name(name, split)
    path = (Path(out_dir) if out_dir is not None else DATA_DIR) / name / f"{split}.jsonl"
    if not path.is_file():
        prepare(name, source=source, out_dir=out_dir, progress=progress)
    # a damaged or hand-edited file: one line here, not a KeyError in a caller
    again = "remove it to prepare it again"
    try:
        rows = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); {again}") from None
    if not rows:
        raise ValueError(f"{path}: no rows; {again}")
    kinds = dict(id=str, question=str, answer=(int, float))
    for line, row in enumerate(rows, 1):
        _fields(path, line, row, **kinds, **({"rationale": str} if name == "gsm8k" else {}))
    return rows


def main(
    source: Where = None, out_dir: Where = None, names: tuple = tuple(SPLITS), progress: bool = True
) -> dict[str, dict[str, int]]:
    counts = {}
    for name in names:
        counts[name] = prepare(name, source=source, out_dir=out_dir, progress=progress)
        print(f"{name}: " + ", ".join(f"{s} {n}" for s, n in counts[name].items()), flush=True)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepare SIKeD's four datasets as JSONL splits.")
    parser.error = lambda m: parser.exit(2, f"{parser.prog}: {m} (see --help)\n")  # no usage block
    parser.add_argument(
        "--from", dest="source",
        help="local folder laid out like ../shared/data (default: $SIKED_DATA, else download)",
    )  # fmt: skip
    parser.add_argument("--out", help="output root (default: data/ beside this file)")
    parser.add_argument(
        "--only", nargs="+", choices=list(SPLITS), default=list(SPLITS), help="datasets to prepare"
    )
    parser.add_argument("--quiet", action="store_true", help="no download progress bars")
    args = parser.parse_args()
    try:
        main(args.source, args.out, tuple(args.only), progress=not args.quiet)
    except (ValueError, OSError) as e:  # OSError: e.g. an unwritable --out
        sys.exit(f"prepare.py: {e}")
