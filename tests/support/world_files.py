"""Scenes of the embedded model's world written as image files, for the collection jobs (caption, index, search)."""

import os

from blip2.catalogue import EMBEDDED_MODELS, GENERATION, RETRIEVAL
from blip2.train import world

GEN, ITM = str(EMBEDDED_MODELS[GENERATION]), str(EMBEDDED_MODELS[RETRIEVAL])


def write_scenes(directory, n, seed=20, size=96):
    """Render n test-split scenes to directory/sNNN.png (every third one in a sub-folder) -> (paths, scenes)."""
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    scenes = world.make_split("test", n, seed=seed)
    paths = []
    for i, s in enumerate(scenes):
        path = os.path.join(directory, "sub" if i % 3 == 0 else "", f"s{i:03d}.png")
        s.render(size).save(path)
        paths.append(os.path.abspath(path))
    return paths, scenes
