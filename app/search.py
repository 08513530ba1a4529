"""Search tab: rank a gallery of images for a text.

Every image is scored by ITC (its embeddings cached by content hash, so a repeated query over the same
gallery only embeds the text), then the top-k are re-ranked by ITM log-odds + ITC cosine (as LAVIS does).
"""

from __future__ import annotations

import os

import gradio as gr

from . import examples
from .common import model_event, progress_callback, session_models, user_errors
from .registry import RETRIEVAL
from .render import SEARCH_COLUMNS, ranked_results
from .service import Service

GALLERY = "the gallery"
INDEX_HITS = 24  # results shown from a prebuilt index


def in_index(collection):
    return f"the index ({len(collection)} images)"


def _name(checked, i):
    src = checked.source
    if isinstance(src, str):
        return os.path.basename(src)
    return f"image {i}"


class SearchTab:
    """The Search tab's handler over `service` (Gradio reads its signature for the API)."""

    def __init__(self, service: Service):
        self.service = service

    @user_errors
    def search(self, gallery, query, rerank_k=None, session=None, where=GALLERY,
               progress=gr.Progress(track_tqdm=True)):
        """Rank gallery images for a text, or search the prebuilt index (python app.py --index; `where`).
        Returns (ranked gallery [(image, caption)], table, notice)."""
        svc = self.service
        if svc.collection is not None and where != GALLERY:
            shown, notice = svc.search_index(query, INDEX_HITS, rerank_k)
            items, table = ranked_results([(thumb, os.path.basename(h.path), h.itc, h.itm, h.caption)
                                           for thumb, h in shown])
            return items, table, notice
        key = session_models(svc, session)[RETRIEVAL]
        result = svc.search(key, gallery, query, rerank_k, progress=progress_callback(progress))
        shown = [(img.source if isinstance(img.source, str) else img.image, _name(img, rank), itc, itm)
                 for rank, (img, itc, itm) in enumerate(result.hits, 1)]
        items, table = ranked_results(shown)
        n = len(result.hits)
        notice = f"Ranked {n} image{'s' if n != 1 else ''}."
        if result.skipped:
            notice += " Skipped: " + "; ".join(reason for _, reason in result.skipped[:5])
        return items, table, f"{notice} {result.notice}".strip()


def example_gallery():
    return examples.gallery()


def build(tab: SearchTab, session: gr.State):
    limits = tab.service.limits
    collection = tab.service.collection
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            where = None if collection is None else gr.Radio(
                [in_index(collection), GALLERY], value=in_index(collection), label="Search in", elem_id="search-where",
                info="the prebuilt index of the server's images (python app.py --index), or a gallery you upload")
            gallery = gr.Gallery(label=f"Images to search (upload up to {limits.max_gallery})", columns=4,
                                 height=300, interactive=True, type="filepath", elem_id="search-gallery",
                                 object_fit="cover", file_types=["image"], visible=where is None)
            load = gr.Button("Use the example images", size="sm", elem_id="search-examples", visible=where is None)
            query = gr.Textbox(label="Search for", placeholder="e.g. a large purple square in the top left",
                               max_length=limits.max_prompt_chars, elem_id="search-query")
            rerank = gr.Slider(0, 20, value=limits.search_rerank_k, step=1, label="Re-rank the top-k by ITM",
                               info="0 = rank by ITC alone")
            run = gr.Button("Search", variant="primary", elem_id="search-run")
        with gr.Column(scale=1):
            results = gr.Gallery(label="Results, best first", columns=2, height=420, interactive=False,
                                 elem_id="search-results", object_fit="contain")
            notice = gr.Markdown(elem_id="search-notice", label="Notice")
            ranking = gr.Dataframe(headers=SEARCH_COLUMNS, label="Scores", interactive=False, elem_id="search-table",
                                   column_widths=["64px", "40%", "120px", "100px"], wrap=True,
                                   max_height=260)
            scenes, photos = examples.search_queries()
            gr.Examples(scenes, inputs=[query], label="Example queries: " + examples.SCENES_LABEL, examples_per_page=3)
            gr.Examples(photos, inputs=[query], label="Example queries for photographs (a real checkpoint)",
                        examples_per_page=3)
    load.click(example_gallery, None, gallery, api_visibility="private", queue=False)
    if where is not None:  # the upload area only when the gallery is searched
        where.change(lambda w: [gr.update(visible=w == GALLERY)] * 2, where, [gallery, load],
                     api_visibility="private", queue=False)
    inputs = [gallery, query, rerank, session] + ([where] if where is not None else [])
    model_event(limits, [run.click, query.submit], tab.search, inputs, [results, ranking, notice],
                api_name="search", notice=notice, session=session,
                api_description="Rank gallery images for a text: ITC over all, ITM re-ranking of the top-k.")
    return gallery
