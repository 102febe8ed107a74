"""TriviaQA prompt templates, in one place: evaluation (torch and ONNX) and TriviaQA LoRA training both
use these, so a model is trained on exactly the prompt it is tested with.

Plain completion prompts with two fixed worked examples (not from TriviaQA). Zero-shot "Question: ...
Answer:" made SmolLM2-135M-Instruct start most answers with a line break or a full sentence, which a
newline-terminated greedy decode scores as empty; two short examples fix the answer format for small models
without a chat wrapper (whose system prompt costs ~30 tokens per question on a small CPU budget).
"""

from __future__ import annotations

_SHOTS = (
    "Question: What is the capital city of France?\nAnswer: Paris\n\n"
    "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare\n\n"
)
CLOSED_BOOK = _SHOTS + "Question: {question}\nAnswer:"
OPEN_BOOK = "Passage: {context}\n\n" + _SHOTS + "Question: {question}\nAnswer:"


def closed_book_prompt(question: str) -> str:
    return CLOSED_BOOK.format(question=question.strip())


def open_book_prompt(question: str, context: str) -> str:
    return OPEN_BOOK.format(question=question.strip(), context=context.strip())
