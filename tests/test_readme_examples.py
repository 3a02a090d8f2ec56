"""The README's quick-start captions and instructions, run on the shipped default model with the
README's seeds and read back by the toy world's judge: what a newcomer types first must come out
right (issue 17). The expected scenes are written out here; each must caption to the README's exact
words, so a changed README example fails until it is listed (and drawn correctly)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastdiff
from fastdiff import toyworld
from fastdiff.toyworld import Edit, Scene, Shape

README = Path(__file__).resolve().parent.parent / "README.md"


def _shape(kind, color, size, row, col):
    return Shape(kind=kind, color=color, size=size, row=row, col=col)


RED_CIRCLE = _shape("circle", "red", "big", 0, 0)
YELLOW_CIRCLE = _shape("circle", "yellow", "big", 2, 2)
SCENES = {  # caption -> the scene it names
    "a big red circle at the top left on a white background": Scene((RED_CIRCLE,), ("white",)),
    "a big yellow circle at the bottom right on a black background": Scene((YELLOW_CIRCLE,), ("black",)),
}
EDITS = {  # (caption, instruction) -> (edit kind, target scene, shapes changed)
    ("a big red circle at the top left on a white background", "make the background pink"):
        ("background", Scene((RED_CIRCLE,), ("pink",)), ()),
    ("a big yellow circle at the bottom right on a black background", "remove the circle"):
        ("remove", Scene((), ("black",)), (YELLOW_CIRCLE,)),
}


def quick_start() -> list[tuple[str, int, str, int]]:
    """(caption, seed, instruction, seed) of each quick-start example: the Python block's
    fastdiff.generate/edit pair and the shell block's `fastdiff generate` / `fastdiff edit` pair
    (the CLI's --seed defaults to 0)."""
    section = README.read_text().split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    python = re.search(r'fastdiff\.generate\("([^"]+)", seed=(\d+)\).*\n.*fastdiff\.edit\(image, "([^"]+)", seed=(\d+)\)', section)
    shell = re.search(r'fastdiff generate "([^"]+)" -o (\S+) --seed (\d+)\nfastdiff edit \2 "([^"]+)" -o \S+( --seed (\d+))?', section)
    assert python and shell, "the README's quick start no longer has its generate/edit pairs in the expected form"
    return [(python[1], int(python[2]), python[3], int(python[4])),
            (shell[1], int(shell[3]), shell[4], int(shell[6] or 0))]


def test_examples_are_listed_with_their_scenes():
    for caption, _, instruction, _ in quick_start():
        assert caption in SCENES and (caption, instruction) in EDITS, f"README example not listed here: {caption!r} / {instruction!r}"
    for caption, scene in SCENES.items():
        assert scene.caption() == caption
    for (caption, _), (kind, target, _) in EDITS.items():
        assert kind in toyworld.EDIT_KINDS and target != SCENES[caption]


@pytest.mark.parametrize("example", range(2), ids=["python", "shell"])
def test_default_model_draws_the_readme_examples(example, monkeypatch):
    monkeypatch.delenv("FASTDIFF_MODEL", raising=False)
    caption, seed, instruction, edit_seed = quick_start()[example]
    image = fastdiff.generate(caption, seed=seed, progress=False)[0]
    reading = toyworld.judge(image, SCENES[caption])
    assert reading.ok, f"{caption!r} (seed {seed}) drawn as: {reading.summary()}"
    kind, target, changed = EDITS[(caption, instruction)]
    edit = Edit(SCENES[caption], instruction, target, kind, changed)
    edited = fastdiff.edit(image, instruction, seed=edit_seed, progress=False)
    verdict = toyworld.judge_edit(edited, edit, source_image=image)
    assert verdict.success, (f"{instruction!r} on {caption!r} (seed {edit_seed}): {verdict.reading.summary()}, "
                             f"leftover colours {verdict.leftovers}")
