"""Reading Hugging Face tokenizer.json parts: vocab, merges, nested components, the post-processor's BOS / EOS."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import regex

from .base import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED


def load_json(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict, encoding="utf-8") as f:
        return json.load(f)


def flatten(node: dict | None, key: str) -> list[dict]:
    """Flatten a (possibly nested) HF ``Sequence`` component into a list of components."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key) or [] for c in flatten(child, key)]
    return [node]


def hf_vocab(data: dict) -> tuple[list[str], list[int]]:
    """Pieces and token types (added special tokens -> CONTROL, other added -> USER_DEFINED)."""
    vocab: dict[str, int] = data["model"]["vocab"]
    added = data.get("added_tokens") or []
    size = max([*vocab.values(), *(t["id"] for t in added), -1]) + 1
    pieces = [""] * size
    types = [UNUSED] * size
    for piece, i in vocab.items():
        pieces[i] = piece
        types[i] = BYTE if regex.fullmatch(r"<0x[0-9A-F]{2}>", piece) else NORMAL
    for tok in added:
        pieces[tok["id"]] = tok["content"]
        types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
    return pieces, types


def hf_merges(merges: Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in merges:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed merge {m!r}")
        else:
            a, b = m
        out.append((a, b))
    return out


def post_processor_ids(data: dict, pieces: list[str]) -> tuple[int | None, int | None]:
    """BOS / EOS ids added by a TemplateProcessing post-processor (if any)."""
    bos = eos = None
    for proc in flatten(data.get("post_processor"), "processors"):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        specials = proc.get("special_tokens") or {}

        def token_id(item: dict, specials: dict = specials) -> int | None:
            name = item["SpecialToken"]["id"]
            ids = (specials.get(name) or {}).get("ids") or []
            if ids:
                return int(ids[0])
            return pieces.index(name) if name in pieces else None

        if single and "SpecialToken" in single[0]:
            bos = token_id(single[0])
        if len(single) > 1 and "SpecialToken" in single[-1]:
            eos = token_id(single[-1])
    return bos, eos
