"""Evaluation: the lmms-eval plugin ``dop`` (``plugin``), the inference helpers it shares with dop's
own scoring loops (``scoring``), the benchmark registry (``benchmarks``), dop's synthetic task
(``tasks``), lmms-eval's tasks on local copies of their datasets (``local_tasks``, ``task_hooks``),
fixtures of the 13 benchmarks (``fixtures``) and what the evaluate stage measures around lmms-eval
(``runner``).

Owns everything between a model under a policy or baseline and a benchmark score. May import the
engine, model access and the concepts; never the sweep or the search. Submodules are imported by
name (``dop.evaluation.plugin`` pulls in lmms-eval, which is slow to load).
"""
