"""lmms-eval hooks of the ``dop_synthetic`` task (loaded via the generated utils.py)."""

from __future__ import annotations

from typing import Any

from dop.evaluation.scoring import exact_match


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    # The bare question: the plugin wraps it in the model's chat prompt, exactly like score_synthetic.
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0], doc["answer"])}
