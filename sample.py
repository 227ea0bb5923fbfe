"""Batched KV-cache sampling with shared prefixes and continuous batching.

SIKeD spends most of its compute here: each iteration the student writes 10 solutions per strategy
for every training question (../shared/SPEC.md), and every evaluation decodes greedily. One call:

    completions = generate(model, tokenizer, prompts, n=10, max_new_tokens=512, temperature=0.7,
                           top_p=0.95, stop=STOP, seed=0)

    python sample.py --model smollm2-135m-instruct --prompt "What is 2+3?" --chat --n 4 \
        --temperature 0.7 --top-p 0.95 --max-new-tokens 64

Sources: pytorch-labs/gpt-fast generate.py (preallocated cache written at `input_pos`, separate
prefill / decode step / sampling functions, the compiled decode step), meta-llama/llama3
generation.py (ragged batches, per-row eos), karpathy/nanochat engine.py (prefill a prompt once,
copy its cache to every sample row), vLLM's incremental detokenizer (stop strings checked on a
small decoded window), FlashInfer's sorting-free top-p sampling (rejection).

Design, and why:
1. Per-row positions, not left padding. Each cache row ("slot") holds one sample at positions
   0..pos; a boolean mask `key_pos <= pos` (True = attend) hides whatever the row held before. So a
   row can be refilled with a new prompt of any length without touching the others, and RoPE sees
   the same positions as an unpadded run (padding and batch invariance).
2. Continuous batching: a row that hits eos, a stop string or its length limit is refilled from the
   queue at once. Dropping finished rows instead would leave the batch shrinking to its slowest row
   for every chunk of prompts; with SIKeD's ragged lengths (a few to 512 tokens) refilling keeps the
   matrix multiplies full. Once the queue is empty, the live rows are compacted to the front of the
   cache whenever a quarter of the width is idle, so finished rows stop costing compute.
3. Shared prefixes: a prompt's text and each forced continuation are tokenized whole (exactly the
   tokens a plain prompt would get; BPE may merge across the boundary), the longest token prefix
   common to all continuations is prefilled once, each continuation once on top of it, and that
   prefix cache is copied into each sample's row at admission. The copy (prompt length x layers, a
   few MB) costs about as much as one decode step of that row; reading a shared prefix without
   copying would need either a gather per step (a copy every step) or a two-part attention merged
   by log-sum-exp inside the model's attention, which SDPA behind the model's
   `update(input_pos, k, v) -> (k, v)` protocol cannot express. One copy per sample is the simplest
   correct choice and leaves the decode step a single SDPA call.
4. The last prompt token is not prefilled: it is the first decode input of its row. So every decode
   step produces a generated token for every live row, prefill only needs `last_only` logits (that
   it discards), and the first token of each of a prompt's n samples is drawn independently.
5. Our own cache class (RowKVCache) instead of model.KVCache: it returns only the first `kv_len`
   positions (the longest live row), not the whole preallocated buffer, so attention costs what the
   rows hold, and its buffers are zero-filled so masked, never-written keys can't inject NaN.
6. Sampling costs a few passes over the (rows, vocab) logits, never a sort: one uniform per row
   against the cumulative distribution, and top-p by rejection (see _sample_nucleus). On CPU a
   sort of 60 x 49k logits costs about as much as a decode step of the 135M model. One host sync
   per decode step (the sampled ids, needed for eos, stop strings and refills), plus one per
   top-p rejection round, not one per row.
7. CUDA: the model runs in the dtype it was loaded in (bf16 recommended) and attends with SDPA,
   which picks the fused memory-efficient kernel for a boolean mask. `compile=True` compiles the
   decode step (torch.compile, mode="reduce-overhead": CUDA graphs) with static shapes: all
   `batch_size` rows and the whole cache length every step (the mask hides the rest), so it
   compiles once; rows are then never compacted. Written for CUDA, not measured on these CPU
   machines; on CPU it still works (inductor, no graphs) but the static length costs more than it
   saves.

Log-probabilities: `Completion.logprob` is the sum, over the generated tokens (eos included, tokens
after a stop string included), of log softmax of the model's raw fp32 logits, i.e. the model's own
probability of the text, before temperature, top-k and top-p. It is defined for greedy decoding too
and does not change with the sampling settings.
"""

import argparse
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

# Prompt tokens per prefill forward (rows x padded length): bounds prefill activations and the
# temporary prefix caches.
PREFILL_TOKENS = 1024


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


class RowKVCache:
    """Preallocated keys/values of one layer, one row per sample, positions per row.

    `update(input_pos, k, v)` writes this step's (B, n_kv_heads, T, head_dim) keys/values at
    `input_pos` ((B, T) or (T,)) of the first B rows and returns those rows' first `kv_len`
    positions: views, no copy. The caller sets `kv_len` (and masks stale positions) before each
    forward.
    """

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        # zeros, not empty: a masked key still enters SDPA's weighted sum with weight 0, and 0 * NaN
        # from uninitialised memory would be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_len = max_len
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (batch_size, 1)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, T = k.shape[0], k.shape[2]
        rows = self.rows[:B]  # (B, 1)
        # advanced indexing on dims 0 and 2 puts them first: the target is (B, T, n_kv_heads,
        # head_dim). (scatter_ along dim 2 would be the obvious call, but on CPU it copies the
        # whole buffer: ~400x slower per decode step.)
        self.k[rows, :, input_pos.expand(B, T)] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, input_pos.expand(B, T)] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:B, :, : self.kv_len], self.v[:B, :, : self.kv_len]  # views


def setup_caches(model, batch_size: int, max_len: int) -> list[RowKVCache]:
    cfg = model.config
    weight = next(model.parameters())
    return [
        RowKVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, weight.dtype, weight.device)
        for _ in range(cfg.n_layers)
    ]


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-k, then top-p (nucleus) filtering of (B, V) fp32 logits, the reference definition.

    Returns (values, token_ids), both (B, K): each row's K candidate tokens in descending order of
    logit (K = top_k, or V), the ones filtered out set to -inf. top-k keeps exactly k tokens (ties
    at the k-th broken by torch.topk). top-p keeps the smallest prefix, in descending order, whose
    probability reaches top_p: a token is dropped when the tokens above it already hold >= top_p
    (HF's TopPLogitsWarper), with probabilities renormalised over the top-k when top-k is on.
    """
    V = logits.shape[-1]
    if top_k > 0:
        values, ids = logits.topk(min(top_k, V), dim=-1)  # (B, k), descending
    else:
        values, ids = logits.sort(dim=-1, descending=True)  # (B, V)
    if top_p < 1.0:
        probs = values.softmax(-1)  # (B, K), renormalised over the candidates
        mass_above = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        values = values.masked_fill(mass_above >= top_p, float("-inf"))
    return values, ids


def _sample_cdf(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of (B, K) probabilities (unnormalised is fine) -> (B,) indices.

    Inverse CDF: a single uniform per row against the cumulative sum. An exponential race
    (gpt-fast) needs K random numbers per row, which on CPU costs ~20x more for a 49k vocabulary;
    torch.multinomial is as slow. Zero-probability entries are never picked (right=True).
    """
    cdf = probs.cumsum(-1)  # (B, K)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def _sample_nucleus(probs: Tensor, top_p: float, generator: torch.Generator) -> Tensor:
    """Exact top-p sampling from (B, V) probabilities without sorting the vocabulary.

    Draw from the allowed tokens (at first all of them); accept the draw if the tokens strictly
    more likely than it hold < top_p, i.e. it is in the nucleus. Otherwise it and every token at
    most as likely are outside the nucleus too: exclude them and draw again. Given acceptance each
    draw is distributed as p over the nucleus, so the result is exactly p renormalised over it
    (rejection sampling; FlashInfer samples top-p this way). A first draw is rejected with
    probability 1 - mass(nucleus) ~ 1 - top_p, so ~1.05 rounds on average, each a few passes over
    (B, V), against a full sort that costs ~50x a pass on CPU. Ties exactly at the boundary go out
    together, where filter_logits's sort would break them arbitrarily.
    """
    B = probs.shape[0]
    out = torch.empty(B, dtype=torch.long, device=probs.device)
    floor = torch.full((B, 1), -1.0, device=probs.device)  # allowed: p > floor
    todo = torch.arange(B, device=probs.device)
    p = probs
    while True:
        draw = _sample_cdf(p * (p > floor), generator)  # (n,)
        p_draw = p.gather(-1, draw[:, None])  # (n, 1)
        mass_above = (p * (p > p_draw)).sum(-1)  # (n,)
        ok = mass_above < top_p
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
        values, ids = filter_logits(logits, top_k, top_p)  # (B, k)
        return ids.gather(-1, _sample_cdf(values.softmax(-1), generator)[:, None]).squeeze(-1)
    probs = logits.softmax(-1)  # (B, V)
    if top_p >= 1.0:
        return _sample_cdf(probs, generator)
    return _sample_nucleus(probs, top_p, generator)


# ----------------------------------------------------------------------------- stop strings


class StopChecker:
    """Finds stop strings in a row's text as its tokens arrive, decoding only a small tail window.

    Incremental detokenisation as vLLM does it: decode ids[prefix_offset:] and keep the text past
    the already-emitted ids[prefix_offset:read_offset]; decoding from a token a little before the
    new ones gets the spacing and multi-token characters right, and a trailing U+FFFD (half of a
    UTF-8 character) waits for the next token. Only the new text plus len(longest stop) - 1
    characters before it are searched, so a stop string that spans tokens is found once, at its
    first occurrence.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.lookback = max(len(s) for s in stop) - 1
        self.text = ""
        self.prefix_offset = self.read_offset = 0
        self.prefix_text = ""

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


# ----------------------------------------------------------------------------- forward passes


def prefill(
    model, branches: list[_Branch], n_shared: list[int]
) -> list[list[tuple[Tensor, Tensor]]]:
    """Prefill each branch's tokens but the last; returns per branch, per layer, (k, v) views of
    shape (n_kv_heads, len(ids) - 1, head_dim).

    Branches come grouped by prompt; n_shared[i] is the number of leading tokens branch i shares
    with the other branches of its prompt (equal within a group). Stage 1 prefills each prompt's
    shared tokens once (rows = prompts, right-padded: pad keys sit after every real one, so plain
    causal masking suffices); stage 2 copies each prompt's cache to its branches' rows and
    prefills each branch's own tokens on top, at per-row positions with a mask.
    """
    cfg = model.config
    device = next(model.parameters()).device
    firsts, group = [], []  # each prompt's first branch; each branch's prompt row in stage 1
    for i, b in enumerate(branches):
        if i == 0 or b.prompt != branches[i - 1].prompt:
            firsts.append(i)
        group.append(len(firsts) - 1)
    group = torch.tensor(group, device=device)
    T = max(n_shared[i] for i in firsts)
    shared = setup_caches(model, len(firsts), max(T, 1))
    if T > 0:
        tokens = _pad([branches[i].ids[: n_shared[i]] for i in firsts], T, device)  # (R, T)
        input_pos = torch.arange(T, device=device)  # (T,)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, S=T)
        _set_kv_len(shared, T)
        model(tokens, input_pos, causal.view(1, 1, T, T), shared, last_only=True)

    segments = [b.ids[n_shared[i] : -1] for i, b in enumerate(branches)]
    Tc = max(len(s) for s in segments)
    if Tc == 0:
        caches, rows = shared, group.tolist()
    else:
        caches = setup_caches(model, len(branches), T + Tc)
        for c, s in zip(caches, shared, strict=True):
            c.k[:, :, :T] = s.k[group, :, :T]  # (Rb, n_kv_heads, T, head_dim)
            c.v[:, :, :T] = s.v[group, :, :T]
        del shared
        tokens = _pad(segments, Tc, device)  # (Rb, Tc)
        start = torch.tensor(n_shared, device=device)[:, None]  # (Rb, 1)
        # pads get positions past their row's real tokens, clamped inside the RoPE table: never
        # attended by a real token (it only sees keys <= its own position)
        input_pos = (start + torch.arange(Tc, device=device)).clamp(max=cfg.max_seq_len - 1)
        key_pos = torch.arange(T + Tc, device=device)
        mask = key_pos.view(1, 1, 1, -1) <= input_pos[:, None, :, None]  # (Rb, 1, Tc, S)
        _set_kv_len(caches, T + Tc)
        model(tokens, input_pos, mask, caches, last_only=True)
        rows = list(range(len(branches)))
    return [
        [(c.k[r, :, : len(b.ids) - 1], c.v[r, :, : len(b.ids) - 1]) for c in caches]
        for r, b in zip(rows, branches, strict=True)
    ]


def decode_step(model, caches: list[RowKVCache], tokens: Tensor, pos: Tensor, key_pos: Tensor):
    """One token for each of the first W rows: tokens, pos (W,) -> fp32 logits (W, V).

    key_pos is arange(S), S = the cache length attended to (the longest live row + 1, or the whole
    cache for the compiled static-shape step).
    """
    W, S = tokens.shape[0], key_pos.shape[0]
    mask = (key_pos[None, :] <= pos[:, None]).view(W, 1, 1, S)  # row b sees its positions 0..pos[b]
    _set_kv_len(caches, S)
    return model(tokens.view(W, 1), pos.view(W, 1), mask, caches, last_only=True)[:, -1]


def _set_kv_len(caches: list[RowKVCache], kv_len: int) -> None:
    for c in caches:
        c.kv_len = kv_len


def _pad(rows: list[list[int]], T: int, device) -> Tensor:
    return torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- generate


def _check_args(prompts, n, max_new_tokens, temperature, top_p, top_k, stop, batch_size) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts is empty; expected at least one prompt")
    if n < 1:
        raise ValueError(f"n={n}; expected n >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; expected >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}; expected 0 < top_p <= 1")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}; expected >= 0 (0 = off)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop={stop!r}; expected a sequence of non-empty strings")
    for i, p in enumerate(prompts):
        if isinstance(p, SharedPrompt):
            if not p.continuations or any(k < 1 for _, k in p.continuations):
                raise ValueError(
                    f"prompts[{i}].continuations={p.continuations!r}; expected n >= 1 each"
                )
        elif not isinstance(p, str):
            raise ValueError(f"prompts[{i}] is a {type(p).__name__}; expected str or SharedPrompt")


def _tokenize(tokenizer, prompts, n: int, max_seq_len: int) -> tuple[list[_Branch], list[int]]:
    """Branches in prompt order and, per branch, the token count shared within its prompt."""
    branches, n_shared = [], []
    for i, p in enumerate(prompts):
        pairs = p.continuations if isinstance(p, SharedPrompt) else [("", n)]
        prefix = p.prefix if isinstance(p, SharedPrompt) else p
        out, group = 0, []
        for cont, k in pairs:
            ids = tokenizer.encode(prefix + cont, bos=tokenizer.add_bos)
            if not ids:
                raise ValueError(f"prompts[{i}] is empty after tokenization; expected >= 1 token")
            if len(ids) >= max_seq_len:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; expected fewer than the model's "
                    f"max_seq_len={max_seq_len}"
                )
            group.append(_Branch(i, out, cont, ids, k))
            out += k
        # the longest common token prefix, leaving every branch at least its last token to decode
        shared = min(len(b.ids) - 1 for b in group)
        for b in group[1:]:
            shared = next((j for j in range(shared) if b.ids[j] != group[0].ids[j]), shared)
        branches += group
        n_shared += [shared] * len(group)
    return branches, n_shared


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

    A str gets n completions; a SharedPrompt gets its continuations' completions in order, each its
    own n (the `n` argument is ignored for it). batch_size = cache rows decoded together.
    Reproducible for a given seed, batch_size and compile flag. Text is the generated text only;
    it ends at eos (tokenizer.stop_ids), before the first stop string, after max_new_tokens, or
    when the sequence fills the model's max_seq_len.
    """
    _check_args(prompts, n, max_new_tokens, temperature, top_p, top_k, stop, batch_size)
    stop = tuple(stop)
    max_seq_len = model.config.max_seq_len
    branches, n_shared = _tokenize(tokenizer, prompts, n, max_seq_len)
    groups: list[list[int]] = [[] for _ in prompts]  # branch indices of each prompt
    for i, b in enumerate(branches):
        groups[b.prompt].append(i)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    stop_ids = set(tokenizer.stop_ids)

    # one request per completion, in output order
    queue = deque((b, j) for b in range(len(branches)) for j in range(branches[b].n))
    queued = [b.n for b in branches]  # samples of each branch not yet admitted
    limit = [min(max_new_tokens, max_seq_len - len(b.ids)) for b in branches]
    B = min(batch_size, len(queue))
    # a row prefills len(ids) - 1 tokens, decodes from its last prompt token, and its last input
    # sits at position len(ids) - 2 + limit
    L = max(len(b.ids) - 1 + lim for b, lim in zip(branches, limit, strict=True))
    caches = setup_caches(model, B, L)
    key_pos = torch.arange(L, device=device)

    tokens = torch.zeros(B, dtype=torch.long, device=device)  # next input of each row
    pos = torch.zeros(B, dtype=torch.long, device=device)  # its position
    logprob = torch.zeros(B, dtype=torch.float32, device=device)
    live = torch.zeros(B, dtype=torch.bool, device=device)
    rows = _Rows(B)
    results: list[list[Completion | None]] = [
        [None] * sum(branches[i].n for i in g) for g in groups
    ]
    # prefilled branches that still have queued samples: per layer (k, v)
    pending_kv: dict[int, list[tuple[Tensor, Tensor]]] = {}

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
            rows.start(
                r, (b, j), len(branches[b].ids) - 1, StopChecker(tokenizer, stop) if stop else None
            )
        todo = sorted({branches[b].prompt for b in new if b not in pending_kv})
        for chunk in _prefill_chunks([groups[p] for p in todo], branches):
            kvs = prefill(model, [branches[i] for i in chunk], [n_shared[i] for i in chunk])
            for b, kv in zip(chunk, kvs, strict=True):
                if b in new:
                    fill(b, new.pop(b), kv)
                if queued[b] > 0:  # keep a compact copy, not the prefill buffers
                    pending_kv[b] = [(k.clone(), v.clone()) for k, v in kv]
        for b, idx in new.items():
            fill(b, idx, pending_kv[b])
            if queued[b] == 0:
                del pending_kv[b]

    width = 0  # rows [0, width) are decoded, the rest are idle
    bar = tqdm(total=len(queue), disable=not progress, unit="completion", desc="sampling")
    while True:
        free = [r for r in range(B) if rows.req[r] is None]
        if queue and free:
            admit(free)
            width = max(width, max(r for r in range(B) if rows.req[r] is not None) + 1)
        n_live = sum(q is not None for q in rows.req)
        if n_live == 0:
            break
        if not queue and not compile and n_live <= width * 3 // 4:
            width = _compact(caches, rows, (tokens, pos, logprob, live), width)

        W = B if compile else width
        S = L if compile else max(rows.pos[r] for r in range(W) if rows.req[r] is not None) + 1
        logits = step(model, caches, tokens[:W], pos[:W], key_pos[:S])  # (W, V) fp32
        nxt = sample_next_token(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        logprob[:W] += logits.gather(-1, nxt[:, None]).squeeze(-1) - logits.logsumexp(-1)
        tokens[:W] = nxt
        pos[:W] += live[:W]  # idle rows stay put

        finished = []
        for r, t in enumerate(nxt.tolist()):  # host sync: the sampled ids
            if rows.req[r] is None:
                continue
            ids = rows.ids[r]
            ids.append(t)
            rows.pos[r] += 1
            if t in stop_ids:
                finished.append((r, "eos"))
            elif rows.stop[r] is not None and rows.stop[r].add(ids) >= 0:
                finished.append((r, "stop"))
            elif len(ids) >= limit[rows.req[r][0]]:
                finished.append((r, "length"))
        if finished:
            lp = logprob.tolist()
            for r, reason in finished:
                (b, j), ids = rows.req[r], rows.ids[r]
                text = tokenizer.decode(ids[:-1] if reason == "eos" else ids)
                if reason == "stop":  # cut at the first stop string of the full decode
                    cut = _find_stop(text, stop)
                    text = text if cut < 0 else text[:cut]
                br = branches[b]
                results[br.prompt][br.out + j] = Completion(
                    text, ids, reason, lp[r], br.continuation
                )
                rows.req[r] = None
            done = torch.tensor([r for r, _ in finished], device=device)
            live[done] = False
            # An idle row is still decoded until it is refilled or compacted away (always, when
            # compiled); park it at position 0 of its own row, inside the cache whatever its
            # length was.
            pos[done] = 0
            bar.update(len(finished))
    bar.close()
    return results


class _Rows:
    """Host-side state of the cache rows: each one's request, tokens, position and stop check."""

    def __init__(self, B: int):
        self.req: list[tuple[int, int] | None] = [None] * B  # (branch, sample index)
        self.ids: list[list[int]] = [[] for _ in range(B)]
        self.pos = [0] * B
        self.stop: list[StopChecker | None] = [None] * B

    def start(self, r: int, req: tuple[int, int], pos: int, stop: "StopChecker | None") -> None:
        self.req[r], self.ids[r], self.pos[r], self.stop[r] = req, [], pos, stop


def _prefill_chunks(groups: list[list[int]], branches: list[_Branch]):
    """Consecutive prompts' branches, about PREFILL_TOKENS (rows x longest prompt) at a time."""
    chunk, longest = [], 0
    for g in groups:
        longest_g = max(len(branches[i].ids) for i in g)
        if chunk and (len(chunk) + len(g)) * max(longest, longest_g) > PREFILL_TOKENS:
            yield chunk
            chunk, longest = [], 0
        chunk, longest = chunk + g, max(longest, longest_g)
    if chunk:
        yield chunk


def _compact(caches: list[RowKVCache], rows: _Rows, state: tuple[Tensor, ...], width: int) -> int:
    """Move the live rows of [0, width) to the front, in order; returns the new width."""
    keep = [r for r in range(width) if rows.req[r] is not None]
    m = len(keep)
    idx = torch.tensor(keep, device=state[0].device)
    S = max(rows.pos[r] for r in keep) + 1
    for c in caches:
        c.k[:m, :, :S] = c.k[idx, :, :S]  # the gather copies first, so overlapping rows are safe
        c.v[:m, :, :S] = c.v[idx, :, :S]
    for t in state:  # tokens, pos, logprob, live
        t[:m] = t[idx]
    state[-1][m:width] = False
    for lst in (rows.req, rows.ids, rows.pos, rows.stop):
        lst[:m] = [lst[r] for r in keep]
    rows.req[m:width] = [None] * (width - m)
    return m


# ----------------------------------------------------------------------------- CLI


def main(
    model: str,
    prompt: str,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: tuple[str, ...] = (),
    seed: int = 0,
    chat: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    batch_size: int = 64,
    compile: bool = False,
) -> list[Completion]:
    from model import Tokenizer, Transformer

    net = Transformer.from_pretrained(model, device=device, dtype=getattr(torch, dtype))
    tokenizer = Tokenizer.from_pretrained(model)
    if chat:
        prompt = tokenizer.chat([{"role": "user", "content": prompt}])
    (completions,) = generate(
        net,
        tokenizer,
        [prompt],
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        batch_size=batch_size,
        compile=compile,
    )
    for i, c in enumerate(completions):
        print(f"--- {i} [{c.finish_reason}, {len(c.token_ids)} tokens, logprob {c.logprob:.2f}]")
        print(c.text)
    return completions


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample completions from a model.")
    parser.add_argument(
        "--model", required=True, help="local folder, alias (model.ALIASES) or HF id"
    )
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--n", type=int, default=1, help="completions to sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = off")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens, 0 = off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="cache rows decoded together")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (CUDA)"
    )
    args = parser.parse_args()
    main(**{k: tuple(v) if k == "stop" else v for k, v in vars(args).items()})
