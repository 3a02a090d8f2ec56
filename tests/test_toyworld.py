"""fastdiff.toyworld: seeded scenes and edits, the held-out split, the captions' grammar, and a
judge that reads every rendered scene right and catches each kind of mistake."""
import dataclasses
import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from fastdiff import toyworld
from fastdiff.toyworld import Scene, Shape

SEEDS = range(150)


def scenes(split="train", seeds=SEEDS):
    return [toyworld.sample_scene(random.Random(seed), split) for seed in seeds]


def edits(split="train", seeds=SEEDS):
    return [toyworld.sample_edit(random.Random(seed), split) for seed in seeds]


def test_same_seed_same_scenes_and_edits():
    for split in ("train", "test"):
        assert scenes(split, range(20)) == scenes(split, range(20))
        assert edits(split, range(20)) == edits(split, range(20))
    one, two = scenes(seeds=[3])[0], scenes(seeds=[3])[0]
    np.testing.assert_array_equal(np.asarray(one.render()), np.asarray(two.render()))
    assert len({s.caption() for s in scenes(seeds=range(20))}) > 15  # and different seeds differ


def test_splits_are_disjoint():
    train = {s.caption() for s in scenes("train", range(300))}
    test = {s.caption() for s in scenes("test", range(100))}
    assert not train & test
    assert all(toyworld.split_of(c) == "train" for c in train) and all(toyworld.split_of(c) == "test" for c in test)
    pair = lambda e: f"{e.source.caption()} | {e.instruction}"  # noqa: E731
    train_edits = {pair(e) for e in edits("train", range(300))}
    test_edits = {pair(e) for e in edits("test", range(100))}
    assert not train_edits & test_edits
    assert all(toyworld.split_of(p) == "test" for p in test_edits)
    # the held-out share is about a tenth of all captions
    drawn = [toyworld.draw_scene(random.Random(seed)).caption() for seed in range(2000)]
    assert 0.06 < sum(toyworld.split_of(c) == "test" for c in drawn) / len(drawn) < 0.14
    with pytest.raises(ValueError, match="split: expected 'train' or 'test', got 'val'"):
        toyworld.sample_scene(random.Random(0), "val")
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        toyworld.sample_edit(random.Random(0), "valid")


def test_scene_options():
    """max_shapes and background narrow the scenes drawn (the training curriculum's world)."""
    scenes = [toyworld.sample_scene(random.Random(seed), "test", max_shapes=1, background=("white",)) for seed in range(40)]
    assert {len(s.shapes) for s in scenes} == {1} and {s.background for s in scenes} == {("white",)}
    assert all(toyworld.split_of(s.caption()) == "test" for s in scenes)
    assert {len(toyworld.draw_scene(random.Random(seed)).shapes) for seed in range(40)} == {1, 2}
    with pytest.raises(ValueError, match="max_shapes: expected 1 or 2, got 3"):
        toyworld.draw_scene(random.Random(0), max_shapes=3)
    with pytest.raises(ValueError, match="background: expected one or two of"):
        toyworld.sample_scene(random.Random(0), background=("teal",))


def test_caption_grammar():
    red = Shape("circle", "red", "big", 0, 0)
    blue = Shape("star", "blue", "small", 1, 2)
    assert Scene((red,), ("white",)).caption() == "a big red circle at the top left on a white background"
    assert Scene((red, blue), ("gray", "black")).caption() == \
        "a big red circle at the top left and a small blue star on the right on a gray and black background"
    places = {(r, c): Shape("square", "green", "small", r, c).place for r in range(3) for c in range(3)}
    assert places == {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
                      (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
                      (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
    assert Shape("square", "green", "small", 1, 1).destination == "to the center"
    assert Shape("square", "green", "small", 2, 0).destination == "to the bottom left"
    shape = r"a (small|big) (\w+) (circle|square|triangle|star) (at the (top|bottom)( (left|right))?|on the (left|right)|in the center)"
    caption = re.compile(rf"{shape}( and {shape})? on a \w+( and \w+)? background")
    for scene in scenes("train", range(100)) + scenes("test", range(30)):
        assert caption.fullmatch(scene.caption()), scene.caption()
        assert len(scene.colors()) == len(scene.shapes) + len(scene.background)  # every color differs


def test_instruction_grammar():
    name = r"the( \w+)? (circle|square|triangle|star)"
    new = r"a (small|big) \w+ \w+ .+"
    where = r"(at the .+|on the (left|right)|in the center|to the .+)"
    patterns = {
        "recolor": rf"(make|turn|paint) {name} \w+|change the color of {name} to \w+",
        "background": r"(make|turn|paint) the background \w+|change the background to \w+",
        "reshape": rf"(turn|change) {name} (into|to) a \w+|make {name} a \w+|replace {name} with a \w+",
        "move": rf"(move|put|shift|place) {name} {where}",
        "remove": rf"(remove|delete|take away|get rid of) {name}",
        "add": rf"(add|put|draw|place) {new}",
    }
    seen = set()
    for edit in edits("train", range(200)) + edits("test", range(30)):
        seen.add(edit.kind)
        assert re.fullmatch(patterns[edit.kind], edit.instruction), (edit.kind, edit.instruction)
        assert edit.target != edit.source
    assert seen == set(toyworld.EDIT_KINDS)
    sample = toyworld.sample_edit(random.Random(0))
    assert sample.instruction and sample.kind in toyworld.EDIT_KINDS


def test_judge_reads_every_rendered_scene():
    for scene in scenes("train", SEEDS) + scenes("test", range(50)):
        reading = toyworld.judge(scene.render(), scene)
        assert reading.ok, (scene.caption(), reading.summary())
        assert reading.summary().startswith("OK: ")


def test_judge_reads_every_edit_target_and_fails_the_unedited_source():
    for edit in edits("train", range(100)) + edits("test", range(40)):
        done = toyworld.judge_edit(edit.target.render(), edit)
        assert done.success and not done.leftovers, (edit.instruction, done.reading.summary())
        assert done.preservation == math.inf  # nothing outside the edited region moved
        undone = toyworld.judge_edit(edit.source.render(), edit)
        assert not undone.success, (edit.kind, edit.instruction, undone.reading.summary())


def test_judge_catches_each_wrong_attribute():
    shape = Shape("triangle", "red", "big", 0, 2)
    scene = Scene((shape, Shape("circle", "blue", "small", 2, 0)), ("white",))
    assert toyworld.judge(scene.render(), scene).ok

    def read(**changes):
        wrong = Scene((dataclasses.replace(shape, **changes), scene.shapes[1]), scene.background)
        reading = toyworld.judge(wrong.render(), scene)
        assert not reading.ok and reading.summary().startswith("WRONG: ")
        assert reading.shapes[1].ok and reading.background_ok  # the rest still reads right
        return reading.shapes[0]

    recolored = read(color="green")
    assert recolored.color == "green" and not recolored.color_ok and recolored.kind is None  # no red blob at all
    for kind in ("circle", "square", "star"):
        reshaped = read(kind=kind)
        assert reshaped.kind == kind and reshaped.color_ok and reshaped.position_ok and not reshaped.kind_ok
    moved = read(row=1, col=1)
    assert moved.cell == (1, 1) and not moved.position_ok and moved.kind_ok and moved.color == "white"

    for background in [("pink",), ("white", "black")]:
        reading = toyworld.judge(Scene(scene.shapes, background).render(), scene)
        assert reading.background == background and not reading.background_ok and all(s.ok for s in reading.shapes)
    assert toyworld.judge(Scene(scene.shapes, ("black", "white")).render(), Scene(scene.shapes, ("black", "white"))).ok


def test_judge_edit_leftovers():
    red, blue = Shape("circle", "red", "big", 0, 0), Shape("square", "blue", "big", 2, 2)
    source = Scene((red, blue), ("gray",))
    remove = toyworld.Edit(source, "remove the red circle", Scene((blue,), ("gray",)), "remove", (red,))
    assert toyworld.judge_edit(source.render(), remove).leftovers == ("red",)
    assert toyworld.judge_edit(remove.target.render(), remove).leftovers == ()
    # recolored, but the old color still drawn beside the new one: a leftover, not a success
    green = dataclasses.replace(red, color="green")
    recolor = toyworld.Edit(source, "make the circle green", Scene((green, blue), ("gray",)), "recolor", (red, green))
    both = Scene((green, blue, dataclasses.replace(red, row=1, col=1)), ("gray",))
    reading = toyworld.judge_edit(both.render(), recolor)
    assert reading.reading.ok and reading.leftovers == ("red",) and not reading.success
    assert reading.preservation < math.inf  # the stray circle lies outside the edited region
    # removed, but another shape drawn in its place: not a success either
    swapped = Scene((blue, dataclasses.replace(red, color="yellow", kind="star")), ("gray",))
    reading = toyworld.judge_edit(swapped.render(), remove)
    assert reading.reading.ok and reading.leftovers == ("yellow",) and not reading.success


def test_psnr():
    a = np.zeros((toyworld.SIZE, toyworld.SIZE, 3), np.uint8)
    b = a + 10
    assert toyworld.psnr(a, a) == math.inf
    assert toyworld.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    where = np.zeros((toyworld.SIZE, toyworld.SIZE), bool)
    where[:8] = True
    c = a.copy()
    c[8:] = 200  # outside `where`: ignored
    assert toyworld.psnr(Image.fromarray(a), Image.fromarray(c), where) == math.inf
    c[:8] = 10
    assert toyworld.psnr(a, c, where) == pytest.approx(toyworld.psnr(a, b))


def test_bad_image_size():
    scene = scenes(seeds=[0])[0]
    with pytest.raises(ValueError, match=r"image: expected a 128x128 RGB image, got an array of shape \(64, 64, 3\)"):
        toyworld.judge(Image.new("RGB", (64, 64)), scene)
    with pytest.raises(ValueError, match=r"image: expected a 128x128 RGB image"):
        toyworld.psnr(np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.uint8))
    assert toyworld.judge(scene.render().convert("RGBA"), scene).ok  # any PIL mode is converted


def test_vocabulary_covers_every_caption_and_instruction():
    vocabulary = set(toyworld.vocabulary())
    assert toyworld.vocabulary() == sorted(vocabulary)
    texts = [s.caption() for s in scenes("train") + scenes("test", range(50))]
    texts += [t for e in edits("train") + edits("test", range(50)) for t in (e.instruction, e.target.caption())]
    used = {w for text in texts for w in text.split()}
    assert used <= vocabulary, used - vocabulary


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastdiff.models.text_encoder import write_clip_tokenizer

    size = write_clip_tokenizer(tmp_path, toyworld.vocabulary())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tokenizer) == size
    for word in toyworld.vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    caption = scenes(seeds=[1])[0].caption()
    ids = tokenizer(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # BOS, one per word, EOS
    assert len(tokenizer.tokenize("a zebra")) > 2  # other words still tokenize, character by character
