"""The shapes world's closed vocabulary: attribute values, position words and every word a question,
answer or caption can use. Each entry is one whitespace-separated word, hence one token."""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
DOMAINS: tuple[str, ...] = ("plain", "textured", "noisy")

GRID = 3  # cells per side; cell index = row * GRID + col
POSITIONS: tuple[str, ...] = (
    "top-left", "top-center", "top-right",
    "middle-left", "center", "middle-right",
    "bottom-left", "bottom-center", "bottom-right",
)
COUNTS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")  # "left of", "right of", "above", "below"
YES_NO: tuple[str, ...] = ("yes", "no")

FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "where", "exists", "relation")

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
_GLUE_WORDS: tuple[str, ...] = (
    "what", "colour", "shape", "is", "the", "object", "how", "many", "are", "there", "where", "a", "of",
    "?", "at", "and", ".", "on", "background",
)


def words() -> tuple[str, ...]:
    """Every non-special word of the world, in a fixed order (the tokenizer's ids follow it)."""
    groups = (_GLUE_WORDS, SHAPES, tuple(PLURALS.values()), COLOURS, SIZES, DOMAINS, POSITIONS, COUNTS,
              RELATIONS, YES_NO)
    out: list[str] = []
    for group in groups:
        out.extend(w for w in group if w not in out)
    return tuple(out)


def answer_words(family: str) -> tuple[str, ...]:
    """The possible one-word answers of a question family."""
    table = {
        "colour": COLOURS, "shape": SHAPES, "count": COUNTS[:4], "where": POSITIONS,
        "exists": YES_NO, "relation": YES_NO,
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    return table[family]
