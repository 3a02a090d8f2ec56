"""The quality bar on the default models (fastdiff/weights): a --quick run of fastdiff.bench.quality
(32 held-out captions and 32 held-out edits at the pipelines' default settings, C++ and reference
backends, under a minute on 2 cores) against the figures recorded in fastdiff/weights/quality.json;
and the bench's plumbing (verdict counting, the record comparison, options, the tables and JSON).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fastdiff import toyworld
from fastdiff.bench import quality
from fastdiff.bench.__main__ import main

# A figure may fall this far below the record (shares; PSNR in dB). The test draws the record's
# samples with the record's seeds (compare_to_record refuses other settings), so on the recording
# machine every figure reproduces exactly; what moves them is numerics (another CPU's kernel
# paths, a changed fast path) flipping borderline verdicts. test_backends_agree bounds that: a
# change of numerics as large as the reference backend's flips at most 1 - MIN_SAME_VERDICTS = 5%
# of verdicts, so moves a rate by about 5 points; the margin is twice that. It is also beyond
# sampling noise: were the 32 captions (~48 shapes) and 32 edits drawn afresh, the binomial
# standard error of a share near 0.9 over 48 shapes is 4.3 points, of one near 0.85 over 32 edits
# 6.3 points; a 10-point drop is over 3 of 32 edits, 5 of 48 shapes. Per-kind edit rates (~5 edits
# each) are too few to bound and are not compared.
MARGIN = 0.10
# The mean over 32 edits of the PSNR outside the edited region: images that move by a level or two
# (the reference backend's move by ~1) shift it by well under 1 dB.
PSNR_MARGIN = 2.0
# C++ fp32 and the reference backend fp32 run the same samples with the same noise: their
# images differ by rounding only, so nearly every verdict must match (1 of 32 edits may flip).
MIN_SAME_VERDICTS = 0.95


@pytest.fixture(scope="module")
def quick_run():
    return quality.measure(quality.QUICK, progress=False)


def test_quality_holds_against_record(request):
    try:
        record = quality.load_record()
    except FileNotFoundError as exc:
        record, missing = None, str(exc)
    if record is None:  # a failure, not a skip: the bar must be recorded
        pytest.fail(missing, pytrace=False)
    result = request.getfixturevalue("quick_run")
    problems = quality.compare_to_record(result, record, margin=MARGIN, psnr_margin=PSNR_MARGIN)
    assert not problems, "quality fell below the record:\n" + "\n".join(problems) + "\n\n" + quality.tables(result)


def test_backends_agree(quick_run):
    rows = [(task, row) for task in ("generate", "edit") for row in quick_run[task] if row["backend"] == "reference"]
    assert len(rows) == 2
    for task, row in rows:
        assert row["same_verdicts"] >= MIN_SAME_VERDICTS, (
            f"{task}: the C++ and reference backends agree on {row['same_verdicts']:.1%} of verdicts (max pixel "
            f"difference {row['max_pixel_diff']}), expected at least {MIN_SAME_VERDICTS:.0%}")


# -- plumbing -------------------------------------------------------------------------------------

def _shape(color, row, col, kind="circle"):
    return toyworld.Shape(kind=kind, color=color, size="big", row=row, col=col)


def _reading(shapes_read, background=("white",), read_background=("white",)):
    """A Reading of a scene with the expected shapes of `shapes_read` [(expected, color, kind, cell)]."""
    scene = toyworld.Scene(tuple(s for s, *_ in shapes_read), background)
    return toyworld.Reading(scene, tuple(toyworld.ShapeReading(s, *read) for s, *read in shapes_read), read_background)


def test_generate_figures_count_verdicts():
    red, blue = _shape("red", 0, 0), _shape("blue", 2, 2, "star")
    readings = [
        _reading([(red, "red", "circle", (0, 0)), (blue, "blue", "square", (2, 2))]),  # kind wrong
        _reading([(red, "green", None, None)], read_background=("black",)),  # all wrong
        _reading([(blue, "blue", "star", (2, 2))], background=("white", "gray"), read_background=("white", "gray")),
    ]
    figures = quality.generate_figures(readings)
    assert figures == {"images": 3, "shapes": 4, "color": 3 / 4, "kind": 2 / 4, "position": 3 / 4,
                       "background": 2 / 3, "all": 1 / 3}
    assert quality.verdicts(readings[0]) == [True, True, True, True, False, True, True]
    # the same scenes read otherwise: 2 of readings[0]'s 7 verdicts and 1 of readings[2]'s 4 differ
    other = [_reading([(red, "red", "circle", (1, 0)), (blue, "blue", "star", (2, 2))]),
             readings[1], _reading([(blue, "blue", "star", (2, 2))], background=("white", "gray"))]
    assert quality.same_verdicts(other, readings) == pytest.approx(12 / 15)
    assert quality.same_verdicts(readings[:2], readings) == 1.0
    with pytest.raises(ValueError, match="baseline's samples"):
        quality.same_verdicts(readings[1:], readings)


def test_edit_figures_count_per_kind_and_cap_psnr():
    red = _shape("red", 1, 1)
    source = toyworld.Scene((red,), ("white",))
    good = _reading([(dataclasses.replace(red, color="blue"), "blue", "circle", (1, 1))])
    wrong = _reading([(red, "red", "circle", (1, 1))], read_background=("gray",))

    def edit_reading(kind, reading, leftovers=(), preservation=30.0):
        edit = toyworld.Edit(source, "x", reading.scene, kind, ())
        return toyworld.EditReading(edit, reading, leftovers, preservation)

    readings = [edit_reading("recolor", good, preservation=math.inf), edit_reading("recolor", good, ("red",)),
                edit_reading("move", wrong, preservation=20.0), edit_reading("move", good)]
    figures = quality.edit_figures(readings)
    assert figures["edits"] == 4 and figures["success"] == 2 / 4
    assert figures["preservation"] == pytest.approx((quality.PSNR_CAP + 30 + 20 + 30) / 4)
    assert figures["by_kind"]["recolor"] == {"edits": 2, "success": 1 / 2}
    assert figures["by_kind"]["move"] == {"edits": 2, "success": 1 / 2}
    assert figures["by_kind"]["add"] == {"edits": 0, "success": None}
    assert [quality.verdicts(r) for r in readings] == [[True], [False], [False], [True]]


def _result(color=0.9, success=0.9, preservation=30.0, settings=None, weights="w"):
    row = lambda backend, figures: {"sampler": "euler", "steps": 20, "backend": backend, "dtype": "fp32",  # noqa: E731
                                    "cache": None, "figures": figures, "same_verdicts": None, "max_pixel_diff": None,
                                    "psnr_to_uncached": None}
    generate = {"images": 24, "shapes": 36, "color": color, "kind": 0.8, "position": 0.9, "background": 1.0, "all": 0.7}
    edit = {"edits": 24, "success": success, "preservation": preservation, "by_kind": {}}
    return {"settings": settings or quality.QUICK.as_json(), "weights": {"generate": weights, "edit": weights},
            "generate": [row("cpp", generate), row("reference", generate)], "edit": [row("cpp", edit)]}


def test_compare_to_record_flags_drops_beyond_the_margin():
    compare = lambda result, record: quality.compare_to_record(result, record, margin=0.1, psnr_margin=2.0)  # noqa: E731
    record = json.loads(json.dumps(_result()))  # as read back from quality.json
    assert compare(_result(), record) == []
    assert compare(_result(color=0.81, success=0.81, preservation=28.1), record) == []
    problems = compare(_result(color=0.79, success=0.79, preservation=27.9), record)
    assert len(problems) == 4  # color on both backends, success, preservation
    assert all(any(name in p for p in problems) for name in ("cpp fp32 color", "reference fp32 color", "success",
                                                               "preservation"))
    assert "settings" in compare(_result(), _result(settings={"n_generate": 96}))[0]
    assert "weights" in compare(_result(weights="other"), record)[0]
    fewer = json.loads(json.dumps(record))
    fewer["generate"].pop()
    assert "no such row" in compare(_result(), fewer)[0]


def test_missing_record_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--quick --record"):
        quality.load_record(tmp_path / "quality.json")


def test_held_out_samples_are_deterministic_prefixes():
    settings = quality.Settings(n_generate=6, n_edit=6, n_bf16=0, seed=3)
    scenes, edits = quality.held_out(settings)
    assert all(toyworld.split_of(s.caption()) == "test" for s in scenes)
    assert all(toyworld.split_of(f"{e.source.caption()} | {e.instruction}") == "test" for e in edits)
    fewer = quality.held_out(dataclasses.replace(settings, n_generate=3, n_edit=2))
    assert fewer == (scenes[:3], edits[:2])


@pytest.mark.parametrize("argv, message", [
    (["--samplers", "euler:0"], "--samplers"),
    (["--samplers", "plms:20"], "--samplers"),
    (["--samplers", "euler"], "--samplers"),
    (["--n-edit", "0"], "--n-edit"),
    (["--n-bf16", "-1"], "--n-bf16"),
    (["--quick", "--n-generate", "4"], "drop --n-generate"),
    (["--record"], "add --quick"),
    (["--cache-interval", "2,0"], "--cache-interval: expected comma-separated integers >= 1"),
    (["--cache-interval", "2", "--cache-depth", "x"], "--cache-depth: expected comma-separated integers"),
    (["--cache-depth", "2"], "--cache-depth: .*give --cache-interval too"),
    (["--cache-interval", "1", "--cache-samplers", "euler:2"], "--cache-samplers: .*an interval above 1"),
    (["--cache-interval", "2", "--cache-samplers", "euler"], "--cache-samplers: expected comma-separated sampler:steps"),
    (["--quick", "--cache-interval", "2"], "drop --cache-interval"),
])
def test_bad_options_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        main(["quality", *argv])


def test_parse_grid():
    assert quality.parse_grid("euler:10, ddim:20,") == (("euler", 10), ("ddim", 20))
    assert quality.parse_grid("") == ()


def test_parse_cache_grid_crosses_the_axes_without_the_uncached_interval():
    assert quality.parse_cache_grid("1,2,3,5", "1,2") == ((2, 1), (2, 2), (3, 1), (3, 2), (5, 1), (5, 2))
    assert quality.parse_cache_grid("3, 3,1") == ((3, 1),)
    assert quality.parse_cache_grid("1") == ()


def test_int8_verdict_holds_int8_within_two_points_of_fp32():
    result = _result()
    assert quality.int8_verdict(result) is None  # no int8 rows
    base_g, base_e = result["generate"][0], result["edit"][0]
    int8_g = {**base_g, "dtype": "int8", "figures": {**base_g["figures"], "color": 0.885, "kind": 0.75}}
    int8_e = {**base_e, "dtype": "int8", "figures": {**base_e["figures"], "success": 0.89, "preservation": 29.0}}
    result["generate"].append(int8_g)
    result["edit"].append(int8_e)
    line = quality.int8_verdict(result)
    assert "generate color -1.5" in line and "generate kind -5.0" in line and "edit success -1.0" in line
    assert "edit preservation -1.0 dB" in line and line.endswith("MISS (kind)")
    int8_g["figures"]["kind"] = 0.79
    assert quality.int8_verdict(result).endswith(": ok")


def test_int8_rows_beside_fp32(tmp_path, capsys):
    path = tmp_path / "quality.json"
    assert main(["quality", "--n-generate", "2", "--n-edit", "2", "--n-bf16", "0", "--samplers", "", "--int8",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["int8"] is True
    for task in ("generate", "edit"):
        [row] = [r for r in result[task] if r["dtype"] == "int8"]
        assert row["backend"] == "cpp" and row["cache"] is None and 0 <= row["same_verdicts"] <= 1
    assert "cpp int8" in capsys.readouterr().out and "int8 vs fp32, points" in quality.tables(result)


def test_records_made_before_caching_still_match():
    """A record without the cache settings and row keys (made before step caching existed) matches a
    run without caching; a run with cached rows is another setting."""
    record = json.loads(json.dumps(_result()))
    for key in quality.LATER_SETTINGS:
        del record["settings"][key]
    for row in record["generate"] + record["edit"]:
        del row["cache"]
    compare = lambda result: quality.compare_to_record(result, record, margin=0.1, psnr_margin=2.0)  # noqa: E731
    assert compare(_result()) == []
    cached = _result(settings=quality.Settings(n_generate=32, n_edit=32, n_bf16=0, grid=(),
                                               cache_grid=((2, 1),)).as_json())
    assert "settings" in compare(cached)[0]


def test_tables_and_json_on_two_samples(tmp_path, capsys):
    path = tmp_path / "quality.json"
    assert main(["quality", "--n-generate", "2", "--n-edit", "2", "--n-bf16", "1", "--samplers", "euler:2",
                 "--cache-interval", "1,2", "--cache-samplers", "euler:2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["settings"] == {"n_generate": 2, "n_edit": 2, "n_bf16": 1, "seed": 0, "grid": [["euler", 2]],
                                  "cache_grid": [[2, 1]], "cache_samplers": [["euler", 2]], "int8": False}
    # the uncached euler 2 generate row is the grid's, measured once; the editor's is added for its cached row
    assert [(r["sampler"], r["steps"], r["backend"], r["dtype"], r["cache"]) for r in result["generate"]] == [
        ("euler", 20, "cpp", "fp32", None), ("euler", 20, "reference", "fp32", None), ("euler", 20, "cpp", "bf16", None),
        ("euler", 2, "cpp", "fp32", None), ("euler", 2, "cpp", "fp32", [2, 1])]
    assert [(r["steps"], r["backend"], r["dtype"], r["cache"], r["figures"]["edits"]) for r in result["edit"]] == [
        (20, "cpp", "fp32", None, 2), (20, "reference", "fp32", None, 2), (20, "cpp", "bf16", None, 1),
        (2, "cpp", "fp32", None, 2), (2, "cpp", "fp32", [2, 1], 2)]
    for row in result["generate"] + result["edit"]:
        beside = row["backend"] != "cpp" or row["dtype"] != "fp32" or row["cache"] is not None
        assert (row["same_verdicts"] is not None) == beside and (row["max_pixel_diff"] is not None) == beside
        assert (row["psnr_to_uncached"] is not None) == (row["cache"] is not None)
        if beside:
            assert 0 <= row["same_verdicts"] <= 1 and 0 <= row["max_pixel_diff"] <= 255
        if row["cache"] is not None:  # the last of 2 steps ran cached: the images moved (how far is the bar's to judge)
            psnr = row["psnr_to_uncached"]
            assert len(psnr["images"]) == 2 and 0 < psnr["min"] <= psnr["mean"] < quality.PSNR_CAP
    generate = result["generate"][0]["figures"]
    assert generate["images"] == 2 and all(0 <= generate[n] <= 1 for n in quality.GENERATE_FIGURES)
    assert set(result["edit"][0]["figures"]["by_kind"]) == set(toyworld.EDIT_KINDS)
    for text in ("color >=90%", "kind >=80%", "position >=90%", "success >=85%", "PSNR dB >=25", "same verdicts",
                 "reference fp32", "cpp bf16", "euler 2 ", "cache N/depth", "PSNR to uncached", "2/1",
                 "success vs uncached"):
        assert text in out
    assert "ok" in out or "MISS" in out
