"""Counts in words, for what agentsd prints and reports."""


def plural(count: int, noun: str) -> str:
    """`count` and `noun`, plural unless the count is 1: "1 image", "2 images"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
