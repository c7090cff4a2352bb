"""Everyday questions a new user asks first, with a pattern the right answer contains (None: open-ended)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    text: str
    answer: str | None  # a regular expression, matched case-insensitively


QUESTIONS = [
    Question("What is the capital of France?", r"\bParis\b"),
    Question("What is 2+2?", r"\b4\b|\bfour\b"),
    Question("How many days are in a week?", r"\b7\b|\bseven\b"),
    Question("What color is the sky on a clear day?", r"\bblue\b"),
    Question("Who wrote Romeo and Juliet?", r"Shakespeare"),
    Question("What is the boiling point of water in Celsius?", r"\b100\b"),
    Question("Write a haiku about the sea.", None),
    Question("Write a one-line Python function that returns the square of a number.", r"def |lambda"),
    Question("Give me three tips for sleeping better.", None),
    Question("Write a short thank-you note to a friend.", None),
]
