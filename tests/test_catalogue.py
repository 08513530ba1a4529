"""blip2.catalogue is the one list of known checkpoints: the app's picker and the Space's README read it."""

import os
import re

from app.registry import KNOWN_CHECKPOINTS
from blip2.catalogue import CHECKPOINTS, GENERATION, RETRIEVAL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_space_card_and_the_picker_list_the_catalogue():
    with open(os.path.join(ROOT, "README.md")) as f:
        front = f.read().split("---")[1]  # the Space's YAML card
    models = re.findall(r"^  - (\S+)$", front.split("models:")[1], flags=re.M)
    assert models == [k.repo_id for k in CHECKPOINTS]
    expected = [(k.repo_id, (k.task,), k.note) for k in CHECKPOINTS]
    assert [(c.key, c.roles, c.note) for c in KNOWN_CHECKPOINTS] == expected


def test_every_entry_names_a_task():
    assert {k.task for k in CHECKPOINTS} == {GENERATION, RETRIEVAL}
    assert all(k.repo_id.startswith("Salesforce/blip2-") and k.note for k in CHECKPOINTS)
    assert all(("itm" in k.repo_id) == (k.task == RETRIEVAL) for k in CHECKPOINTS)
