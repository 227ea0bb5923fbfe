"""
SIKeD in plain PyTorch: self-guided iterative knowledge distillation for math reasoning.

A small student learns three strategies (chain-of-thought, least-to-most, program-of-thought) from
a teacher, each solution tagged with its strategy, then trains again for T-1 iterations on a mix
of its own correct samples and teacher solutions for the problems it still fails:

    teacher -> iter1: train (Combined, tagged) -> eval
            -> iter t = 2..T: sample -> filter -> mix -> train (continual) -> eval

Paper: Adarsh, Shridhar, Gulcehre, Monath, Sachan, "SIKeD: Self-guided Iterative Knowledge
Distillation for Mathematical Reasoning", arXiv 2410.18574 (ACL Findings 2025). Hyperparameters
from the authors' code, github.com/shivam0109/SIKeD ([R]); the method and every open choice are in
SPEC.md. Loop and CLI modelled on nanoGPT's train.py and nanochat's chat_rl.py.

    python siked.py --model smollm-1.7b                      # the paper's settings, 3 iterations
                                                             # paper's student: smollm-1.7b-instruct
    python siked.py --model smollm2-135m-instruct --quick    # a small run: minutes on a CPU
    torchrun --nproc_per_node 8 siked.py --model qwen2-1.5b --micro-batch-size 1  # DDP, 8 x 1
    torchrun --nproc_per_node 8 siked.py --model gemma-7b-it --micro-batch-size 1 --full-finetune \
        --fsdp  # every weight sharded over the 8 processes
    python siked.py --model smollm-1.7b --strategies cot --iterations 1  # CoT-only baseline
    python siked.py --model smollm-1.7b --bias pot           # PoT-biased SIKeD
    python siked.py --model smollm-1.7b --teacher-url http://host:8000/v1 --teacher-model llama3-70b

Each stage of runs/<name>/ is a folder closed by an atomic DONE marker (JSON: its numbers and wall
time); a rerun skips finished stages and resumes an interrupted one from its last chunk or
checkpoint; report.md is rewritten after every stage. Under torchrun each process trains a replica
(DDP) or a shard of every weight (--fsdp, FSDP2), takes every world-th chunk of sampling and
evaluation, and only rank 0 writes shared files.

Departures from the paper, on purpose:
1. Teacher: without --teacher-url/--teacher-local, gold GSM8K rationales in each strategy's format
   (data/teacher.py) stand in for LLaMA-3 70B: one solution per (question, strategy). L2M needs
   GSM8K's train_socratic file; a strategy without teacher rows is dropped (and said so).
2. Each iteration keeps its last checkpoint; the report names the best iteration on the 10%
   held-out GSM8K-train split (seed 42), never on test ([R] chose its checkpoints on test).
3. Answers match with a relative tolerance of 1e-4, whole-number golds up to rounding noise only
   (--rel-tol 0: the paper's exact equality).
4. MultiArith: all 600 problems (the paper's 180-problem HF split cannot be rebuilt here); ASDiv:
   the 2,096 of 2,305 problems with a numeric answer (data/prepare.py).
5. The PoT sandbox (verify.py) has no sympy: programs that import it count as wrong ([R]'s prefix
   also defined solve_it; its math and lcm are here). Timeout 2 s, not 10.
6. Packing without cross-contamination: each example attends only to itself, positions from 0
   (TRL's packing of the time let examples see each other), and whole examples are packed greedily
   (TRL cut the stream of examples into full sequences): sequences end in padding.
7. LoRA by hand (not unsloth/PEFT), same r, alpha and targets; fp32 adapters on base weights in
   the run's dtype, bf16 autocast on CUDA.
8. transformers' linear warmup/decay schedule per optimizer step (step 0 runs at lr 0); 8 packed
   sequences per optimizer step; the loss is averaged over the step's tokens ([R]'s Trainer
   averaged per micro-batch); fp32 where bf16 is not supported (SPEC: fp16).
9. Biased SIKeD samples each strategy forced too (SPEC 5.2), then the priority order picks one
   solution per question; [R] let its biased students pick (--sampling free).
10. Off-policy (SPEC 1.6; the paper's setup is unknown): each student row of the mix gives way
   to another correct teacher solution of its (question, strategy), else to D_LLM's own (with
   --mix all, then twice in the set), else is dropped; needs an LLM teacher.
11. Answers (CoT, L2M): the number after the last "Final Answer:", else "####", else "the answer
   is", else the last number in the text (verify.py). [R] filters on the last number and
   evaluates only after "final answer:" and a few fallbacks, so an output that stops before its
   final answer may score here where [R] counts it wrong. Untagged outputs are read as CoT.
12. Prompts are this project's wording (strategies.py); the LLM teacher gets an 8-shot chat
   prompt per strategy, not an Alpaca one; sampling stops at the template's `###` sections.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
import typing
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import sample
import strategies as S
import verify
from data import prepare, teacher
from model import ModelConfig, Tokenizer, Transformer, resolve_checkpoint
from model import read_json as model_read_json

# ----------------------------------------------------------------------------------------- config


# --quick: a small run that finishes on a laptop CPU in minutes (parse_args fills these in where
# no flag is given; RunConfig(quick=True) alone only labels a run as quick).
QUICK = dict(train_limit=100, eval_limit=20, iterations=2, samples=1, epochs=1,
             sample_max_new_tokens=256, eval_max_new_tokens=256, chunk_size=64)  # fmt: skip
BIAS_ORDERS = {
    "cot": ("cot", "pot", "l2m"),
    "pot": ("pot", "cot", "l2m"),
    "l2m": ("l2m", "pot", "cot"),
}
STAGES = ("teacher", "train", "eval", "sample", "filter", "mix", "report")


def arg(default, help: str, choices: tuple[str, ...] | None = None, group: str | None = None):
    """A RunConfig field that parse_args makes a flag; `group` starts a group of flags there."""
    metadata = {"help": help, "choices": choices, "group": group}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """One run, a flag per field. Defaults are the paper's settings (SPEC.md section 2, from [R]'s
    configs)."""

    model: str = arg(
        "smollm-1.7b", "alias (model.ALIASES), HF repo id or local folder", group="model and run"
    )
    run_name: str | None = arg(None, "folder under --runs-dir (default: model and variant flags)")
    runs_dir: str = arg("runs", "where runs live")
    quick: bool = arg(False, f"a small run for a laptop CPU, minutes with a 135M model: {QUICK}")
    only: str | None = arg(None, "run only this stage, wherever its inputs are finished", STAGES)
    strategies: tuple[str, ...] = arg(
        ("cot", "l2m", "pot"),
        "comma list of cot,l2m,pot; one alone: untagged (with --iterations 1: its baseline)",
        group="data and teacher",
    )
    train_limit: int | None = arg(None, "training questions, of those not held out (default: all)")
    heldout_frac: float = arg(0.1, "share of GSM8K train held out, only to choose an iteration")
    eval_sets: tuple[str, ...] = arg(
        ("gsm8k", "svamp", "asdiv", "multiarith"), "comma list of gsm8k,svamp,asdiv,multiarith"
    )
    eval_limit: int | None = arg(None, "questions per eval set, a seeded subset (default: all)")
    rel_tol: float = arg(1e-4, "relative tolerance of an answer; 0: exact, as the paper")
    teacher_url: str | None = arg(None, "OpenAI-compatible teacher server (default: gold teacher)")
    teacher_model: str | None = arg(None, "the teacher's model name on that server")
    teacher_local: str | None = arg(None, "a teacher model (alias or folder) run in-process")
    teacher_samples: int = arg(10, "samples per question and strategy from an LLM teacher")
    iterations: int = arg(
        3, "T: iteration 1 distils the teacher data, 2..T are SIKeD's", group="SIKeD iterations"
    )
    samples: int = arg(10, "student samples per question and strategy")
    sampling: str = arg(
        "forced", "forced: each strategy's tag given; free: the student picks", ("forced", "free")
    )
    temperature: float = arg(0.7, "sampling temperature")
    top_p: float = arg(0.95, "sampling nucleus")
    sample_max_new_tokens: int = 512  # both set by --max-new-tokens
    eval_max_new_tokens: int = 1024
    mix: str = arg(
        "adaptive",
        "adaptive: teacher rows only where the student failed; all: the union",
        ("adaptive", "all"),
    )
    mix_rate: float | None = arg(None, "force alpha (the teacher share) by sampling teacher rows")
    bias: str | None = arg(
        None, "biased SIKeD: one solution per question, this strategy first", tuple(BIAS_ORDERS)
    )
    off_policy: bool = arg(False, "extra teacher samples in place of the student's own")
    from_base: bool = arg(False, "retrain from the base model every iteration, not continually")
    full_finetune: bool = arg(False, "train every weight, not a LoRA adapter", group="training")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha (scale alpha / r)")
    lr: float | None = arg(None, "peak learning rate (default: 2e-4, 3e-4 for the qwen2 family)")
    warmup_steps: int = arg(5, "linear warmup steps")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    batch_size: int = arg(8, "packed sequences per optimizer step, over all processes")
    micro_batch_size: int = arg(2, "sequences per forward/backward (gradient accumulation)")
    epochs: int = arg(3, "epochs per iteration")
    max_seq_len: int = arg(1024, "tokens per packed sequence")
    loss_on: str = arg(
        "all",
        "all: prompt and response, as the authors; response: the solution only",
        ("all", "response"),
    )
    grad_clip: float = arg(1.0, "gradient norm clipping (0: off)")
    ckpt_every: int = arg(50, "optimizer steps between resumable checkpoints")
    activation_checkpointing: bool = arg(False, "recompute each block in the backward pass")
    fsdp: bool = arg(
        False,
        "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP "
        "replicas, for a student that does not fit one device",
    )
    seed: int = arg(42, "seed of the split, data order, LoRA's init, sampling", group="system")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg(
        "auto",
        "weights and autocast; auto: bfloat16 on CUDA, float32 on CPU",
        ("auto", "float32", "bfloat16"),
    )
    compile: bool = arg(False, "torch.compile the model for training and sample.py's decode step")
    chunk_size: int = arg(256, "sequences per sampling/evaluation chunk, the unit of resumption")
    gen_batch_size: int = arg(64, "sequences decoded together by sample.generate")


# Settings a rerun into an existing run folder may change: where it is, what runs now, how far.
RERUN_FREE = ("run_name", "runs_dir", "only", "iterations", "fsdp")  # fsdp: same math as DDP
# SPEC.md section 4: SIKeD minus the best traditional distillation baseline, accuracy points.
PAPER_GAINS = {
    "smollm-1.7b": {"gsm8k": "+3.4", "asdiv": "+0.8..1.6", "multiarith": "up to +5"},
    "gemma-2b": {"gsm8k": "+3.2", "asdiv": "+0.8..1.6"},
    "gemma-7b": {"gsm8k": "+2.5", "asdiv": "+0.8..1.6", "multiarith": "reaches 100"},
    "qwen2-0.5b": {"asdiv": "+0.8..1.6"},
    "qwen2-1.5b": {"asdiv": "+0.8..1.6"},
}
HELDOUT = "gsm8k-heldout"  # the 10% of GSM8K train held out; evaluated to choose an iteration
POSITIVE = (
    "iterations samples epochs batch_size micro_batch_size max_seq_len chunk_size gen_batch_size "
    "sample_max_new_tokens eval_max_new_tokens lora_r lora_alpha ckpt_every teacher_samples "
    "train_limit eval_limit"
)
# check_config's ranges: (fields, ok, expected). Each ok is a comparison, which nan fails.
RANGES = [
    (POSITIVE, lambda x: x >= 1, "a positive integer"),
    (
        "rel_tol temperature weight_decay grad_clip warmup_steps",
        lambda x: 0 <= x < math.inf,
        "a finite value >= 0",
    ),
    ("mix_rate", lambda x: 0 <= x <= 1, "a value in [0, 1]"),
    ("top_p", lambda x: 0 < x <= 1, "a value in (0, 1]"),
    ("heldout_frac", lambda x: 0 < x < 1, "a value in (0, 1)"),
    ("lr", lambda x: 0 < x < math.inf, "a finite learning rate > 0"),
    # derived seeds (seed + iteration, + chunk) must stay in torch's manual_seed range
    ("seed", lambda x: 0 <= x < 2**32, "an integer in [0, 2**32)"),
]


def fail(message: str):  # a one-line error for the command line
    raise SystemExit(f"siked: {message}")


def flag(field: str) -> str:
    """A RunConfig field's flag as the user types it (one flag sets both max_new_tokens)."""
    if field in ("sample_max_new_tokens", "eval_max_new_tokens"):
        return "--max-new-tokens"
    return "--" + field.replace("_", "-")


# ------------------------------------------------------------------------------------------- files


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old version or the whole new one, never a part."""
    with prepare.atomic_open(path) as f:
        f.write(text)


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """model.read_json, its ValueError for a damaged file as the command line's one-line error."""
    try:
        return model_read_json(path)
    except ValueError as e:
        fail(str(e))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # a damaged chunk or stage file: named, one line
                fail(f"{path}:{i}: not valid JSON ({e})")
    return rows


def is_done(folder: Path) -> bool:
    return (folder / "DONE").is_file()


# ------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): one process per device, nccl on CUDA, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), dev
    d = Dist(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    # Long timeout: ranks wait at a barrier while rank 0 alone runs the teacher, filter and mix.
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=12))
    return d, dev


# ------------------------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x (Hu et al. 2021), W frozen. A is kaiming-uniform as in PEFT and
    B zero, so the layer starts out as W. Dropout 0, as the paper."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        A = torch.empty(r, base.in_features)  # initialised on the CPU: the generator lives there
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scale * update).to(y.dtype)


def add_lora(model: nn.Module, r: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Freeze the model and wrap its seven projections per layer; returns the adapter weights."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    wrapped = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, r, alpha, g)
                setattr(module, name, lora)
                wrapped += [lora.lora_A, lora.lora_B]
    assert len(wrapped) == 2 * len(LORA_TARGETS) * model.config.n_layers, len(wrapped)
    return wrapped


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight, W + (alpha / r) B A in fp32, and put the plain
    nn.Linear back: the model saves as an ordinary checkpoint."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                W = child.base.weight
                delta = child.scale * (child.lora_B.float() @ child.lora_A.float())  # (out, in)
                W.copy_((W.float() + delta).to(W.dtype))
                setattr(module, name, child.base)


# ---------------------------------------------------------------------------------------- packing


@dataclass
class Example:
    ids: list[int]  # prompt + response + EOS
    n_prompt: int  # the first n_prompt ids are the prompt


def tokenize_example(tok: Tokenizer, prompt: str, response: str) -> Example:
    """Prompt and response are encoded apart: at inference the model continues the prompt's own
    tokens (sample.py encodes the prompt alone, with BOS)."""
    p = tok.encode(prompt, bos=tok.add_bos)
    return Example(p + tok.encode(response) + [tok.eos_id], len(p))


def pack(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Next-fit: consecutive examples share a sequence while they fit; the indices per sequence."""
    bins, room = [], 0
    for i, n in enumerate(lengths):
        assert n <= max_seq_len
        if not bins or n > room:
            bins.append([])
            room = max_seq_len
        bins[-1].append(i)
        room -= n
    return bins


def make_batch(examples: list[Example], bins: list[list[int]], loss_on: str, pad_id: int):
    """Packed sequences -> tokens, targets (-100: no loss), input_pos (from 0 per example) and a
    block-diagonal causal mask: each example sees and predicts only itself. Padding is one more
    block, so that no query row is all False (SDPA would give NaN)."""
    B = len(bins)
    T = max(sum(len(examples[i].ids) for i in b) for b in bins)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    input_pos = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for b, sequence in enumerate(bins):
        off = 0
        for k, i in enumerate(sequence):
            ex = examples[i]
            ids, L = torch.tensor(ex.ids), len(ex.ids)
            tokens[b, off : off + L] = ids
            input_pos[b, off : off + L] = torch.arange(L)
            segment[b, off : off + L] = k
            # target at position j is token j+1; response-only: j+1 >= n_prompt
            start = 0 if loss_on == "all" else max(ex.n_prompt - 1, 0)
            targets[b, off + start : off + L - 1] = ids[start + 1 :]
            off += L
        input_pos[b, off:] = torch.arange(T - off)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    return tokens, targets, input_pos, mask[:, None]  # mask: (B, 1, T, T)


def token_losses(model, tokens, targets, input_pos, mask) -> torch.Tensor:
    """Cross-entropy of every target, (B, T), 0 where the target is -100. Logits are fp32."""
    logits = model(tokens, input_pos=input_pos, mask=mask)  # (B, T, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view_as(targets)


# --------------------------------------------------------------------------------------- training


def get_lr(step: int, total_steps: int, lr: float, warmup_steps: int) -> float:
    """transformers' get_linear_schedule_with_warmup (what [R]'s trainer ran): a linear ramp from 0
    over warmup_steps, then a linear decay to 0 at total_steps. `step` counts optimizer steps."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train(model: Transformer, examples: list[Example], cfg: RunConfig, device: torch.device,
          d: Dist | None = None, ckpt_path: Path | None = None, desc: str = "train", log=print,
          pad_id: int = 0) -> dict:  # fmt: skip
    """Fine-tune the trainable weights on packed examples, cfg.batch_size sequences per step over
    all ranks; the loss is summed over the global batch and divided by its loss tokens, so the cut
    into ranks and micro-batches does not matter. Resumes from ckpt_path, saved every ckpt_every."""
    d = d or Dist()
    assert cfg.lr is not None, "resolve cfg.lr first (resolve_lr)"
    fsdp = cfg.fsdp and d.world > 1
    if fsdp:  # one all-gather per block; the optimizer must then see the sharded parameters
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [  # no decay on norms and biases, as HF
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)

    # the data: a seeded shuffle, packed once; the packed sequences are reshuffled every epoch
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    lengths = [len(examples[i].ids) for i in order]
    bins = [[order[i] for i in b] for b in pack(lengths, cfg.max_seq_len)]
    steps_per_epoch, mbs = math.ceil(len(bins) / cfg.batch_size), cfg.micro_batch_size
    total_steps = cfg.epochs * steps_per_epoch
    n_loss = lambda b: sum(
        len(examples[i].ids) - (1 if cfg.loss_on == "all" else examples[i].n_prompt) for i in b
    )

    # checkpoints hold whole tensors keyed by name (gathered from the shards under FSDP)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    step, first_loss = 0, None  # first_loss: step 0's, which a resumed run has from the checkpoint
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        assert state["trainable"].keys() == params.keys(), "checkpoint of another model/adapter"
        set_state_dict(model, opt, model_state_dict=state["trainable"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip
        step, first_loss = state["step"], state["first_loss"]
        log(f"{desc}: resuming from {ckpt_path} at step {step}/{total_steps}")

    amp = cfg.dtype == "bfloat16"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    if cfg.activation_checkpointing:  # recompute each block in the backward pass, from outside
        recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for layer in model.model.layers:
            layer.forward = functools.partial(recompute, layer.forward)
    model.train()
    net = torch.compile(model) if cfg.compile else model
    if d.world > 1 and not fsdp:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    bar = tqdm(
        range(step, total_steps), initial=step, total=total_steps, desc=desc, disable=not d.main
    )
    losses, t_start, tokens_seen, perm_epoch = [], time.time(), 0, None
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:  # one shuffle per epoch, the same on every rank and on resuming
            perm, perm_epoch = list(range(len(bins))), epoch
            random.Random(cfg.seed * 1000 + epoch).shuffle(perm)
        batch = [bins[i] for i in perm[k * cfg.batch_size :][: cfg.batch_size]]
        n_tokens = max(1, sum(n_loss(b) for b in batch))  # loss tokens in the global batch
        mine = batch[d.rank :: d.world]  # this rank's sequences
        micro = [mine[j : j + mbs] for j in range(0, len(mine), mbs)]
        # every rank runs as many micro-batches (FSDP gathers in each forward): a short one pads
        n_micro = max(1, math.ceil(math.ceil(len(batch) / d.world) / mbs))
        micro += [None] * (n_micro - len(micro))
        for g in opt.param_groups:
            g["lr"] = get_lr(step, total_steps, cfg.lr, cfg.warmup_steps)
        loss_sum = torch.zeros((), device=device)
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1  # gradients are reduced on the last micro-batch only
            no_sync = contextlib.nullcontext()
            if fsdp:
                model.set_requires_gradient_sync(sync)
            elif d.world > 1 and not sync:
                no_sync = net.no_sync()
            with no_sync, ctx:
                if mb is None:  # a rank left without data still joins the collectives
                    loss = net(torch.full((1, 1), pad_id, device=device)).sum() * 0.0
                else:
                    tensors = make_batch(examples, mb, cfg.loss_on, pad_id)
                    tl = token_losses(net, *(t.to(device) for t in tensors)).sum()
                    loss_sum += tl.detach()
                    # DDP and FSDP average gradients over ranks: * world turns that into a sum
                    loss = tl / n_tokens * d.world
            loss.backward()
        if d.world > 1:
            dist.all_reduce(loss_sum)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

        loss_now = loss_sum.item() / n_tokens  # .item() is a sync point: once per step
        losses.append(loss_now)
        first_loss = loss_now if first_loss is None else first_loss
        tokens_seen += sum(len(examples[i].ids) for b in batch for i in b)
        tok_s = tokens_seen / (time.time() - t_start)
        bar.set_postfix(
            loss=f"{loss_now:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{opt.param_groups[0]['lr']:.2e}"
        )
        done = step + 1
        if ckpt_path is not None and done % cfg.ckpt_every == 0 and done < total_steps:
            trainable, optim = get_state_dict(model, opt, options=whole)  # all ranks
            if d.main:
                state = dict(step=done, first_loss=first_loss, trainable=trainable, optimizer=optim)
                with prepare.atomic_open(ckpt_path, "wb") as f:
                    torch.save(state, f)
    bar.close()
    model.eval()
    wall = time.time() - t_start
    return {
        "examples": len(examples),
        "sequences": len(bins),
        "steps": total_steps,
        "tokens_per_epoch": sum(len(e.ids) for e in examples),
        "final_loss": losses[-1] if losses else None,
        "first_loss": first_loss,
        "train_tok_s": round(tokens_seen / wall, 1) if tokens_seen else None,
    }


# ------------------------------------------------------------------------------------ data mixing


def mix(teacher_rows: list[dict], self_rows: list[dict], mode: str = "adaptive",
        mix_rate: float | None = None, seed: int = 42) -> tuple[list[dict], float]:  # fmt: skip
    """An iteration's training set from D_LLM and D_self, and alpha, its teacher share (SPEC 1.4.3).
    adaptive: teacher rows only for the (id, strategy) pairs the student did not solve; all: every
    one. mix_rate forces alpha by sampling that teacher part, as near as its size allows."""
    solved = {(r["id"], r["strategy"]) for r in self_rows}
    if mode == "adaptive":
        pool = [r for r in teacher_rows if (r["id"], r["strategy"]) not in solved]
    elif mode == "all":
        pool = list(teacher_rows)
    else:
        raise ValueError(f"mix mode {mode!r}: expected 'adaptive' or 'all'")
    if mix_rate is not None:
        if not 0.0 <= mix_rate <= 1.0:
            raise ValueError(f"mix_rate {mix_rate}: expected a value in [0, 1]")
        n = len(self_rows)
        if mix_rate == 1.0:
            self_rows = []
        elif n:  # without D_self, alpha is 1 whatever is kept: the whole pool stays
            # k teacher rows, k / (k + n) nearest mix_rate (ties: the larger k)
            want = min(range(len(pool) + 1), key=lambda k: (abs(k / (k + n) - mix_rate), -k))
            keep = sorted(random.Random(seed).sample(range(len(pool)), want))
            pool = [pool[i] for i in keep]
    rows = list(self_rows) + pool
    alpha = len(pool) / len(rows) if rows else 0.0
    return rows, alpha


def apply_bias(rows: list[dict], order: tuple[str, ...]) -> list[dict]:
    """Biased SIKeD (SPEC 1.5): one solution per question, the first strategy in `order` that has
    one (ties within a strategy: the first row)."""
    rank = {s: i for i, s in enumerate(order)}
    best: dict[str, dict] = {}
    for r in sorted((r for r in rows if r["strategy"] in rank), key=lambda r: rank[r["strategy"]]):
        best.setdefault(r["id"], r)  # sorted() is stable: ties keep their order
    return [r for r in rows if best.get(r["id"]) is r]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# ------------------------------------------------------------------------------------ the run


@dataclass
class Run:
    """What every stage needs: the config, the run folder, this process's place, the data."""

    cfg: RunConfig
    dir: Path
    d: Dist
    device: torch.device
    tok: Tokenizer
    questions: dict[str, dict]  # GSM8K train rows by id (training and held-out questions)
    train_ids: list[str]
    heldout_ids: list[str]
    held: list[str] | None = dataclasses.field(default_factory=list)  # log lines not yet written

    def log(self, message: str) -> None:
        """Print, and append to log.txt; until a stage runs the lines are held back, so that a
        rerun with nothing to do leaves the run folder as it was."""
        if not self.d.main:
            return
        print(f"siked: {message}", flush=True)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
        if self.held is not None:
            self.held.append(line)
            return
        with open(self.dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(line)

    def release_log(self) -> None:
        if self.d.main and self.held:
            with open(self.dir / "log.txt", "a", encoding="utf-8") as f:
                f.writelines(self.held)
        self.held = None

    @property
    def tagged(self) -> bool:
        return len(self.cfg.strategies) > 1

    @property
    def strategies(self) -> list[str]:
        """The configured strategies the teacher has solutions for (teacher stage's DONE)."""
        return read_json(self.dir / "teacher" / "DONE")["strategies"]

    def generate(self, model, prompts, n, max_new_tokens, temperature=0.0, seed=None):
        """sample.generate with the run's nucleus, batch size and stop strings."""
        top_p = self.cfg.top_p if temperature > 0 else 1.0
        return sample.generate(model, self.tok, prompts, n=n, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, stop=S.STOP, seed=seed,
                               batch_size=self.cfg.gen_batch_size, progress=self.d.main,
                               compile=self.cfg.compile)  # fmt: skip

    def load_model(self, path: str | Path, training: bool = False) -> Transformer:
        # full fine-tuning keeps fp32 master weights under bf16 autocast; LoRA trains fp32
        # adapters on a frozen base in the run's dtype (the paper: 16-bit base weights)
        fp32 = training and self.cfg.full_finetune
        dtype = torch.float32 if fp32 else getattr(torch, self.cfg.dtype)
        return Transformer.from_pretrained(str(path), device=str(self.device), dtype=dtype).eval()

    def student(self, t: int) -> Path:
        return self.dir / f"iter{t}" / "train" / "student"


def teacher_rows(R: Run) -> list[dict]:
    """D_LLM: the teacher's selected solutions (the training questions and kept strategies only:
    the teacher stage saw no others), each row marked as the teacher's."""
    rows = read_jsonl(R.dir / "teacher" / "selected.jsonl")
    return [dict(r, source="teacher", teacher=r["source"], iteration=0) for r in rows]


def judged_teacher_rows(R: Run) -> list[dict]:
    """Every row of teacher.jsonl, judged again at --rel-tol: data/teacher.py judges at verify's
    default tolerance, and --rel-tol 0 makes that exact."""
    rows = read_jsonl(R.dir / "teacher" / "teacher.jsonl")
    for r in rows:
        ok = verify.is_correct(r["answer"], R.questions[r["id"]]["answer"], rel_tol=R.cfg.rel_tol)
        r["correct"] = r["correct"] and ok
    return rows


def per_strategy(strategies=None, **groups: list[dict]) -> dict[str, dict[str, int]]:
    """{strategy: {group: its rows of that strategy}} ("none": no strategy), for `strategies` or
    else every strategy the groups hold, sorted."""
    counts = {name: Counter(r["strategy"] or "none" for r in rows) for name, rows in groups.items()}
    if strategies is None:
        strategies = sorted(set().union(*counts.values()))
    return {s: {name: c[s] for name, c in counts.items()} for s in strategies}


def run_chunks(R: Run, folder: Path, items: list, cs: int, student: Path, generate_chunk):
    """Generate items in chunks of cs with the student, rank r the chunks i = r mod world not on
    disk yet, each an atomic JSONL file (a crash loses only the chunk in progress). Rank 0 returns
    every row in order and this attempt's tokens/s; the other ranks (None, None)."""
    desc = " ".join(folder.relative_to(R.dir).parts)  # iterT sample, iterT eval
    paths = [folder / "chunks" / f"{i:05d}.jsonl" for i in range(math.ceil(len(items) / cs))]
    todo = [i for i in range(len(paths)) if i % R.d.world == R.d.rank and not paths[i].is_file()]
    n_done = sum(p.is_file() for p in paths)
    if n_done:
        R.log(f"{desc}: {n_done}/{len(paths)} chunks already on disk, resuming")
    t0, n_tokens = time.time(), 0
    if todo:
        model = R.load_model(student)
        t0 = time.time()  # throughput of generation, not of loading
        for i in todo:
            rows = generate_chunk(model, items[i * cs : (i + 1) * cs], i)
            n_tokens += sum(r["n_tokens"] for r in rows)
            write_jsonl(paths[i], rows)
            R.log(f"{desc}: chunk {i + 1}/{len(paths)} written")
        del model
    R.d.barrier()
    if not R.d.main:
        return None, None
    # tokens/s of this rank in this attempt, times the ranks (they ran side by side)
    tok_s = round(n_tokens / (time.time() - t0) * R.d.world, 1) if n_tokens else None
    return [r for p in paths for r in read_jsonl(p)], tok_s


def _finish(c: sample.Completion) -> dict:
    return {"finish_reason": c.finish_reason, "n_tokens": len(c.token_ids)}


def score(texts: list[str], strategies: list[str | None], golds: list[float], rel_tol: float):
    """Predicted answers (PoT programs run in one sandboxed batch; no strategy: read as CoT) and
    whether each is correct."""
    preds = verify.extract_answers(texts, strategies)
    ok = [verify.is_correct(p, g, rel_tol=rel_tol) for p, g in zip(preds, golds, strict=True)]
    return preds, ok


def parse_output(R: Run, text: str) -> tuple[str | None, str]:
    """The strategy and solution body of a free (untagged-prompt) completion."""
    if not R.tagged:
        return R.cfg.strategies[0], text
    strategy, body = S.parse_solution(text)
    return (strategy if strategy in S.STRATEGIES else None), body


# ---------------------------------------------------------------------------------------- stages
# Each stage runs on every rank (rank 0 alone where noted), returns the numbers for its DONE
# marker, and reads only finished stages' files.


def stage_teacher(R: Run, folder: Path, t: int = 0) -> dict:
    """D_LLM (rank 0): the teacher's solutions to the training questions, one kept per
    (question, strategy)."""
    if not R.d.main:
        return {}
    cfg = R.cfg
    rows = [R.questions[i] for i in R.train_ids]
    out = folder / "teacher.jsonl"
    kw = dict(strategies_=cfg.strategies, progress=True)
    try:
        if cfg.teacher_url:
            source = f"{cfg.teacher_model} at {cfg.teacher_url}"
            url, name, n = cfg.teacher_url, cfg.teacher_model, cfg.teacher_samples
            teacher.http_teacher(rows, out, url, name, n=n, **kw)
        elif cfg.teacher_local:
            source = f"{cfg.teacher_local} (local)"
            kw.update(device=str(R.device), dtype=cfg.dtype, seed=cfg.seed)
            teacher.local_teacher(rows, out, cfg.teacher_local, n=cfg.teacher_samples, **kw)
        else:
            source = "gold GSM8K rationales (data/teacher.py gold_teacher)"
            teacher.gold_teacher(rows, out, **kw)
    except teacher.TeacherError as e:  # a server that retrying does not fix: one line
        fail(f"teacher: {e}")
    all_rows = judged_teacher_rows(R)
    selected = teacher.select_teacher(all_rows)
    write_jsonl(folder / "selected.jsonl", selected)
    correct = [r for r in all_rows if r["correct"]]
    per = per_strategy(cfg.strategies, rows=all_rows, correct=correct, selected=selected)
    kept = [s for s in cfg.strategies if per[s]["selected"]]
    for s in [s for s in cfg.strategies if s not in kept]:
        R.log(
            f"teacher: no {s} solutions (for l2m the gold teacher needs GSM8K train_socratic): "
            f"{s} is dropped from this run"
        )
    if not kept:
        fail("teacher: no correct teacher solution for any strategy")
    R.log(f"teacher ({source}): {len(selected)} solutions for {len(rows)} questions: {per}")
    return {"source": source, "questions": len(rows), "strategies": kept, "per_strategy": per}


def stage_train(R: Run, folder: Path, t: int) -> dict:
    """Iteration 1: distil the base model on D_LLM. Later: continual, a new LoRA on the last
    iteration's merged student (--from-base: on the base model), trained on the mix."""
    cfg = R.cfg
    if t == 1:
        rows = teacher_rows(R)
        if cfg.bias:
            rows = apply_bias(rows, BIAS_ORDERS[cfg.bias])
        if R.d.main:
            write_jsonl(folder / "data.jsonl", rows)  # iteration 1's training set, as provenance
    else:
        rows = read_jsonl(R.dir / f"iter{t}" / "mix" / "train.jsonl")
    if not rows:
        fail(f"iter{t} train: the training set is empty")
    examples, n_cut = [], 0  # prompt + response + EOS, as strategies.training_example lays out
    for r in rows:
        q = R.questions[r["id"]]["question"]
        ex = tokenize_example(R.tok, *S.training_example(q, r["strategy"], r["text"], R.tagged))
        if len(ex.ids) > cfg.max_seq_len:
            n_cut += 1
            ex = Example(ex.ids[: cfg.max_seq_len], min(ex.n_prompt, cfg.max_seq_len))
        examples.append(ex)
    if n_cut:
        R.log(f"iter{t} train: {n_cut} of {len(examples)} examples cut to {cfg.max_seq_len} tokens")
    base = cfg.model if t == 1 or cfg.from_base else R.student(t - 1)

    def fresh() -> Transformer:
        model = R.load_model(base, training=True)
        if not cfg.full_finetune:
            add_lora(model, cfg.lora_r, cfg.lora_alpha, seed=cfg.seed + t)
        return model

    model, ckpt, desc = fresh(), folder / "ckpt.pt", f"iter{t} train"
    stats = train(model, examples, cfg, R.device, R.d, ckpt, desc, R.log, R.tok.pad_id)
    if cfg.fsdp and R.d.world > 1:  # rank 0 gathers the shards into a whole model to save
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=whole)
        if R.d.main:
            model = fresh()
            model.load_state_dict(state)
    if R.d.main:
        if not cfg.full_finetune:
            merge_lora(model)
        model.to(getattr(torch, cfg.dtype)).save_pretrained(folder / "student", tokenizer=R.tok)
        R.log(
            f"iter{t} train: loss {stats['first_loss']:.4f} -> {stats['final_loss']:.4f}, "
            f"student saved in {folder / 'student'}"
        )
    per = dict(sorted(Counter(r["strategy"] for r in rows).items()))
    return dict(stats, base=str(base), rows=len(rows), cut=n_cut, per_strategy=per)


def stage_sample(R: Run, folder: Path, t: int) -> dict:
    """D_self candidates: the last student samples every training question, each strategy forced
    by its tag (--sampling free: the student picks), T=0.7, top-p 0.95."""
    cfg, strategies = R.cfg, R.strategies

    def generate_chunk(model, ids: list[str], i: int) -> list[dict]:
        seed = cfg.seed + 1000 * t + i  # per chunk: a resumed chunk draws the same samples
        qs = [R.questions[q]["question"] for q in ids]
        n = cfg.samples
        if not R.tagged:
            prompts = [S.single_prompt(q, strategies[0]) for q in qs]
        elif cfg.sampling == "forced":
            tags = [(S.forced_tag(s), cfg.samples) for s in strategies]
            prompts = [sample.SharedPrompt(S.student_prompt(q), tags) for q in qs]
        else:
            prompts, n = [S.student_prompt(q) for q in qs], cfg.samples * len(strategies)
        outs = R.generate(model, prompts, n, cfg.sample_max_new_tokens, cfg.temperature, seed)
        rows = []
        for qid, completions in zip(ids, outs, strict=True):
            for k, c in enumerate(completions):
                # a forced tag is read back with its sample (the space after it is the sample's)
                strategy, body = parse_output(R, c.continuation + c.text)
                row = dict(id=qid, iteration=t, source="student", strategy=strategy, sample=k)
                rows.append(row | dict(seed=seed, text=body, **_finish(c)))
        return rows

    per_question = cfg.samples * (len(strategies) if R.tagged else 1)
    size = max(1, cfg.chunk_size // per_question)
    rows, tok_s = run_chunks(R, folder, R.train_ids, size, R.student(t - 1), generate_chunk)
    if not R.d.main:
        return {}
    write_jsonl(folder / "samples.jsonl", rows)
    tokens = sum(r["n_tokens"] for r in rows)
    return dict(samples=len(rows), questions=len(R.train_ids), sample_tok_s=tok_s, tokens=tokens)


def stage_filter(R: Run, folder: Path, t: int) -> dict:
    """D_self (rank 0): correct samples of the run's strategies only, L2M ones without sub-questions
    dropped, then the first correct one per (question, strategy). Every sample keeps its verdict."""
    if not R.d.main:
        return {}
    run_strategies = R.strategies
    rows = read_jsonl(R.dir / f"iter{t}" / "sample" / "samples.jsonl")
    golds = [R.questions[r["id"]]["answer"] for r in rows]
    texts, strategies = [r["text"] for r in rows], [r["strategy"] for r in rows]
    preds, correct = score(texts, strategies, golds, R.cfg.rel_tol)
    kept, seen = [], set()
    for r, gold, pred, ok in zip(rows, golds, preds, correct, strict=True):
        pair = (r["id"], r["strategy"])
        if r["strategy"] is None:
            verdict = "no_tag"
        elif r["strategy"] not in run_strategies:  # --sampling free: one the teacher stage dropped
            verdict = "strategy_dropped"
        elif r["strategy"] == "l2m" and not verify.has_subquestions(r["text"]):
            verdict = "no_subquestions"
        elif not ok:
            verdict = "wrong"
        elif pair in seen:
            verdict = "correct_duplicate"
        else:
            verdict = "kept"
            seen.add(pair)
            kept.append(r)
        r.update(answer=gold, pred=pred, verdict=verdict)
    write_jsonl(folder / "samples.jsonl", rows)
    write_jsonl(folder / "kept.jsonl", kept)
    correct = [r for r in rows if r["verdict"] in ("kept", "correct_duplicate")]
    per = per_strategy(samples=rows, correct=correct, kept=kept)
    R.log(f"iter{t} filter: kept {len(kept)} of {len(rows)} samples: {per}")
    return {"samples": len(rows), "kept": len(kept), "per_strategy": per}


def off_policy_rows(R: Run, self_rows: list[dict], d_llm: list[dict]) -> tuple[list[dict], dict]:
    """--off-policy: each student row gives way to another correct teacher sample of its (question,
    strategy) than D_LLM's, else to D_LLM's own; pairs the teacher never solved lose their row."""
    used = {(r["id"], r["strategy"]): r for r in d_llm}
    extra: dict[tuple, dict] = {}  # the first such teacher row per pair
    for r in judged_teacher_rows(R):
        pair = (r["id"], r["strategy"])
        if r["correct"] and pair in used and r["text"] != used[pair]["text"]:
            extra.setdefault(pair, r)
    out, n_extra = [], 0
    for r in self_rows:
        pair = (r["id"], r["strategy"])
        if pair in extra:
            t = extra[pair]
            out.append(dict(t, source="teacher", teacher=t["source"], iteration=0, off_policy=True))
            n_extra += 1
        elif pair in used:
            out.append(dict(used[pair], off_policy=True))
    n_dropped = len(self_rows) - len(out)
    info = {"extra_teacher": n_extra, "reused_teacher": len(out) - n_extra, "dropped": n_dropped}
    R.log(f"off-policy: {len(self_rows)} student rows replaced by teacher rows: {info}")
    return out, info


def stage_mix(R: Run, folder: Path, t: int) -> dict:
    """The training set of iteration t (rank 0): D_self plus teacher rows (SPEC 1.4.3), alpha."""
    if not R.d.main:
        return {}
    cfg = R.cfg
    d_llm = teacher_rows(R)
    d_self = read_jsonl(R.dir / f"iter{t}" / "filter" / "kept.jsonl")
    info = {}
    if cfg.off_policy:
        d_self, info = off_policy_rows(R, d_self, d_llm)
    rows, alpha_mix = mix(d_llm, d_self, cfg.mix, cfg.mix_rate, seed=cfg.seed + t)
    if cfg.bias:
        rows = apply_bias(rows, BIAS_ORDERS[cfg.bias])
    write_jsonl(folder / "train.jsonl", rows)
    by_source = {src: [r for r in rows if r["source"] == src] for src in ("teacher", "student")}
    n_teacher, n_student = len(by_source["teacher"]), len(by_source["student"])
    alpha = n_teacher / len(rows) if rows else 0.0
    if cfg.mix_rate is not None and abs(alpha_mix - cfg.mix_rate) > 0.01:
        R.log(f"iter{t} mix: --mix-rate {cfg.mix_rate} not reachable, alpha = {alpha_mix:.3f}")
    R.log(f"iter{t} mix ({cfg.mix}): {n_student} student + {n_teacher} teacher, alpha {alpha:.3f}")
    stats = dict(rows=len(rows), teacher_rows=n_teacher, student_rows=n_student, alpha=alpha)
    stats |= dict(alpha_mix=alpha_mix, d_llm=len(d_llm), d_self=len(d_self))
    return info | stats | dict(per_strategy=per_strategy(R.strategies, **by_source))


def eval_items(R: Run) -> list[tuple[str, dict]]:
    """(set, row) for each evaluation set, a seeded subset of --eval-limit rows each, then the
    held-out GSM8K-train questions (for choosing an iteration, not for reporting)."""
    cfg, items = R.cfg, []
    sets = {name: prepare.load(name, "test", progress=False) for name in cfg.eval_sets}
    sets[HELDOUT] = [R.questions[i] for i in R.heldout_ids]
    for name, rows in sets.items():
        if cfg.eval_limit is not None and len(rows) > cfg.eval_limit:
            keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.eval_limit))
            rows = [rows[i] for i in keep]
        items += [(name, r) for r in rows]
    return items


def stage_eval(R: Run, folder: Path, t: int) -> dict:
    """Greedy decoding, the student choosing its strategy: accuracy per set with a 95% Wilson
    interval, the share of each strategy chosen and the accuracy within each."""
    cfg = R.cfg

    def generate_chunk(model, chunk: list[tuple[str, dict]], i: int) -> list[dict]:
        if R.tagged:
            prompts = [S.student_prompt(r["question"]) for _, r in chunk]
        else:
            prompts = [S.single_prompt(r["question"], cfg.strategies[0]) for _, r in chunk]
        outs = [o[0] for o in R.generate(model, prompts, 1, cfg.eval_max_new_tokens)]
        parsed = [parse_output(R, c.text) for c in outs]
        texts, strategies = [b for _, b in parsed], [s for s, _ in parsed]
        preds, correct = score(texts, strategies, [r["answer"] for _, r in chunk], cfg.rel_tol)
        rows = []
        for (name, r), c, s, p, ok in zip(chunk, outs, strategies, preds, correct, strict=True):
            row = dict(set=name, id=r["id"], strategy=s, text=c.text, pred=p, answer=r["answer"])
            rows.append(row | dict(correct=ok, **_finish(c)))
        return rows

    rows, tok_s = run_chunks(R, folder, eval_items(R), cfg.chunk_size, R.student(t), generate_chunk)
    if not R.d.main:
        return {}
    results = {}
    for name in (*cfg.eval_sets, HELDOUT):
        rs = [r for r in rows if r["set"] == name]
        k, n = sum(r["correct"] for r in rs), len(rs)
        per = per_strategy(n=rs, correct=[r for r in rs if r["correct"]])
        per = {s: dict(v, share=v["n"] / n, accuracy=v["correct"] / v["n"]) for s, v in per.items()}
        acc = k / n if n else 0.0
        results[name] = dict(n=n, correct=k, accuracy=acc, ci95=list(wilson(k, n)), strategies=per)
    write_jsonl(folder / "predictions.jsonl", rows)
    student = str(R.student(t).relative_to(R.dir))
    summary = {"iteration": t, "student": student, "rel_tol": cfg.rel_tol, "sets": results}
    write_json(folder / "eval.json", summary)
    R.log(f"iter{t} eval: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in results.items()))
    accuracy = {k: v["accuracy"] for k, v in results.items()}
    return dict(gen_tok_s=tok_s, tokens=sum(r["n_tokens"] for r in rows), accuracy=accuracy)


# ---------------------------------------------------------------------------------------- report


def _chart_line(t: int, label: str, strategy: str, share: float, note: str) -> str:
    n = round(share * 24)
    return f"iter{t} {label:<11} {strategy:<5} {'█' * n + '·' * (24 - n)} {share:6.1%}  ({note})"


def write_report(R: Run) -> None:
    """runs/<name>/report.md from the finished stages' files (rank 0, after every stage)."""
    cfg, sets = R.cfg, [*R.cfg.eval_sets, HELDOUT]
    iters = [t for t in range(1, cfg.iterations + 1) if (R.dir / f"iter{t}").is_dir()]
    done = {  # every finished stage's DONE, in the order of the run
        f"iter{t} {name}" if t else name: read_json(folder / "DONE")
        for name, folder, _, _, t in plan(R)
        if is_done(folder)
    }
    evals = {
        t: read_json(R.dir / f"iter{t}" / "eval" / "eval.json")["sets"]
        for t in iters
        if f"iter{t} eval" in done
    }
    row = lambda *cells: "| " + " | ".join(map(str, cells)) + " |"
    table = lambda header, rows: "\n".join([row(*header), "|---" * len(header) + "|", *rows])
    # the report is blocks (paragraphs, tables, headings) separated by blank lines
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    blocks = [f"# SIKeD run `{R.dir.name}`", f"Rewritten {stamp} after each stage by siked.py."]
    if cfg.quick:
        blocks.append(
            "**A --quick run**: scaled down to finish in minutes on a CPU; its numbers "
            "say the pipeline works, not what the method achieves."
        )

    # the model, lr and dtype (resolved for this model and device, never RunConfig's None and
    # "auto"), then what differs from the paper; not where and what runs now
    paper = dataclasses.asdict(RunConfig())
    hidden, shown = ("run_name", "runs_dir", "only"), ("model", "lr", "dtype")
    settings = [
        row(k, ",".join(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in hidden and (k in shown or v != paper[k])
    ]
    teacher_source = done["teacher"]["source"] if "teacher" in done else "(not run yet)"
    blocks += [
        "## Config",
        f"Teacher: {teacher_source}; {len(R.train_ids)} training questions, {len(R.heldout_ids)} "
        "held out (GSM8K train). The model, its learning rate and dtype, and the settings that "
        "differ from the paper's (RunConfig's defaults); `config.json` has every one.",
        table(("setting", "value"), settings),
    ]

    data, listing = [], lambda per, cell: ", ".join(f"{s} {cell(v)}" for s, v in per.items())
    for t in iters:
        tr, fi, mx = (done.get(f"iter{t} {s}") for s in ("train", "filter", "mix"))
        if t == 1:  # iteration 1 trains on teacher rows only
            cells = [listing(tr["per_strategy"], str) if tr else "", "-", "1.000"]
        else:
            cells = [
                listing(mx["per_strategy"], lambda v: v["teacher"]) if mx else "",
                listing(fi["per_strategy"], lambda v: f"{v['kept']}/{v['samples']}") if fi else "",
                f"{mx['alpha']:.3f}" if mx else "",
            ]
        data.append(row(t, *cells, *(tr[k] if tr else "" for k in ("rows", "sequences", "steps"))))
    header = ("iteration", "teacher rows (D_LLM)", "self-generated kept / samples", "alpha",
              "training rows", "packed sequences", "steps")  # fmt: skip
    blocks += ["## Data per iteration", table(header, data)]

    pct = lambda x: f"{100 * x:.1f}"
    cell = lambda r: f"{pct(r['accuracy'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}] (n={r['n']})"
    accuracy = [row(t, *(cell(res[s]) for s in sets)) for t, res in evals.items()]
    if len(evals) > 1:
        first, last = evals[min(evals)], evals[max(evals)]
        gains = [f"{100 * (last[s]['accuracy'] - first[s]['accuracy']):+.1f}" for s in sets]
        accuracy.append(row(f"gain, iteration {max(evals)} - {min(evals)}", *gains))
    key = next((k for k in PAPER_GAINS if k in Path(cfg.model).name.lower()), None)
    if key:
        accuracy.append(row(f"paper's gain ({key})", *(PAPER_GAINS[key].get(s, "") for s in sets)))
    note = (
        "The paper's gains (SPEC.md section 4) are SIKeD minus the best single-strategy or "
        "Combined baseline; ours are the last iteration minus the first evaluated (1)."
    )
    if evals:
        best = max(evals, key=lambda t: (evals[t][HELDOUT]["accuracy"], -t))
        where = R.student(best).relative_to(R.dir)
        note += f"\nBest iteration on {HELDOUT}: **{best}** (student `{where}`)."
    blocks += [
        "## Accuracy",
        f"Accuracy (%) with a 95% Wilson interval; `{HELDOUT}` is the held-out 10% of GSM8K train, "
        "used only to choose an iteration.",
        table(("iteration", *sets), accuracy),
        note,
    ]

    charts = []  # one per iteration
    for t in iters:
        lines, tr, mx = [], done.get(f"iter{t} train"), done.get(f"iter{t} mix")
        for s, n in tr["per_strategy"].items() if tr else ():
            zero = {"teacher": 0, "student": 0}  # missing: a dropped strategy an old filter kept
            src = mx["per_strategy"].get(s, zero) if mx else {"teacher": n, "student": 0}
            share = n / sum(tr["per_strategy"].values())
            detail = f"teacher {src['teacher']}, student {src['student']}"
            lines.append(_chart_line(t, "train", s, share, detail))
        for name in cfg.eval_sets if t in evals else ():
            for s, v in evals[t][name]["strategies"].items():
                detail = f"accuracy {v['accuracy']:.1%}, n={v['n']}"
                lines.append(_chart_line(t, name, s, v["share"], detail))
        charts += ["\n".join(lines)] if lines else []
    blocks += [
        "## Strategy mix",
        "Each training set by strategy (with its teacher and student rows), and the strategy the "
        "student chose on each evaluation set (`none`: no tag).",
        "```\n" + "\n\n".join(charts) + "\n```" if charts else "(no iteration trained yet)",
    ]

    rates = {"train_tok_s": "trained", "sample_tok_s": "sampled", "gen_tok_s": "decoded"}
    wall = [
        row(
            label,
            f"{info['wall_s'] / 60:.1f} min",
            " ".join(f"{info[k]} tok/s {v}" for k, v in rates.items() if info.get(k)),
        )
        for label, info in done.items()
    ]
    blocks += [
        "## Wall time",
        table(("stage", "wall time", "throughput"), wall),
        "## Files",
        "- `config.json`, `split.json` (training / held-out ids), `log.txt`; `teacher/`: "
        "`teacher.jsonl` every teacher row, `selected.jsonl` one per (question, strategy)\n"
        "- `iter1/train/data.jsonl`, `iterT/mix/train.jsonl`: each training set; every row has "
        "its `source` (teacher/student), `iteration` and `strategy`, student rows their `seed`, "
        "`sample` and `verdict`, teacher rows their `teacher` (gold, http:..., local:...)\n"
        "- `iterT/filter/samples.jsonl` every student sample with its verdict, `kept.jsonl`; "
        "`iterT/train/student/` the merged student (HF layout); `iterT/eval/predictions.jsonl`, "
        "`eval.json`",
    ]
    atomic_write(R.dir / "report.md", "\n\n".join(blocks) + "\n")


# ------------------------------------------------------------------------------------------ main


def plan(R: Run) -> list[tuple[str, Path, list[Path], object, int]]:
    """(stage, folder, the folders it needs finished, function, iteration), in order."""
    steps = [("teacher", R.dir / "teacher", [], stage_teacher, 0)]
    for t in range(1, R.cfg.iterations + 1):
        it = R.dir / f"iter{t}"
        if t > 1:
            steps += [
                ("sample", it / "sample", [R.dir / f"iter{t - 1}" / "train"], stage_sample, t),
                ("filter", it / "filter", [it / "sample"], stage_filter, t),
                ("mix", it / "mix", [it / "filter"], stage_mix, t),
            ]
        steps += [
            ("train", it / "train", [it / "mix" if t > 1 else R.dir / "teacher"], stage_train, t),
            ("eval", it / "eval", [it / "train"], stage_eval, t),
        ]
    return steps


def scratch(folder: Path) -> list[Path]:
    """A finished stage's leftovers: training checkpoints, and files a kill left half-written
    (prepare.atomic_open's, and the temporary folders of an interrupted save_pretrained)."""
    files = [p for p in [*folder.glob("*.pt"), *folder.rglob("*.part")] if p.is_file()]
    return files + [p for p in folder.glob(".student.*") if p.is_dir()]


def close_stage(R: Run, folder: Path) -> None:
    """What follows a stage's DONE (rank 0): its scratch goes, the report is rewritten."""
    for p in scratch(folder):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    write_report(R)


def run(R: Run) -> int:
    """Run every unfinished stage in order (--only: that stage wherever its inputs are ready).
    Returns the number of stages run."""
    only, ran = R.cfg.only, 0
    if only == "report":
        if R.d.main:
            write_report(R)
        return 1
    # a kill between a stage's DONE and close_stage left its scratch, or a report older than the
    # DONE (else a finished run would never report its last stage): close the stage now
    report = R.dir / "report.md"
    for _, folder, *_ in plan(R) if R.d.main else ():
        if not is_done(folder):
            continue
        done_ns = (folder / "DONE").stat().st_mtime_ns
        if scratch(folder) or not report.is_file() or report.stat().st_mtime_ns < done_ns:
            close_stage(R, folder)
    for name, folder, needs, fn, t in plan(R):
        if is_done(folder) or (only and name != only):
            continue
        missing = [n for n in needs if not is_done(n)]
        if missing:  # only with --only: the stages before it come first
            if not ran:
                fail(
                    f"--only {only}: {missing[0].relative_to(R.dir)} is not finished; "
                    "run without --only first"
                )
            break
        R.release_log()
        R.log(f"stage {folder.relative_to(R.dir)}")
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        stats = fn(R, folder, t)
        if R.d.main:
            write_json(folder / "DONE", {"wall_s": round(time.time() - t0, 1), **stats})
            close_stage(R, folder)
        R.d.barrier()
        ran += 1
    return ran


def resolve_lr(cfg: RunConfig) -> float:
    """2e-4, and 3e-4 for the qwen2 family ([R]'s configs), unless given."""
    if cfg.lr is not None:
        return cfg.lr
    path = Path(resolve_checkpoint(cfg.model)) / "config.json"
    family = ModelConfig.from_hf_config(read_json(path), source=str(path)).family
    return 3e-4 if family == "qwen2" else 2e-4


def check_config(cfg: RunConfig, world: int) -> Path:
    """Every bad setting as a one-line error naming it; returns the run folder."""
    if not cfg.strategies:
        fail("--strategies: expected some of cot,l2m,pot")
    for s in cfg.strategies:
        if s not in S.STRATEGIES:
            fail(f"--strategies {s}: expected some of {', '.join(S.STRATEGIES)}")
    if len(set(cfg.strategies)) != len(cfg.strategies):
        fail(f"--strategies {','.join(cfg.strategies)}: a strategy is repeated")
    for name in cfg.eval_sets:
        if name not in prepare.SPLITS or "test" not in prepare.SPLITS[name]:
            fail(f"--eval-sets {name}: expected some of gsm8k, svamp, asdiv, multiarith")
    if cfg.bias and (cfg.bias not in cfg.strategies or len(cfg.strategies) < 2):
        fail(f"--bias {cfg.bias}: needs several strategies including {cfg.bias}")
    if cfg.teacher_url and not cfg.teacher_model:
        fail("--teacher-url needs --teacher-model (the model name the server knows)")
    if cfg.teacher_url and cfg.teacher_local:
        fail("--teacher-url and --teacher-local: give one teacher")
    if cfg.off_policy and not (cfg.teacher_url or cfg.teacher_local):
        fail(
            "--off-policy needs an LLM teacher (--teacher-url or --teacher-local): the gold "
            "teacher has one solution per (question, strategy), none to spare"
        )
    for fields, ok, expected in RANGES:
        for k in fields.split():
            if getattr(cfg, k) is not None and not ok(getattr(cfg, k)):  # None: not given
                fail(f"{flag(k)} {getattr(cfg, k)}: expected {expected}")
    if cfg.batch_size % (cfg.micro_batch_size * world):
        fail(
            f"--batch-size {cfg.batch_size}: expected a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size} x {world} processes"
        )
    name = default_run_name(cfg) if cfg.run_name is None else cfg.run_name
    if name in ("", ".", "..") or Path(name).name != name:  # else it lands outside --runs-dir
        fail(f"--run-name {name!r}: expected a folder name, without '/' and not '.' or '..'")
    run_dir = Path(cfg.runs_dir) / name
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        fail(f"--runs-dir {cfg.runs_dir}: {existing} is not a folder")
    return run_dir


def default_run_name(cfg: RunConfig) -> str:
    parts = [Path(os.path.abspath(cfg.model)).name.lower()]  # abspath: "." names its folder
    if tuple(cfg.strategies) != RunConfig.strategies:
        parts.append("-".join(cfg.strategies))
    parts += [f"bias-{cfg.bias}"] if cfg.bias else []
    parts += ["mix-all"] if cfg.mix == "all" else []
    parts += [f"rate-{cfg.mix_rate}"] if cfg.mix_rate is not None else []
    parts += ["off-policy"] if cfg.off_policy else []
    parts += ["from-base"] if cfg.from_base else []
    parts += ["full-ft"] if cfg.full_finetune else []
    parts += ["quick"] if cfg.quick else []
    return "-".join(parts)


def main(cfg: RunConfig) -> Path:
    """Run (or resume) SIKeD as configured; returns the run folder."""
    d, device = setup_distributed(cfg.device)
    run_dir = check_config(cfg, d.world)
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if bf16 else "float32")
    # everything is checked before config.json is saved: a rerun with the mistake fixed would
    # otherwise find "a run with other settings"
    try:
        cfg = dataclasses.replace(cfg, lr=resolve_lr(cfg), run_name=run_dir.name)
        tok = Tokenizer.from_pretrained(cfg.model)
        gsm8k = prepare.load("gsm8k", "train", progress=d.main)
        for name in cfg.eval_sets:  # prepared now: a missing one would otherwise stop the eval
            prepare.load(name, "test", progress=d.main)
        old = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    except (OSError, ValueError, KeyError) as e:
        fail(f"{e}".splitlines()[0] if str(e) else f"--model {cfg.model}: {type(e).__name__}")
    if cfg.teacher_local and not is_done(run_dir / "teacher"):
        try:
            resolve_checkpoint(cfg.teacher_local, weights=False)
        except (OSError, ValueError) as e:
            fail(f"--teacher-local {cfg.teacher_local}: {f'{e}'.splitlines()[0]}")
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the file
    if old is not None:
        diff = [k for k in saved if k not in RERUN_FREE and old.get(k) != saved[k]]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)} -> {saved[k]}" for k in diff)
            fail(f"{run_dir} holds a run with other settings ({changes}); pass another --run-name")
    if cfg.only == "report" and not is_done(run_dir / "teacher"):  # no stage finished
        fail(f"--only report: {run_dir} has no finished stage yet, nothing to report")
    if old is None and d.main:
        write_json(run_dir / "config.json", saved)
    d.barrier()

    # the held-out split: 10% of all GSM8K training ids, seed 42 (SPEC section 2)
    ids = [r["id"] for r in gsm8k]
    random.Random(cfg.seed).shuffle(ids)
    n_held = round(cfg.heldout_frac * len(ids))
    heldout, train_ids = ids[:n_held], ids[n_held:][: cfg.train_limit]  # limit: a random subset
    order = {r["id"]: i for i, r in enumerate(gsm8k)}
    heldout.sort(key=order.get)
    train_ids.sort(key=order.get)
    R = Run(cfg, run_dir, d, device, tok, {r["id"]: r for r in gsm8k}, train_ids, heldout)
    if d.main and not (run_dir / "split.json").is_file():
        write_json(run_dir / "split.json", {"train": train_ids, "heldout": heldout})
    R.log(f"config ({run_dir / 'config.json'}): {json.dumps(saved)}")
    if cfg.quick:
        R.log(
            f"--quick: a scaled-down run ({len(train_ids)} training questions, {cfg.eval_limit} "
            f"per eval set, {cfg.iterations - 1} SIKeD iteration(s), {cfg.samples} sample(s) per "
            f"strategy, {cfg.epochs} epoch(s)): not the paper's settings"
        )
    ran = run(R)
    R.log(f"done: {run_dir / 'report.md'}" if ran else f"nothing to do: {run_dir} is finished")
    if d.world > 1:
        dist.destroy_process_group()
    return run_dir


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The command line: a flag per RunConfig field given by arg(), typed as its default."""
    p = argparse.ArgumentParser(
        prog="siked.py",
        description=__doc__.split("\n\n")[1].rstrip(":") + ".",
        argument_default=argparse.SUPPRESS,  # only the flags given: --quick fills in the rest
    )
    p.error = lambda m: p.exit(2, f"{p.prog}: {m} (see --help)\n")  # one line, no usage block
    csv = lambda s: tuple(x for x in s.split(",") if x)
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("group"):
            g = p.add_argument_group(f.metadata["group"])
        if f.name == "sample_max_new_tokens":  # one flag for this field and the next
            g.add_argument("--max-new-tokens", type=int, help="sampling and evaluation both "
                           "(default 512 and 1024)")  # fmt: skip
        if not f.metadata:
            continue
        flag, default, text = "--" + f.name.replace("_", "-"), f.default, f.metadata["help"]
        if isinstance(default, bool):
            g.add_argument(flag, action="store_true", help=text)
            continue
        if isinstance(default, tuple):
            kind, shown = csv, ",".join(default)
        else:
            # a None default: the type its annotation (X | None) names
            kind, shown = typing.get_args(f.type)[0] if default is None else type(default), default
        required = f.name == "model"  # RunConfig's default model is for code, not the CLI
        text += "" if "default" in text or default is None or required else f" (default {shown})"
        g.add_argument(flag, type=kind, choices=f.metadata["choices"], help=text,
                       required=required)  # fmt: skip
    args = vars(p.parse_args(argv))
    n = args.pop("max_new_tokens", None)
    if n is not None:
        args.update(sample_max_new_tokens=n, eval_max_new_tokens=n)
    if args.get("quick"):  # --quick's settings, where no flag says otherwise
        args = {**QUICK, **args}
    return RunConfig(**args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        fail("interrupted; the same command resumes from the last finished chunk or checkpoint")
    except OSError as e:  # e.g. a --runs-dir that cannot be written, or a full disk
        fail(f"{e} (finished work is kept: fix that and rerun the same command)")
