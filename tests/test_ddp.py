"""DDP and FSDP training: two gloo processes on the CPU reach the same weights as one process on the
same global batches. This file is also the torchrun worker (`python -m torch.distributed.run ...
tests/test_ddp.py MODEL_DIR OUT MODE`)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from test_train import examples_abc, load, tiny_hf  # noqa: E402

import siked  # noqa: E402


def examples():
    # next-fit packs these into 5 sequences: with batch 4, the second step of each epoch has one
    # sequence, so rank 1 has no data there and must still join the all-reduce
    return examples_abc() * 2


def train_once(model_dir: Path, d: siked.Dist, device: torch.device, mode: str, ckpt=None) -> dict:
    """mode: ddp or fsdp (LoRA), fsdp-full (every weight); returns the trained weights, whole."""
    torch.manual_seed(0)
    model = load(model_dir)
    full = mode == "fsdp-full"
    if not full:
        siked.add_lora(model, r=4, alpha=8, seed=0)
    cfg = siked.RunConfig(lr=1e-2, warmup_steps=1, batch_size=4, micro_batch_size=1, epochs=2,
                          max_seq_len=12, seed=0, full_finetune=full, fsdp=mode != "ddp",
                          ckpt_every=2)  # fmt: skip
    stats = siked.train(model, examples(), cfg, device=device, d=d, ckpt_path=ckpt)
    assert stats["sequences"] == 5 and stats["steps"] == 4
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return {n: p.detach().clone() for n, p in get_model_state_dict(model, options=whole).items()}


def worker(model_dir: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    d, device = siked.setup_distributed("cpu")
    assert d.world == 2
    ckpt = Path(out).with_suffix(".ckpt") if mode == "fsdp-full" else None
    weights = train_once(Path(model_dir), d, device, mode, ckpt)
    if ckpt is not None:  # resume from the step-2 checkpoint: the same weights at the end
        assert torch.load(ckpt, weights_only=True)["step"] == 2
        resumed = train_once(Path(model_dir), d, device, mode, ckpt)
        if d.main:
            for n, p in weights.items():
                torch.testing.assert_close(resumed[n], p, rtol=0, atol=0, msg=n)
    if d.main:
        torch.save(weights, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-full"])
def test_two_gloo_processes_equal_one_process(tmp_path, mode):
    model_dir = tiny_hf(tmp_path / "tiny")
    out = tmp_path / f"{mode}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*cmd, __file__, str(model_dir), str(out), mode]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    single = train_once(model_dir, siked.Dist(), torch.device("cpu"), mode)
    assert two.keys() == single.keys()
    moved = sum(not torch.equal(single[n], p) for n, p in _fresh(model_dir, mode).items())
    assert moved == len(single)  # training changed every trained weight
    for n, p in single.items():
        # the gradient sums differ only in float rounding (reduction vs. local accumulation)
        torch.testing.assert_close(two[n], p, rtol=1e-4, atol=1e-6, msg=n)


def _fresh(model_dir: Path, mode: str) -> dict:
    model = load(model_dir)
    if mode != "fsdp-full":
        siked.add_lora(model, r=4, alpha=8, seed=0)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    worker(*sys.argv[1:4])
