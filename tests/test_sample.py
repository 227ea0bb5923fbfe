"""sample.py against transformers' generate, HF's logits warpers and hand-computed distributions.

Tiny random llama models (2 layers, dim 64) saved with transformers' save_pretrained and loaded
with our Transformer.from_pretrained, with the real SmolLM2 tokenizer; one test on the real
SmolLM2-135M-Instruct weights. All fp32 on CPU.
"""

import copy
import json
import math
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import sample as sample_module
from model import Tokenizer, Transformer
from sample import (
    SharedPrompt,
    StopChecker,
    _PackedLinear,
    can_pack,
    filter_logits,
    generate,
    pack_linears,
    sample_next_token,
)

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "Hi",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "def solution():\n    answer =",
    "Question: what is 2 + 3?\nAnswer:",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_dir)


def _tiny(folder, vocab_size: int, seed: int, sharpen: float = 1.0, max_len: int = 128):
    """A tiny random HF llama, saved and loaded back with our loader: (hf model, our model)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper next-token distributions: a larger final norm scales logits
        hf.model.norm.weight.mul_(sharpen)
    hf.save_pretrained(folder)
    return hf, Transformer.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    return _tiny(tmp_path_factory.mktemp("tiny"), vocab, seed=0)


def _hf_greedy(hf, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy generate on one unpadded prompt: the new tokens, through eos."""
    out = hf.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
    )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


class _StopAt:
    """The tokenizer with other stop ids (to make a random model hit "eos" where we choose)."""

    def __init__(self, tok, stop_ids):
        self.tok, self.stop_ids, self.add_bos = tok, set(stop_ids), tok.add_bos

    def encode(self, text, bos=False):
        return self.tok.encode(text, bos=bos)

    def decode(self, ids):
        return self.tok.decode(ids)


# ----------------------------------------------------------------------------- greedy vs HF


def test_greedy_matches_transformers(tiny, tok):
    hf, ours = tiny
    out = generate(ours, tok, PROMPTS, max_new_tokens=16, batch_size=3, progress=False)
    for p, (c,) in zip(PROMPTS, out, strict=True):
        ref = _hf_greedy(hf, tok.encode(p, bos=tok.add_bos), 16, sorted(tok.stop_ids))
        assert c.token_ids == ref
        assert c.finish_reason == ("eos" if ref[-1] in tok.stop_ids else "length")
        assert c.text == tok.decode(ref[:-1] if c.finish_reason == "eos" else ref)


def test_refill_with_ragged_lengths_matches_transformers(tiny, tok):
    """Rows end at different steps (eos on tokens each prompt emits at a different point), so rows
    are refilled from the queue mid-decode and compacted at the end; each equals its HF run."""
    hf, ours = tiny
    free = [generate(ours, _StopAt(tok, []), [p], max_new_tokens=12, progress=False)[0][0]
            for p in PROMPTS]  # fmt: skip
    stop_ids = {c.token_ids[1 + i % 7] for i, c in enumerate(free)}
    out = generate(ours, _StopAt(tok, stop_ids), PROMPTS * 2, max_new_tokens=12, batch_size=3,
                   progress=False)  # fmt: skip
    lengths = set()
    for p, (c,) in zip(PROMPTS * 2, out, strict=True):
        ref = _hf_greedy(hf, tok.encode(p, bos=tok.add_bos), 12, sorted(stop_ids))
        assert c.token_ids == ref
        assert c.finish_reason == ("eos" if ref[-1] in stop_ids else "length")
        lengths.add(len(ref))
    assert len(lengths) >= 3  # the rows really were ragged


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_decode_step_matches_eager(tiny, tok):
    """compile=True: static shapes (every row, the whole cache each step), idle rows included."""
    _, ours = tiny
    stop_ids = {t for (c,) in generate(ours, tok, PROMPTS[:3], max_new_tokens=6, progress=False)
                for t in c.token_ids[2:4]}  # fmt: skip
    kw = dict(max_new_tokens=10, batch_size=4, progress=False)
    eager = generate(ours, _StopAt(tok, stop_ids), PROMPTS * 2, **kw)
    compiled = generate(ours, _StopAt(tok, stop_ids), PROMPTS * 2, compile=True, **kw)
    assert [c.token_ids for (c,) in compiled] == [c.token_ids for (c,) in eager]
    assert len({len(c.token_ids) for (c,) in eager}) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_match_and_put_the_model_back(tiny, dtype, monkeypatch):
    """oneDNN-prepacked weights give the same logits, the dense weights hold no memory meanwhile,
    and the model comes back bit for bit and trainable, also after an error inside."""
    model = copy.deepcopy(tiny[1]).to(dtype)
    if not can_pack(model, rows=64):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU")
    tokens = torch.randint(0, 1000, (3, 7))
    modules, params = list(model.modules()), list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    with torch.inference_mode():
        plain = model(tokens)
        with pack_linears(model):
            # per layer q+k+v, o, gate+up, down; and the tied head
            assert sum(isinstance(m, _PackedLinear) for m in model.modules()) == 2 * 4 + 1
            assert len(dense) == 2 * 7 and {p.numel() for p in dense} == {0}
            packed = model(tokens)
        with pytest.raises(KeyError), pack_linears(model):
            raise KeyError("inside")
        monkeypatch.setattr(sample_module, "FUSED", [])
        with pack_linears(model):
            assert sum(isinstance(m, _PackedLinear) for m in model.modules()) == 2 * 7 + 1
            apart = model(tokens)
    torch.testing.assert_close(packed, plain)
    assert torch.equal(packed, apart)  # one matmul for q, k and v (gate and up) changes no bit
    assert list(model.modules()) == modules and model.lm_head is None
    assert list(model.parameters()) == params  # the same Parameters: optimizers keep them
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model(tokens).float().logsumexp(-1).sum().backward()  # not inference tensors
    assert all(p.grad is not None for p in params)


def test_an_interrupt_while_packing_leaves_the_model_whole(tiny, monkeypatch):
    model = copy.deepcopy(tiny[1])
    if not can_pack(model, rows=64):
        pytest.skip("oneDNN cannot run fp32 on this CPU")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    made = []

    class Interrupted(_PackedLinear):
        def __init__(self, weight, bias):
            if len(made) == 5:  # Ctrl-C inside the sixth layer's reorder
                raise KeyboardInterrupt
            super().__init__(weight, bias)
            made.append(self)

    monkeypatch.setattr(sample_module, "_PackedLinear", Interrupted)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), pack_linears(model):
        pass
    assert len(made) == 5 and not any(isinstance(m, _PackedLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.skipif(not hasattr(sample_module._malloc_trim, "argtypes"), reason="glibc only")
def test_packing_costs_only_the_tied_heads_copy(smollm2_dir):
    """Peak resident memory over three pack/unpack cycles of the real SmolLM2-135M in bf16 stays
    within the tied head's copy (57 MiB) plus 32 MiB: no second copy of the rest while packed or
    while unpacking, and freed weights do not pile up in the heap (measured 64 MiB; without
    malloc_trim 235, keeping every packed weight until the end of unpacking 206)."""
    code = (
        "import sys, torch, sample\n"
        "from model import Transformer\n"
        "kib = lambda k: int(open('/proc/self/status').read().split(k + ':')[1].split()[0])\n"
        "m = Transformer.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "with torch.inference_mode(): m(torch.tensor([[1, 2, 3]]))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # peak := now\n"
        "base = kib('VmRSS')\n"
        "for _ in range(3):\n"
        "    with torch.inference_mode(), sample.pack_linears(m):\n"
        "        pass\n"
        "print((kib('VmHWM') - base) * 1024, m.model.embed_tokens.weight.nbytes)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(smollm2_dir)], capture_output=True, text=True,
        check=True, cwd=Path(sample_module.__file__).parent,
    )  # fmt: skip
    grown, head = map(int, out.stdout.split())
    assert grown < head + 32 * 2**20, f"{grown / 2**20:.0f} MiB for a {head / 2**20:.0f} MiB head"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_packs_from_three_rows_bf16_always(tiny, tok, dtype, monkeypatch):
    """Packing is skipped where MKL's dense matmuls are faster: fp32 decoding 1-2 rows."""
    model = copy.deepcopy(tiny[1]).to(dtype)
    if not can_pack(model, rows=64):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU")
    calls, pack = [], sample_module.pack_linears
    monkeypatch.setattr(sample_module, "pack_linears", lambda m: calls.append(m) or pack(m))

    def packs(**kw) -> bool:
        calls.clear()
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, progress=False, **kw)
        return calls == [model]

    got = [packs(n=1), packs(n=2), packs(n=3), packs(n=8, batch_size=2), packs(n=8, batch_size=3)]
    assert got == ([False, False, True, False, True] if dtype == torch.float32 else [True] * 5)


def test_a_prefilled_chunk_is_freed_before_the_next_one_prefills(tiny, tok, monkeypatch):
    """Nothing keeps a chunk's prefill caches (views of them) alive while the next one prefills."""
    views, alive = [], []  # weak references to every (k, v) view prefill returned; alive per call
    prefill = sample_module.prefill

    def tracked(*args):
        alive.append(sum(v() is not None for v in views))
        out = prefill(*args)
        views.extend(weakref.ref(t) for branch in out for kv in branch for t in kv)
        return out

    monkeypatch.setattr(sample_module, "prefill", tracked)
    monkeypatch.setattr(sample_module, "PREFILL_TOKENS", 1)  # a chunk per prompt
    generate(tiny[1], tok, PROMPTS, max_new_tokens=2, progress=False)
    assert alive == [0] * len(PROMPTS)


def test_packed_linear_with_bias_matches_f_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)  # qwen2's q/k/v projections carry a bias
    x = torch.randn(2, 5, 48)
    with torch.inference_mode():
        torch.testing.assert_close(_PackedLinear(linear.weight, linear.bias)(x), linear(x))


@pytest.mark.parametrize("temperature", [0.0, 0.9])  # greedy computes it its own way
def test_logprob_is_the_raw_model_logprob(tiny, tok, temperature):
    hf, ours = tiny
    (c,) = generate(ours, tok, PROMPTS[:1], max_new_tokens=8, temperature=temperature, top_k=20,
                    seed=3, progress=False)[0]  # fmt: skip
    ids = tok.encode(PROMPTS[0], bos=tok.add_bos)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1 : -1].float()
    ref = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).sum()
    assert c.logprob == pytest.approx(ref.item(), abs=1e-3)


def test_greedy_batch_and_prefix_invariant(tiny, tok):
    _, ours = tiny
    prefix = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
    tags = ["[cot]: ", "[l2m]: ", "[pot]: "]
    alone = [
        generate(ours, tok, [prefix + t], max_new_tokens=10, progress=False)[0][0] for t in tags
    ]
    batched = generate(ours, tok, [PROMPTS[2], *(prefix + t for t in tags), PROMPTS[1]],
                       max_new_tokens=10, batch_size=4, progress=False)  # fmt: skip
    shared = generate(ours, tok, [SharedPrompt(prefix, [(t, 2) for t in tags]), PROMPTS[0]],
                      max_new_tokens=10, batch_size=5, progress=False)  # fmt: skip
    assert [len(o) for o in shared] == [6, 1]
    for i, (a, t) in enumerate(zip(alone, tags, strict=True)):
        assert batched[1 + i][0].token_ids == a.token_ids
        for c in shared[0][2 * i : 2 * i + 2]:  # greedy: both samples of a tag are the same
            assert (c.token_ids, c.text, c.continuation) == (a.token_ids, a.text, t)
            assert c.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_a_header_every_prompt_starts_with_is_prefilled_once(tiny, tok, monkeypatch):
    hf, ours = tiny
    prompts = [f"Solve the problem below and end with the answer.\n\n{p}" for p in PROMPTS[:3]]
    ids = [tok.encode(p, bos=tok.add_bos) for p in prompts]
    C = next(j for j in range(len(ids[0])) if len({i[j] for i in ids}) > 1)  # tokens in common
    assert C >= 10
    calls = []  # (rows, tokens) of every forward over more than one token: the prefills
    forward = ours.forward
    monkeypatch.setattr(
        ours, "forward", lambda x, *a, **k: calls.append(x.shape) or forward(x, *a, **k)
    )
    out = generate(ours, tok, prompts, max_new_tokens=8, progress=False)
    # the header once, then each prompt's rest but its last token, right-padded, in one chunk
    assert [tuple(c) for c in calls if c[1] > 1] == [(1, C), (3, max(map(len, ids)) - 1 - C)]
    for i, (c,) in zip(ids, out, strict=True):
        assert c.token_ids == _hf_greedy(hf, i, 8, sorted(tok.stop_ids))


def test_plain_prompt_n_copies_share_one_prefill(tiny, tok):
    _, ours = tiny
    one = generate(ours, tok, PROMPTS[:2], max_new_tokens=6, progress=False)
    many = generate(ours, tok, PROMPTS[:2], n=3, max_new_tokens=6, batch_size=4, progress=False)
    for (a,), cs in zip(one, many, strict=True):
        assert [c.token_ids for c in cs] == [a.token_ids] * 3


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(tiny, tok):
    _, ours = tiny
    kw = dict(n=3, max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9, batch_size=4,
              progress=False)  # fmt: skip
    a = generate(ours, tok, PROMPTS[:3], seed=7, **kw)
    b = generate(ours, tok, PROMPTS[:3], seed=7, **kw)
    c = generate(ours, tok, PROMPTS[:3], seed=8, **kw)
    assert a == b
    assert a != c
    assert len({tuple(x.token_ids) for x in a[0]}) > 1  # the n samples differ


def _kept(values: torch.Tensor, ids: torch.Tensor) -> list[set[int]]:
    return [set(i[v > float("-inf")].tolist()) for v, i in zip(values, ids, strict=True)]


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (0, 1.0, {0, 1, 2, 3, 4}),
        (1, 1.0, {0}),
        (2, 1.0, {0, 1}),
        (0, 0.4, {0}),  # the first token alone holds 0.5 >= 0.4
        (0, 0.7, {0, 1}),  # 0.5 < 0.7 <= 0.75
        (0, 0.8, {0, 1, 2}),
        (0, 0.95, {0, 1, 2, 3}),
        (0, 0.99, {0, 1, 2, 3, 4}),
        (3, 0.8, {0, 1}),  # renormalised over the top 3: 0.5 / 0.9 + 0.25 / 0.9 = 0.83 >= 0.8
        (3, 0.85, {0, 1, 2}),  # (without renormalising, 0.8 would keep 3 tokens)
    ],
)
def test_filter_logits_hand_made(top_k, top_p, kept):
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    perm = torch.tensor([3, 0, 4, 2, 1])  # shuffle, so ids are not ranks
    logits = probs.log()[:, perm]
    values, ids = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert _kept(values, ids) == [{int(perm.tolist().index(t)) for t in kept}]


@pytest.mark.parametrize("scale", [0.5, 8.0])  # flat: full sort; peaked: the candidate shortcut
@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.5), (50, 1.0), (40, 0.8)])
def test_filter_logits_matches_hf_warpers(scale, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 3000) * scale
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    values, ids = filter_logits(logits, top_k=top_k, top_p=top_p)
    want = [set(torch.nonzero(r > float("-inf")).flatten().tolist()) for r in ref]
    assert _kept(values, ids) == want


def test_sample_next_token_stays_in_the_filtered_set():
    torch.manual_seed(0)
    logits = torch.randn(64, 500) * 3
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        sample_next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=g),
        logits.argmax(-1),
    )
    values, ids = filter_logits(logits / 0.7, top_k=0, top_p=0.6)
    allowed = _kept(values, ids)
    for _ in range(20):
        t = sample_next_token(logits, temperature=0.7, top_k=0, top_p=0.6, generator=g)
        assert all(x in a for x, a in zip(t.tolist(), allowed, strict=True))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.8), (0, 0.35), (4, 1.0), (6, 0.7)])
def test_sampler_draws_the_filtered_distribution(top_k, top_p):
    """sample_next_token (inverse CDF; top-p by rejection, no sort) against softmax of
    filter_logits's definition: only kept tokens, frequencies within a chi-square bound."""
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
    flat = torch.full((10,), 0.1) + torch.linspace(0, 0.01, 10)  # nearly flat: many rejections
    rows = torch.stack([probs.log(), probs.flip(0).log() * 2, flat.log()])  # (3, 10)
    N, T = 6000, 0.8
    logits = rows.repeat_interleave(N, 0)  # (3N, 10)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, temperature=T, top_k=top_k, top_p=top_p, generator=g)
    values, ids = filter_logits(rows / T, top_k=top_k, top_p=top_p)
    for r in range(3):
        want = torch.zeros(10).scatter_(0, ids[r], values[r].softmax(-1))
        counts = torch.bincount(draws[r * N : (r + 1) * N], minlength=10).float()
        assert set(torch.nonzero(counts).flatten().tolist()) <= set(
            torch.nonzero(want).flatten().tolist()
        )
        stat, df = _chi2(counts, N * want)
        assert df == 0 or stat < _chi2_critical(df)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.95), (5, 0.95)])
def test_non_finite_probabilities_are_an_error(top_k, top_p):
    """NaN or inf logits (or a temperature that overflows them): a one-line error, not an
    arbitrary token or an endless top-p rejection loop."""
    g = torch.Generator().manual_seed(0)
    finite = torch.randn(2, 50) * 5
    for logits, T in [
        (finite, 1e-38),
        (finite.index_fill(1, torch.tensor([3]), math.nan), 0.7),
        (finite.index_fill(1, torch.tensor([3]), math.inf), 0.7),
    ]:
        with pytest.raises(ValueError, match="non-finite probabilities"):
            sample_next_token(logits, temperature=T, top_k=top_k, top_p=top_p, generator=g)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over tokens expected >= 5 times each, the rest pooled into one bin."""
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def test_temperature_frequencies_match_softmax(tmp_path, smollm2_dir, tok):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    hf, ours = _tiny(tmp_path, vocab, seed=1, sharpen=3.0)
    T, N = 0.7, 2000
    ids = tok.encode(PROMPTS[4], bos=tok.add_bos)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
    out = generate(ours, tok, [PROMPTS[4]], n=N, max_new_tokens=1, temperature=T, seed=0,
                   batch_size=500, progress=False)[0]  # fmt: skip
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=vocab).float()
    stat, df = _chi2(counts, N * (logits / T).softmax(-1))
    assert df >= 5  # enough distinct outcomes for the test to mean something
    assert stat < _chi2_critical(df)
    wrong, df_wrong = _chi2(counts, N * logits.softmax(-1))  # T = 1: must be rejected
    assert wrong > _chi2_critical(df_wrong)


# ----------------------------------------------------------------------------- stop strings


def test_stop_checker_finds_a_stop_split_across_tokens(tok):
    text = "Final Answer: 5\n\n### Instruction: next"
    ids = tok.encode(text)
    stop = ("### Instruction", "### Input")
    checker = StopChecker(tok, stop)
    found = [checker.add(ids[: i + 1]) for i in range(len(ids))]
    first = next(i for i, f in enumerate(found) if f >= 0)
    assert found[first] == text.index("###")
    # found exactly when the last character of the stop string has arrived
    assert "### Instruction" in tok.decode(ids[: first + 1])
    assert "### Instruction" not in tok.decode(ids[:first])
    assert "###" in tok.decode(ids[:first])  # it spans tokens: its start arrived earlier


def test_stop_strings_cut_exactly(tiny, tok):
    _, ours = tiny
    (full,) = generate(ours, _StopAt(tok, []), [PROMPTS[0]], max_new_tokens=24, progress=False)[0]
    ids, text = full.token_ids, full.text
    # a stop string of 2 + 2 characters around a token boundary, in plain ASCII text
    for k in range(2, len(ids) - 2):
        head = tok.decode(ids[:k])
        if (
            text.startswith(head)
            and len(head) >= 2
            and text[len(head) - 2 : len(head) + 2].isascii()
        ):
            if len(tok.decode(ids[k : k + 1])) >= 2 and len(tok.decode(ids[k - 1 : k])) >= 2:
                break
    else:
        pytest.fail("no token boundary to test on")
    stop = text[len(head) - 2 : len(head) + 2]
    cut = text.index(stop)
    (c,) = generate(ours, _StopAt(tok, []), [PROMPTS[0]], max_new_tokens=24, stop=[stop, "\x00zz"],
                    progress=False)[0]  # fmt: skip
    assert c.finish_reason == "stop"
    assert c.text == text[:cut]
    (again,) = generate(
        ours,
        _StopAt(tok, []),
        [PROMPTS[0]],
        max_new_tokens=24,
        stop=(s for s in [stop, "\x00zz"]),
        progress=False,
    )[0]
    assert again == c  # stop strings from a generator: the same
    # generation ends with the token that completes the stop string's first occurrence
    assert c.token_ids == ids[: len(c.token_ids)]
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])


def test_stop_string_completed_by_a_partial_character_is_cut(tiny, tok, monkeypatch):
    # " " + the first byte of a multi-byte character completes "Answer: ", but the checker waits
    # for the character (U+FFFD); the sample ends first, by eos or by its length limit
    _, ours = tiny
    texts = [tok.decode([i]) for i in range(tok.tok.get_vocab_size())]
    partial = next(i for i, t in enumerate(texts) if t.startswith(" ") and t.endswith("\ufffd"))
    script = tok.encode("Answer:") + [partial]
    for tail, limit in (([tok.eos_id], 10), ([], len(script))):
        draws = iter(script + tail)

        def scripted(logits, draws=draws, **kw):
            return torch.tensor([next(draws)])

        monkeypatch.setattr(sample_module, "sample_next_token", scripted)
        # temperature > 0: greedy decoding takes the argmax itself, not through sample_next_token
        out = generate(ours, tok, [PROMPTS[0]], max_new_tokens=limit, stop=["Answer: "],
                       temperature=1.0)  # fmt: skip
        assert (out[0][0].text, out[0][0].finish_reason) == ("", "stop")


def test_finish_reasons_and_context_limit(tmp_path, smollm2_dir, tok):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    _, ours = _tiny(tmp_path, vocab, seed=2, max_len=48)
    (c,) = generate(ours, _StopAt(tok, []), [PROMPTS[2]], max_new_tokens=50, progress=False)[0]
    n_prompt = len(tok.encode(PROMPTS[2], bos=tok.add_bos))
    assert c.finish_reason == "length"
    assert n_prompt + len(c.token_ids) == 48  # stopped by max_seq_len, before max_new_tokens
    # beside 7 short prompts that go on decoding: its finished row idles (not refilled, not
    # compacted) at the end of the cache
    batch = generate(ours, _StopAt(tok, []), [PROMPTS[2]] + [PROMPTS[1]] * 7, max_new_tokens=30,
                     batch_size=8, progress=False)  # fmt: skip
    assert batch[0][0].token_ids == c.token_ids
    assert [len(o[0].token_ids) for o in batch[1:]] == [30] * 7
    eos = c.token_ids[2]
    (d,) = generate(ours, _StopAt(tok, [eos]), [PROMPTS[2]], max_new_tokens=50, progress=False)[0]
    k = c.token_ids.index(eos)
    assert (d.finish_reason, d.token_ids) == ("eos", c.token_ids[: k + 1])
    assert d.text == tok.decode(c.token_ids[:k])  # eos not in the text


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompts, kw, word",
    [
        ([], {}, "prompts"),
        (["hi"], {"n": 0}, "n=0"),
        (["hi"], {"temperature": -0.1}, "temperature"),
        (["hi"], {"top_p": 0.0}, "top_p"),
        (["hi"], {"top_p": 1.5}, "top_p"),
        (["hi"], {"top_k": -1}, "top_k"),
        (["hi"], {"max_new_tokens": 0}, "max_new_tokens"),
        (["hi", "word " * 200], {}, "prompts[1] has"),
        ([SharedPrompt("hi", [("a", 0)])], {}, "continuations"),
        (["hi"], {"seed": 2**64}, "seed=18446744073709551616"),
    ],
)
def test_bad_input(tiny, tok, prompts, kw, word):
    _, ours = tiny
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match="expected") as e:
        generate(ours, tok, prompts, progress=False, **kw)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input_is_one_line(tmp_path, smollm2_dir):
    """Bad input to `python sample.py`: exit 1 and one line naming it, never a traceback."""
    script = Path(sample_module.__file__)
    model = ["--model", str(smollm2_dir), "--prompt", "hi", "--max-new-tokens", "1"]
    cases = [
        (["--model", str(tmp_path / "none"), "--prompt", "hi"], f"'{tmp_path / 'none'}'"),
        ([*model, "--n", "0"], "n=0; expected n >= 1"),
        ([*model, "--top-p", "0"], "top_p=0.0; expected 0 < top_p <= 1"),
        ([*model, "--seed", str(2**64)], f"seed={2**64}; expected"),
        ([*model, "--device", "banana"], "--device banana: expected cpu, cuda or cuda:N"),
    ]
    for args, needle in cases:
        cmd = [sys.executable, str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sample.py: ") and needle in lines[0], lines


# ----------------------------------------------------------------------------- real checkpoint


def test_real_smollm2_greedy_matches_transformers(smollm2_dir, tok):
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    questions = ["What is 7 times 8?", "Name the capital of France.", "Write a haiku about rain."]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in questions]
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = generate(ours, tok, prompts, max_new_tokens=24, batch_size=3, progress=False)
    for p, (c,) in zip(prompts, out, strict=True):
        ids = hf_tok(p)["input_ids"]  # transformers' own tokenization of the prompt
        assert tok.encode(p, bos=tok.add_bos) == ids
        assert c.token_ids == _hf_greedy(hf, ids, 24, sorted(tok.stop_ids))
        assert c.text == hf_tok.decode(
            c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
        )
