"""Evaluation and calibration data: the copies shipped in runtime/data, a user's own files, or
(online only) the usual Hugging Face `datasets` names.

Shipped files (see runtime/data/PROVENANCE.md for sources and licences):
- WikiText-2 raw test: evaluation only (perplexity).
- WikiText-2 valid (tokenized release, with `<unk>`): calibration and LoRA text, never evaluation.
- TriviaQA: 1,000 questions with all aliases, 728 with a Wikipedia passage for open book.
- Chat instructions: 202 human-written self-instruct user tasks, the prompts of the chat fidelity metric.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import EdgepackError

DATA_DIR = Path(__file__).resolve().parent / "data"
WIKITEXT_TEST = DATA_DIR / "wikitext-2-raw-v1" / "wiki.test.raw"
WIKITEXT_VALID = DATA_DIR / "wikitext-2-v1" / "valid.txt"
TRIVIAQA = DATA_DIR / "triviaqa" / "triviaqa_test1k.jsonl"
TINY_WIKITEXT = DATA_DIR / "tiny" / "wiki.test.raw.first200lines"
TINY_TRIVIAQA = DATA_DIR / "tiny" / "triviaqa_tiny20.jsonl"
CHAT_INSTRUCTIONS = DATA_DIR / "chat" / "user_oriented_instructions_202.jsonl"

# Names a user may give instead of a path.
NAMED = {
    "wikitext2-test": WIKITEXT_TEST,
    "wikitext2-valid": WIKITEXT_VALID,
    "triviaqa": TRIVIAQA,
    "tiny-wikitext": TINY_WIKITEXT,
    "tiny-triviaqa": TINY_TRIVIAQA,
    "chat-instructions": CHAT_INSTRUCTIONS,
}


# sha256 of each shipped copy: a named set is checked against it before it is read, so a quality claim
# re-measured by `edgepack verify` is measured on exactly the data the exporter used.
SHIPPED_SHA256 = {
    WIKITEXT_TEST: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    WIKITEXT_VALID: "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    TRIVIAQA: "2f9352c0977f1389da5827bdaa06430bbcfd550bb644bfa47eb3ad784142e897",
    TINY_WIKITEXT: "425a7b371d0c38bf0e1da121954e8c4519a257a7f5f3d6793843961c9d3dd877",
    TINY_TRIVIAQA: "91ccd1c24184d6c5753a41acf27ecfd94ce96cc1ce1a6a461e8ebae716e54171",
    CHAT_INSTRUCTIONS: "6bd0ac69806fc4f90baafb6f2e5ac72df730811d045c24f0eae677c81798fdfd",
}
_CHECKED: set[Path] = set()
MAX_DATA_BYTES = 1 << 30


@dataclass
class QARecord:
    id: str
    question: str
    answers: list[str]
    context: str = ""
    extra: dict = field(default_factory=dict)


def _resolve(name_or_path: str | Path) -> Path:
    """A shipped set by name (its digest checked once per process), or a user's own file given on the
    command line: a regular file, never a device or FIFO (checked before it is opened)."""
    import stat

    if str(name_or_path) in NAMED:
        path = NAMED[str(name_or_path)]
        if path not in _CHECKED:
            from runtime.fileio import sha256_file

            try:
                ok = sha256_file(path) == SHIPPED_SHA256[path]
            except OSError as e:
                raise EdgepackError(
                    f"{path}: shipped data file unreadable ({e.strerror}); reinstall edgepack"
                ) from None
            if not ok:
                raise EdgepackError(f"{path}: shipped data file does not match its digest; reinstall edgepack")
            _CHECKED.add(path)
        return path
    path = Path(name_or_path).expanduser()
    try:
        st = path.stat()
    except OSError:
        raise EdgepackError(
            f"{path}: data file not found (give a path, or one of: {', '.join(sorted(NAMED))})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgepackError(f"{path}: not a regular file (devices, FIFOs and directories are refused)")
    if st.st_size > MAX_DATA_BYTES:
        raise EdgepackError(f"{path}: larger than {MAX_DATA_BYTES >> 20} MiB")
    return path


def wikitext_rows(name_or_path: str | Path = "wikitext2-test") -> list[str]:
    """The rows of a WikiText file as Hugging Face `datasets` returns them: blank lines become ''."""
    path = _resolve(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            return ["" if not line.strip() else line for line in f]
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{path}: not valid UTF-8 text (byte {e.start})") from None


def wikitext_eval_text(name_or_path: str | Path = "wikitext2-test") -> str:
    """Evaluation text joined the way GPTQ and llama.cpp do: rows joined with "\\n\\n"."""
    return "\n\n".join(wikitext_rows(name_or_path))


def eval_text(name_or_path: str | Path = "wikitext2-test") -> str:
    """Perplexity text: a shipped WikiText set joined as GPTQ and llama.cpp do, or a user's own text file as
    it is (UTF-8)."""
    if str(name_or_path) in NAMED:
        return wikitext_eval_text(name_or_path)
    path = _resolve(name_or_path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{path}: not valid UTF-8 text (byte {e.start})") from None


def calibration_text(name_or_path: str | Path = "wikitext2-valid") -> str:
    """Calibration / fine-tuning text. The shipped WikiText-2 valid split is the *tokenized* release:
    its `<unk>` markers are dropped and the ' @-@ ', ' @,@ ', ' @.@ ' joiners undone, so the model sees
    ordinary prose rather than a token it was never trained on."""
    text = "\n\n".join(wikitext_rows(name_or_path))
    text = text.replace(" <unk>", "").replace("<unk> ", "").replace("<unk>", "")
    text = re.sub(r" @(.)@ ", r"\1", text)
    return text


def _clean_question(q: str) -> str:
    # Some TriviaQA questions carry CSV quoting: "\"Who wrote \"\"A ...\"\"?\"" -> Who wrote "A ..."?
    q = q.strip()
    if len(q) >= 2 and q[0] == '"' and q[-1] == '"' and '""' in q:
        q = q[1:-1].replace('""', '"')
    return q


def triviaqa_records(name_or_path: str | Path = "triviaqa", with_context_only: bool = False) -> list[QARecord]:
    """TriviaQA-style JSONL: {"question", "answers": [aliases], "context"?, "id"?} per line.
    Also accepts "answer" (a string or list) in place of "answers"."""
    path = _resolve(name_or_path)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = row["question"]
            answers = row.get("answers", row.get("answer"))
            if answers is None or not isinstance(question, str):
                raise KeyError("answers")
            if not isinstance(answers, (str, list)):
                raise TypeError("answers must be a string or a list")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise EdgepackError(f"{path}:{lineno}: expected JSON with 'question' and 'answers' ({e})") from None
        if isinstance(answers, str):
            answers = [answers]
        rec = QARecord(
            id=str(row.get("id", f"row{lineno}")),
            question=_clean_question(question),
            answers=[str(a) for a in answers],
            context=row["context"] if isinstance(row.get("context"), str) else "",
            extra={k: v for k, v in row.items() if k not in {"id", "question", "answers", "answer", "context"}},
        )
        records.append(rec)
    if with_context_only:
        records = [r for r in records if r.context]
    if not records:
        raise EdgepackError(f"{path}: no usable TriviaQA records")
    return records


def chat_turns(name_or_path: str | Path = "chat-instructions") -> list[str]:
    """User turns for chat evaluation, one per JSONL line, in file order. A line is either a self-instruct
    record {"instruction", "instances": [{"input"}, ...]} (user turn = the instruction, plus the first
    instance's input as its own paragraph when non-empty) or {"prompt": "..."} (used as it is)."""
    path = _resolve(name_or_path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    turns = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns.append(_chat_turn(row))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            raise EdgepackError(
                f"{path}:{lineno}: expected JSON with 'instruction' (and optional 'instances'/'input') or 'prompt' ({e})"
            ) from None
    if not turns:
        raise EdgepackError(f"{path}: no chat instructions")
    return turns


def _chat_turn(row: dict) -> str:
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise TypeError("'prompt' must be a non-empty string")
        return row["prompt"]
    instruction = row["instruction"]
    instances = row.get("instances") or [{}]
    extra = row.get("input", instances[0].get("input", ""))
    if not isinstance(instruction, str) or not instruction.strip() or not isinstance(extra, str):
        raise TypeError("'instruction' and 'input' must be strings")
    extra = extra.strip()
    return instruction.strip() + (f"\n\n{extra}" if extra else "")


def hf_dataset_text(name: str, config: str, split: str) -> str:  # pragma: no cover - needs network
    """Online path: text of a Hugging Face dataset split (e.g. "wikitext", "wikitext-2-raw-v1", "test").
    Kept for users with a network; nothing in edgepack's tests or defaults depends on it."""
    try:
        import datasets  # type: ignore
    except ImportError:
        raise EdgepackError("the `datasets` package is needed for hub dataset names; use a local file") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # network or name errors, reported in one line
        raise EdgepackError(f"could not load dataset {name}/{config}/{split}: {e}") from None
    return "\n\n".join(rows)
