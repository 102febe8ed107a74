"""Stage 3: LoRA fine-tuning with peft, checkpointed and resumable, and the float merge that keeps N:M masks.

Training data arrives as token ids: a list of (input_ids, labels) pairs, labels -100 where no loss is taken
(the prompt of a TriviaQA example; nothing in a WikiText window). The loop is plain torch: AdamW, gradient
accumulation, linear warmup then cosine decay, held-out loss every `eval_every` steps.

Checkpoints (adapter, optimizer, RNG, step, loss history) go to `out_dir/checkpoints/step-NNNNNN/` every
`checkpoint_every` steps, each written into a temporary directory and published with one rename, then
`out_dir/latest.json` is replaced atomically to point at it. Calling `train_lora` again with the same
`out_dir` resumes from there; the batch order is a pure function of (seed, step), so an interrupted run
resumed to the end gives the same adapter as an uninterrupted one. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from compressor.allocator import retained_freed_memory
from compressor.device import pick_device
from compressor.recipe import LoraStage
from runtime.errors import EdgepackError
from runtime.fileio import atomic_directory, atomic_write_bytes, atomic_write_json, read_json

Example = tuple[list[int], list[int]]
IGNORE = -100
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Settings that may change between a run and its resumption; any other change means a different training run.
RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every")
# Settings added after checkpoints existed, at the value those checkpoints were trained with.
ADDED_LATER = {"modules": []}


@dataclass
class LoraTraining:
    """One LoRA training run: the recipe's `[lora]` settings, embedded as they are (rank, alpha, targets, lr,
    batch size, samples ...), plus the schedule the stage derives from the amount of data (steps, warmup,
    evaluation and checkpoint intervals) and the trainer's fixed knobs."""

    stage: LoraStage = field(default_factory=LoraStage)
    steps: int = 200  # optimizer steps
    warmup_steps: int = 20
    eval_every: int = 50
    checkpoint_every: int = 50
    max_len: int = 512
    pad_id: int = 0  # any id works: padded positions are masked out of attention and loss
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # explicit module names to adapt instead of the stage's target suffixes (EoRA tuning: exactly the
    # projections EoRA corrected, compressor.eora_tune)
    modules: list[str] = field(default_factory=list)

    @classmethod
    def for_examples(cls, stage: LoraStage, n_examples: int, pad_id: int) -> LoraTraining:
        """The pipeline's schedule: one pass over the examples, 10 % warmup, 4 checkpoints, and the held-out
        loss at the start, the middle and the end (a held-out pass costs ~2 training steps: 31 examples forward,
        twice with a teacher, against 8 forward + backward; at 8 steps, 5 evaluations took longer than training)."""
        return cls.for_steps(stage, max(1, math.ceil(n_examples / (stage.batch_size * stage.grad_accum))), pad_id)

    @classmethod
    def for_steps(cls, stage: LoraStage, steps: int, pad_id: int, **fixed) -> LoraTraining:
        """The schedule for `steps` optimizer steps (10 % warmup, held-out loss at the start, middle and end,
        4 checkpoints); `fixed`: other fields (e.g. modules)."""
        return cls(
            stage,
            steps=steps,
            warmup_steps=max(1, steps // 10),
            eval_every=max(1, steps // 2),
            checkpoint_every=max(1, steps // 4),
            max_len=max(stage.seqlen, 512),
            pad_id=pad_id,
            **fixed,
        )

    @classmethod
    def from_flat(cls, flat: dict) -> LoraTraining:
        """The inverse of `settings_json`: one flat dict with the stage's and the schedule's keys."""
        stage_keys = {f.name for f in fields(LoraStage)}
        stage = LoraStage(**{k: (list(v) if k == "targets" else v) for k, v in flat.items() if k in stage_keys})
        return cls(stage, **{k: v for k, v in flat.items() if k not in stage_keys})


# ---------------------------------------------------------------------------------------------------------
# Examples


def pack_lm_windows(token_ids: list[int], seqlen: int) -> list[Example]:
    """Non-overlapping windows of `seqlen` tokens from one token stream, every token a target (the model
    shifts labels itself). The ragged tail is dropped, as in the perplexity protocol."""
    if seqlen < 2:
        raise EdgepackError(f"lora seqlen={seqlen}: must be >= 2")
    return [
        (list(token_ids[i : i + seqlen]), list(token_ids[i : i + seqlen]))
        for i in range(0, len(token_ids) - seqlen + 1, seqlen)
    ]


def qa_example(prompt_ids: list[int], answer_ids: list[int], eos_id: int | None) -> Example:
    """Prompt followed by answer (+ EOS, so the model learns to stop); loss only on the answer and EOS."""
    target = list(answer_ids) + ([eos_id] if eos_id is not None else [])
    return list(prompt_ids) + target, [IGNORE] * len(prompt_ids) + target


def prepare_examples(examples: list[Example], max_len: int) -> tuple[list[Example], int]:
    """Keep the last `max_len` tokens of each example (QA targets sit at the end) and drop examples that
    are left with no predicted token (labels beyond position 0). Returns (kept, number dropped)."""
    kept = []
    for ids, labels in examples:
        if len(ids) != len(labels):
            raise EdgepackError(f"lora example: {len(ids)} input ids but {len(labels)} labels")
        ids, labels = list(ids[-max_len:]), list(labels[-max_len:])
        if any(t != IGNORE for t in labels[1:]):
            kept.append((ids, labels))
    return kept, len(examples) - len(kept)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def data_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def micro_batch(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of micro-batch `index`: the stream of shuffled epochs, cut into batches. A pure
    function of its arguments, so resuming needs no data-loader state."""
    out = []
    for pos in range(index * batch_size, (index + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(epoch_order(n, seed, epoch)[i])
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to zero. Written out (4 lines) rather than a scheduler object so
    that a resumed run with a different total step count gets the schedule for its new total."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


LOSS_CHUNK = 256  # positions per LM-head chunk: peak loss memory is ~3 x LOSS_CHUNK x vocab floats


def causal_parts(model):
    """(decoder, LM head) of a plain or peft-wrapped transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def labelled_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [N, H] of the N positions that predict a label, and those labels [N]. The LM head
    is not applied here: the losses below run it chunk by chunk."""
    decoder, _ = causal_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden.last_hidden_state[:, :-1][keep], targets[keep]


def _chunks(n: int, chunk: int):
    return ((s, min(n, s + chunk)) for s in range(0, n, chunk))


class _ChunkBuffers:
    """Two [chunk, vocab] float32 buffers (logits, log-probabilities) reused by every chunk of a loss call:
    a fresh 50-130 MB tensor per chunk would be a fresh mmap (zero-filled page faults) every time."""

    def __init__(self, chunk: int, head, device):
        vocab = head.weight.shape[0]
        self.z = torch.empty((chunk, vocab), dtype=torch.float32, device=device)
        self.logp = torch.empty_like(self.z)

    def log_probs(self, head, h: torch.Tensor) -> torch.Tensor:
        """log_softmax of one chunk's logits in float32, into the buffers (the returned view is `logp`)."""
        n = h.shape[0]
        z, logp = self.z[:n], self.logp[:n]
        if h.dtype == torch.float32 and head.weight.dtype == torch.float32 and head.bias is None:
            torch.mm(h, head.weight.t(), out=z)
        else:
            z.copy_(head(h))
        return torch.log_softmax(z, dim=-1, out=logp)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed loss of LM head + softmax over positions, computed chunk by chunk, with d loss / d hidden made in
    the same pass: dz = softmax - target distribution, d hidden = dz @ W. So neither the forward nor the
    backward ever holds more than one chunk's [chunk, vocab] logits, and no chunk is recomputed (a
    checkpointed chunk would run the head matmul three times instead of two). Written by hand: the fused
    chunked cross-entropy kernels that exist (Liger, Cut Cross-Entropy) are GPU/Triton only. The head must be
    frozen (LoRA never trains it), so no weight gradient is made.

    `target(s, e, logp)` returns the chunk's loss sum and a function that turns the student's softmax into
    d loss / d logits in place."""

    @staticmethod
    def forward(ctx, h, head, chunk, target, need_grad):
        weight = head.weight
        if need_grad and weight.requires_grad:
            raise EdgepackError("chunked loss: the LM head must be frozen (LoRA does not train it)")
        grad = torch.empty_like(h) if need_grad else h.new_empty(0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        buffers = _ChunkBuffers(min(chunk, max(1, h.shape[0])), head, h.device)
        for s, e in _chunks(h.shape[0], chunk):
            logp = buffers.log_probs(head, h[s:e])
            loss, to_grad = target(s, e, logp)
            total += loss
            if need_grad:
                dz = logp.exp_()  # the student's softmax, in place of its log
                to_grad(dz)
                if dz.dtype == weight.dtype == grad.dtype:
                    torch.mm(dz, weight, out=grad[s:e])
                else:
                    grad[s:e] = (dz.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _apply_chunked(h: torch.Tensor, head, target) -> torch.Tensor:
    need_grad = torch.is_grad_enabled() and h.requires_grad
    return _ChunkedHeadLoss.apply(h, head, LOSS_CHUNK, target, need_grad)


class _CrossEntropyTarget:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __call__(self, s: int, e: int, logp: torch.Tensor):
        labels = self.labels[s:e]
        rows = torch.arange(e - s, device=logp.device)

        def to_grad(p: torch.Tensor) -> None:  # softmax - one-hot
            p[rows, labels] -= 1.0

        return -logp[rows, labels].sum(), to_grad


class _TeacherTarget:
    """KL(teacher || student) per chunk, the teacher's log-probabilities made from its hidden states chunk by
    chunk (never the whole [N, V] at once), in its own two reused buffers."""

    def __init__(self, teacher_head, teacher_hidden: torch.Tensor):
        self.head, self.hidden = teacher_head, teacher_hidden
        self.buffers = _ChunkBuffers(
            min(LOSS_CHUNK, max(1, teacher_hidden.shape[0])), teacher_head, teacher_hidden.device
        )

    def __call__(self, s: int, e: int, logp: torch.Tensor):
        with torch.no_grad():
            logp_t = self.buffers.log_probs(self.head, self.hidden[s:e])
            p_t = torch.exp(logp_t, out=self.buffers.z[: e - s])
            kl = torch.dot(p_t.view(-1), logp_t.sub_(logp).view(-1))  # sum p_t (log p_t - log p_s)

        def to_grad(p: torch.Tensor) -> None:  # softmax_student - softmax_teacher
            p.sub_(p_t)

        return kl, to_grad


def nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions and their count (token-weighted, unlike HF's loss,
    so held-out numbers do not depend on how examples fall into batches). The LM head and softmax run
    LOSS_CHUNK positions at a time, so no full [batch, length, vocab] logits tensor is ever made."""
    h, labels = labelled_hidden(model, batch)
    _, head = causal_parts(model)
    return _apply_chunked(h, head, _CrossEntropyTarget(labels)), int(labels.numel())


def kl_sum(model, teacher, batch: dict[str, torch.Tensor], teacher_hidden=None) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) of the next-token distributions over labelled positions, and their count.
    The teacher runs under no_grad (or `teacher_hidden`, its labelled hidden states on this batch, is given);
    both heads run chunk by chunk."""
    h, labels = labelled_hidden(model, batch)
    h_t = teacher_hidden
    if h_t is None:
        with torch.no_grad():
            h_t, _ = labelled_hidden(teacher, batch)
    _, head = causal_parts(model)
    _, head_t = causal_parts(teacher)
    return _apply_chunked(h, head, _TeacherTarget(head_t, h_t)), int(labels.numel())


def batch_loss_sum(model, batch: dict[str, torch.Tensor], teacher=None) -> tuple[torch.Tensor, int]:
    """The training objective's summed loss and token count: NLL, or KL from `teacher` when one is given."""
    return nll_sum(model, batch) if teacher is None else kl_sum(model, teacher, batch)


@torch.no_grad()
def heldout_loss(
    model, examples: list[Example], settings: LoraTraining, device, teacher=None, teacher_cache: dict | None = None
) -> float | None:
    """Mean loss per labelled token on the held-out examples. With a teacher, `teacher_cache` (a dict kept by
    the caller) holds the frozen teacher's hidden states per batch, so later evaluations skip its forward pass
    (SmolLM2: 31 held-out examples x 256 tokens x 576 floats = 18 MB)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), settings.stage.batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(examples[start : start + settings.stage.batch_size], settings.pad_id).items()
        }
        if teacher is None:
            s, c = nll_sum(model, batch)
        else:
            if teacher_cache is not None and start not in teacher_cache:
                teacher_cache[start] = labelled_hidden(teacher, batch)[0]
            s, c = kl_sum(model, teacher, batch, None if teacher_cache is None else teacher_cache[start])
        total, count = total + float(s), count + c
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------------
# Adapter


def attach_lora(model, settings: LoraTraining):
    """Wrap a plain transformers model with fresh LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "peft_config"):
        raise EdgepackError("attach_lora: the model already carries a peft adapter; pass the base model")
    config = LoraConfig(
        r=settings.stage.rank,
        lora_alpha=settings.stage.alpha,
        lora_dropout=settings.stage.dropout,
        target_modules=list(settings.modules or settings.stage.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)  # LoRA A's initialisation
    return get_peft_model(model, config)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise EdgepackError(f"{source}: adapter keys do not match the model ({unexpected[:2]})")


def adapter_config_json(peft_model) -> dict:
    cfg = peft_model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_adapter(peft_model, adapter_dir: Path) -> None:
    """PEFT's own layout (adapter_model.safetensors + adapter_config.json), written through fileio."""
    from safetensors.torch import save

    atomic_write_bytes(adapter_dir / ADAPTER_FILE, save(adapter_state(peft_model)))
    atomic_write_json(adapter_dir / ADAPTER_CONFIG, adapter_config_json(peft_model))


def load_lora(model, out_dir, settings: LoraTraining | None = None):
    """The base model with the trained adapter of `out_dir/adapter` attached, e.g. to merge it in a later
    process. Settings default to the ones recorded with the adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(out_dir) / "adapter"
    if not (adapter_dir / ADAPTER_FILE).exists():
        raise EdgepackError(f"{adapter_dir}: no trained adapter ({ADAPTER_FILE})")
    if settings is None:
        settings = settings_from_json(read_json(Path(out_dir) / "lora_record.json")["settings"])
    peft_model = attach_lora(model, settings)
    load_adapter_state(peft_model, load_file(adapter_dir / ADAPTER_FILE), adapter_dir)
    return peft_model


def settings_from_json(d: dict) -> LoraTraining:
    return LoraTraining.from_flat(d)


def settings_json(settings: LoraTraining) -> dict:
    """One flat dict (the stage's keys and the schedule's), as checkpoints and records store it."""
    flat = {**asdict(settings.stage), **{k: v for k, v in asdict(settings).items() if k != "stage"}}
    return json.loads(json.dumps(flat))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as safetensors tensors ("<param index>.<name>") plus JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def save_checkpoint(out_dir: Path, step: int, peft_model, optimizer, state: dict) -> Path:
    from safetensors.torch import save

    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    with atomic_directory(final) as tmp:
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        atomic_write_bytes(tmp / ADAPTER_FILE, save(adapter_state(peft_model)))
        atomic_write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
        atomic_write_bytes(tmp / "rng.safetensors", save(rng_tensors()))
        atomic_write_json(tmp / "trainer_state.json", dict(state, step=step, optimizer=opt_meta))
    atomic_write_json(out_dir / "latest.json", {"checkpoint": f"checkpoints/{final.name}", "step": step})
    for old in ckpt_root.iterdir():  # only the checkpoint latest.json names is needed
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path) -> tuple[Path, dict] | None:
    latest = out_dir / "latest.json"
    if not latest.exists():
        return None
    ckpt = out_dir / read_json(latest)["checkpoint"]
    state_path = ckpt / "trainer_state.json"
    if not state_path.exists():
        raise EdgepackError(f"{latest}: names {ckpt}, which has no trainer_state.json")
    return ckpt, read_json(state_path)


# ---------------------------------------------------------------------------------------------------------
# Training


def train_lora(
    model,
    train_examples: list[Example],
    heldout_examples: list[Example],
    settings: LoraTraining,
    out_dir,
    teacher=None,
    init: dict[str, torch.Tensor] | None = None,
    desc: str = "LoRA",
) -> tuple[Any, dict[str, Any]]:
    """Train LoRA adapters on `model` (a plain transformers model, left frozen) and return
    (peft_model, record). Resumes from `out_dir`'s last checkpoint when there is one for the same run.
    The objective is the next-token NLL of the labels, or, with `teacher` (the stage's objective "distill"),
    KL(teacher || student) at the labelled positions; the teacher stays frozen and resident beside the student.
    `init`: adapter tensors (PEFT state-dict keys) to start from instead of fresh LoRA (B = 0).

    The final adapter is written to `out_dir/adapter/` (PEFT layout) and the record to
    `out_dir/lora_record.json`; merge with `merge_lora(peft_model, masks)`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.steps < 1:  # batch_size and grad_accum are checked by LoraStage
        raise EdgepackError("lora: steps must be >= 1")
    train, dropped = prepare_examples(train_examples[: settings.stage.samples], settings.max_len)
    heldout, _ = prepare_examples(heldout_examples, settings.max_len)
    if not train:
        raise EdgepackError("lora: no training example has a token to learn (all labels are -100)")
    if (teacher is not None) != (settings.stage.objective == "distill"):
        raise EdgepackError(f"lora: objective={settings.stage.objective} needs a teacher model exactly when 'distill'")
    fingerprint = data_fingerprint(train)

    device = pick_device()
    peft_model = attach_lora(model, settings).to(device)
    if init is not None:  # a checkpoint of this run, if any, replaces it in _resume
        load_adapter_state(peft_model, {k: v.to(device) for k, v in init.items()}, out_dir)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.stage.lr, weight_decay=settings.weight_decay)

    start_step, seconds_before, history = _resume(out_dir, peft_model, optimizer, settings, fingerprint)

    def checkpoint_state(elapsed: float) -> dict:
        return {
            "settings": settings_json(settings),
            "data_sha256": fingerprint,
            "history": history,
            "seconds": round(seconds_before + elapsed, 2),
        }

    # the loop re-allocates every step's activations: keep freed memory mapped (compressor.allocator)
    with retained_freed_memory() as retained:
        t0 = time.perf_counter()
        peft_model.train()
        teacher_cache: dict = {}
        if start_step == 0 and heldout:
            history["heldout_loss"].append(
                [0, heldout_loss(peft_model, heldout, settings, device, teacher, teacher_cache)]
            )
        bar = tqdm(total=settings.steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        for step in range(start_step, settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.stage.lr * lr_factor(step, settings.warmup_steps, settings.steps)
            step_loss = _accumulate_gradients(peft_model, train, settings, step, device, teacher)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            history["train_loss"].append([done, round(step_loss, 6)])
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if heldout and (done % settings.eval_every == 0 or done == settings.steps):
                h = heldout_loss(peft_model, heldout, settings, device, teacher, teacher_cache)
                history["heldout_loss"].append([done, h])
                bar.write(f"step {done}: held-out loss {h:.4f}")
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                save_checkpoint(out_dir, done, peft_model, optimizer, checkpoint_state(time.perf_counter() - t0))
        bar.close()
        peft_model.eval()

    save_adapter(peft_model, out_dir / "adapter")
    record = {
        "stage": "lora",
        "settings": settings_json(settings),
        "device": device,
        "train_examples": len(train),
        "train_examples_dropped": dropped,
        "heldout_examples": len(heldout),
        "data_sha256": fingerprint,
        "start_step": start_step,
        "final_step": settings.steps,
        "trainable_parameters": sum(p.numel() for p in params),
        "malloc_retains_freed_memory": retained,
        "train_loss": history["train_loss"],
        "heldout_loss": history["heldout_loss"],
        "seconds": round(seconds_before + time.perf_counter() - t0, 2),
        "adapter_dir": "adapter",
    }
    atomic_write_json(out_dir / "lora_record.json", record)
    return peft_model, record


def _resume(out_dir: Path, peft_model, optimizer, settings: LoraTraining, fingerprint: str) -> tuple[int, float, dict]:
    """(start step, seconds already trained, loss history): from out_dir's checkpoint of the same run (adapter,
    optimizer and RNG restored), else a fresh start."""
    resumed = load_checkpoint(out_dir)
    if resumed is None:
        torch.manual_seed(settings.seed + 1)  # dropout stream, independent of LoRA A's initialisation
        return 0, 0.0, {"train_loss": [], "heldout_loss": []}
    ckpt, state = resumed
    check_same_run(state, settings, fingerprint, ckpt)
    from safetensors.torch import load_file

    if state["step"] > settings.steps:
        raise EdgepackError(f"{ckpt}: already at step {state['step']} > steps={settings.steps}; use a new out_dir")
    load_adapter_state(peft_model, load_file(ckpt / ADAPTER_FILE), ckpt)
    optimizer_from_files(optimizer, load_file(ckpt / "optimizer.safetensors"), state["optimizer"])
    restore_rng(load_file(ckpt / "rng.safetensors"))
    return state["step"], state["seconds"], state["history"]


def _accumulate_gradients(
    peft_model, train: list[Example], settings: LoraTraining, step: int, device, teacher=None
) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's mean loss."""
    step_loss, accum = 0.0, settings.stage.grad_accum
    for micro in range(accum):
        idx = micro_batch(len(train), settings.stage.batch_size, settings.seed, step * accum + micro)
        batch = {k: v.to(device) for k, v in collate([train[i] for i in idx], settings.pad_id).items()}
        total, count = batch_loss_sum(peft_model, batch, teacher)
        loss = total / max(count, 1)
        (loss / accum).backward()
        step_loss += float(loss.detach()) / accum
    return step_loss


def check_same_run(state: dict, settings: LoraTraining, fingerprint: str, ckpt: Path) -> None:
    saved = {k: v for k, v in {**ADDED_LATER, **state["settings"]}.items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in settings_json(settings).items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise EdgepackError(
            f"{ckpt}: checkpoint was trained with different settings ({', '.join(changed)}); use a new out_dir"
        )
    if state["data_sha256"] != fingerprint:
        raise EdgepackError(f"{ckpt}: checkpoint was trained on different data; use a new out_dir")


# ---------------------------------------------------------------------------------------------------------
# Merge


def merge_lora(model_with_adapter, masks: dict[str, torch.Tensor] | None = None, keep_dense: bool = False):
    """Merge the adapter into the base weights in float32 (peft merge_and_unload) and return
    (merged plain model, record).

    A LoRA delta B·A is dense: merged into an N:M-pruned weight it fills the pruned zeros. With `masks`
    ({module name: BoolTensor, True = kept}, as the width stage saves them) the merge zeroes those
    positions again, unless `keep_dense`. Either way the record says how much of the delta's Frobenius
    norm falls on pruned positions, i.e. what re-masking removed (or would have removed)."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(model_with_adapter, "merge_and_unload"):
        raise EdgepackError("merge_lora: expected the peft model returned by train_lora/load_lora")
    model_with_adapter = model_with_adapter.float()
    base = model_with_adapter.base_model.model
    masks = {k.removesuffix(".weight"): v.to(torch.bool) for k, v in (masks or {}).items()}
    for name, mask in masks.items():  # check before merging: a bad mask must not consume the model
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise EdgepackError(f"merge_lora: mask names module {name!r}, which the model does not have") from None
        shape = tuple(getattr(module, "base_layer", module).weight.shape)
        if tuple(mask.shape) != shape:
            raise EdgepackError(f"merge_lora: mask for {name} is {tuple(mask.shape)}, weight is {shape}")

    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                deltas[name] = deltas.get(name, 0) + module.get_delta_weight(adapter).detach().float()
    merged = model_with_adapter.merge_and_unload()

    # Frobenius norm of the delta on pruned positions, per module and over all merged deltas together.
    removed_sq, per_module = 0.0, {}
    total_sq = sum(float(d.pow(2).sum()) for d in deltas.values())
    for name, mask in masks.items():
        if name in deltas:
            delta = deltas[name]
            off = float(delta[~mask.to(delta.device)].pow(2).sum())
            removed_sq += off
            per_module[name] = math.sqrt(off / max(float(delta.pow(2).sum()), 1e-30))
    if masks and not keep_dense:
        from compressor.width import reapply_masks

        reapply_masks(merged, masks)
    record = {
        "lora_modules_merged": len(deltas),
        "masks_given": len(masks),
        "mask_policy": "none" if not masks else ("kept_dense" if keep_dense else "reapplied"),
        "delta_norm_fraction_on_pruned": math.sqrt(removed_sq / total_sq) if total_sq > 0 else 0.0,
        "delta_norm_fraction_on_pruned_by_module": per_module,
    }
    return merged, record
