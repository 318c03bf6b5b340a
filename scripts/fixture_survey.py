"""Run the 13 benchmark fixtures through lmms-eval's own task code with a model, and say what it sees.

    python scripts/fixture_survey.py                          # embedded model, dense: table to stdout
    python scripts/fixture_survey.py --vision-from 0          # vision q/kv/mlp pruned from layer 0
    python scripts/fixture_survey.py --policy P.yaml --prompts FIXTURE_PROMPTS.md

Per benchmark: fixture size, wall time of its ``simple_evaluate``, the headline metric of
``conf/benchmark/<name>.yaml``, and (``--prompts``) the exact prompt the model receives (lmms-eval's
``doc_to_text`` wrapped by the plugin's chat prompt), the tokens the model's tokenizer does not know,
the expected answer format, and a few (target, answer) pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from dop.evaluation.benchmarks import resolve
from dop.evaluation.fixtures import TASKS, build_fixture
from dop.evaluation.local_tasks import benchmark_tasks
from dop.evaluation.plugin import MODEL_NAME, DopLMM, load_policy
from dop.evaluation.scoring import build_prompt
from dop.models import load_model
from dop.policy import DepthPolicy

# How lmms-eval 0.7.3 scores an answer, per benchmark (read from its utils; what a model must emit).
SCORING = {
    "gqa": "lmms-eval's exact_match against `answer` (case and punctuation ignored): the word alone.",
    "mmbench_en_dev": "rule-based option matcher (judge off): a letter A-D, or exactly one option's text in the "
                      "answer; circular copies (index + 1e6, options rotated) must all be right.",
    "mmbench_cn_dev": "as mmbench_en_dev; the post-prompt is Chinese (the fixture's questions stay English).",
    "mme": "parse_pred_ans: 'yes'/'no' (or starting with them, or 'y'/'n'); the question's ' Please answer yes or "
           "no.' is replaced by the default post-prompt; pairs per image (acc + acc+).",
    "pope": "answer.lower().strip() must equal 'yes' or 'no' exactly.",
    "scienceqa_img": "the letter alone (case-insensitive) or 'X. ...'; an option's text scores 0.",
    "vqav2_val": "EvalAI normalisation (punctuation, articles, number words -> digits), then min(1, matches/3) "
                 "over 10 answers.",
    "textvqa_val": "as VQAv2; doc_to_text capitalises the question (`What colour ...`).",
    "vizwiz_vqa_val": "as VQAv2; question capitalised; post-prompt also offers 'Unanswerable'.",
    "mmmu_val": "multiple choice: a letter, or an option's text (parse_multi_choice_response); open: the answer "
                "word inside the response. `<image k>` markers stay in the text.",
    "seedbench": "only the first character of the answer is compared with the letter.",
    "ocrbench": "the answer word must occur in the response (case-insensitive); score = right answers / 1000.",
    "ok_vqa_val2014": "as VQAv2; post-prompt also offers 'Unanswerable'.",
}
# Documents whose prompt forms differ from document 0 (multi-image, open questions, other option counts).
SHOWN_DOCS = {"mmmu_val": (0, 1, 3), "seedbench": (0, 3), "ocrbench": (0, 1), "scienceqa_img": (0, 1),
              "mmbench_en_dev": (0, 8)}


class RecordingLMM(DopLMM):
    """The plugin, remembering how many images each document brought."""

    images_seen: dict[tuple[str, int], int] = {}

    def _doc_images(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        images = super()._doc_images(doc_to_visual, doc_id, task, split)
        self.images_seen[(task, doc_id)] = len(images)
        return images


def _target(sample: dict[str, Any]) -> str:
    """The logged target; VQA tasks log the literal "answer" (no such column), so their majority answer."""
    answers = (sample.get("doc") or {}).get("answers")
    if sample["target"] == "answer" and answers:
        words = [a["answer"] if isinstance(a, dict) else a for a in answers]
        return max(set(words), key=words.count)
    return str(sample["target"])


def _context(sample: dict[str, Any]) -> str:
    arg = sample["arguments"][0]
    return arg[0] if isinstance(arg, (list, tuple)) else arg


def _unknown_words(processor: Any, prompt: str) -> list[str]:
    tok = getattr(processor, "tokenizer", processor)
    unk = getattr(tok, "unk_token", None)
    if unk is None:
        return []
    words = []
    for word in prompt.split():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if tok.unk_token_id in ids and word not in words:
            words.append(word)
    return words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default="tiny_llava")
    ap.add_argument("--policy", default=None, help="a policy YAML (default: dense)")
    ap.add_argument("--vision-from", type=int, default=None, help="prune vision q/kv/mlp from this layer on")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--prompts", default=None, help="write the prompt / answer-format survey to this file")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    model, processor = load_model(args.pretrained)
    policy = load_policy(args.policy)
    if args.vision_from is not None:
        layers = int(model.config.get_text_config().num_hidden_layers)
        policy = DepthPolicy({(t, "vision"): args.vision_from for t in ("q", "kv", "mlp")}).expand(num_layers=layers)
    lm = RecordingLMM.from_model(model, processor, policy=policy, batch_size=args.batch_size, name=args.pretrained)
    rows, survey = [], ["# Prompts of the 13 benchmark fixtures, as the model receives them", "",
                        f"Model `{args.pretrained}`, plugin `dop` (lmms-eval prompt variant `default`). Each prompt is "
                        "lmms-eval's own `doc_to_text` (with the task's pre/post prompt) wrapped by the plugin "
                        "(`dop.evaluation.scoring.build_prompt`: the model's chat template, one image token per "
                        "image, expanded by the processor). Generated by `scripts/fixture_survey.py`.", "",
                        "Fixtures (`dop.evaluation.fixtures`): every question is a `dop.data.synthetic` question "
                        "(its exact template and one-word answer) on a 32x32 scene; yes/no fixtures (POPE, MME) use "
                        "`exists` questions only, half yes; multiple-choice options are words of the answer's kind "
                        "(colours, shapes, counts one-four, cells; SEED-Bench 4 options, MMBench 3-4, ScienceQA "
                        "2-5); MMMU and SEED-Bench have multi-image documents (the same scene rendered again); "
                        "TextVQA and OCRBench images are the scene between two 64-pixel text bands (the word in "
                        "the left one), which the embedded processor's centre crop removes exactly; MMBench-CN "
                        "keeps English questions under its Chinese instruction.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # aggregations write submission files into the working directory
        try:
            for name in args.tasks:
                t0 = time.perf_counter()
                fx = build_fixture(name, Path(tmp) / "data" / name)
                (bench,) = resolve(name, check=False)
                bench = dataclasses.replace(bench, dataset_path=str(fx.path), judge=False)
                names = benchmark_tasks(bench, Path(tmp) / "tasks")
                tm = TaskManager("WARNING", include_path=str(Path(tmp) / "tasks"), include_defaults=False,
                                 model_name=MODEL_NAME)
                res = simple_evaluate(model=lm, tasks=list(names), task_manager=tm, log_samples=True,
                                      verbosity="WARNING", bootstrap_iters=0)
                seconds = time.perf_counter() - t0
                values = bench.metric_values(res["results"], task_names=names)
                (task,) = names
                samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
                n = res["n-samples"][task]["effective"]
                rows.append((name, fx.size, n, seconds, bench.metric, values.get(bench.metric)))
                print(f"{name}: {n} docs, {seconds:.1f} s, {bench.metric} = {values.get(bench.metric)}", flush=True)
                survey += [f"## {name} (task `{task}`, {fx.size} docs, metric `{bench.metric}`)", "",
                           f"Answer format: {fx.answer_format}. Scoring: {SCORING.get(name, '')}", ""]
                unknown: list[str] = []
                for i in SHOWN_DOCS.get(name, (0,)):
                    n_images = lm.images_seen.get((task, i), 1)
                    prompt = build_prompt(processor, _context(samples[i]), num_images=n_images)
                    unknown += [w for w in _unknown_words(processor, prompt) if w not in unknown]
                    survey += [f"Document {i} ({n_images} image{'s' if n_images != 1 else ''}; target "
                               f"`{_target(samples[i])}`):", "", "```", prompt, "```", ""]
                if unknown:
                    survey += [f"Words the tokenizer maps to its unknown token: {' '.join(unknown)}", ""]
                survey += ["| doc | target | model answer |", "|---|---|---|"]
                for s in samples[:4]:
                    resp = s["filtered_resps"][0] if s["filtered_resps"] else ""
                    survey.append(f"| {s['doc_id']} | {_target(s)[:40]} | {str(resp)[:40]!r} |")
                survey.append("")
        finally:
            os.chdir(cwd)
    print("\n| benchmark | fixture docs | docs run | time (s) | metric | score |\n|---|---|---|---|---|---|")
    for name, size, n, seconds, metric, value in rows:
        score = "missing" if value is None else f"{value:.4g}"
        print(f"| {name} | {size} | {n} | {seconds:.1f} | {metric} | {score} |")
    if args.prompts:
        Path(args.prompts).write_text("\n".join(survey) + "\n")


if __name__ == "__main__":
    main()
