"""The benchmark prompt formats the embedded model is trained on (dop.data.synthetic.task_prompt) are
lmms-eval's own: each equals the installed task's doc_to_text with its YAML's default kwargs; the
samples are deterministic and true of their scenes; the tokenizer reads every training prompt."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lmms_eval")

import lmms_eval  # noqa: E402
import torch  # noqa: E402
from lmms_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lmms_eval.tasks.gqa import utils as gqa  # noqa: E402
from lmms_eval.tasks.mmbench import cn_utils as mmbench_cn  # noqa: E402
from lmms_eval.tasks.mmbench import en_utils as mmbench_en  # noqa: E402
from lmms_eval.tasks.mme import utils as mme  # noqa: E402
from lmms_eval.tasks.mmmu import utils as mmmu  # noqa: E402
from lmms_eval.tasks.ocrbench import utils as ocrbench  # noqa: E402
from lmms_eval.tasks.ok_vqa import utils as ok_vqa  # noqa: E402
from lmms_eval.tasks.pope import utils as pope  # noqa: E402
from lmms_eval.tasks.scienceqa import utils as scienceqa  # noqa: E402
from lmms_eval.tasks.seedbench import utils as seedbench  # noqa: E402
from lmms_eval.tasks.textvqa import utils as textvqa  # noqa: E402
from lmms_eval.tasks.vizwiz_vqa import utils as vizwiz  # noqa: E402
from lmms_eval.tasks.vqav2 import utils as vqav2  # noqa: E402

from dop.data import synthetic as syn  # noqa: E402
from dop.models import load_model  # noqa: E402
from dop.training.tiny_llava import build_processor, evaluate_task_formats, task_correct  # noqa: E402

TASKS = Path(lmms_eval.__file__).parent / "tasks"


class _Loader(yaml.SafeLoader):
    """Reads task YAMLs without resolving ``!function`` tags."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def default_kwargs(path: str) -> dict:
    """``lmms_eval_specific_kwargs["default"]`` of a task YAML, following its ``include`` chain."""
    file = TASKS / path
    cfg = yaml.load(file.read_text(), Loader=_Loader)
    merged = default_kwargs(str(file.parent.relative_to(TASKS) / cfg["include"])) if "include" in cfg else {}
    return {**merged, **(cfg.get("lmms_eval_specific_kwargs") or {}).get("default", {})}


def _mmbench_doc(question: str, options: list[str], hint: str) -> dict:
    doc = {"question": question, "answer": "A", "category": "x", "L2-category": "x", "index": 0,
           "hint": hint or math.nan, "source": "x", "split": "dev"}
    return {**doc, **{syn.OPTION_LETTERS[i]: o for i, o in enumerate(options)}}


def lmms_eval_prompt(fmt: str, question: str, options: list[str], hint: str) -> str:
    """What lmms-eval's own ``doc_to_text`` makes of a document with this content, default kwargs."""
    q = {"question": question}
    if fmt == "gqa":
        return gqa.gqa_doc_to_text(q, default_kwargs("gqa/gqa.yaml"))
    if fmt == "vqav2":
        return vqav2.vqav2_doc_to_text(q, default_kwargs("vqav2/vqav2_val.yaml"))
    if fmt == "ok_vqa":
        return ok_vqa.ok_vqa_doc_to_text(q, default_kwargs("ok_vqa/ok_vqa_val2014.yaml"))
    if fmt == "vizwiz_vqa":
        return vizwiz.vizwiz_vqa_doc_to_text(q, default_kwargs("vizwiz_vqa/vizwiz_vqa_val.yaml"))
    if fmt == "textvqa":
        return textvqa.textvqa_doc_to_text({**q, "ocr_tokens": []}, default_kwargs("textvqa/textvqa_val.yaml"))
    if fmt == "pope":
        return pope.pope_doc_to_text(q, default_kwargs("pope/pope.yaml"))
    if fmt == "mme":  # MME's questions end in " Please answer yes or no."; the default kwargs replace it
        return mme.mme_doc_to_text({"question": f"{question} {syn.YES_NO}"}, default_kwargs("mme/mme.yaml"))
    if fmt == "ocrbench":
        return ocrbench.ocrbench_doc_to_text(q, default_kwargs("ocrbench/ocrbench.yaml"))
    if fmt in ("mmmu_open", "mmmu_mc"):
        kind = "multiple-choice" if fmt == "mmmu_mc" else "open"
        return mmmu.mmmu_doc_to_text({**q, "question_type": kind, "options": repr(options)},
                                     default_kwargs("mmmu/mmmu_val.yaml"))
    if fmt == "scienceqa_img":
        return scienceqa.sqa_doc_to_text({**q, "hint": hint, "choices": options},
                                         default_kwargs("scienceqa/scienceqa_img.yaml"))
    if fmt == "seedbench":
        return seedbench.seed_doc_to_text({**q, **{f"choice_{c}": o for c, o in zip("abcd", options)}})
    if fmt == "mmbench_en":
        return mmbench_en.mmbench_doc_to_text(_mmbench_doc(question, options, hint),
                                              default_kwargs("mmbench/mmbench_en_dev.yaml"))
    if fmt == "mmbench_cn":
        return mmbench_cn.mmbench_doc_to_text(_mmbench_doc(question, options, hint),
                                              default_kwargs("mmbench/mmbench_cn_dev.yaml"))
    raise ValueError(fmt)


FORMATS = sorted({f for fs in syn.TASK_FORMATS.values() for f in fs})


def test_every_format_has_its_task():
    assert len(FORMATS) == 14  # the 13 benchmarks; MMMU in its two question types, MMBench en + cn
    assert {"pope", "mme", "gqa", "vqav2", "textvqa", "vizwiz_vqa", "ok_vqa", "ocrbench", "scienceqa_img",
            "seedbench", "mmbench_en", "mmbench_cn"} < set(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_is_lmms_evals_own_doc_to_text(fmt):
    rng = np.random.default_rng(3)
    family = next(f for f, fs in syn.TASK_FORMATS.items() if fmt in fs)
    for i in range(20):
        kind = syn.TASK_KINDS[family][i % len(syn.TASK_KINDS[family])]
        scene = syn.sample_scene(rng)
        while not syn._possible(scene, kind):
            scene = syn.sample_scene(rng)
        question = syn.natural_question(kind, syn._task_args(scene, kind, rng), rng)
        options = ([] if family != "choice" else
                   syn.choice_options(scene, kind, syn.task_answer(scene, kind, syn._task_args(scene, kind, rng)),
                                      4 if fmt == "seedbench" else 2 + i % 3, rng)[0])
        hint = syn.HINTS[i % len(syn.HINTS)] if i % 2 and fmt in ("scienceqa_img", "mmbench_en", "mmbench_cn") else ""
        assert syn.task_prompt(fmt, question, options, hint=hint) == lmms_eval_prompt(fmt, question, options, hint)


def test_mme_variants_match_its_replacement_rule():
    q = "Is there a red circle in this image?"
    no_post = {"pre_prompt": "", "post_prompt": ""}
    assert syn.task_prompt("mme", q, variant=1) == mme.mme_doc_to_text({"question": f"{q} {syn.YES_NO}"}, no_post)
    assert syn.task_prompt("mme", q, variant=2) == mme.mme_doc_to_text(
        {"question": f"{q}{syn.YES_NO}"}, default_kwargs("mme/mme.yaml"))


def test_task_samples_are_deterministic_and_true_of_their_scene():
    for i in range(300):
        a = syn.make_task_sample(syn.sample_rng(0, "task_test", i))
        b = syn.make_task_sample(syn.sample_rng(0, "task_test", i))
        assert a["question"] == b["question"] and np.array_equal(a["image"], b["image"])
        scene, args = syn.Scene.from_json(a["scene"]), json.loads(a["args"])
        value = syn.task_answer(scene, a["qtype"], args)
        assert a["format"] in syn.TASK_FORMATS[a["family"]] and a["qtype"] in syn.TASK_KINDS[a["family"]]
        if a["family"] == "choice":
            # the lettered option names the true answer (a count may be written as a digit, a cell in words)
            line = next(x for x in a["question"].split("\n") if x.startswith(f"{a['answer']}. "))
            text = line[3:].lower().replace(" corner", "").replace("upper", "top").replace("lower", "bottom")
            text = text.replace("-", "_").replace(" ", "_")
            shown = syn.NUMBER_WORDS[int(text)] if text.isdigit() else text
            assert shown == value, (a["question"], a["answer"], value)
            assert sum(x[:2] in {f"{c}." for c in syn.OPTION_LETTERS} for x in a["question"].split("\n")) >= 2
        else:
            assert a["answer"] == value
            assert a["answer"] in (("yes", "no") if a["family"] == "yesno" else syn.vocabulary())
    other = syn.make_task_sample(syn.sample_rng(0, "task_val", 0))
    assert other["question"] != syn.make_task_sample(syn.sample_rng(0, "task_test", 0))["question"]


def test_families_are_balanced_and_yes_no_is_half_yes():
    rows = syn.task_rows(0, "task_test", 600)
    assert {f: rows["family"].count(f) for f in syn.FAMILIES} == {"short": 200, "yesno": 200, "choice": 200}
    yes = [a for a, f in zip(rows["answer"], rows["family"]) if f == "yesno"].count("yes")
    assert 80 <= yes <= 120
    letters = [a for a, f in zip(rows["answer"], rows["family"]) if f == "choice"]
    assert len(set(letters)) >= 4 and max(letters.count(c) for c in "ABCDE") < 0.45 * len(letters)


def test_tokenizer_reads_every_training_prompt():
    tok = build_processor().tokenizer
    vocab = set(tok.get_vocab())
    unknown = {w.lower() for w in syn.UNKNOWN_WORDS}
    for i in range(400):
        s = syn.make_task_sample(syn.sample_rng(1, "task_stream", i))
        words = syn.prompt_words(s["question"])
        ids = tok(s["question"], add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [w if w in vocab else "<unk>" for w in words]
        assert {w for w in words if w not in vocab} <= unknown, s["question"]
        assert s["answer"] in vocab
    # capitals inside words fold, a capital alone (an option letter) stays and decodes as itself
    assert tok.tokenize("A. Red\nB. BLUE") == ["A", ".", "red", "B", ".", "blue"]
    assert tok.decode(tok.convert_tokens_to_ids(["A"])) == "A"
    assert tok.tokenize("phrase.") == ["phrase", "."] and tok.tokenize("top_left?") == ["top_left", "?"]
    assert tok.tokenize(syn.LETTER_CN) == [syn.LETTER_CN[:-1], "。"]
    assert tok.convert_tokens_to_ids("<image>") == 4


def test_strict_scoring_agrees_with_the_tasks_parsers():
    # what task_correct accepts, the tasks accept: the capital letter alone, yes/no, the word
    opts = ["red", "blue", "green"]
    for pred in ("B", "A", "b", "B."):
        ok = task_correct("choice", pred, "B")
        assert not ok or scienceqa.sqa_process_results({"choices": opts, "answer": 1}, [pred])["exact_match"] == 1.0
        assert not ok or mmbench_en.mmbench_evaluator.can_infer(pred, dict(zip("ABC", opts))) == "B"
        idx2ans, choices = mmmu.get_multi_choice_info(opts)
        assert not ok or mmmu.parse_multi_choice_response(pred, choices, idx2ans) == "B"
    assert mmbench_en.mmbench_evaluator.can_infer("b", dict(zip("ABC", opts))) is False  # why capitals
    assert task_correct("yesno", " Yes", "yes") and not task_correct("yesno", "yes no", "yes")
    assert task_correct("short", "top_left", "top_left") and not task_correct("short", "two", "2")


# ------------------------------------------------------------------ the embedded model through the parsers
@pytest.fixture(scope="module")
def answered():
    """The embedded model's greedy answers to 240 held-out benchmark-format prompts (80 per family)."""
    torch.set_num_threads(1)
    model, processor = load_model("tiny_llava")
    rows = syn.task_rows(0, "task_test", 240)
    rows["prediction"] = evaluate_task_formats(model, processor, rows, batch_size=60)["predictions"]
    return rows


def _family(rows, family):
    return [{k: rows[k][i] for k in rows} for i in range(len(rows["answer"])) if rows["family"][i] == family]


def _options(question: str) -> list[str]:
    return [line[3:] for line in question.split("\n") if line[:2] in {f"{c}." for c in syn.OPTION_LETTERS}]


def test_multiple_choice_answers_score_under_each_tasks_parser(answered):
    rows = _family(answered, "choice")
    score = {"scienceqa_img": [], "seedbench": [], "mmbench (rule-based, no judge)": [], "mmmu_val": []}
    for i, r in enumerate(rows):
        opts, pred, gold = _options(r["question"]), r["prediction"], r["answer"]
        letters = syn.OPTION_LETTERS[: len(opts)]
        score["scienceqa_img"].append(scienceqa.sqa_process_results(
            {"choices": opts, "answer": letters.index(gold)}, [pred])["exact_match"])
        seed = seedbench.seed_process_result({"answer": gold, "data_type": "image", "question_id": i}, [pred])
        score["seedbench"].append(seedbench.seed_aggregation_result([seed["seed_image"]]))
        if len(opts) <= 4:  # MMBench's parser only knows options A-D (its questions have at most 4)
            score["mmbench (rule-based, no judge)"].append(
                mmbench_en.mmbench_evaluator.can_infer(pred, dict(zip(letters, opts))) == gold)
        idx2ans, choices = mmmu.get_multi_choice_info(opts)
        score["mmmu_val"].append(mmmu.parse_multi_choice_response(pred, choices, idx2ans) == gold)
    means = {k: float(np.mean(v)) for k, v in score.items()}
    assert len(rows) == 80 and all(m >= 0.8 for m in means.values()), means


def test_yes_no_answers_score_under_pope_and_mme(answered):
    rows = _family(answered, "yesno")
    pope_acc = np.mean([pope.pope_process_results({"answer": r["answer"], "question_id": i}, [r["prediction"]])
                        ["pope_accuracy"]["score"] for i, r in enumerate(rows)])
    mme_acc = np.mean([mme.mme_process_results({"answer": r["answer"], "question_id": i, "category": "existence"},
                                               [r["prediction"]])["mme_perception_score"]["score"]
                       for i, r in enumerate(rows)])
    assert pope_acc >= 0.8 and mme_acc >= 0.8, (pope_acc, mme_acc)


def test_short_answers_score_under_vqa_and_gqa_matching(answered):
    rows = _family(answered, "short")
    vqa = np.mean([vqav2.vqav2_process_results({"answers": [{"answer": r["answer"], "answer_id": j} for j in range(1, 11)],
                                                "question_id": i}, [r["prediction"]])["exact_match"]
                   for i, r in enumerate(rows)])
    exact = exact_match_hf_evaluate([r["prediction"] for r in rows], [r["answer"] for r in rows],
                                    ignore_case=True, ignore_punctuation=True)["exact_match"]
    assert vqa >= 0.8 and exact >= 0.8, (vqa, exact)
