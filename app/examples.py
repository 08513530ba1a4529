"""Example inputs for every tab, from assets/examples (photographs + scenes of the embedded model's world)."""

from __future__ import annotations

import json
from functools import lru_cache

from .paths import EXAMPLES_DIR

PHOTOS = {  # file -> (caption prompt, chat question, matching candidates)
    "chelsea_cat.jpg": ("a photo of", "what animal is this?",
                        ["a cat lying on a rug", "a dog running on a beach", "a cup of coffee", "a rocket launch"]),
    "astronaut.jpg": ("", "what is the person wearing?",
                      ["an astronaut in a spacesuit", "a cat sleeping", "a bowl of soup", "a rocket on a launch pad"]),
    "coffee.jpg": ("a photo of", "what is in the cup?",
                   ["a cup of coffee on a saucer", "a woman in a spacesuit", "a tabby cat", "a rocket launch"]),
    "rocket.jpg": ("", "what is happening in this picture?",
                   ["a rocket launching into the sky", "a cup of coffee", "a cat", "an astronaut smiling"]),
}


def path(name):
    return str(EXAMPLES_DIR / name)


@lru_cache(maxsize=1)
def scenes():
    try:
        with open(EXAMPLES_DIR / "scenes.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def caption_examples():
    """(scenes, photographs): [image, prompt] rows."""
    photos = [[path(name), prompt] for name, (prompt, _, _) in PHOTOS.items()]
    return [[path(s["file"]), ""] for s in scenes()[:4]], photos


def chat_examples():
    """(scenes, photographs): [image, question] rows."""
    rows = []
    for s in scenes()[:4]:
        qs = s["questions"]
        pick = next((q for q in qs if q["question"].startswith("what color")), qs[0])
        rows.append([path(s["file"]), pick["question"]])
    return rows, [[path(name), question] for name, (_, question, _) in PHOTOS.items()]


def matching_examples():
    """(scenes, photographs): [image, candidate texts] rows; each scene's true caption among near misses."""
    rows = [[path(s["file"]), "\n".join([s["negatives"][0], s["caption"], *s["negatives"][1:]])] for s in scenes()[:4]]
    return rows, [[path(name), "\n".join(texts)] for name, (_, _, texts) in list(PHOTOS.items())[:2]]


def gallery():
    """Every example image: the default gallery of the Search tab (the world's scenes first)."""
    return [path(s["file"]) for s in scenes()] + [path(name) for name in PHOTOS]


def search_queries():
    """(scene captions, photo queries)."""
    return [[s["caption"]] for s in scenes()[:3]], [["a cat"], ["a rocket launch"], ["a cup of coffee"]]


SCENES_LABEL = "Scenes of the embedded model's world (what blip2-tiny knows)"
PHOTOS_LABEL = "Photographs: for a real checkpoint (pick one above); the embedded model knows only shapes"
