"""Rebuild the example images: `python assets/examples/make_examples.py` (from the repository root).

* Photographs: public-domain / CC0 pictures shipped inside the scikit-image wheel (see README.md here),
  downsized to at most 480 px and saved as JPEG.
* Scenes: renders of the procedural world the embedded model was trained on (blip2/train/world.py), with
  their true caption and a few questions written to scenes.json for the UI's examples and the tests.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

PHOTOS = {"astronaut.jpg": "astronaut.png", "coffee.jpg": "coffee.png", "chelsea_cat.jpg": "chelsea.png",
          "rocket.jpg": "rocket.jpg"}
# (split, seed, index) of the scenes, picked for variety: one, two and three objects, every background kind
SCENES = [("test", 7, 2), ("test", 7, 1), ("test", 7, 8), ("test", 7, 0), ("test", 7, 10), ("test", 7, 6)]
SCENE_SIZE = 224


def photos():
    import skimage
    from PIL import Image

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    for name, src in PHOTOS.items():
        im = Image.open(os.path.join(data, src)).convert("RGB")
        im.thumbnail((480, 480), Image.LANCZOS)
        im.save(os.path.join(HERE, name), quality=85, optimize=True)


def scenes():
    import random

    from blip2.train.world import hard_negative_caption, make_split

    meta = []
    for i, (split, seed, index) in enumerate(SCENES, 1):
        scene = make_split(split, index + 1, seed=seed)[index]
        name = f"scene_{i}.png"
        scene.render(SCENE_SIZE).save(os.path.join(HERE, name), optimize=True)
        qas = scene.questions()
        kinds = {}
        for qa in qas:  # one question of each kind, in a fixed order
            kinds.setdefault(qa.kind, qa)
        rng, negatives = random.Random(f"negatives/{i}"), []
        while len(negatives) < 3:
            n = hard_negative_caption(scene, rng)
            if n not in negatives and n != scene.caption():
                negatives.append(n)
        meta.append({"file": name, "caption": scene.caption(), "negatives": negatives,
                     "questions": [{"question": qa.question, "answer": qa.answer}
                                   for qa in kinds.values()]})
    with open(os.path.join(HERE, "scenes.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    photos()
    scenes()
