"""Benchmark sample.generate against transformers' generate and vLLM's CPU build (not a unit test).

    python tests/bench/bench_sample.py [--model DIR] [--quick] [--new-tokens 128] [--threads 1]
        [--cases greedy,siked,vllm] [--reps 3]
    python tests/bench/bench_sample.py --device cuda --random-init [--cases greedy,compile,siked]

Same model (default: the SmolLM2-135M-Instruct fixture), same prompt token ids (GSM8K test questions
in the chat template), same batch size, greedy, a fixed number of new tokens (eos ignored on every
side: ours through a tokenizer without stop ids, transformers through min_new_tokens, vLLM through
ignore_eos), at batch 1, 16 and 64 in fp32 and bf16; then the SIKeD shape in bf16 (8 questions x 3
strategy tags x n=10 in strategies.py's student prompt, T=0.7, top-p 0.95, eos and stop strings on,
the same max new tokens) against transformers with num_return_sequences=10, 60 rows a call (2
questions x 3 tags) as our batch_size=60, counting each row's tokens up to its eos; then vLLM (its
own venv, $SIKED_VLLM_VENV, default ~/.cache/siked-vllm-venv) at 16 and 64 prompts in bf16, when
that venv exists (its ratio reuses our bf16 figure from the same run).

Each measurement runs in a fresh subprocess: tokens/s counts generated tokens over the wall time of
the generate call (prefill included, after one short warm-up call), and peak memory is the process's
VmHWM (peak resident set, /proc/self/status) during that call, reset after loading the model by
writing 5 to /proc/self/clear_refs, so it counts weights + cache + activations but not the load.
Each case runs ours and the peer alternately, --reps times, and prints the medians: tokens/s of
each side, and the ratios of each back-to-back pair (on a shared 2-core VM one measurement moves by
10-30%, and a pair shares most of what moved it). Run on an idle machine where possible.

--device cuda (a GPU machine; issue 5): bf16 only, batches 16, 64 and 256, peak memory from
torch.cuda.max_memory_allocated; the "compile" case pits generate(compile=True) against our eager
decode (the warm-up is then the same call, so compilation is not timed; its time is printed) and
counts the rows whose greedy tokens match. --random-init replaces the weights by seeded random
ones of the model's config (same speed; what travels to a GPU machine is the config and
tokenizer, not the 257 MB of weights); greedy rows then still decode a fixed number of tokens.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DATA = Path(os.environ.get("SIKED_DATA", ROOT.parent / "shared" / "data"))
VLLM_VENV = Path(os.environ.get("SIKED_VLLM_VENV", Path.home() / ".cache" / "siked-vllm-venv"))


def questions(k: int) -> list[str]:
    with open(DATA / "gsm8k" / "test.jsonl") as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(k), strict=False)]


def peak_reset(device: str = "cpu") -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib(device: str = "cpu") -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def random_init(folder: str, out: Path) -> str:
    """A copy of folder's config and tokenizer files with seeded random weights (transformers)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(folder).iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return str(out)


class _NoStop:
    """The model's tokenizer with no stop ids: every row decodes exactly max_new_tokens."""

    def __init__(self, tok):
        self.tok, self.stop_ids, self.add_bos = tok, set(), tok.add_bos

    def encode(self, text, bos=False):
        return self.tok.encode(text, bos=bos)

    def decode(self, ids):
        return self.tok.decode(ids)


# ----------------------------------------------------------------------------- workers


def work_ours(a: dict) -> dict:
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])

    import sample
    from model import Tokenizer, Transformer

    device = a.get("device", "cpu")
    tok = Tokenizer.from_pretrained(a["model"])
    net = Transformer.from_pretrained(a["model"], device, getattr(torch, a["dtype"])).eval()
    if a["kind"] == "greedy":
        gen_tok = _NoStop(tok)
        prompts = [tok.chat([{"role": "user", "content": q}]) for q in a["questions"]]
        kw = dict(n=1, temperature=0.0, batch_size=len(prompts))
    else:
        import strategies as S

        gen_tok = tok
        tags = [(S.forced_tag(s), a["n"]) for s in ("cot", "l2m", "pot")]
        prompts = [sample.SharedPrompt(S.student_prompt(q), tags) for q in a["questions"]]
        kw = dict(temperature=0.7, top_p=0.95, stop=S.STOP, seed=0, batch_size=a["batch_size"])
    kw.update(compile=a.get("compile", False), progress=False)
    t0 = time.perf_counter()
    if kw["compile"]:  # the same shapes as the timed call: compiled once, here
        sample.generate(net, gen_tok, prompts, max_new_tokens=a["new"], **kw)
    else:
        sample.generate(net, gen_tok, prompts[:1], max_new_tokens=4, **kw)
    warmup_s = time.perf_counter() - t0
    peak_reset(device)
    t0 = time.perf_counter()
    out = sample.generate(net, gen_tok, prompts, max_new_tokens=a["new"], **kw)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(c.token_ids) for cs in out for c in cs)
    ids = [c.token_ids for cs in out for c in cs]
    return {"tok_s": n_tokens / dt, "tokens": n_tokens, "s": dt, "peak_mib": peak_mib(device),
            "warmup_s": warmup_s, "ids": ids}  # fmt: skip


def work_hf(a: dict) -> dict:
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    from transformers import AutoModelForCausalLM

    from model import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(a["model"])
    dtype, device = getattr(torch, a["dtype"]), a.get("device", "cpu")
    net = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype).to(device).eval()
    if a["kind"] == "greedy":
        texts = [tok.chat([{"role": "user", "content": q}]) for q in a["questions"]]
        calls = [[tok.encode(t, bos=tok.add_bos) for t in texts]]
        kw = dict(do_sample=False, min_new_tokens=a["new"], num_return_sequences=1)
    else:
        import strategies as S

        per_call = max(1, a["batch_size"] // (3 * a["n"]))  # questions per call: same rows as ours
        calls = []
        for i in range(0, len(a["questions"]), per_call):
            qs = a["questions"][i : i + per_call]
            texts = [
                S.student_prompt(q) + S.forced_tag(s) for q in qs for s in ("cot", "l2m", "pot")
            ]
            calls.append([tok.encode(t, bos=tok.add_bos) for t in texts])
        kw = dict(
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            top_k=0,
            num_return_sequences=a["n"],
            eos_token_id=sorted(tok.stop_ids),
            stop_strings=list(S.STOP),
            tokenizer=_hf_tok(a),
        )
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id

    def run(call: list[list[int]], new: int) -> int:
        T = max(len(p) for p in call)
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in call], device=device)  # left padding
        attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in call], device=device)
        with torch.inference_mode():
            out = net.generate(ids, attention_mask=attn, max_new_tokens=new, pad_token_id=pad, **kw)
        gen = out[:, T:].cpu()
        if a["kind"] == "greedy":
            return gen.numel()
        # generated tokens up to and including the first stop id (the rest is padding)
        stop = torch.isin(gen, torch.tensor(sorted(tok.stop_ids)))
        first = torch.where(
            stop.any(1),
            stop.float().argmax(1) + 1,
            torch.full_like(stop[:, 0], gen.shape[1], dtype=torch.long),
        )
        return int(first.sum())

    run([calls[0][0]], 4)  # warm-up
    peak_reset(device)
    t0 = time.perf_counter()
    n_tokens = sum(run(c, a["new"]) for c in calls)
    dt = time.perf_counter() - t0
    return {"tok_s": n_tokens / dt, "tokens": n_tokens, "s": dt, "peak_mib": peak_mib(device)}


def _hf_tok(a: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(a["model"])


VLLM_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=args["model"], dtype=args["dtype"], enforce_eager=True, max_model_len=2048,
          hf_overrides={"architectures": ["LlamaForCausalLM"]})
prompts = [{"prompt_token_ids": p} for p in args["prompts"]]
params = SamplingParams(temperature=0.0, max_tokens=args["new"], ignore_eos=True)
llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t0
n = sum(len(o.outputs[0].token_ids) for o in out)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps({"tok_s": n / dt, "tokens": n, "s": dt, "peak_mib": peak}))
"""


def run_vllm(a: dict) -> dict | None:
    from model import Tokenizer

    tok = Tokenizer.from_pretrained(a["model"])
    prompts = [
        tok.encode(tok.chat([{"role": "user", "content": q}]), bos=tok.add_bos)
        for q in a["questions"]
    ]
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND="0" if a["threads"] == 1 else "0-1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        VLLM_LOGGING_LEVEL="WARNING",
    )
    arg = json.dumps(
        {"model": a["model"], "dtype": a["dtype"], "prompts": prompts, "new": a["new"]}
    )
    proc = subprocess.run(
        [str(VLLM_VENV / "bin" / "python"), "-c", VLLM_SCRIPT, arg],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"  vLLM failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return None


def measure(a: dict) -> dict:
    """Run one measurement in a fresh interpreter, so peak memory is this one's alone."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(a)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {a['who']} failed: {proc.stderr.strip()[-2000:]}")


def measure_hf(a: dict) -> dict:
    return measure(dict(a, who="hf"))


def measure_compiled(a: dict) -> dict:
    return measure(dict(a, who="ours", compile=True))


# ----------------------------------------------------------------------------- main


def main(
    model: str,
    quick: bool = False,
    new_tokens: int = 128,
    threads: int = 0,
    cases: tuple[str, ...] = ("greedy", "siked", "vllm"),
    reps: int = 3,
    device: str = "cpu",
) -> list[dict]:
    new = 32 if quick else new_tokens
    if device == "cuda":
        batches, dtypes = (16, 64, 256), ("bfloat16",)
    else:
        batches, dtypes = (1, 16) if quick else (1, 16, 64), ("float32", "bfloat16")
    rows = []

    def pairs(a: dict, peer, earlier: list[dict] = ()) -> list[tuple[dict, dict]]:
        """reps back-to-back (ours, peer(a)) runs, ours taken from `earlier` while it lasts; a
        failed peer run (None) is dropped."""
        out = []
        for i in range(reps):
            ours = earlier[i] if i < len(earlier) else measure(dict(a, who="ours"))
            out.append((ours, peer(a)))
        return [(o, p) for o, p in out if p is not None]

    def line(name: str, measured: list[tuple[dict, dict]], peer_name: str) -> None:
        if not measured:
            return
        median = statistics.median
        ours = {k: median(o[k] for o, _ in measured) for k in ("tok_s", "peak_mib")}
        peer = {k: median(p[k] for _, p in measured) for k in ("tok_s", "peak_mib")}
        spread = [round(o["tok_s"] / p["tok_s"], 2) for o, p in measured]
        ratio = median(o["tok_s"] / p["tok_s"] for o, p in measured)
        mem = median(o["peak_mib"] / p["peak_mib"] for o, p in measured)
        print(
            f"{name:<28} ours {ours['tok_s']:7.1f} tok/s {ours['peak_mib']:7.0f} MiB | "
            f"{peer_name} {peer['tok_s']:7.1f} tok/s {peer['peak_mib']:7.0f} MiB | "
            f"speed x{ratio:.2f} {spread}  memory x{mem:.2f}",
            flush=True,
        )
        rows.append(
            {
                "case": name,
                "peer": peer_name,
                "ours": ours,
                "theirs": peer,
                "speed_ratio": ratio,
                "memory_ratio": mem,
                "pairs": measured,
            }
        )

    print(
        f"model {model}; {new} new tokens; {os.cpu_count()} CPUs; threads {threads or 'default'}; "
        f"medians of {reps} alternating runs; device {device}"
    )
    ours_bf16 = {}
    for dtype in dtypes if "greedy" in cases else ():
        for b in batches:
            a = {
                "model": model,
                "dtype": dtype,
                "kind": "greedy",
                "questions": questions(b),
                "new": new,
                "threads": threads,
                "device": device,
            }
            measured = pairs(a, measure_hf)
            line(f"greedy {dtype} batch {b}", measured, "transformers")
            if dtype == "bfloat16":
                ours_bf16[b] = [o for o, _ in measured]

    for b in (batches if device == "cuda" else batches[1:]) if "compile" in cases else ():
        a = {"model": model, "dtype": "bfloat16", "kind": "greedy", "questions": questions(b),
             "new": new, "threads": threads, "device": device}  # fmt: skip
        measured = [(c, e) for e, c in pairs(a, measure_compiled, ours_bf16.get(b, []))]
        line(f"compile bfloat16 batch {b}", measured, "our eager")
        same = [sum(x == y for x, y in zip(c["ids"], e["ids"], strict=True)) for c, e in measured]
        warmup = [round(c["warmup_s"], 1) for c, _ in measured]
        print(f"  rows whose tokens equal eager's: {same} of {b}; compile warm-up s: {warmup}")

    if "siked" in cases:
        n_q, n = (2, 10) if quick else (8, 10)
        a = {
            "model": model,
            "dtype": "bfloat16",
            "kind": "siked",
            "questions": questions(n_q),
            "n": n,
            "new": new,
            "batch_size": 60,
            "threads": threads,
            "device": device,
        }
        measured = pairs(a, measure_hf)
        line(f"SIKeD {n_q}q x 3 tags x n={n} bf16", measured, "transformers")

    if "vllm" not in cases or device != "cpu":
        return rows
    if not (VLLM_VENV / "bin" / "python").exists():
        print(f"vLLM: no venv at {VLLM_VENV}; skipped")
        return rows
    for b in batches[1:]:
        a = {"model": model, "dtype": "bfloat16", "kind": "greedy", "questions": questions(b),
             "new": new, "threads": threads}  # fmt: skip
        measured = pairs(a, run_vllm, ours_bf16.get(b, []))  # ours: the greedy runs' figures
        line(f"greedy bfloat16 batch {b}", measured, "vLLM")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="sample.generate vs transformers and vLLM")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the fixture)")
    parser.add_argument(
        "--quick", action="store_true", help="32 new tokens, batch 1 and 16, 2 questions"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per greedy row")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads on every side (0 = torch's default)"
    )
    parser.add_argument(
        "--cases", default="greedy,siked,vllm", help="comma-separated: greedy,compile,siked,vllm"
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="alternating (ours, peer) runs per case; medians"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--random-init", action="store_true", help="seeded random weights of --model's config"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        a = json.loads(args.worker)
        print("RESULT " + json.dumps({"ours": work_ours, "hf": work_hf}[a["who"]](a)), flush=True)
    elif args.reps < 1:
        parser.error(f"--reps {args.reps}; expected >= 1")
    else:
        import build_fixture

        folder = args.model or str(build_fixture.build(build_fixture.default_dir()))
        if args.random_init:
            import tempfile

            folder = random_init(folder, Path(tempfile.mkdtemp()) / "random")
        cases = tuple(args.cases.split(","))
        main(folder, args.quick, args.new_tokens, args.threads, cases, args.reps, args.device)
