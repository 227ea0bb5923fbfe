"""A decoder-only transformer that loads and saves Hugging Face checkpoints of three families.

    llama  SmolLM, SmolLM2, Llama 3 (incl. rope_scaling "llama3"): RMSNorm, SwiGLU, GQA, RoPE
    qwen2  Qwen2, Qwen2.5: llama plus a bias on the q/k/v projections
    gemma  Gemma 1: GeGLU (tanh GELU), sqrt(dim)-scaled embeddings, RMSNorm with (1 + w), MQA on 2B

Module names follow HF's state-dict layout: checkpoints load as they are, saved ones load in
transformers. `python model.py --model smollm2-135m-instruct --prompt "..."` prints a greedy
continuation (sample.py is the fast sampler). Weights come from a folder, an alias (ALIASES) or an
HF repo id (resolve_checkpoint); they are read, not memory-mapped as in gpt-fast (read_safetensors).

Sources: karpathy/nanoGPT and pytorch-labs/gpt-fast model.py (layout, KVCache, meta-device
loading); meta-llama/llama3 model.py (names, fp32 norms). Numerics follow transformers'
modeling_{llama,qwen2,gemma}.py: rotate_half RoPE, LlamaRMSNorm (cast before the weight multiply),
GemmaRMSNorm ((1 + w) in fp32, then cast), Gemma's embedding scale, _compute_llama3_parameters.
"""

import argparse
import http.client
import json
import math
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

# The paper's students are the instruct checkpoints of SmolLM-1.7B, Qwen2-0.5B/1.5B and Gemma 2B/7B
# (../shared/SPEC.md); the other sizes are for quick runs. Each alias also has an instruct form.
_BASE = {
    **{f"smollm-{s.lower()}": f"HuggingFaceTB/SmolLM-{s}" for s in ("135M", "360M", "1.7B")},
    **{f"smollm2-{s.lower()}": f"HuggingFaceTB/SmolLM2-{s}" for s in ("135M", "360M", "1.7B")},
    **{f"qwen2-{s.lower()}": f"Qwen/Qwen2-{s}" for s in ("0.5B", "1.5B")},
    **{f"qwen2.5-{s.lower()}": f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B")},
}
ALIASES: dict[str, str] = {
    **_BASE,
    **{f"{k}-instruct": f"{v}-Instruct" for k, v in _BASE.items()},
    **{f"gemma-{s}{it}": f"google/gemma-{s}{it}" for s in ("2b", "7b") for it in ("", "-it")},
}
FAMILIES = ("llama", "qwen2", "gemma")
# how decoding calls SDPA (Attention); a private torch helper, so its absence reads as no AMX
AMX_CPU = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@dataclass
class ModelConfig:
    family: str  # one of FAMILIES
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "llama3", "factor": ..., ...}
    max_seq_len: int
    tie_embeddings: bool
    qkv_bias: bool
    hf_config: dict = field(default_factory=dict, repr=False)  # config.json as read; saved back

    @classmethod
    def from_hf_config(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        def unsupported(what, expected):
            return ValueError(f"{source}: unsupported {what} (expected {expected})")

        family = d.get("model_type")
        if family not in FAMILIES:
            raise unsupported(f"model_type {family!r}", " or ".join(FAMILIES))
        # transformers 5 nests rope_theta and the scaling in rope_parameters; hub configs keep
        # rope_theta at the top level and the scaling in rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise unsupported(f"rope type {rope_type!r}", "default or llama3")
        act = d.get("hidden_act") or d.get("hidden_activation")
        if act not in (("gelu", "gelu_pytorch_tanh") if family == "gemma" else ("silu",)):
            raise unsupported(f"hidden_act {act!r} for {family}", "silu, or gelu for gemma")
        bias = () if family == "qwen2" else ("attention_bias",)
        if bad := [f for f in ("mlp_bias", "use_sliding_window", *bias) if d.get(f)]:
            raise unsupported(bad[0], "false")
        # the fields read as d[...] below: one line here, not a KeyError or a TypeError later
        sizes = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads"
        for f in sizes.split():
            if not isinstance(d.get(f), int) or d[f] < 1:
                raise ValueError(f"{source}: {f}={d.get(f)!r}; expected a positive integer")
        if not isinstance(d.get("rms_norm_eps"), (int, float)):
            raise ValueError(f"{source}: rms_norm_eps={d.get('rms_norm_eps')!r}; expected a number")
        n_heads = d["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            hidden_dim=d["intermediate_size"],
            norm_eps=d["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_seq_len=d.get("max_position_embeddings", 8192),
            tie_embeddings=d.get("tie_word_embeddings", family == "gemma"),  # HF class defaults
            qkv_bias=family == "qwen2",
            hf_config=d,
        )


# ----------------------------------------------------------------------------- the model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        # Gemma stores w for a norm computing (1 + w), so its identity is zeros.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # GemmaRMSNorm: (1 + w) in fp32, then cast
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)  # LlamaRMSNorm: cast, then multiply by w


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, (head_dim // 2,) in fp32, with llama3 scaling when configured."""
    hd, s = config.head_dim, config.rope_scaling
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, device="cpu").float() / hd)
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated (transformers' _compute_llama3_parameters, step for step).
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF's half-split layout: dim i pairs with dim i + head_dim / 2 (not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = hd = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * hd, config.dim, bias=False)
        self.qkv_proj = None  # while sampling on CPU: q, k and v in one matmul (sample.py)

    def forward(self, x, cos, sin, input_pos, mask, kv_cache) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.n_heads * hd, *[self.n_kv_heads * hd] * 2], -1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # RoPE
        if kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v)  # (B, n_kv_heads, S, hd)
        gqa = self.n_kv_heads != self.n_heads
        amx_bf16 = AMX_CPU and q.is_cpu and q.dtype == torch.bfloat16
        if T == 1 and gqa and mask is not None and not amx_bf16:
            # Decoding: the query heads sharing a kv head (consecutive) become its query rows, one
            # SDPA call (mask (B, 1, 1, S)): faster on CPU than enable_gqa's row per head in fp32
            # (a decode step 1.06x) and in bf16 without AMX (SDPA 2x), not in bf16 with AMX (0.91x)
            q = q.reshape(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, 1, hd)
        else:
            # enable_gqa shares kv heads without copying them (HF's repeat_kv); with a 4-D mask
            # SDPA takes the fast CPU kernel, not the math one
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )  # (B, n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.gemma = config.family == "gemma"
        self.gate_up_proj = None  # while sampling on CPU: gate and up in one matmul (sample.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        # Gemma's config says "gelu" but means the tanh approximation (transformers PR #29402)
        gate = F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)
        return self.down_proj(gate * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        gemma = config.family == "gemma"
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, unit_offset=gemma)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, unit_offset=gemma)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos, mask, kv_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """One layer's keys and values: (B, n_kv_heads, max_len, head_dim) buffers; slot = position."""

    def __init__(self, shape: tuple, dtype, device):
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, n_kv_heads, T, head_dim); input_pos: (T,) for all rows or (B, T) per row.
        # Indices on dims 0 and 2 put their (B, T) shape first: (B, T, n_kv_heads, head_dim).
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2)
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache, self.v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # On the meta device (from_pretrained) the embedding skips its normal_ init and the RoPE
        # table is computed on the CPU: torch's meta kernels for them import ~70 MB (sympy, dynamo).
        V, D = config.vocab_size, config.dim
        embed = nn.Embedding(V, D, _weight=torch.empty(V, D))
        if not embed.weight.is_meta:
            nn.init.normal_(embed.weight)  # nn.Embedding's own init
        self.model = nn.Module()  # HF's "model." prefix on the decoder's weights
        self.model.embed_tokens = embed
        self.model.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.model.norm = RMSNorm(D, config.norm_eps, unit_offset=config.family == "gemma")
        self.lm_head = None if config.tie_embeddings else nn.Linear(D, V, bias=False)
        inv_freq = rope_inv_freq(config).to(embed.weight.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) casts every float buffer; the RoPE frequencies stay fp32, as in HF
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def setup_kv_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        w, c = self.model.embed_tokens.weight, self.config
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        return [KVCache(shape, w.dtype, w.device) for _ in range(c.n_layers)]

    def forward(self, tokens, input_pos=None, mask=None, kv_cache=None, last_only=False):
        """tokens (B, T) -> float32 logits (B, T, vocab), or (B, 1, vocab) when last_only.
        input_pos: (T,) or (B, T) positions (default arange(T)), also the cache slots written.
        mask: bool, broadcastable to (B, 1, T, S), True = may attend, a True in every row (else
        NaN); None = causal (with a KVCache, position p sees slots <= p)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if mask is None and kv_cache is not None:
            slots = torch.arange(kv_cache[0].k_cache.shape[2], device=tokens.device)  # (S,)
            mask = (slots <= input_pos[..., None]).view(-1, 1, T, len(slots))  # (B or 1, 1, T, S)
        elif mask is not None:
            mask = mask[(None,) * (4 - mask.dim())]  # (.., 1, T, S): the CPU flash kernel wants 4-D
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        if self.config.family == "gemma":  # HF rounds the fp32 normalizer to the weights' dtype
            x = x * torch.tensor(self.config.dim**0.5).to(x.device, x.dtype)
        freqs = input_pos[..., None].float() * self.inv_freq  # (B or 1, T, hd / 2), fp32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1).view(-1, 1, T, 2 * len(self.inv_freq))
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (B or 1, 1, T, hd)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, input_pos, mask, None if kv_cache is None else kv_cache[i])
        if last_only:
            x = x[:, -1:]  # (B, 1, dim)
        x = self.model.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight).float()  # tied: (B, T, vocab)
        return self.lm_head(x).float()

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32) -> "Transformer":
        folder = resolve_checkpoint(name_or_path)
        path = folder / "config.json"
        config = ModelConfig.from_hf_config(read_json(path), str(path))
        with torch.device("meta"):  # placeholders without memory, replaced by the weights below
            model = cls(config)
        state = load_weights(folder, model.state_dict(), device, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)  # non-persistent, so still on meta
        return model.eval()

    def save_pretrained(self, folder, tokenizer: "Tokenizer | None" = None) -> None:
        """config.json + model.safetensors (+ tokenizer files) in HF layout, replaced atomically."""
        folder, state = Path(folder), self.state_dict()
        with torch.device("meta"):
            expected = Transformer(self.config).state_dict().keys()
        if state.keys() != expected or not self.config.hf_config:
            odd = sorted(state.keys() ^ expected)[:1] or ["(no hf_config)"]
            raise ValueError(
                f"{folder}: cannot save a model that is not in HF layout: {odd[0]} "
                "(merge LoRA adapters first; build configs with from_hf_config)"
            )
        hf = dict(self.config.hf_config)
        hf["torch_dtype"] = hf["dtype"] = str(self.model.embed_tokens.weight.dtype)[len("torch.") :]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tmp.chmod(0o755)
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            # the old folder stays whole until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            if folder.exists():
                folder.rename(old / folder.name)
            tmp.rename(folder)
            shutil.rmtree(old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints
def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """(source, files): model.safetensors alone, else the index and the shards it names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file() or not index.is_file():
        return single, [single]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map (expected a safetensors index)")
    names = sorted(set(weight_map.values()))
    return index, [folder / name for name in names]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}  # fmt: skip


def read_safetensors(path: Path):
    """Yield (name, shape, read) per tensor of a safetensors file; read(name, dtype, device) returns
    it in memory of its own (read, not mapped: sample.pack_linears frees weights while packed)."""
    bad = lambda why: ValueError(f"{path}: not a valid safetensors file ({why})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= size - 8:
            raise bad(f"header length {n} in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = {}
            for key, e in header.items():
                begin, end = map(int, e["data_offsets"])
                entries[key] = e["dtype"], tuple(map(int, e["shape"])), begin, end
            largest = max((end - begin for _, _, begin, end in entries.values()), default=0)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise bad(f"header: {type(e).__name__} {e}") from None
        scratch = None  # conversions read the file here: no heap hole left per tensor

        def read(key, dtype, device):
            nonlocal scratch
            src, shape, begin, end = entries[key]
            if src not in SAFETENSORS_DTYPES:
                raise bad(f"{key!r} has dtype {src}, not one of {', '.join(SAFETENSORS_DTYPES)}")
            src = SAFETENSORS_DTYPES[src]
            nbytes = math.prod(shape) * src.itemsize
            if begin < 0 or end - begin != nbytes or 8 + n + end > size:
                raise bad(f"{key!r} has data_offsets {[begin, end]}, shape {shape}; {size} bytes")
            direct = src == dtype and torch.device(device).type == "cpu"
            if direct:
                buf = torch.empty(shape, dtype=dtype)
            else:
                scratch = torch.empty(largest, dtype=torch.uint8) if scratch is None else scratch
                buf = scratch[:nbytes].view(src).view(shape)
            f.seek(8 + n + begin)
            f.readinto(buf.view(-1).view(torch.uint8).numpy())
            return buf if direct else buf.to(device=device, dtype=dtype)

        for key, (_, shape, _, _) in entries.items():
            yield key, shape, read


def load_weights(folder: Path, expected: dict, device, dtype) -> dict:
    """Every tensor `expected` (name -> meta tensor) names, shape-checked, as dtype on device."""
    source, files = weight_files(folder)
    if not source.is_file():
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    if lost := [f.name for f in files if not f.is_file()]:
        raise ValueError(f"{source}: shard {lost[0]} is missing")
    # tied checkpoints may still carry lm_head.weight; old conversions saved RoPE tables
    ignored = re.compile(r"lm_head\.weight|.*rotary_emb\.inv_freq")
    state = {}
    for path in files:
        for key, shape, read in read_safetensors(path):
            if key not in expected and ignored.fullmatch(key):
                continue
            if key not in expected:
                raise ValueError(f"{path}: unexpected tensor {key!r} (not in the model)")
            want = tuple(expected[key].shape)
            if shape != want:
                raise ValueError(f"{path}: tensor {key!r} has shape {shape}, not {want}")
            state[key] = read(key, dtype, device)
    if missing := [k for k in expected if k not in state]:
        key, shape = missing[0], tuple(expected[missing[0]].shape)
        raise ValueError(f"{source}: missing tensor {key!r}, shape {shape} ({len(missing)} in all)")
    return state


REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def resolve_checkpoint(name_or_path, *, weights: bool = True) -> Path:
    """A folder with the checkpoint's files: the folder given, an HF cache snapshot, or a download
    into $SIKED_CACHE/{org}--{name}. weights=False is enough for the tokenizer."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
        return path
    repo = ALIASES.get(str(name_or_path), str(name_or_path))
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: not a folder, an HF repo id "
            f"(org/name) or an alias ({', '.join(ALIASES)})"
        )
    slug = repo.replace("/", "--")
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cached = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub") / f"models--{slug}"
    dest = Path(os.environ.get("SIKED_CACHE") or Path.home() / ".cache" / "siked") / slug
    folders = [dest]
    if (cached / "refs" / "main").is_file():  # an HF cache snapshot comes first
        folders.insert(0, cached / "snapshots" / (cached / "refs" / "main").read_text().strip())
    for folder in folders:
        files = [folder / f for f in REQUIRED_FILES] + (weight_files(folder)[1] if weights else [])
        if all(f.is_file() for f in files):
            return folder
    # config first (a gated repo fails fast), weights last (their presence marks a full folder)
    for name in ("config.json", *OPTIONAL_FILES, *REQUIRED_FILES[1:]):
        download(repo, name, dest, optional=name in OPTIONAL_FILES)
    if weights and not download(repo, "model.safetensors", dest, optional=True):
        download(repo, "model.safetensors.index.json", dest)
        for shard in weight_files(dest)[1]:
            download(repo, shard.name, dest)
    return dest


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new and auth and urlsplit(newurl).netloc == urlsplit(req.full_url).netloc:
            new.add_unredirected_header("Authorization", auth)
        return new


def download(repo: str, name: str, dest: Path, optional: bool = False) -> bool:
    """Fetch {endpoint}/{repo}/resolve/main/{name} into dest/name, resuming dest/name.part; False
    for a missing optional file. HF_TOKEN follows same-host redirects only: the hub sends LFS
    files to signed CDN URLs that reject a second credential."""
    target, part = dest / name, dest / (name + ".part")
    if target.is_file():
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = f"{endpoint.rstrip('/')}/{repo}/resolve/main/{name}"
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "siked"})
    if token := os.environ.get("HF_TOKEN"):
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.build_opener(_SameHostAuth).open(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            hint = "the repo is gated, private or missing; accept its licence and set HF_TOKEN"
            raise ValueError(f"{repo}: HTTP {e.code} for {name}: {hint}") from None
        if e.code == 404 and optional:
            return False
        if e.code == 404:
            raise ValueError(f"{repo}: no file {name} (HTTP 404 from {url})") from None
        if e.code == 416 and have:  # the range starts at or past the end: start over
            part.unlink()
            return download(repo, name, dest, optional)
        raise ConnectionError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # no network, no such host, a timeout
        reason = getattr(e, "reason", None) or e
        raise ConnectionError(f"{url}: cannot download {repo} ({reason})") from None
    with resp:
        dest.mkdir(parents=True, exist_ok=True)  # once the server answers: a 404 leaves no folder
        have = have if resp.status == 206 else 0  # 200: the server ignored the Range header
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, leave=False)
        try:
            with open(part, "ab" if have else "wb") as f, bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(f"{url}: {e}; run again to resume from {part}") from None
    if total is not None and (got := part.stat().st_size) != total:
        raise ConnectionError(f"{url}: got {got} of {total} bytes; run again to resume from {part}")
    part.replace(target)
    return True


# ----------------------------------------------------------------------------- tokenizer
def read_json(path: Path) -> dict:
    """A JSON object file's content; a one-line ValueError naming the file if it is damaged."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # json's own message names no file
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _ids(x) -> list:  # config ids are a number, a list or null
    return [] if x is None else x if isinstance(x, list) else [x]


class Tokenizer:
    """tokenizers.Tokenizer plus the checkpoint's special ids and its chat format, written by hand.
    encode(text, bos=tok.add_bos) equals transformers' tokenizer(text), special tokens included,
    except that a text already starting with <bos> (a Gemma chat) gets no second one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / "tokenizer.json").is_file():
            raise ValueError(f"{self.folder}: no tokenizer.json")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"{self.folder}/tokenizer.json: not a valid tokenizer ({e})") from None
        names = ("tokenizer_config.json", "config.json", "generation_config.json")
        paths = [self.folder / name for name in names]
        tc, cfg, gen = (read_json(p) if p.is_file() else {} for p in paths)

        def special_id(kind: str) -> int | None:  # tokenizer_config first, then the configs
            tok = tc.get(f"{kind}_token")
            if tok is not None:
                return self.tok.token_to_id(tok["content"] if isinstance(tok, dict) else tok)
            return (_ids(cfg.get(f"{kind}_token_id", gen.get(f"{kind}_token_id"))) or [None])[0]

        self.bos_id, self.eos_id, self.pad_id = map(special_id, ("bos", "eos", "pad"))
        if self.pad_id is None:  # padded positions are masked out: any id will do
            self.pad_id = self.eos_id
        # as transformers' tokenizer(text): add_bos_token if given, else tokenizer.json decides
        adds_bos = self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = bool(tc.get("add_bos_token", adds_bos)) and self.bos_id is not None
        turn_ends = [self.tok.token_to_id(t) for t in ("<|im_end|>", "<end_of_turn>")]
        ids = [self.eos_id, *_ids(cfg.get("eos_token_id")), *_ids(gen.get("eos_token_id"))]
        self.stop_ids = {i for i in ids + turn_ends if i is not None}

        template = tc.get("chat_template") or ""
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t["name"] == "default"), "")
        if (self.folder / "chat_template.jinja").is_file():
            template = (self.folder / "chat_template.jinja").read_text()
        formats = {"<|im_start|>": "chatml", "<start_of_turn>": "gemma"}
        self.chat_format = next((f for t, f in formats.items() if t in template), "plain")
        # the system prompt a ChatML template inserts when a conversation has none (SmolLM2,
        # Qwen2); its "\n" is a real newline or the escape inside a Jinja string
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]*?)<\|im_end\|>", template)
        self.default_system = m.group(1) if m else None
        self.bos_text = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        return cls(resolve_checkpoint(name_or_path, weights=False))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of transformers' apply_chat_template, or role-labelled paragraphs for a base
        model without a template (Gemma's starts with <bos>, which encode does not repeat)."""
        if self.chat_format == "chatml":
            if self.default_system is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.chat_format == "gemma":  # no system role; user/model turns alternate
            text = self.bos_text
            for i, m in enumerate(messages):
                role = "model" if m["role"] == "assistant" else m["role"]  # Gemma's own name too
                if role != ("user" if i % 2 == 0 else "model"):
                    raise ValueError(
                        f"Gemma chat: message {i} has role {m['role']!r} (expected "
                        "user and assistant turns alternating, user first)"
                    )
                text += f"<start_of_turn>{role}\n{m['content'].strip()}<end_of_turn>\n"
            return text + ("<start_of_turn>model\n" if add_generation_prompt else "")
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", *OPTIONAL_FILES):
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, Path(folder) / name)


def check_device(name: str) -> torch.device:
    """A --device as a torch.device; a one-line error for a bad or missing one (torch's are not)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device


@torch.no_grad()
def greedy(model: Transformer, prompt_ids: list[int], max_new_tokens: int, stop_ids=()) -> list:
    """The simplest cached decoding loop: one prefill, then one token per step."""
    device, T = model.model.embed_tokens.weight.device, len(prompt_ids)
    cache = model.setup_kv_cache(1, T + max_new_tokens)
    tokens = torch.tensor([prompt_ids], device=device)  # (1, T)
    logits = model(tokens, torch.arange(T, device=device), kv_cache=cache, last_only=True)
    out = []
    for pos in range(T, T + max_new_tokens):
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in stop_ids or len(out) == max_new_tokens:
            break
        tokens = torch.tensor([[out[-1]]], device=device)  # (1, 1)
        logits = model(tokens, torch.tensor([pos], device=device), kv_cache=cache)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Load a checkpoint and print a greedy continuation.")
    p.error = lambda m: p.exit(2, f"{p.prog}: {m} (see --help)\n")  # one line, no usage block
    p.add_argument("--model", default="smollm2-135m-instruct", help="folder, alias or HF repo id")
    p.add_argument("--prompt", default="The capital of France is", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format")
    args = p.parse_args()
    try:  # bad input: one line, not a traceback
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected >= 0")
        check_device(args.device)
        net = Transformer.from_pretrained(args.model, args.device, getattr(torch, args.dtype))
        tok = Tokenizer.from_pretrained(args.model)
        text = tok.chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        prompt_ids = tok.encode(text, bos=tok.add_bos)
        if not prompt_ids:
            raise ValueError(f"--prompt {args.prompt!r}: expected text of at least one token")
    except (ValueError, OSError) as e:  # OSError: e.g. no network for a download
        sys.exit(f"model.py: {e}")
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {args.dtype} on {args.device}")
    ids = greedy(net, prompt_ids, args.max_new_tokens, tok.stop_ids)
    print(text + tok.decode(ids))
