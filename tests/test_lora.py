"""LoRA stage: training lowers the loss, checkpoints resume exactly, and the float merge (with N:M masks
re-applied or kept dense) equals base + B·A·(alpha/r)."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import lora as L
from conftest import make_tiny_llama
from runtime.errors import EdgepackError


def stream(n_tokens: int, seed: int = 0) -> list[int]:
    """A learnable token stream: a fixed random successor for every token (a bigram chain with restarts),
    so a few dozen LoRA steps can visibly lower the loss of a random model."""
    succ = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(1234))  # same chain for all
    g = torch.Generator().manual_seed(seed)
    out, t = [], 3
    for i in range(n_tokens):
        t = int(torch.randint(3, 256, (1,), generator=g)) if i % 16 == 0 else int(succ[t])
        out.append(t)
    return out


def quick(**overrides) -> L.LoraTraining:
    base = dict(steps=6, batch_size=4, warmup_steps=2, eval_every=3, checkpoint_every=3, max_len=32, lr=5e-3)
    base.update(overrides)
    return L.LoraTraining.from_flat(base)


def data():
    return L.pack_lm_windows(stream(32 * 24), 32), L.pack_lm_windows(stream(32 * 4, seed=1), 32)


def test_example_helpers():
    windows = L.pack_lm_windows(list(range(10)), 4)
    assert windows == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4, 5, 6, 7], [4, 5, 6, 7])]  # ragged tail dropped
    ids, labels = L.qa_example([5, 6, 7], [8, 9], eos_id=2)
    assert ids == [5, 6, 7, 8, 9, 2] and labels == [-100, -100, -100, 8, 9, 2]
    kept, dropped = L.prepare_examples(
        [(ids, labels), ([1, 2], [-100, -100]), ([1] * 9 + [4], [-100] * 9 + [4])], max_len=4
    )
    assert dropped == 1 and kept[0] == ([7, 8, 9, 2], [-100, 8, 9, 2]) and kept[1] == ([1, 1, 1, 4], [-100] * 3 + [4])
    batch = L.collate([([1, 2, 3], [1, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def full_logits_losses(student, teacher, batch):
    """The unchunked reference: full [B, T, V] logits, HF-style shift, summed NLL and KL(teacher || student)."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != L.IGNORE
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp, logp_t = logits[keep].log_softmax(-1), t_logits[keep].log_softmax(-1)
    kl = (logp_t.exp() * (logp_t - logp)).sum()
    return nll, kl, int(keep.sum())


@pytest.mark.parametrize("kind", ["plain", "llama32"])  # untied and tied (Llama-3.2) LM heads
def test_chunked_losses_and_gradients_equal_the_full_logits_ones(monkeypatch, kind):
    """Chunks of 5 positions over 3 ragged examples (padding and prompt labels masked) give the same NLL, KL
    and LoRA gradients as full-vocabulary logits."""
    monkeypatch.setattr(L, "LOSS_CHUNK", 5)
    examples = [
        ([5, 6, 7, 8, 9, 10, 11], [-100, -100, 7, 8, 9, 10, 11]),
        ([3, 4, 5], [3, 4, 5]),
        (list(range(20, 33)),) * 2,
    ]
    batch = L.collate(examples, pad_id=0)
    teacher = make_tiny_llama(kind, seed=1)
    settings = L.LoraTraining()
    student, _, _ = randomized_adapter(settings, kind)
    lora = [p for n, p in student.named_parameters() if "lora_" in n]
    for name, chunked in [
        ("nll", lambda: L.nll_sum(student, batch)),
        ("kl", lambda: L.kl_sum(student, teacher, batch)),
    ]:
        ref_nll, ref_kl, ref_count = full_logits_losses(student, teacher, batch)
        ref = ref_nll if name == "nll" else ref_kl
        ref_grads = torch.autograd.grad(ref, lora)
        got, count = chunked()
        grads = torch.autograd.grad(got, lora)
        assert count == ref_count == 5 + 2 + 12
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5), name
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # evaluation: same value, no gradient buffers
        assert float(L.nll_sum(student, batch)[0]) == pytest.approx(float(ref_nll), rel=1e-5)


def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    """A few distillation steps lower the held-out KL to the teacher; a run without its teacher is refused."""
    train, held = data()
    settings = quick(steps=20, eval_every=10, checkpoint_every=10, lr=1e-2, objective="distill")
    teacher = make_tiny_llama("plain", seed=1)
    _, rec = L.train_lora(make_tiny_llama("plain"), train, held, settings, tmp_path / "d", teacher=teacher)
    assert [s for s, _ in rec["heldout_loss"]] == [0, 10, 20]
    assert rec["heldout_loss"][-1][1] < 0.8 * rec["heldout_loss"][0][1], rec["heldout_loss"]
    with pytest.raises(EdgepackError, match="needs a teacher"):
        L.train_lora(make_tiny_llama("plain"), train, held, settings, tmp_path / "e")


def test_retained_freed_memory_sets_glibc_and_gives_the_heap_back(monkeypatch):
    """On glibc Linux (CI) both mallopt settings are accepted inside the block and malloc_trim runs on exit."""
    import sys

    from compressor import allocator

    calls = []
    real = allocator._libc()

    class Spy:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return real.mallopt(param, value) if real else 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return real.malloc_trim(pad) if real else 1

    monkeypatch.setattr(allocator, "_libc", lambda: Spy())
    with allocator.retained_freed_memory() as ok:
        assert ok is True
        assert calls == [
            ("mallopt", allocator.M_MMAP_THRESHOLD, 32 << 20),
            ("mallopt", allocator.M_TRIM_THRESHOLD, 2**31 - 1),
        ]
    assert calls[2:] == [("mallopt", allocator.M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]
    if sys.platform.startswith("linux"):
        assert real is not None  # glibc found: the real settings were applied above
    monkeypatch.setattr(allocator, "_libc", lambda: None)  # not glibc: nothing to set, says so
    with allocator.retained_freed_memory() as ok:
        assert ok is False


def test_schedule_warms_up_then_decays_to_zero():
    f = [L.lr_factor(s, 4, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] < 0.02


def test_training_lowers_train_and_heldout_loss(tmp_path):
    train, held = data()
    model = make_tiny_llama("plain")
    peft_model, rec = L.train_lora(
        model, train, held, quick(steps=40, eval_every=20, checkpoint_every=20, lr=1e-2), tmp_path
    )
    losses = [loss for _, loss in rec["train_loss"]]
    assert len(losses) == 40 and rec["start_step"] == 0 and rec["final_step"] == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    held_steps = [s for s, _ in rec["heldout_loss"]]
    assert held_steps == [0, 20, 40]
    assert rec["heldout_loss"][-1][1] < rec["heldout_loss"][0][1] - 0.3, rec["heldout_loss"]
    # only the adapter trains: 4 layers x 4 projections x (A + B)
    assert rec["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((tmp_path / "lora_record.json").read_text())["final_step"] == 40


def test_resume_starts_at_the_saved_step(tmp_path):
    train, held = data()
    _, first = L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=4, checkpoint_every=2), tmp_path)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]  # older ones pruned

    _, second = L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=9, checkpoint_every=2), tmp_path)
    assert second["start_step"] == 4
    assert [s for s, _ in second["train_loss"]] == list(range(1, 10))
    assert second["train_loss"][:4] == first["train_loss"]  # history carried over, not retrained


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """Kill the run right after its first checkpoint; the resumed run must end bit-identical to an
    uninterrupted one (same batches, optimizer moments, dropout RNG)."""
    train, held = data()
    settings = quick(steps=6, checkpoint_every=3)
    straight, rec_straight = L.train_lora(make_tiny_llama("plain"), train, held, settings, tmp_path / "a")

    real_save = L.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(L, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        L.train_lora(make_tiny_llama("plain"), train, held, settings, tmp_path / "b")
    monkeypatch.setattr(L, "save_checkpoint", real_save)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3
    resumed, rec_resumed = L.train_lora(make_tiny_llama("plain"), train, held, settings, tmp_path / "b")

    assert rec_resumed["start_step"] == 3
    assert rec_resumed["train_loss"] == rec_straight["train_loss"]
    a, b = L.adapter_state(straight), L.adapter_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_from_before_explicit_modules_still_resumes(tmp_path):
    """`modules` (explicit module names, for EoRA tuning) was added after checkpoints existed: a checkpoint
    without it was trained on the stage's target suffixes, which is what an empty list means."""
    train, held = data()
    L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=2, checkpoint_every=2), tmp_path)
    state_file = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]["modules"]
    state_file.write_text(json.dumps(state))
    _, rec = L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=3), tmp_path)
    assert rec["start_step"] == 2


def test_resume_refuses_a_different_run(tmp_path):
    train, held = data()
    L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=3), tmp_path)
    with pytest.raises(EdgepackError, match="different settings \\(lr\\)"):
        L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=6, lr=1e-3), tmp_path)
    with pytest.raises(EdgepackError, match="different data"):
        L.train_lora(make_tiny_llama("plain"), train[:-1], held, quick(steps=6), tmp_path)


def test_load_lora_restores_the_trained_adapter(tmp_path):
    train, held = data()
    trained, _ = L.train_lora(make_tiny_llama("plain"), train, held, quick(steps=3), tmp_path)
    reloaded = L.load_lora(make_tiny_llama("plain"), tmp_path)
    x = torch.tensor([train[0][0]])
    with torch.no_grad():
        assert torch.equal(trained(input_ids=x).logits, reloaded.eval()(input_ids=x).logits)


def randomized_adapter(settings: L.LoraTraining, kind: str = "plain"):
    """A tiny model with a LoRA adapter whose A and B are both random (B starts at zero in peft)."""
    peft_model = L.attach_lora(make_tiny_llama(kind), settings)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
        for k, v in peft_model.named_parameters()
        if "lora_" not in k
    }
    ab = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            ab[name] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
            )
    return peft_model.eval(), base, ab


def test_merge_equals_base_plus_scaled_BA():
    settings = L.LoraTraining()
    peft_model, base, ab = randomized_adapter(settings)
    x = torch.tensor([[1, 5, 9, 33, 200, 7]])
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
    merged, rec = L.merge_lora(peft_model)
    assert rec["mask_policy"] == "none" and rec["lora_modules_merged"] == 16
    assert not any("lora" in n for n, _ in merged.named_modules())
    scaling = settings.stage.alpha / settings.stage.rank
    state = merged.state_dict()
    for key, w in base.items():
        module = key.removesuffix(".weight")
        expected = w + (ab[module][1] @ ab[module][0]) * scaling if module in ab else w
        assert torch.equal(state[key], expected), key
    assert len(ab) == 16 and all(k.split(".")[-1] in settings.stage.targets for k in ab)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, before, atol=1e-5)


@pytest.mark.parametrize("keep_dense", [False, True])
def test_merge_reapplies_or_keeps_the_width_masks(keep_dense):
    settings = L.LoraTraining()
    peft_model, base, ab = randomized_adapter(settings)
    g = torch.Generator().manual_seed(5)
    masks = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        shape = base[f"{name}.weight"].shape
        masks[name] = torch.rand(shape, generator=g) > 0.5
        module = peft_model.base_model.model.get_submodule(name)
        getattr(module, "base_layer", module).weight.data.mul_(masks[name])  # a pruned base, as stage 2 leaves it
        base[f"{name}.weight"] *= masks[name]
    merged, rec = L.merge_lora(peft_model, masks=masks, keep_dense=keep_dense)
    scaling = settings.stage.alpha / settings.stage.rank
    q = "model.layers.0.self_attn.q_proj"
    delta = (ab[q][1] @ ab[q][0]) * scaling
    dense = base[f"{q}.weight"] + delta
    got = merged.get_submodule(q).weight.detach()
    if keep_dense:
        assert torch.equal(got, dense) and rec["mask_policy"] == "kept_dense"
        assert (got[~masks[q]] != 0).all()  # the delta filled the pruned zeros
    else:
        assert torch.equal(got, dense * masks[q]) and rec["mask_policy"] == "reapplied"
        assert (got[~masks[q]] == 0).all()
    # down_proj carries no LoRA (targets are q/k/v/o): its mask holds either way
    down = merged.get_submodule("model.layers.1.mlp.down_proj").weight.detach()
    assert (down[~masks["model.layers.1.mlp.down_proj"]] == 0).all()
    total = sum(((b @ a) * scaling).pow(2).sum() for a, b in ab.values())
    assert rec["delta_norm_fraction_on_pruned"] == pytest.approx(
        float((delta[~masks[q]].pow(2).sum() / total).sqrt()), rel=1e-5
    )
    assert rec["delta_norm_fraction_on_pruned_by_module"][q] == pytest.approx(
        float(delta[~masks[q]].norm() / delta.norm()), rel=1e-5
    )


def test_merge_rejects_bad_masks():
    peft_model, _, _ = randomized_adapter(L.LoraTraining())
    with pytest.raises(EdgepackError, match="is \\(3, 3\\)"):
        L.merge_lora(peft_model, masks={"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(EdgepackError, match="does not have"):  # the same model: a rejected mask merges nothing
        L.merge_lora(peft_model, masks={"model.layers.9.nope": torch.ones(3, 3, dtype=torch.bool)})
    merged, rec = L.merge_lora(peft_model)
    assert rec["lora_modules_merged"] == 16


def test_pipeline_schedule_evaluates_start_middle_and_end():
    """One pass over the examples; the held-out loss three times (a held-out pass costs about two steps, so
    a short run does not spend longer evaluating than training); four checkpoints."""
    from compressor.recipe import LoraStage

    t = L.LoraTraining.for_examples(LoraStage(samples=64), 64, pad_id=0)
    assert (t.steps, t.warmup_steps, t.eval_every, t.checkpoint_every) == (8, 1, 4, 2)
    t = L.LoraTraining.for_examples(LoraStage(), 256, pad_id=0)
    assert (t.steps, t.eval_every, t.checkpoint_every) == (32, 16, 8)
    assert L.LoraTraining.for_examples(LoraStage(), 3, pad_id=0).eval_every == 1


def test_heldout_distillation_loss_runs_the_teacher_once(monkeypatch):
    """The held-out KL with the teacher's hidden states cached equals the uncached one, and the frozen teacher
    runs once per held-out batch over all evaluations (it cost half of every held-out pass)."""
    _, held = data()
    settings = quick(objective="distill")
    student, _, _ = randomized_adapter(settings)
    teacher = make_tiny_llama("plain", seed=1)
    calls = []
    real = L.labelled_hidden
    monkeypatch.setattr(L, "labelled_hidden", lambda m, b: calls.append(m is teacher) or real(m, b))
    plain = L.heldout_loss(student, held, settings, "cpu", teacher)
    batches = -(-len(held) // settings.stage.batch_size)
    assert calls.count(True) == batches  # uncached: the teacher runs on every held-out batch, every time
    calls.clear()
    cache: dict = {}
    first = L.heldout_loss(student, held, settings, "cpu", teacher, cache)
    again = L.heldout_loss(student, held, settings, "cpu", teacher, cache)
    assert first == pytest.approx(plain, rel=1e-6) and again == pytest.approx(plain, rel=1e-6)
    assert calls.count(True) == len(cache) == batches
