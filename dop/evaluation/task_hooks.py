"""Functions the derived lmms-eval tasks of ``dop.evaluation.local_tasks`` call (from their generated utils.py).

Kept apart from ``local_tasks`` because importing lmms-eval's MMBench scorer imports ``lmms_eval.tasks``
(seconds); lmms-eval has imported it already whenever these run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

from dop.evaluation.local_tasks import LocalDatasetError, LocalSplit

# lmms-eval's mmbench.yaml metadata.sys_prompt (its utils read it from there).
MMBENCH_SYS_PROMPT = "There are several options:"


def attach_images(dataset: datasets.Dataset, images: Mapping[str, Any], key: str) -> datasets.Dataset:
    """GQA's ``process_docs`` on a local copy: each doc gets the image whose ``id`` is ``doc[key]``
    (lmms-eval's ``gqa_process_docs`` does the same join on images it downloads)."""
    split = LocalSplit(images["dataset_path"], images["split"], tuple(images.get("data_files", ())))
    table = split.load()
    by_id = {i: n for n, i in enumerate(table["id"])}
    wanted = set(dataset[key])
    missing = sorted(wanted - set(by_id))
    if missing:
        raise LocalDatasetError(f"images at {split.dataset_path} lack id(s) {', '.join(map(str, missing[:5]))} "
                                f"({len(missing)} of {len(wanted)} referenced by {key})")
    return dataset.map(lambda doc: {"image": table[by_id[doc[key]]]["image"].convert("RGB")})


def mmbench_static_score(results: list[dict[str, Any]], args: Any = None) -> float:
    """MMBench accuracy in percent without a GPT judge, circular groups scored as lmms-eval scores them.

    lmms-eval's ``MMBench_Evaluator.eval_result(..., eval_method="static")``, the rule of its
    ``mmbench_en_dev_static`` task: the option is read by the rule-based matcher (``can_infer``: a
    letter, or exactly one option's text in the answer), then by ``extract_mcq_answer``; an answer
    neither parses is wrong.
    """
    overall, _, _ = MMBench_Evaluator(sys_prompt=MMBENCH_SYS_PROMPT).eval_result(results, "static")
    return float(overall) * 100
