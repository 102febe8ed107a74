"""Reference log-probabilities of the uncompressed source model, so the runtime can compute KL divergence
and top-1 agreement with no torch and no source model.

Stored compactly in one safetensors file: the evaluation windows' token ids, and for every scored position
the reference's top-k token ids (int32) and log-probs (float32). See `runtime.metrics.topk_kl` for the error
this introduces (a lower bound of the full KL; the tail beyond k is folded into one 'rest' bucket).

The same file may also hold the chat reference (`ChatReference`, arrays prefixed `chat_`): the source's greedy
replies to chat prompts rendered with the bundle's chat template, and the source's top-k log-probs at each
reply token, for the teacher-forced chat fidelity metric (runtime.harness.eval_chat). Readers that predate
it ignore those arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import EdgepackError


CHAT_ARRAYS = (
    ("chat_tokens", np.int64),
    ("chat_prompt_lens", np.int64),
    ("chat_reply_lens", np.int64),
    ("chat_top_ids", np.int32),
    ("chat_top_logp", np.float32),
)


@dataclass
class ChatReference:
    """The source's greedy replies and its top-k log-probs on them (rows right-padded with 0).

    tokens[i, :prompt_lens[i]] is prompt i (chat template applied, generation prompt included), followed by
    the source's greedy reply tokens[i, prompt_lens[i] : prompt_lens[i] + reply_lens[i]] (its stop token
    included when it stopped before the length limit); top_ids/top_logp[i, j] are the source's top-k at reply
    token j (the distribution that produced it, so top_ids[i, j, 0] is the reply token)."""

    tokens: np.ndarray  # [n, T] int64
    prompt_lens: np.ndarray  # [n] int64
    reply_lens: np.ndarray  # [n] int64
    top_ids: np.ndarray  # [n, R, k] int32, R = longest reply
    top_logp: np.ndarray  # [n, R, k] float32

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def prompt(self, i: int) -> list[int]:
        return self.tokens[i, : self.prompt_lens[i]].tolist()

    def reply(self, i: int) -> list[int]:
        p = int(self.prompt_lens[i])
        return self.tokens[i, p : p + int(self.reply_lens[i])].tolist()

    def arrays(self) -> dict:
        return {name: getattr(self, name[len("chat_") :]) for name, _ in CHAT_ARRAYS}

    @classmethod
    def from_replies(cls, prompts: list[list[int]], replies: list[list[int]], tops: list[tuple]) -> ChatReference:
        """Pack per-prompt lists: prompts and replies as token-id lists, tops as (ids [R_i, k], logp [R_i, k])."""
        n, k = len(prompts), int(tops[0][0].shape[-1])
        width = max(len(p) + len(r) for p, r in zip(prompts, replies))
        longest = max(len(r) for r in replies)
        tokens = np.zeros((n, width), np.int64)
        top_ids = np.zeros((n, longest, k), np.int32)
        top_logp = np.zeros((n, longest, k), np.float32)
        for i, (p, r, (ids, lp)) in enumerate(zip(prompts, replies, tops)):
            tokens[i, : len(p) + len(r)] = p + r
            top_ids[i, : len(r)] = ids[: len(r)]
            top_logp[i, : len(r)] = lp[: len(r)]
        lens = np.array([len(p) for p in prompts], np.int64), np.array([len(r) for r in replies], np.int64)
        return cls(tokens, *lens, top_ids, top_logp)

    def check(self, where, vocab_size: int | None = None) -> None:
        """Shapes, lengths, token-id ranges and finiteness; one EdgepackError naming `where` otherwise."""
        t, pl, rl, ids, lp = self.tokens, self.prompt_lens, self.reply_lens, self.top_ids, self.top_logp
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
            raise EdgepackError(f"{where}: reference chat_tokens must be [replies, length >= 2], got {list(t.shape)}")
        n, width = t.shape
        if pl.shape != (n,) or rl.shape != (n,):
            raise EdgepackError(f"{where}: reference chat_prompt_lens/chat_reply_lens must be [{n}]")
        if ids.ndim != 3 or ids.shape[0] != n or ids.shape[1] < 1 or ids.shape[2] < 1 or lp.shape != ids.shape:
            raise EdgepackError(
                f"{where}: reference chat_top_ids/chat_top_logp must be [{n}, longest reply, k], got "
                f"{list(ids.shape)} and {list(lp.shape)}"
            )
        if int(pl.min()) < 1 or int(rl.min()) < 1 or int(rl.max()) > ids.shape[1] or int((pl + rl).max()) > width:
            raise EdgepackError(
                f"{where}: reference chat lengths must satisfy prompt >= 1, 1 <= reply <= {ids.shape[1]}, "
                f"prompt + reply <= {width}"
            )
        hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        for name, arr in (("chat_tokens", t), ("chat_top_ids", ids)):
            if int(arr.min()) < 0 or int(arr.max()) >= hi:
                raise EdgepackError(f"{where}: reference {name} holds token ids outside [0, {hi})")
        if not np.isfinite(lp).all():
            raise EdgepackError(f"{where}: reference chat_top_logp must be finite log-probabilities")


@dataclass
class Reference:
    window_ids: np.ndarray  # [n_windows, ctx] int64: the WikiText test windows
    top_ids: np.ndarray  # [n_windows, ctx-1, k] int32: reference top-k ids at each scored position
    top_logp: np.ndarray  # [n_windows, ctx-1, k] float32
    chat: ChatReference | None = None  # the chat fidelity reference, when the file holds one

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        from runtime.fileio import atomic_write_bytes

        arrays = {
            "window_ids": self.window_ids.astype(np.int64),
            "top_ids": self.top_ids.astype(np.int32),
            "top_logp": self.top_logp.astype(np.float32),
        }
        if self.chat is not None:
            arrays.update({name: self.chat.arrays()[name].astype(dtype) for name, dtype in CHAT_ARRAYS})
        data = save(
            {name: np.ascontiguousarray(a) for name, a in arrays.items()},
            metadata={"format": "edgepack-reference-1"},
        )
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> Reference:
        """Read and check a reference file: the three arrays present with the right dtypes and consistent
        shapes ([n, ctx] windows, [n, ctx-1, k] top ids and log-probs), token ids inside [0, vocab_size),
        log-probs finite; the chat arrays all or none, checked by ChatReference.check. Anything else raises
        one EdgepackError naming the file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
        except FileNotFoundError:
            raise EdgepackError(f"{path}: reference file not found") from None
        except (SafetensorError, OSError, ValueError, TypeError, KeyError, MemoryError) as e:
            raise EdgepackError(f"{path}: not a valid reference file ({str(e).splitlines()[0][:200]})") from None
        ref = cls(
            *(
                _array(t, name, dtype, path)
                for name, dtype in (("window_ids", np.int64), ("top_ids", np.int32), ("top_logp", np.float32))
            )
        )
        if any(name in t for name, _ in CHAT_ARRAYS):
            ref.chat = ChatReference(*(_array(t, name, dtype, path) for name, dtype in CHAT_ARRAYS))
        ref.check(path, vocab_size)
        return ref

    def check(self, where, vocab_size: int | None = None) -> None:
        w, ids, lp = self.window_ids, self.top_ids, self.top_logp
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2:
            raise EdgepackError(f"{where}: reference window_ids must be [windows, ctx >= 2], got {list(w.shape)}")
        n, ctx = w.shape
        if ids.ndim != 3 or ids.shape[:2] != (n, ctx - 1) or ids.shape[2] < 1 or lp.shape != ids.shape:
            raise EdgepackError(
                f"{where}: reference top_ids/top_logp must be [{n}, {ctx - 1}, k], got "
                f"{list(ids.shape)} and {list(lp.shape)}"
            )
        hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        for name, arr in (("window_ids", w), ("top_ids", ids)):
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= hi):
                raise EdgepackError(f"{where}: reference {name} holds token ids outside [0, {hi})")
        if lp.size and not np.isfinite(lp).all():
            raise EdgepackError(f"{where}: reference top_logp must be finite log-probabilities")
        if self.chat is not None:
            self.chat.check(where, vocab_size)


def _array(tensors: dict, name: str, dtype, where) -> np.ndarray:
    if name not in tensors:
        raise EdgepackError(f"{where}: reference file lacks the {name!r} array")
    arr = tensors[name]
    if arr.dtype != dtype:
        raise EdgepackError(f"{where}: reference {name} is {arr.dtype}, expected {np.dtype(dtype).name}")
    return arr
