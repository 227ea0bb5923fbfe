"""Where generate(compile=True) leaves eager greedy decoding, is it at a near-tie? (a GPU machine)

    SIKED_DATA=.gpu/data python tests/bench/compile_check.py --model .gpu/model   (gpu_check.sh)

bf16 kernels differ between the compiled and the eager decode step, so greedy rows may part where
the top two logits are within bf16 rounding; a wrong cache, mask or position would instead part
them where one token clearly leads. For each row that parts, the eager model reruns the row's
eager prefix without a cache and prints the eager-minus-compiled logit gap at that step, next to a
typical top-1 minus top-2 gap. Seeded random weights of --model's config (bench_sample.random_init).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).parent)]
import bench_sample  # noqa: E402

import sample  # noqa: E402
from model import Tokenizer, Transformer  # noqa: E402


@torch.no_grad()
def main(model: str, rows: int, new_tokens: int) -> None:
    folder = bench_sample.random_init(model, Path(tempfile.mkdtemp()) / "random")
    tok = Tokenizer.from_pretrained(folder)
    net = Transformer.from_pretrained(folder, "cuda", torch.bfloat16).eval()
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in bench_sample.questions(rows)]
    kw = dict(max_new_tokens=new_tokens, batch_size=rows, progress=False)
    no_stop = bench_sample._NoStop(tok)
    eager = sample.generate(net, no_stop, prompts, **kw)
    compiled = sample.generate(net, no_stop, prompts, compile=True, **kw)
    parted, top_gaps = [], []
    for prompt, e, c in zip(prompts, eager, compiled, strict=True):
        e, c = e[0].token_ids, c[0].token_ids
        prompt_ids = tok.encode(prompt, bos=tok.add_bos)
        logits = net(torch.tensor([prompt_ids], device="cuda"))[0, -1]
        top_gaps.append((logits.topk(2).values @ torch.tensor([1.0, -1.0], device="cuda")).item())
        step = next((i for i, (x, y) in enumerate(zip(e, c, strict=False)) if x != y), None)
        if step is None:
            continue
        logits = net(torch.tensor([prompt_ids + e[:step]], device="cuda"))[0, -1]
        parted.append((step, round((logits[e[step]] - logits[c[step]]).item(), 4)))
    print(f"rows whose tokens equal eager's: {rows - len(parted)} of {rows}")
    print(f"rows that part (step, eager-minus-compiled logit there): {parted}")
    print(f"largest gap where rows part: {max((g for _, g in parted), default=0.0):.4f}")
    top_gaps.sort()
    print(f"top-1 minus top-2 logit after each prompt, median: {top_gaps[rows // 2]:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile=True vs eager greedy, on CUDA")
    parser.add_argument("--model", required=True, help="folder with config and tokenizer files")
    parser.add_argument("--rows", type=int, default=64, help="prompts, decoded in one batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compile_check.py: needs a CUDA device (generate's compile=True is for CUDA)")
    main(args.model, args.rows, args.new_tokens)
