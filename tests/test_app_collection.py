"""python app.py --index INDEX_DIR: the Search tab searches a prebuilt index (thumbnails, ITC + ITM scores) beside
its upload-a-gallery mode."""

import os

import app_support as S
import gradio as gr
import pytest
from PIL import Image
from world_files import ITM, write_scenes

from app import search
from app.collection import Collection
from app.render import NOT_RERANKED
from blip2.bulk import load_runner
from blip2.index import index_job


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, svc):
    d = tmp_path_factory.mktemp("library")
    paths, scenes = write_scenes(d, 30, size=160)
    out = str(d / "index")
    index_job(load_runner(None, ITM), [d], out, ITM, captions=False, progress=False)
    svc.collection = Collection(svc.registry, out)  # as Service(index=out) builds it (test_app_flag: app.py)
    yield svc.collection, paths, scenes
    svc.collection = None  # the other app tests see the app without an index


def test_search_tab_searches_the_index(indexed):
    collection, paths, scenes = indexed
    assert collection.key == "blip2-tiny (embedded)"  # the index's model is the embedded one: no second copy
    where = search.in_index(collection)
    right = 0
    for i in (0, 7, 19):
        items, table, notice = S.app().search.search(None, scenes[i].caption(), 3, None, where)
        right += table["image"][0] == os.path.basename(paths[i])
        thumb, label = items[0]
        assert isinstance(thumb, Image.Image) and max(thumb.size) <= 256 and "ITM" in label
        assert len(items) == 24 and (table["ITM probability"] != NOT_RERANKED).sum() == 3
        assert "index of 30 images" in notice
    assert right == 3  # measured: 3 of 3 (the search tests in blip2 measure the rate over 200 scenes)
    uploads = [S.write(paths[0], f"s{i}.png", open(paths[i], "rb").read()) for i in (0, 1)]
    items, table, notice = S.app().search.search(uploads, scenes[1].caption(), 1, None, search.GALLERY)
    assert items[0][0] == uploads[1] and notice == "Ranked 2 images."  # the gallery mode as before
    with pytest.raises(gr.Error, match="not uploaded"):  # and it still reads uploads only, not the index's files
        S.app().search.search(paths[:2], scenes[1].caption(), 1, None, search.GALLERY)
    with pytest.raises(gr.Error, match="search text"):
        S.app().search.search(None, "   ", 3, None, where)
    with pytest.raises(gr.Error, match="Re-rank top-k must be between 0 and 100"):
        S.app().search.search(None, "a red circle", 1000, None, where)


def test_the_tab_offers_both_modes(indexed, svc):
    from app.ui import build_demo

    demo = build_demo(svc)
    radios = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "search-where"]
    assert len(radios) == 1 and radios[0].value == search.in_index(indexed[0])


def test_app_flag():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("app_main", os.path.join(root, "app.py"))
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    assert main.parse_args(["--index", "lib.index"]).index == "lib.index"
