"""siked.py's training building blocks: LoRA, packing, loss masking, the schedule, the loop.

Oracles: hand-computed values (the schedule, W + (alpha/r) B A, the masked targets), the unpacked
forward of each example (packing), transformers' LlamaForCausalLM on the saved student (saving).
Tiny random models (2 layers, dim 64) built with transformers and loaded by model.py.
"""

import math

import pytest
import torch
import torch.nn as nn

import siked
from model import Transformer


def tiny_hf(folder, vocab_size=97, tie=True, seed=0, init_std=0.02):
    """A tiny random Llama in HF layout (transformers writes it; model.py reads it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        initializer_range=init_std,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("tiny"))


def load(folder) -> Transformer:
    return Transformer.from_pretrained(str(folder), device="cpu", dtype=torch.float32).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, siked.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def examples_abc():
    """Three hand-made examples of different lengths (prompt then response ids)."""
    return [
        siked.Example([5, 6, 7, 8, 9, 10, 11], 3),
        siked.Example([20, 21, 22, 23], 2),
        siked.Example([30, 31, 32, 33, 34, 35, 36, 37, 38, 39], 6),
    ]


# ------------------------------------------------------------------------------------ schedule


def test_get_lr_is_transformers_linear_schedule():
    lr, total, warm = 2e-4, 25, 5
    values = [siked.get_lr(s, total, lr, warm) for s in range(total + 1)]
    assert values[0] == 0.0  # transformers' first step runs at lr 0
    assert values[1] == pytest.approx(lr / 5)
    assert values[4] == pytest.approx(4 * lr / 5)
    assert values[5] == pytest.approx(lr)  # the peak
    assert values[15] == pytest.approx(lr * 10 / 20)
    assert values[24] == pytest.approx(lr / 20)
    assert values[25] == 0.0
    assert max(values) == pytest.approx(lr)
    # transformers' own scheduler, stepped the same way, as an oracle
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    for s in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(values[s], abs=1e-12)
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_wraps_the_seven_projections_and_only_they_get_grads(tiny_dir):
    model = load(tiny_dir)
    adapters = siked.add_lora(model, r=4, alpha=8, seed=0)
    wrapped = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, siked.LoRALinear)
    }
    assert wrapped == set(siked.LORA_TARGETS)
    assert len(adapters) == 2 * 7 * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (2, 9))
    model(tokens).float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_starts_as_identity_and_merge_equals_w_plus_scaled_ba(tiny_dir):
    base = load(tiny_dir)
    model = load(tiny_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(tokens), base(tokens))  # B = 0: no change yet
    randomize_adapters(model)
    q = model.model.layers[1].self_attn.q_proj
    W, A, B = q.base.weight.clone(), q.lora_A.detach().clone(), q.lora_B.detach().clone()
    assert q.scale == 8 / 4
    before = model(tokens)
    siked.merge_lora(model)
    merged = model.model.layers[1].self_attn.q_proj
    assert type(merged) is nn.Linear  # the plain layer is back
    torch.testing.assert_close(merged.weight, W + (8 / 4) * B @ A)
    assert not any(isinstance(m, siked.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(tokens), before, rtol=1e-5, atol=1e-5)


def test_merge_then_new_adapter_keeps_the_function(tiny_dir):
    """Continual training: merging the last adapter and adding a fresh one changes nothing."""
    model = load(tiny_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (2, 9))
    y = model(tokens)
    siked.merge_lora(model)
    siked.add_lora(model, r=4, alpha=8, seed=1)
    torch.testing.assert_close(model(tokens), y, rtol=1e-5, atol=1e-5)
    assert all(
        n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad
    )


def test_saved_student_loads_in_transformers_with_the_same_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(tiny_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(tokens)
        siked.merge_lora(model)
    model.save_pretrained(tmp_path / "student")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # the fold adds fp32 rounding


# ---------------------------------------------------------------------------------------- packing


def test_make_batch_masks_positions_and_targets():
    exs = examples_abc()
    tokens, targets, input_pos, mask = siked.make_batch(exs, [[0, 1], [2]], "all", pad_id=0)
    assert tokens.shape == (2, 11) and mask.shape == (2, 1, 11, 11)
    assert tokens[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert input_pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    # each example predicts its own next tokens; no target crosses into the next example
    assert targets[0].tolist() == [6, 7, 8, 9, 10, 11, -100, 21, 22, 23, -100]
    assert targets[1].tolist() == [31, 32, 33, 34, 35, 36, 37, 38, 39, -100, -100]
    m = mask[0, 0]
    assert m[8, 7] and m[8, 8] and not m[8, 6] and not m[8, 9]  # block-diagonal and causal
    assert m[6, 0] and not m[0, 1]
    assert mask[1, 0, 10, 10] and not mask[1, 0, 10, 9]  # padding attends to itself only
    # response only: targets are the response tokens (and EOS) alone
    _, t_resp, _, _ = siked.make_batch(exs, [[0, 1], [2]], "response", pad_id=0)
    assert t_resp[0].tolist() == [-100, -100, 8, 9, 10, 11, -100, -100, 22, 23, -100]
    assert t_resp[1].tolist() == [-100] * 5 + [36, 37, 38, 39, -100, -100]


def test_loss_masking_counts_only_response_tokens(tiny_dir):
    model = load(tiny_dir)
    exs = examples_abc()
    batch_all = siked.make_batch(exs, [[0, 1, 2]], "all", pad_id=0)
    batch_resp = siked.make_batch(exs, [[0, 1, 2]], "response", pad_id=0)
    with torch.no_grad():
        l_all = siked.token_losses(model, *batch_all)
        l_resp = siked.token_losses(model, *batch_resp)
    assert (l_all > 0).sum() == sum(len(e.ids) - 1 for e in exs)
    assert (l_resp > 0).sum() == sum(len(e.ids) - e.n_prompt for e in exs)
    keep = batch_resp[1] != -100
    torch.testing.assert_close(l_resp[keep], l_all[keep])  # same values where both count


def test_packed_loss_equals_unpacked_per_example(tiny_dir):
    model = load(tiny_dir)
    exs = examples_abc()
    with torch.no_grad():
        packed = siked.token_losses(model, *siked.make_batch(exs, [[0, 1, 2]], "all", pad_id=0))
        offsets = [0, 7, 11]
        for i, ex in enumerate(exs):
            alone = torch.tensor([ex.ids])
            logits = model(alone)[0, :-1]  # plain causal attention, positions from 0
            ref = nn.functional.cross_entropy(logits, alone[0, 1:], reduction="none")
            got = packed[0, offsets[i] : offsets[i] + len(ex.ids) - 1]
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and a batch with padding rows gives the same losses again (no NaN from pad rows)
    with torch.no_grad():
        padded = siked.token_losses(model, *siked.make_batch(exs, [[1], [0, 2]], "all", pad_id=0))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, :3], packed[0, 7:10], rtol=1e-5, atol=1e-5)


def test_pack_next_fit():
    assert siked.pack([5, 5, 3, 9, 1], 10) == [[0, 1], [2], [3, 4]]
    assert siked.pack([10, 10], 10) == [[0], [1]]


# ------------------------------------------------------------------------------------------ loop

# four GSM8K training problems, as strategies.training_example would lay them out (whole text)
REAL = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?",
        "[cot]: Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether "
        "in April and May.\nFinal Answer: 72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?",
        "[pot]: per_minute = 12 / 60\nanswer = per_minute * 50",
    ),
    (
        "Betty is saving money for a new wallet which costs $100. Betty has only half of the "
        "money she needs. Her parents decided to give her $15 for that purpose, and her "
        "grandparents twice as much as her parents. How much more money does Betty need?",
        "[cot]: Betty has 100 / 2 = 50 dollars.\nHer grandparents give 15 * 2 = 30 dollars.\n"
        "She needs 100 - 50 - 15 - 30 = 5 more.\nFinal Answer: 5",
    ),
    (
        "James writes a 3-page letter to 2 different friends twice a week. How many pages does "
        "he write a year?",
        "[cot]: He writes 3 * 2 = 6 pages a time.\nSo 6 * 2 = 12 pages a week.\nThat is "
        "12 * 52 = 624 pages a year.\nFinal Answer: 624",
    ),
]


def real_examples(tok):
    prompt = "### Instruction:\nSolve the math word problem.\n\n### Input:\n{}\n\n### Response:\n"
    return [siked.tokenize_example(tok, prompt.format(q), r) for q, r in REAL]


def cfg_for_test(**kw):
    base = dict(lr=1e-2, warmup_steps=0, batch_size=2, micro_batch_size=1, epochs=8, seed=0)
    return siked.RunConfig(**{**base, **kw})


def test_loss_falls_on_a_small_real_batch(smollm2_dir, tmp_path):
    """Four GSM8K problems through the real tokenizer; their ids are renumbered densely so that a
    tiny model (vocabulary 256) can learn them in a few seconds. LoRA, the default."""
    from model import Tokenizer

    tok = Tokenizer.from_pretrained(str(smollm2_dir))
    exs = real_examples(tok)
    assert all(e.ids[-1] == tok.eos_id for e in exs)
    dense = {i: k for k, i in enumerate(sorted({i for e in exs for i in e.ids}))}
    assert len(dense) < 256
    exs = [siked.Example([dense[i] for i in e.ids], e.n_prompt) for e in exs]
    # init std 0.2, not HF's 0.02: LoRA leaves the tied head frozen, and a head that small caps
    # the logits near 0 (loss near ln 256) whatever the adapters learn
    model = load(tiny_hf(tmp_path / "m", vocab_size=256, init_std=0.2))
    siked.add_lora(model, r=8, alpha=16, seed=0)
    before = mean_loss(model, exs)
    cfg = cfg_for_test(max_seq_len=256, lr=3e-2, batch_size=3, micro_batch_size=3, epochs=12)
    stats = siked.train(model, exs, cfg, device=torch.device("cpu"))
    assert stats["sequences"] == 2 and stats["steps"] == 12  # examples share sequences
    after = mean_loss(model, exs)
    assert after < 0.3 * before, (before, after)


def mean_loss(model, exs) -> float:
    with torch.no_grad():
        losses = siked.token_losses(
            model, *siked.make_batch(exs, [[i] for i in range(len(exs))], "all", 0)
        )
    return (losses.sum() / (losses > 0).sum()).item()


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tiny_dir, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed equals the uninterrupted run, in its
    weights and in the losses it reports (the first one is step 0's, kept in the checkpoint)."""
    exs = examples_abc() * 3
    cfg = cfg_for_test(epochs=2, batch_size=4, micro_batch_size=2, ckpt_every=2, max_seq_len=12)
    ckpt = tmp_path / "ckpt.pt"

    full = load(tiny_dir)
    siked.add_lora(full, r=4, alpha=8, seed=0)
    stats = siked.train(full, exs, cfg, device=torch.device("cpu"), ckpt_path=ckpt)
    assert stats["steps"] == 4
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the last checkpoint before the end

    resumed = load(tiny_dir)
    siked.add_lora(resumed, r=4, alpha=8, seed=123)  # other init: the checkpoint overrides it
    again = siked.train(resumed, exs, cfg, device=torch.device("cpu"), ckpt_path=ckpt)
    assert (again["first_loss"], again["final_loss"]) == (stats["first_loss"], stats["final_loss"])
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_micro_batching_and_activation_checkpointing_do_not_change_the_step(tiny_dir):
    """The loss is normalised over the global batch: accumulation over micro-batches, and
    recomputing activations, give the same update as one big batch."""
    exs = examples_abc() * 2
    results = []
    for micro, ac in ((4, False), (1, False), (2, True)):
        model = load(tiny_dir)
        siked.add_lora(model, r=4, alpha=8, seed=0)
        cfg = cfg_for_test(
            epochs=1, batch_size=4, micro_batch_size=micro, max_seq_len=12, grad_clip=0.0
        )
        cfg.activation_checkpointing = ac
        siked.train(model, exs, cfg, device=torch.device("cpu"))
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # equal up to float rounding of the summed gradients, which Adam's 1/sqrt(v) can lift to
    # ~1e-6 where a gradient is tiny (the weights moved by ~4e-3)
    for other in results[1:]:
        for n, p in results[0].items():
            torch.testing.assert_close(other[n], p, rtol=1e-4, atol=1e-5)


def test_full_finetune_trains_every_weight(tiny_dir):
    model = load(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = cfg_for_test(epochs=1, batch_size=2, micro_batch_size=2, max_seq_len=12, lr=1e-3)
    siked.train(model, examples_abc(), cfg, device=torch.device("cpu"))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))


def test_step_gradient_is_the_mean_token_loss_of_the_global_batch(tiny_dir):
    """The gradient the optimizer sees equals autograd of the mean response-token cross-entropy
    over the whole step, each example run alone. Compared before AdamW: Adam is nearly blind to
    a constant gradient scale, so a loss left unnormalised (or averaged per micro-batch, which
    differs here: 4, 2 and 4 loss tokens) would still train and pass the other tests."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = load(tiny_dir)
    siked.add_lora(model, r=4, alpha=8, seed=0)
    randomize_adapters(model)  # B != 0: the A matrices get gradients too
    exs = examples_abc()
    # the oracle: plain causal forward per example, targets = the response tokens (and EOS)
    total, count = 0.0, 0
    for ex in exs:
        ids = torch.tensor([ex.ids])
        logits = model(ids)[0, :-1]
        ce = nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total, count = total + ce[ex.n_prompt - 1 :].sum(), count + len(ex.ids) - ex.n_prompt
    (total / count).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)

    seen = {}  # the gradients at the optimizer step, before AdamW uses them
    names = {id(p): n for n, p in trainable.items()}
    hook = register_optimizer_step_pre_hook(  # every optimizer, the one train() builds too
        lambda opt, args, kwargs: seen.update(
            {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]}
        )
    )
    # max_seq_len 10: three sequences (7, 4, 10 tokens), one per micro-batch, one step, no clipping
    cfg = cfg_for_test(epochs=1, batch_size=3, micro_batch_size=1, max_seq_len=10, grad_clip=0.0)
    cfg.loss_on, cfg.dtype = "response", "float32"
    try:
        stats = siked.train(model, exs, cfg, device=torch.device("cpu"))
    finally:
        hook.remove()
    assert stats["steps"] == 1 and stats["sequences"] == 3
    assert seen.keys() == want.keys()
    for n, g in want.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-4, atol=1e-7, msg=n)
