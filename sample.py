"""Batched KV-cache sampling with shared prefixes and continuous batching.

SIKeD spends most of its compute here: each iteration the student writes 10 solutions per strategy
for every training question (../shared/SPEC.md), and every evaluation decodes greedily.

    completions = generate(model, tokenizer, prompts, n=10, max_new_tokens=512, temperature=0.7,
                           top_p=0.95, stop=STOP, seed=0)
    python sample.py --model smollm2-135m-instruct --prompt "What is 2+3?" --chat --n 4 \
        --temperature 0.7 --top-p 0.95 --max-new-tokens 64

Ideas from gpt-fast generate.py (cache written at `input_pos`, compiled decode step), llama3
generation.py (ragged batches), nanochat engine.py (prefill a prompt once, copy its cache to each
sample), vLLM's incremental detokenizer (stop strings) and FlashInfer (top-p without a sort).

Design, and why:
1. Per-row positions, not left padding. Each cache row holds one sample at positions 0..pos; the
   mask `key_pos <= pos` hides what the row held before. So a row can be refilled with a prompt of
   any length without touching the others, and RoPE sees the positions of an unpadded run
   (padding and batch invariance).
2. Continuous batching, not dropping finished rows. A row that hits eos, a stop string or its
   limit is refilled from the queue at once; dropping it would shrink the batch to its slowest row,
   and SIKeD's lengths are ragged (a few to 512 tokens). Once the queue is empty, live rows are
   compacted to the front whenever a quarter of the width is idle.
3. Shared prefixes are copied, not read in place. A prompt plus each forced continuation is
   tokenized whole (as a plain prompt would be), their common token prefix is prefilled once, each
   continuation once on top, and that cache is copied into each sample's row at admission: about
   one decode step of that row. Reading it in place needs a gather every step, or a two-part
   attention merged by log-sum-exp that SDPA behind the model's `update(input_pos, k, v)` cache
   protocol cannot express; copying keeps the decode step a single SDPA call. Likewise the tokens
   every prompt of a call starts with (a header: with SmolLM2's tokenizer, 24 tokens of its chat
   template, 91 of strategies.py's student prompt) are prefilled once per call and copied into
   each prompt's prefill, much as vLLM's automatic prefix caching shares them.
4. The last prompt token is not prefilled but is its row's first decode input, so every decode
   step yields a token for every live row and a prompt's n samples draw their first token apart.
5. RowKVCache, not model.KVCache: it returns only the first `kv_len` positions (the longest live
   row), so attention costs what the rows hold.
6. No sort of the vocabulary (on CPU, 60 x 49k logits cost about a 135M decode step): one uniform
   per row against the CDF, top-p by rejection. One host sync per step (the sampled ids), plus
   one per top-p rejection round.
7. CUDA: the model runs in its loaded dtype (bf16 recommended) with SDPA. `compile=True` compiles
   the decode step (mode="reduce-overhead": CUDA graphs) with static shapes, all `batch_size` rows
   and the whole cache length (the mask hides the rest), so it compiles once and rows are never
   compacted. On an H200, 7-35x the eager step on SmolLM2-135M (README); on CPU it works
   (inductor) but the static length costs more than it saves.
8. CPU: every linear layer runs from weights oneDNN reordered once per call (pack_linears), not on
   every matmul as F.linear does in bf16, and layers reading one input (FUSED: q/k/v, gate/up) run
   as one matmul: bf16 logits bit-identical, fp32 within rounding, 1.3-2x faster decode matmuls
   (README: where it gains and where not). Each dense weight is freed while its packed copy stands
   in and rebuilt exactly after, so packing costs one layer at a time plus a tied head's copy.
   Except in fp32 on 1-2 rows, where MKL's dense matmuls are faster (PACK_MIN_FP32_ROWS).
   Prompts prefill in order of length, so a prefill chunk holds little padding.

`Completion.logprob` sums log softmax of the raw fp32 logits over the generated tokens (eos and
tokens past a stop string included): the model's own probability of the text, before
temperature, top-k and top-p, so also defined for greedy decoding.
"""

import argparse
import ctypes
import sys
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

# prompt tokens (rows x padded length) per prefill forward: bounds its memory (512 against 1024:
# fp32 peak 45 MiB lower at 16 prompts, prefill time within noise to ~8% slower; README)
PREFILL_TOKENS = 512
# fp32 decoding of 1-2 rows is faster on MKL's dense matmuls, packing not paid (whole calls of 128
# tokens on the Xeon: 1.17-1.41x at 1 row, 1.04-1.26x at 2, 0.86-1.05x at 4); bf16 packs always
PACK_MIN_FP32_ROWS = 3


@dataclass
class Completion:
    text: str  # generated text only, cut before the stop string; eos not decoded
    token_ids: list[int]  # every generated token, eos included, stop-string tokens included
    finish_reason: str  # "eos", "stop" or "length"
    logprob: float  # sum of log softmax(raw logits) over token_ids (see the module docstring)
    continuation: str = ""  # the forced continuation this sample followed ("" for a plain prompt)


@dataclass
class SharedPrompt:
    """A question prefix and forced continuations (e.g. strategy tags), each with its own n."""

    prefix: str
    continuations: list[tuple[str, int]]


@dataclass
class _Branch:
    """One (prompt, continuation) pair: its tokens and where its n completions go."""

    prompt: int  # index into prompts (and the results)
    out: int  # index of its first completion in results[prompt]
    continuation: str
    ids: list[int]  # prompt + continuation tokens
    n: int
    shared: int  # leading tokens shared by every branch of its prompt


@dataclass
class _Slot:
    """Host-side state of a busy cache row."""

    branch: int
    sample: int  # index among the branch's n completions
    start: int  # prompt tokens prefilled = position of the first decode input
    stop: "StopChecker | None"
    ids: list[int] = field(default_factory=list)  # generated tokens

    @property
    def pos(self) -> int:  # position of the next decode input
        return self.start + len(self.ids)


class RowKVCache:
    """One layer's preallocated keys/values, one row per sample, each row at its own positions.

    `update(input_pos, k, v)` writes (B, n_kv_heads, T, head_dim) at `input_pos` ((B, T) or (T,))
    of the first B rows and returns views of their first `kv_len` positions (set by the caller).
    """

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        # zeros, not empty: a masked key still enters SDPA's sum with weight 0, and 0 * NaN = NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_len = max_len
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (batch_size, 1)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, T = k.shape[0], k.shape[2]
        rows = self.rows[:B]
        # indexing dims 0 and 2 puts them first: the target is (B, T, n_kv_heads, head_dim).
        # (scatter_ along dim 2 copies the whole buffer on CPU: ~400x slower per decode step.)
        self.k[rows, :, input_pos.expand(B, T)] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, input_pos.expand(B, T)] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:B, :, : self.kv_len], self.v[:B, :, : self.kv_len]


def setup_caches(model, batch_size: int, max_len: int) -> list[RowKVCache]:
    cfg = model.config
    weight = next(model.parameters())
    return [
        RowKVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, weight.dtype, weight.device)
        for _ in range(cfg.n_layers)
    ]


def can_pack(model, rows: int) -> bool:
    """Whether pack_linears applies and pays for `rows` decoded together: a CPU model in bf16
    where oneDNN runs it natively, or in fp32 at PACK_MIN_FP32_ROWS rows or more."""
    w = model.model.embed_tokens.weight
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    bf16 = w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return bf16 or (w.dtype == torch.float32 and rows >= PACK_MIN_FP32_ROWS)


class _PackedLinear(nn.Module):
    """A frozen linear layer whose weight oneDNN reordered once into its blocked layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        # the layout for PREFILL_TOKENS rows: measured as fast as smaller hints at 1 to 64 rows
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREFILL_TOKENS)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise.default(x, self.weight, self.bias, "none", [], "")


try:  # glibc: hand the free pages inside the heap back to the OS
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):  # other C libraries: a no-op
    _malloc_trim = lambda pad: 0  # noqa: E731


# linear layers reading the same input, one matmul while packed: (the module's attribute, members)
FUSED = [("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))]


def _pack_groups(module: nn.Module) -> list[tuple[str, list[nn.Linear]]]:
    """(attribute, linear layers) that pack_linears packs as one: each FUSED group the module has
    whole (biases all or none), then every other nn.Linear child alone."""
    children = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
    groups = []
    for name, members in FUSED:
        linears = [children.get(m) for m in members]
        if hasattr(module, name) and None not in linears:
            if len({c.bias is None for c in linears}) == 1:
                groups.append((name, linears))
                for m in members:
                    del children[m]
    return groups + [(n, [c]) for n, c in children.items()]


@contextmanager
def pack_linears(model):
    """Run every linear layer (and a tied output head) from oneDNN-prepacked weights inside the
    block, those reading one input as one matmul (FUSED); each dense weight is freed meanwhile and
    rebuilt exactly after (design point 8)."""
    swapped, tied = [], model.lm_head is None  # swapped: (module, name, linears, rows, packed)
    # normal tensors, not inference ones, even under generate's inference_mode: training may follow
    try:
        with torch.inference_mode(False), torch.no_grad():
            for module in list(model.modules()):
                for name, linears in _pack_groups(module):
                    weight = torch.cat([c.weight for c in linears])  # (out features, in)
                    bias = None if linears[0].bias is None else torch.cat([c.bias for c in linears])
                    packed = _PackedLinear(weight, bias)
                    del weight
                    rows = [c.weight.shape[0] for c in linears]
                    swapped.append((module, name, linears, rows, packed))  # before any change
                    setattr(module, name, packed)
                    for c in linears:
                        c.weight.data = c.weight.new_empty(0)  # same Parameter, no memory
                _malloc_trim(0)  # else the freed weights stay resident as holes in the heap
            if tied:  # the embedding stays dense: the head is one extra copy
                model.lm_head = _PackedLinear(model.model.embed_tokens.weight, None)
        yield
    finally:
        if tied:  # first: its memory then serves the weights rebuilt below
            del model.lm_head
            model.lm_head = None
        with torch.inference_mode(False), torch.no_grad():
            while swapped:  # popped: each packed weight is freed as soon as it is unpacked
                module, name, linears, rows, packed = swapped.pop()
                dense = packed.weight.to_dense()  # the original bytes
                parts = dense.split(rows)  # fused: own copies (safetensors refuses shared ones)
                for c, part in zip(linears, parts, strict=True):
                    c.weight.data = part.clone() if len(linears) > 1 else part
                setattr(module, name, None if len(linears) > 1 else linears[0])
                del packed, dense, parts
        _malloc_trim(0)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-k, then top-p filtering of (B, V) fp32 logits: the reference definition.

    Returns (values, token_ids), (B, K) in descending order of logit (K = top_k, or V), filtered
    tokens at -inf. A token is dropped by top-p when the tokens above it hold >= top_p of the
    probability, renormalised over the top-k (HF's TopPLogitsWarper).
    """
    if top_k > 0:
        values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    if top_p < 1.0:
        probs = values.softmax(-1)
        mass_above = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        values = values.masked_fill(mass_above >= top_p, float("-inf"))
    return values, ids


def _sample_cdf(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of (B, K) unnormalised probabilities -> (B,) indices, by inverse CDF: one
    uniform per row (an exponential race or torch.multinomial costs ~20x more on CPU)."""
    cdf = probs.cumsum(-1)
    # NaN or inf: searchsorted would return an arbitrary id, and top-p's rejection never ends
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise ValueError(
            "sampling met non-finite probabilities: NaN or inf logits, or a temperature too "
            "small for their scale"
        )
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    # right=True: zero-probability entries are never picked
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def _sample_nucleus(p: Tensor, top_p: float, generator: torch.Generator) -> Tensor:
    """Exact top-p sampling from (B, V) probabilities by rejection, without a sort.

    Accept a draw if the tokens strictly likelier than it hold < top_p (it is in the nucleus);
    else it and every token at most as likely are out: exclude them and draw again. The accepted
    draw is distributed as p renormalised over the nucleus, after ~1.05 rounds on average. Tokens
    tied at the boundary stay in together (filter_logits's sort would keep an arbitrary part).
    """
    B = p.shape[0]
    out = torch.empty(B, dtype=torch.long, device=p.device)
    floor = torch.full((B, 1), -1.0, device=p.device)  # allowed: p > floor
    todo = torch.arange(B, device=p.device)
    while True:
        draw = _sample_cdf(p * (p > floor), generator)
        p_draw = p.gather(-1, draw[:, None])
        ok = (p * (p > p_draw)).sum(-1) < top_p
        out[todo[ok]] = draw[ok]
        if bool(ok.all()):
            return out
        todo, floor, p = todo[~ok], p_draw[~ok], p[~ok]


def sample_next_token(
    logits: Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> Tensor:
    """(B, V) fp32 logits -> (B,) token ids, from softmax(logits / temperature) after top-k and
    top-p (filter_logits's definition). temperature 0 = greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:  # only k candidates: filter them exactly as defined, then draw
        values, ids = filter_logits(logits, top_k, top_p)
        return ids.gather(-1, _sample_cdf(values.softmax(-1), generator)[:, None]).squeeze(-1)
    probs = logits.softmax(-1)
    if top_p >= 1.0:
        return _sample_cdf(probs, generator)
    return _sample_nucleus(probs, top_p, generator)


class StopChecker:
    """Finds stop strings in a row's text as its tokens arrive, decoding only a tail window.

    As vLLM: decode ids[prefix_offset:], keep the text past ids[prefix_offset:read_offset] (a token
    of context gets spacing and multi-token characters right; a trailing U+FFFD waits). Only the
    new text and len(longest stop) - 1 characters before it are searched.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.lookback = max(len(s) for s in stop) - 1
        self.text = self.prefix_text = ""
        self.prefix_offset = self.read_offset = 0

    def add(self, ids: list[int]) -> int:
        """Take the row's tokens so far; returns the first stop string's index in text, or -1."""
        new_text = self.tokenizer.decode(ids[self.prefix_offset :])
        if len(new_text) <= len(self.prefix_text) or new_text.endswith("\ufffd"):
            return -1
        start = max(0, len(self.text) - self.lookback)
        self.text += new_text[len(self.prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.prefix_text = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        return _find_stop(self.text, self.stop, start)


def _find_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int:
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found, default=-1)


def prefill_causal(
    model, rows: list[list[int]], header: list[tuple[Tensor, Tensor]] | None = None
) -> list[RowKVCache]:
    """Prefill rows of tokens that each continue `header` (per layer, (k, v) of C cached tokens,
    copied into every row), right-padded: pads sit after every real key, so a causal mask
    suffices. Returns caches of C + the longest row's length (at least 1)."""
    device = next(model.parameters()).device
    C = 0 if header is None else header[0][0].shape[1]
    T = C + max(len(r) for r in rows)
    caches = setup_caches(model, len(rows), max(T, 1))
    if header is not None:
        for c, (k, v) in zip(caches, header, strict=True):
            c.k[:, :, :C] = k  # (n_kv_heads, C, head_dim) broadcast into each row
            c.v[:, :, :C] = v
    if T > C:
        input_pos = torch.arange(C, T, device=device)
        causal = torch.arange(T, device=device) <= input_pos[:, None]  # (T - C, T)
        _set_kv_len(caches, T)
        model(_pad(rows, T - C, device), input_pos, causal.view(1, 1, T - C, T), caches,
              last_only=True)  # fmt: skip
    return caches


def prefill(
    model, branches: list[_Branch], header: list[tuple[Tensor, Tensor]] | None = None
) -> list[list[tuple[Tensor, Tensor]]]:
    """Prefill each branch's tokens but the last; returns per branch, per layer, (k, v) views of
    shape (n_kv_heads, len(ids) - 1, head_dim). Branches come grouped by prompt.

    Stage 1 prefills the rest of each prompt's shared tokens on top of the header (the first C
    tokens of every prompt, prefilled once per call), one row per prompt (prefill_causal); stage 2
    copies that cache to its branches' rows and prefills each branch's own tokens on top, at
    per-row positions with a mask.
    """
    device = next(model.parameters()).device
    firsts, group = [], []  # each prompt's first branch; each branch's prompt row in stage 1
    for i, b in enumerate(branches):
        if i == 0 or b.prompt != branches[i - 1].prompt:
            firsts.append(i)
        group.append(len(firsts) - 1)
    group = torch.tensor(group, device=device)
    T = max(b.shared for b in branches)
    C = 0 if header is None else header[0][0].shape[1]
    shared = prefill_causal(
        model, [branches[i].ids[C : branches[i].shared] for i in firsts], header
    )

    segments = [b.ids[b.shared : -1] for b in branches]
    Tc = max(len(s) for s in segments)
    if Tc == 0:
        caches, rows = shared, group.tolist()
    else:
        caches = setup_caches(model, len(branches), T + Tc)
        for c, s in zip(caches, shared, strict=True):
            c.k[:, :, :T] = s.k[group, :, :T]
            c.v[:, :, :T] = s.v[group, :, :T]
        del shared
        start = torch.tensor([b.shared for b in branches], device=device)[:, None]  # (Rb, 1)
        # pads get positions past their row's real tokens, clamped inside the RoPE table: never
        # attended by a real token (it only sees keys <= its own position)
        input_pos = start + torch.arange(Tc, device=device)
        input_pos = input_pos.clamp(max=model.config.max_seq_len - 1)
        key_pos = torch.arange(T + Tc, device=device)
        mask = key_pos.view(1, 1, 1, -1) <= input_pos[:, None, :, None]  # (Rb, 1, Tc, S)
        _set_kv_len(caches, T + Tc)
        model(_pad(segments, Tc, device), input_pos, mask, caches, last_only=True)
        rows = list(range(len(branches)))
    return [
        [(c.k[r, :, : len(b.ids) - 1], c.v[r, :, : len(b.ids) - 1]) for c in caches]
        for r, b in zip(rows, branches, strict=True)
    ]


def decode_step(model, caches: list[RowKVCache], tokens: Tensor, pos: Tensor, key_pos: Tensor):
    """One token for each of the first W rows: tokens, pos (W,) -> fp32 logits (W, V); key_pos is
    arange(S), S = the cache length attended to."""
    W, S = tokens.shape[0], key_pos.shape[0]
    mask = (key_pos[None, :] <= pos[:, None]).view(W, 1, 1, S)  # row b sees its positions 0..pos[b]
    _set_kv_len(caches, S)
    return model(tokens.view(W, 1), pos.view(W, 1), mask, caches, last_only=True)[:, -1]


def _set_kv_len(caches: list[RowKVCache], kv_len: int) -> None:
    for c in caches:
        c.kv_len = kv_len


def _pad(rows: list[list[int]], T: int, device) -> Tensor:
    return torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


def _check_args(prompts, n, max_new_tokens, temperature, top_p, top_k, stop, batch_size) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts is empty; expected at least one prompt")
    for name, value, ok, want in [
        ("n", n, n >= 1, "n >= 1"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_p", top_p, 0.0 < top_p <= 1.0, "0 < top_p <= 1"),
        ("top_k", top_k, top_k >= 0, ">= 0 (0 = off)"),
        ("batch_size", batch_size, batch_size >= 1, ">= 1"),
    ]:
        if not ok:
            raise ValueError(f"{name}={value}; expected {want}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop={stop!r}; expected a sequence of non-empty strings")


def _tokenize(tokenizer, prompts, n: int, max_seq_len: int):
    """Check and tokenize the prompts: branches in prompt order, each prompt's branch indices."""
    branches, groups = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, SharedPrompt):
            if not p.continuations or any(k < 1 for _, k in p.continuations):
                raise ValueError(
                    f"prompts[{i}].continuations={p.continuations!r}; expected n >= 1 each"
                )
            prefix, pairs = p.prefix, p.continuations
        elif isinstance(p, str):
            prefix, pairs = p, [("", n)]
        else:
            raise ValueError(f"prompts[{i}] is a {type(p).__name__}; expected str or SharedPrompt")
        encoded = [tokenizer.encode(prefix + cont, bos=tokenizer.add_bos) for cont, _ in pairs]
        for ids in encoded:
            if not ids:
                raise ValueError(f"prompts[{i}] is empty after tokenization; expected >= 1 token")
            if len(ids) >= max_seq_len:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; expected fewer than the model's "
                    f"max_seq_len={max_seq_len}"
                )
        # the longest common token prefix, leaving every branch at least its last token to decode
        shared = _common_len(encoded, min(len(ids) - 1 for ids in encoded))
        groups.append(list(range(len(branches), len(branches) + len(encoded))))
        out = 0
        for (cont, k), ids in zip(pairs, encoded, strict=True):
            branches.append(_Branch(i, out, cont, ids, k, shared))
            out += k
    return branches, groups


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    compile: bool = False,
) -> list[list[Completion]]:
    """Sample completions: for each prompt (str or SharedPrompt) its completions, in order.

    A str gets n completions; a SharedPrompt its continuations' completions in order, each its own
    n. batch_size = cache rows decoded together. Reproducible for a given seed, batch_size and
    compile flag. Text ends at eos (tokenizer.stop_ids), before the first stop string, after
    max_new_tokens, or when the sequence fills the model's max_seq_len.
    """
    stop = stop if isinstance(stop, str) else tuple(stop)  # a generator is read once, here
    _check_args(prompts, n, max_new_tokens, temperature, top_p, top_k, stop, batch_size)
    max_seq_len = model.config.max_seq_len
    branches, groups = _tokenize(tokenizer, prompts, n, max_seq_len)
    # a header every prompt starts with (chat template, instruction): prefilled once per call
    C = _common_len([b.ids for b in branches], min(b.shared for b in branches))
    common = branches[0].ids[:C]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    elif -(2**63) <= seed < 2**64:  # torch's range; its own error names no argument
        generator.manual_seed(seed)
    else:
        raise ValueError(f"seed={seed}; expected an integer in [-2**63, 2**64)")
    stop_ids = set(tokenizer.stop_ids)

    # one request per completion, in output order
    queue = deque((b, j) for b in range(len(branches)) for j in range(branches[b].n))
    queued = [b.n for b in branches]  # samples of each branch not yet admitted
    limit = [min(max_new_tokens, max_seq_len - len(b.ids)) for b in branches]
    B = min(batch_size, len(queue))
    # a row decodes from its last prompt token, at len(ids) - 1; its last input is limit - 1 later
    L = max(len(b.ids) - 1 + lim for b, lim in zip(branches, limit, strict=True))
    caches = setup_caches(model, B, L)
    key_pos = torch.arange(L, device=device)

    tokens = torch.zeros(B, dtype=torch.long, device=device)  # next input of each row
    pos = torch.zeros(B, dtype=torch.long, device=device)  # its position
    logprob = torch.zeros(B, dtype=torch.float32, device=device)
    live = torch.zeros(B, dtype=torch.bool, device=device)
    slots: list[_Slot | None] = [None] * B
    results = [[None] * sum(branches[i].n for i in g) for g in groups]
    pending_kv: dict[int, list[tuple[Tensor, Tensor]]] = {}  # prefilled branches still queued

    step = decode_step
    if compile:
        # Static shapes (all B rows, the whole cache length; the mask hides the rest): one graph.
        # CUDA graphs need the cache buffers at fixed addresses, as gpt-fast / HF StaticCache do.
        for c in caches:
            torch._dynamo.mark_static_address(c.k)
            torch._dynamo.mark_static_address(c.v)
        step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def fill(b: int, idx: list[int], kv: list[tuple[Tensor, Tensor]]) -> None:
        """Start samples of branch b in rows idx: copy its prefix cache, queue its last token."""
        P = len(branches[b].ids) - 1
        r = torch.tensor(idx, device=device)
        if P > 0:
            for c, (k, v) in zip(caches, kv, strict=True):
                c.k[r, :, :P] = k  # (n_kv_heads, P, head_dim) broadcast into each row
                c.v[r, :, :P] = v
        tokens[r] = branches[b].ids[-1]
        pos[r] = P
        logprob[r] = 0.0
        live[r] = True
        queued[b] -= len(idx)

    def admit(free: list[int]) -> None:
        """Refill free rows from the queue, prefilling prompts on first use."""
        new: dict[int, list[int]] = {}  # branch -> rows it starts in now
        for r in free[: len(queue)]:
            b, j = queue.popleft()
            new.setdefault(b, []).append(r)
            checker = StopChecker(tokenizer, stop) if stop else None
            slots[r] = _Slot(b, j, len(branches[b].ids) - 1, checker)
        # prompts of similar lengths prefill together: less padding
        todo = {branches[b].prompt for b in new if b not in pending_kv}
        todo = sorted(todo, key=lambda p: max(len(branches[i].ids) for i in groups[p]))
        for chunk in _prefill_chunks([groups[p] for p in todo], branches, len(common)):
            kvs = prefill(model, [branches[i] for i in chunk], header)
            for b, kv in zip(chunk, kvs, strict=True):
                if b in new:
                    fill(b, new.pop(b), kv)
                if queued[b] > 0:  # keep a compact copy, not the prefill buffers
                    pending_kv[b] = [(k.clone(), v.clone()) for k, v in kv]
                else:  # all started: an older copy (its prompt prefilled again) is not needed
                    pending_kv.pop(b, None)
            kv = kvs = None  # else their views keep this chunk's prefill caches alive
        for b, idx in new.items():
            fill(b, idx, pending_kv[b])
            if queued[b] == 0:
                del pending_kv[b]

    def compact(width: int) -> int:
        """Move the live rows of [0, width) to the front, in order; returns the new width."""
        keep = [r for r in range(width) if slots[r] is not None]
        m, idx = len(keep), torch.tensor(keep, device=device)
        S = max(slots[r].pos for r in keep) + 1
        for c in caches:
            # the gather copies first, so overlapping source and target rows are safe
            c.k[:m, :, :S] = c.k[idx, :, :S]
            c.v[:m, :, :S] = c.v[idx, :, :S]
        for t in (tokens, pos, logprob, live):
            t[:m] = t[idx]
        live[m:width] = False
        slots[:width] = [slots[r] for r in keep] + [None] * (width - m)
        return m

    width = 0  # rows [0, width) are decoded, the rest are idle
    bar = tqdm(total=len(queue), disable=not progress, unit="completion", desc="sampling")
    with pack_linears(model) if not compile and can_pack(model, B) else nullcontext():
        header = [(c.k[0], c.v[0]) for c in prefill_causal(model, [common])] if common else None
        while True:
            free = [r for r, s in enumerate(slots) if s is None]
            if queue and free:
                admit(free)
                width = max(width, max(r for r, s in enumerate(slots) if s is not None) + 1)
            n_live = sum(s is not None for s in slots)
            if n_live == 0:
                break
            if not queue and not compile and n_live <= width * 3 // 4:
                width = compact(width)

            W = B if compile else width
            S = L if compile else max(s.pos for s in slots[:W] if s is not None) + 1
            logits = step(model, caches, tokens[:W], pos[:W], key_pos[:S])  # (W, V) fp32
            if temperature == 0.0:  # one pass finds the argmax and logsumexp's shift (~1% a step)
                top, nxt = logits.max(-1)
                # log softmax of the max: -log(sum(exp(logits - max)))
                logprob[:W] -= (logits - top[:, None]).exp_().sum(-1).log_()
            else:
                nxt = sample_next_token(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                )
                logprob[:W] += logits.gather(-1, nxt[:, None]).squeeze(-1) - logits.logsumexp(-1)
            tokens[:W] = nxt
            pos[:W] += live[:W]  # idle rows stay put

            finished = []
            for r, t in enumerate(nxt.tolist()):  # host sync: the sampled ids
                s = slots[r]
                if s is None:
                    continue
                s.ids.append(t)
                if t in stop_ids:
                    finished.append((r, "eos"))
                elif s.stop is not None and s.stop.add(s.ids) >= 0:
                    finished.append((r, "stop"))
                elif len(s.ids) >= limit[s.branch]:
                    finished.append((r, "length"))
            if finished:
                lp = logprob.tolist()
                for r, reason in finished:
                    s, br = slots[r], branches[slots[r].branch]
                    text = tokenizer.decode(s.ids[:-1] if reason == "eos" else s.ids)
                    # cut at the first stop string of the full decode: also at eos or the length
                    # limit, when the checker was still waiting on a partial character (U+FFFD)
                    cut = _find_stop(text, stop) if stop else -1
                    if cut >= 0:
                        text, reason = text[:cut], "stop"
                    c = Completion(text, s.ids, reason, lp[r], br.continuation)
                    results[br.prompt][br.out + s.sample] = c
                    slots[r] = None
                done = torch.tensor([r for r, _ in finished], device=device)
                live[done] = False
                # An idle row is still decoded until refilled or compacted away (always, when
                # compiled): park it at position 0 of its own row, inside the cache whatever its
                # length.
                pos[done] = 0
                bar.update(len(finished))
    bar.close()
    return results


def _common_len(seqs: list[list[int]], limit: int) -> int:
    """How many leading tokens (at most limit) all sequences share."""
    for seq in seqs[1:]:
        limit = next((j for j in range(limit) if seq[j] != seqs[0][j]), limit)
    return limit


def _prefill_chunks(groups: list[list[int]], branches: list[_Branch], header_len: int):
    """Consecutive prompts' branches, about PREFILL_TOKENS (rows x longest prompt past the
    header) at a time."""
    chunk, longest = [], 0
    for g in groups:
        longest_g = max(len(branches[i].ids) for i in g) - header_len
        if chunk and (len(chunk) + len(g)) * max(longest, longest_g) > PREFILL_TOKENS:
            yield chunk
            chunk, longest = [], 0
        chunk, longest = chunk + g, max(longest, longest_g)
    if chunk:
        yield chunk


def main(model: str, prompt: str, chat=False, dtype="float32", device="cpu", **kw):
    """Load a model and print the completions of one prompt (kw: generate's keywords)."""
    from model import Tokenizer, Transformer, check_device

    check_device(device)
    net = Transformer.from_pretrained(model, device=device, dtype=getattr(torch, dtype))
    tokenizer = Tokenizer.from_pretrained(model)
    if chat:
        prompt = tokenizer.chat([{"role": "user", "content": prompt}])
    (completions,) = generate(net, tokenizer, [prompt], **kw)
    for i, c in enumerate(completions):
        print(f"--- {i} [{c.finish_reason}, {len(c.token_ids)} tokens, logprob {c.logprob:.2f}]")
        print(c.text)
    return completions


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample completions from a model.")
    parser.error = lambda m: parser.exit(2, f"{parser.prog}: {m} (see --help)\n")  # no usage block
    parser.add_argument("--model", required=True, help="folder, alias (model.ALIASES) or HF id")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--n", type=int, default=1, help="completions to sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = off")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens, 0 = off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="cache rows decoded together")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (CUDA)")
    try:  # bad input: one line, not a traceback
        main(**vars(parser.parse_args()))
    except (ValueError, OSError) as e:  # OSError: e.g. no network for a download
        sys.exit(f"sample.py: {e}")
