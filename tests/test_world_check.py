"""blip2.world_check: the rule that tells the embedded model's world scenes from photographs (its report:
blip2.train.world_check, figures in the README)."""

import pytest
from PIL import Image, ImageDraw

from blip2.train.world import make_split
from blip2.train.world_check import SKIMAGE_PHOTOS, example_images, jpeg, skimage_images
from blip2.world_check import RGB, THRESHOLD, in_world, world_likeness

# seed 1: not the sample the threshold was chosen on (seed 0)
SCENES = make_split("test", 200, seed=1)


@pytest.fixture(scope="module")
def photos():
    return {**skimage_images(SKIMAGE_PHOTOS), **example_images("*.jpg")}


def test_world_scenes_are_in_world():
    # Measured: 0 of 1000 test-split scenes flagged at 224/512 px, PNG and JPEG q85 (lowest score 0.94 against
    # the threshold 0.9). The bound is 2%: at most 4 of 230 may be flagged.
    renders = [s.render(224) for s in SCENES] + [jpeg(s.render(512)) for s in SCENES[:30]]
    flagged = [i for i, im in enumerate(renders) if not in_world(im)]
    assert len(flagged) <= 0.02 * len(renders), flagged


def test_example_scenes_are_in_world():
    scenes = example_images("scene_*.png")
    assert len(scenes) == 6
    assert all(in_world(im) for im in scenes.values())


def test_every_photo_is_flagged(photos):
    assert len(photos) == len(SKIMAGE_PHOTOS) - 2 + 2 + 200 + 4  # motorcycle: 2 views, lfw: 200 faces, 4 examples
    scores = {name: world_likeness(im) for name, im in photos.items()}
    assert all(0 <= s < THRESHOLD for s in scores.values()), {k: s for k, s in scores.items() if s >= THRESHOLD}


def test_greyscale_images_score_zero():
    # the world is always in colour; a grey copy of a scene is outside it (colour answers would be guesses)
    scene = SCENES[0].render(224)
    assert in_world(scene)
    assert world_likeness(scene.convert("L")) == 0
    assert world_likeness(jpeg(scene.convert("L").convert("RGB"))) == 0


def test_a_shape_drawn_on_a_photo_is_still_flagged(photos):
    photo = photos["chelsea"].copy()
    w, h = photo.size
    ImageDraw.Draw(photo).ellipse((w * 0.3, h * 0.2, w * 0.7, h * 0.8), fill=RGB["red"])
    assert not in_world(photo)  # measured 0.40: the flat red disc counts, the cat around it does not


def test_a_scene_pasted_into_a_photo_counts_by_its_area(photos):
    # the score is the fraction of the image that looks like the world: a scene filling a quarter of a photo is
    # flagged (measured 0.44); one filling all but a 4 px photo border (96% of the area) is in-world (0.93)
    photo = photos["chelsea"].resize((448, 448))
    scene = SCENES[0].render(448)
    quarter = photo.copy()
    quarter.paste(scene.resize((224, 224)), (112, 112))
    assert not in_world(quarter)
    framed = photo.copy()
    framed.paste(scene.resize((440, 440)), (4, 4))
    assert in_world(framed)


def test_modes_and_bad_input():
    scene = SCENES[1].render(224)
    assert world_likeness(scene.convert("RGBA")) == world_likeness(scene)
    assert 0 <= world_likeness(Image.new("RGB", (3, 700), (120, 130, 140))) <= 1
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        world_likeness("scene.png")
