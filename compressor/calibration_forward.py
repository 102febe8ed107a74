"""Forward passes over calibration token ids, shared by the depth, width and channel stages.

Calibration input everywhere is `calib_ids: LongTensor [n_samples, seqlen]`, every row a full window with
no padding, so no attention mask is passed. Everything runs in `torch.no_grad()` on the model's own device
(the caller decides where the model lives: CUDA when available, CPU otherwise), in batches of
`batch_size` rows because CPU fp32 is slow and a whole calibration set at once may not fit.

Perplexity here uses the same protocol as `runtime.metrics`: the first token of each row has no
prediction, so a row of T tokens scores T-1 tokens, and the figure is exp(mean token NLL) over all rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_calib_ids(calib_ids: torch.Tensor) -> None:
    if calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ValueError(
            f"calib_ids must be a LongTensor [n_samples, seqlen], got {calib_ids.dtype} {tuple(calib_ids.shape)}"
        )
    if calib_ids.shape[0] == 0 or calib_ids.shape[1] < 2:
        raise ValueError(f"calib_ids needs at least one row of two tokens, got {tuple(calib_ids.shape)}")


def iter_batches(calib_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, calib_ids.shape[0], batch_size):
        yield calib_ids[start : start + batch_size]


def n_batches(calib_ids: torch.Tensor, batch_size: int) -> int:
    return math.ceil(calib_ids.shape[0] / batch_size)


@torch.no_grad()
def calibration_nll(model, calib_ids: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> tuple[float, int]:
    """Summed next-token NLL over all rows and the number of scored tokens.

    The decoder runs on a whole batch, but logits are built one row at a time: [batch, seqlen, vocab]
    in fp32 is ~1 GB for Llama-3.2's 128k vocabulary at batch 4 x 512, for no benefit."""
    check_calib_ids(calib_ids)
    device = model_device(model)
    total, count = 0.0, 0
    batches = iter_batches(calib_ids, batch_size)
    if desc is not None:
        batches = tqdm(batches, total=n_batches(calib_ids, batch_size), desc=desc, leave=False)
    for batch in batches:
        batch = batch.to(device)
        hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state
        total += hidden_nll(model, hidden, batch)
        count += batch.numel() - batch.shape[0]
    return total, count


@torch.no_grad()
def hidden_nll(model, hidden: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of `batch` from the decoder's final (normed) hidden states, one row's logits at
    a time."""
    total = 0.0
    for row_hidden, row_ids in zip(hidden, batch):
        logits = model.lm_head(row_hidden[:-1]).float()
        total += F.cross_entropy(logits, row_ids[1:], reduction="sum").item()
    return total


def calibration_perplexity(model, calib_ids: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> float:
    """exp(mean token NLL) of `model` on `calib_ids` (see the module docstring for the protocol)."""
    total, count = calibration_nll(model, calib_ids, batch_size, desc)
    return math.exp(total / count)


def find_linears(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers whose last name component is in `targets`, by full
    module name (e.g. "model.layers.3.self_attn.q_proj"), in model order."""
    targets = set(targets)
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}"
    }
    if not found:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in the model's decoder layers")
    return found


class InputSquareSums:
    """Forward hooks that accumulate, per input feature j, sum over all tokens of X_j^2 for each Linear.

    Sums are kept in float64 on the module's device: a calibration set has ~10^5 tokens and the norms
    feed a ranking, so accumulation error should not decide which weight is pruned. Use as a context
    manager so the hooks are always removed."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sq = x.pow(2).sum(dim=0)
            if name in self.sums:
                self.sums[name] += sq
            else:
                self.sums[name] = sq
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """||X_j||_2 over all tokens seen, float32 on CPU."""
        missing = [n for n in self.linears if n not in self.sums]
        if missing:
            raise RuntimeError(f"no calibration input reached {missing[0]} (and {len(missing) - 1} more)")
        return {name: self.sums[name].sqrt().float().cpu() for name in self.linears}


@torch.no_grad()
def run_decoder(model, calib_ids: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> None:
    """Run the decoder stack (not lm_head: no hook needs logits) over all calibration rows."""
    check_calib_ids(calib_ids)
    device = model_device(model)
    batches = iter_batches(calib_ids, batch_size)
    if desc is not None:
        batches = tqdm(batches, total=n_batches(calib_ids, batch_size), desc=desc, leave=False)
    for batch in batches:
        model.model(input_ids=batch.to(device), use_cache=False)


@torch.no_grad()
def input_norms(
    model, calib_ids: torch.Tensor, targets: Iterable[str], batch_size: int = 4, desc: str = "calibration forward"
) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens of the input of every target Linear, in one dense pass."""
    with InputSquareSums(find_linears(model, targets)) as sums:
        run_decoder(model, calib_ids, batch_size, desc)
    return sums.norms()


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, calib_ids: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments (position embeddings, mask, position ids) with which the
    model calls its first decoder layer, one entry per batch. Lets a stage run the stack layer by layer
    (sequential WANDA) without re-deriving rotary embeddings or masks by hand: the model computes them
    and a pre-hook on layer 0 takes them, then aborts the rest of the forward."""
    check_calib_ids(calib_ids)
    device = model_device(model)
    captured: list[tuple[torch.Tensor, dict]] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        kwargs["use_cache"] = False
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in iter_batches(calib_ids, batch_size):
            try:
                model.model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured
