"""DDP training: two gloo processes on the CPU reach the same weights as one process on the same
global batches. This file is also the torchrun worker (`python -m torch.distributed.run ...
tests/test_ddp.py MODEL_DIR OUT`)."""

import subprocess
import sys
from pathlib import Path

import torch

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


def train_once(model_dir: Path, d: siked.Dist, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = load(model_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    cfg = siked.RunConfig(
        lr=1e-2, warmup_steps=1, batch_size=4, micro_batch_size=1, epochs=2, max_seq_len=12, seed=0
    )
    stats = siked.train(model, examples(), cfg, device=device, d=d)
    assert stats["sequences"] == 5 and stats["steps"] == 4
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def worker(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    d, device = siked.setup_distributed("cpu")
    assert d.world == 2
    weights = train_once(Path(model_dir), d, device)
    if d.main:
        torch.save(weights, out)
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    model_dir = tiny_hf(tmp_path / "tiny")
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(model_dir), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    single = train_once(model_dir, siked.Dist(), torch.device("cpu"))
    assert ddp.keys() == single.keys()
    moved = sum(not torch.equal(single[n], p) for n, p in _fresh_adapters(model_dir).items())
    assert moved == len(single)  # training changed every adapter weight
    for n, p in single.items():
        # the gradient sums differ only in float rounding (all-reduce vs. local accumulation)
        torch.testing.assert_close(ddp[n], p, rtol=1e-4, atol=1e-6, msg=n)


def _fresh_adapters(model_dir: Path) -> dict:
    model = load(model_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
