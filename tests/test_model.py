"""model.py against transformers (the oracle): tiny random configs of each family, the real
SmolLM2-135M-Instruct fixture, the tokenizer and chat formats, save/load round trips, bad input.
The download path is in test_download.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import model as M

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CONFIGS = {
    "llama": lambda: LlamaConfig(
        **SIZES, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "llama3-untied": lambda: LlamaConfig(
        **SIZES,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False,
    ),
    "qwen2": lambda: Qwen2Config(
        **SIZES,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "gemma": lambda: GemmaConfig(
        **SIZES,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        hidden_act="gelu_pytorch_tanh",
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: the issue's 1e-4 criterion."""
    return ((a - b).abs().max() / b.abs().max()).item()


def make_hf(name: str, folder, hub_form: bool = False):
    """A tiny random HF model saved to folder. Every weight is random (HF inits norms to 1 or 0,
    which would hide a wrong norm formula). hub_form rewrites config.json the way hub configs are
    written (top-level rope_theta, rope_scaling) instead of transformers 5's rope_parameters."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(folder)
    if hub_form:
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        (folder / "config.json").write_text(json.dumps(cfg))
    return hf


def batch(vocab: int, B: int, T: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(T))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = make_hf(name, tmp_path, hub_form=name == "llama3-untied")
    ours = M.Transformer.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings == (name != "llama3-untied")
    assert ours.config.qkv_bias == (name == "qwen2")
    for T in (1, 5, 17):
        tokens = batch(96, 3, T)
        with torch.no_grad():
            want = hf(tokens).logits
            got = ours(tokens)
            last = ours(tokens, last_only=True)
        assert got.dtype == torch.float32 and got.shape == (3, T, 96)
        assert rel_err(got, want) < 1e-4, (name, T)
        torch.testing.assert_close(last, got[:, -1:])


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_equals_full_forward(name, tmp_path):
    make_hf(name, tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path)
    B, T, prefill = 2, 12, 5
    tokens = batch(96, B, T)
    with torch.no_grad():
        full = ours(tokens)
        for per_row in (False, True):  # input_pos (T,) and (B, T)
            cache = ours.setup_kv_cache(B, 16)
            steps = []
            for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]:
                pos = torch.arange(start, end)
                pos = pos.expand(B, -1) if per_row else pos
                steps.append(ours(tokens[:, start:end], pos, kv_cache=cache))
            # fp32 default tolerances: the cached path runs SDPA with an explicit mask over the
            # 16-slot cache, the full forward with is_causal, so the sums differ in the last bits
            torch.testing.assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("amx_cpu", [False, True])
def test_bf16_decoding_attention_paths(amx_cpu, tmp_path, monkeypatch):
    """Both ways decoding calls SDPA with GQA (query heads grouped as a kv head's rows, or
    enable_gqa: bf16 on an AMX CPU) give the fp32 full forward's logits to bf16 precision."""
    make_hf("llama", tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path)
    tokens = batch(96, 2, 8)
    with torch.no_grad():
        want = ours(tokens)
        ours.to(torch.bfloat16)
        monkeypatch.setattr(M, "AMX_CPU", amx_cpu)
        cache = ours.setup_kv_cache(2, 16)
        steps = [ours(tokens[:, :4], torch.arange(4), kv_cache=cache)]
        for t in range(4, 8):
            steps.append(ours(tokens[:, t : t + 1], torch.tensor([t]), kv_cache=cache))
    assert rel_err(torch.cat(steps, dim=1), want) < 3e-2


def test_ragged_batch_with_mask_and_positions(tmp_path):
    """Left-padded rows with a mask and per-row positions give each row's unpadded logits."""
    hf = make_hf("qwen2", tmp_path)
    ours = M.Transformer.from_pretrained(tmp_path)
    lengths, T = [5, 9, 2], 9
    rows = [batch(96, 1, n)[0] for n in lengths]
    tokens = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    valid = torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]  # (B, T)
    input_pos = (valid.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # a pad query attends to itself only: a fully masked row would turn into NaN
    mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)  # (B, T, T)
    with torch.no_grad():
        got = ours(tokens, input_pos, mask=mask[:, None])
        for i, r in enumerate(rows):
            want = hf(r[None]).logits[0]
            assert rel_err(got[i, T - len(r) :], want) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_round_trip(name, tmp_path):
    make_hf(name, tmp_path / "hf")
    ours = M.Transformer.from_pretrained(tmp_path / "hf")
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    ours.save_pretrained(out)  # replacing an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]  # no temp folders left
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not ours.config.tie_embeddings)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = batch(96, 2, 7)
    with torch.no_grad():
        assert rel_err(ours(tokens), back(tokens).logits) < 1e-4
        torch.testing.assert_close(
            M.Transformer.from_pretrained(out)(tokens), ours(tokens), rtol=0, atol=0
        )


def test_save_pretrained_bf16_and_from_scratch(tmp_path):
    """A model built from a config dict alone, cast with .to(bf16), saves a loadable checkpoint."""
    config = M.ModelConfig.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(0)
    ours = M.Transformer(config).to(torch.bfloat16)
    assert ours.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32 through .to()
    ours.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    tokens = batch(96, 2, 7)
    with torch.no_grad():
        assert rel_err(ours(tokens), back(tokens).logits.float()) < 1e-2  # bf16 rounding
    # a wrapped projection (an unmerged LoRA adapter) is not HF layout
    layer = ours.model.layers[0].self_attn
    layer.q_proj = torch.nn.Sequential(layer.q_proj)
    one_line_error(lambda: ours.save_pretrained(tmp_path / "m"), "q_proj.0.weight", "LoRA")


# ----------------------------------------------------------------------------- real checkpoint


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return hf, M.Transformer.from_pretrained(smollm2_dir), M.Tokenizer.from_pretrained(smollm2_dir)


def test_smollm2_logits_and_greedy_match_transformers(smol):
    hf, ours, tok = smol
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    for text in prompts:
        tokens = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4
    ids = tok.encode(tok.chat([{"role": "user", "content": "What is 12 times 7?"}]))
    want = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :]
    got = M.greedy(ours, ids, 20, tok.stop_ids)
    assert got == want.tolist()


STRINGS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines",
    "Natalia sold 48/2 = 24 clips",
    "ünïcödé — émojis 🙂 and 中文",
    "",
    "<|im_start|>user\nHi<|im_end|>\n",
    "x = 3.14159e-5",
]


def test_smollm2_tokenizer_matches_transformers(smol, smollm2_dir):
    _, _, tok = smol
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert tok.eos_id in tok.stop_ids and hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids
    for s in STRINGS:
        ids = tok.encode(s, bos=tok.add_bos)
        assert ids == hf(s)["input_ids"], s
        assert tok.decode(ids) == hf.decode(ids), s


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": " And now? "},
    ],
]


def test_smollm2_chat_matches_apply_chat_template(smol, smollm2_dir):
    _, _, tok = smol
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_format == "chatml" and "SmolLM" in tok.default_system
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.chat(messages, add_generation_prompt=gen) == want
            # as every caller encodes a prompt; Gemma's <bos> is in the text and not doubled
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=True)
            assert tok.encode(want, bos=tok.add_bos) == ids["input_ids"]


# The hub's chat templates of Qwen2-Instruct, Qwen2.5-Instruct and Gemma-it, verbatim
# (in Qwen2.5's, "\n" inside Jinja strings is the two-character escape, as in its JSON).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)


def tiny_tokenizer(folder, specials, template=None, bos=None, eos=None, add_bos=False):
    """A word-level tokenizer folder that transformers and model.Tokenizer both load."""
    words = ["hi", "what", "is", "2", "+", "3", "?", "be", "brief", "."]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, "?"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(specials)
    if add_bos:
        raw.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, 0)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=bos, eos_token=eos, chat_template=template
    )
    hf.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return AutoTokenizer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)


CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENIZERS = {  # special tokens, chat template, bos, eos
    "qwen2": (CHATML, QWEN2_TEMPLATE, None, "<|im_end|>"),
    "qwen2.5": (CHATML, QWEN25_TEMPLATE, None, "<|im_end|>"),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        GEMMA_TEMPLATE,
        "<bos>",
        "<eos>",
    ),
    "base": (["<s>", "</s>"], None, "<s>", "</s>"),
}


@pytest.mark.parametrize("family", TINY_TOKENIZERS)
def test_chat_formats_match_templates(family, tmp_path):
    specials, template, bos, eos = TINY_TOKENIZERS[family]
    hf, tok = tiny_tokenizer(tmp_path, specials, template, bos, eos, add_bos=family == "gemma")
    assert tok.add_bos == (family == "gemma")
    assert tok.encode("what is 2 + 3 ?", bos=tok.add_bos) == hf("what is 2 + 3 ?")["input_ids"]
    if family == "base":
        assert tok.chat_format == "plain"
        assert tok.chat(CONVERSATIONS[0]) == "User: What is 2 + 3?\n\nAssistant:"
        return
    for messages in CONVERSATIONS:
        if family == "gemma" and messages[0]["role"] == "system":
            with pytest.raises(ValueError, match="role 'system'"):
                tok.chat(messages)
            continue
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.chat(messages, add_generation_prompt=gen) == want
            # as every caller encodes a prompt; Gemma's <bos> is in the text and not doubled
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=True)
            assert tok.encode(want, bos=tok.add_bos) == ids["input_ids"]
    if family == "gemma":  # the template also takes its own name for the assistant
        turns = [{"role": "user", "content": "2 + 3?"}, {"role": "model", "content": "5"}]
        assert tok.chat(turns) == hf.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True
        )
    end = "<end_of_turn>" if family == "gemma" else "<|im_end|>"
    assert hf.convert_tokens_to_ids(end) in tok.stop_ids


def test_tokenizer_save_pretrained_copies_files(smol, smollm2_dir, tmp_path):
    _, _, tok = smol
    tok.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (smollm2_dir / name).read_bytes()


def test_from_pretrained_peak_memory(smollm2_dir):
    """Peak RSS of a bf16 from_pretrained plus one forward (which touches every weight page),
    above the RSS after `import torch`, is < 1.3x the file (1.11x measured with SmolLM2-135M)."""
    code = (
        "import resource, sys, torch\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "base = peak()\n"
        "import model as M\n"
        "m = M.Transformer.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "with torch.no_grad(): m(torch.tensor([[1, 2, 3]]))\n"
        "print(peak() - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(smollm2_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(M.__file__).parent,
    )
    peak = int(out.stdout.split()[-1])
    size = (smollm2_dir / "model.safetensors").stat().st_size
    assert peak < 1.3 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


# ----------------------------------------------------------------------------- bad input


def one_line_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_bad_folders_and_names(tmp_path):
    one_line_error(lambda: M.Transformer.from_pretrained(tmp_path), str(tmp_path), "config.json")
    msg = one_line_error(lambda: M.Transformer.from_pretrained("smollm-999m"), "smollm-999m")
    assert "smollm2-135m-instruct" in msg and "gemma-7b-it" in msg
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(lambda: M.Transformer.from_pretrained(tmp_path), "gpt2", "config.json")
    one_line_error(
        lambda: M.ModelConfig.from_hf_config(
            {"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}
        ),
        "yarn",
    )


def test_damaged_json_files(tmp_path, smollm2_dir):
    """A damaged config.json, shard index or tokenizer file: one line naming the file."""
    make_hf("llama", tmp_path)
    config, load = tmp_path / "config.json", lambda: M.Transformer.from_pretrained(tmp_path)
    good = json.loads(config.read_text())
    config.write_text("{oops")
    one_line_error(load, str(config), "not valid JSON")
    config.write_text("[1, 2]")
    one_line_error(load, str(config), "expected a JSON object")
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    one_line_error(load, str(config), "hidden_size")
    config.write_text(json.dumps(dict(good, num_attention_heads="4")))
    one_line_error(load, str(config), "num_attention_heads")
    config.write_text(json.dumps(good))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    one_line_error(load, "model.safetensors.index.json", "weight_map")

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"x": 1}')
    one_line_error(lambda: M.Tokenizer(tok), str(tok / "tokenizer.json"), "not a valid tokenizer")
    shutil.copyfile(smollm2_dir / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text("{oops")
    one_line_error(lambda: M.Tokenizer(tok), str(tok / "tokenizer_config.json"), "not valid JSON")


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    """python model.py args, with env added to this process's environment."""
    cmd = [sys.executable, M.__file__, *args]
    env = {**os.environ, **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_input_is_one_line(tmp_path, smollm2_dir):
    """Bad input to `python model.py`: exit 1 and one line naming it, never a traceback."""
    bad_config = tmp_path / "bad"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{oops")
    offline = dict(
        HF_ENDPOINT="http://127.0.0.1:9",  # nobody listens: no network needed
        SIKED_CACHE=str(tmp_path / "cache"),
        HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    model = ["--model", str(smollm2_dir), "--max-new-tokens", "1"]
    cases = [
        (["--model", str(tmp_path / "none")], {}, f"unknown model '{tmp_path / 'none'}'"),
        (["--model", str(bad_config)], {}, f"{bad_config / 'config.json'}: not valid JSON"),
        (["--model", "org/name"], offline, "config.json: cannot download org/name"),
        ([*model, "--device", "banana"], {}, "--device banana: expected cpu, cuda or cuda:N"),
        ([*model, "--prompt", ""], {}, "--prompt '': expected"),
        ([*model, "--max-new-tokens", "-1"], {}, "--max-new-tokens -1: expected >= 0"),
    ]
    for args, env, needle in cases:
        proc = run_cli(*args, **env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("model.py: ") and needle in lines[0], lines
    assert not (tmp_path / "cache").exists()  # the failed download left no empty folder
    proc = run_cli(*model, "--dtype", "float33")  # argparse's usage error, before any loading
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --dtype: invalid choice: 'float33'" in proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_read_into_their_own_memory(tmp_path, dtype):
    """Same values as safetensors' reader, each tensor in a storage of its own (sample.py frees
    them one by one while packed), and none of it a view of the file."""
    make_hf("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        want = {k: f.get_tensor(k).to(dtype).clone() for k in f.keys()}  # theirs are views
    ours = M.Transformer.from_pretrained(tmp_path, dtype=dtype)
    path.write_bytes(bytes(path.stat().st_size))  # a mapped view would now read zeros
    state = ours.state_dict()
    assert state.keys() <= want.keys() and all(torch.equal(state[k], want[k]) for k in state)
    for p in ours.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_bad_safetensors(tmp_path):
    make_hf("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        # clones: safetensors' tensors map the file, which is rewritten below
        state = {k: f.get_tensor(k).clone() for k in f.keys()}
    load = lambda: M.Transformer.from_pretrained(tmp_path)

    path.write_bytes(good[: len(good) // 2])
    one_line_error(load, str(path), "not a valid safetensors file")
    path.write_bytes(b"\xff" * 64)
    one_line_error(load, str(path), "not a valid safetensors file")
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    one_line_error(load, str(path), "not a valid safetensors file", "header")

    key = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(path))
    one_line_error(load, str(path), key, "(48, 32)")
    save_file({**state, key: torch.zeros(48, 31)}, str(path))
    one_line_error(load, str(path), key, "(48, 31)", "(48, 32)")
    save_file({**state, "model.extra.weight": torch.zeros(2)}, str(path))
    one_line_error(load, str(path), "model.extra.weight")
    save_file({**state, key: torch.zeros(48, 32, dtype=torch.int64)}, str(path))
    one_line_error(load, str(path), key, "dtype I64")
    header = json.dumps({key: {"dtype": "F32", "shape": [-48, 32], "data_offsets": [0, 0]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    one_line_error(load, str(path), key, "(-48, 32)", "(48, 32)")


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("qwen2", tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    tokens = batch(96, 2, 6)
    with torch.no_grad():
        assert rel_err(M.Transformer.from_pretrained(tmp_path)(tokens), hf(tokens).logits) < 1e-4
    shards[-1].unlink()
    one_line_error(lambda: M.Transformer.from_pretrained(tmp_path), "index.json", shards[-1].name)


def test_aliases():
    assert len(M.ALIASES) == 24
    assert M.ALIASES["smollm-1.7b-instruct"] == "HuggingFaceTB/SmolLM-1.7B-Instruct"
    assert M.ALIASES["smollm2-135m-instruct"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert M.ALIASES["qwen2-0.5b"] == "Qwen/Qwen2-0.5B"
    assert M.ALIASES["qwen2.5-1.5b-instruct"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert M.ALIASES["gemma-2b-it"] == "google/gemma-2b-it"
    assert M.ALIASES["gemma-7b"] == "google/gemma-7b"
