"""Image-text matching tab: one image against candidate texts (one per line).

For each text: the ITM head's match probability and the ITC cosine similarity (best of the query
embeddings), ranked by ITM log-odds + ITC cosine (LAVIS' retrieval score), as a table and bar charts; plus a
heat map of where the Q-Former looks for a chosen text (Grad-CAM of the match scores over the queries'
cross-attention maps).
"""

from __future__ import annotations

import gradio as gr

from . import examples
from .common import model_event, progress_callback, session_models, user_errors
from .registry import RETRIEVAL
from .render import MATCH_COLUMNS, match_chart, match_table
from .service import Service


class MatchingTab:
    """The Matching tab's handlers over `service` (Gradio reads their signatures for the API)."""

    def __init__(self, service: Service):
        self.service = service

    @user_errors
    def match(self, image, texts, session=None, progress=gr.Progress(track_tqdm=True)):
        """Rank candidate texts for an image. Returns (table, ITM chart data, ITC chart data, heat map of the best
        text, notice)."""
        svc = self.service
        key = session_models(svc, session)[RETRIEVAL]
        result = svc.match(key, image, texts, heatmap=True, progress=progress_callback(progress))
        best = result.rows[0]
        notice = (f"Best match: **{best.text}** (ITM {best.itm:.3f}). Heat map: {result.method} for the best match; "
                  "pick another text below to see where the model looks for it.")
        data = match_chart(result.rows)
        return match_table(result.rows), data, data, result.heatmap, f"{notice} {result.notice}".strip()

    @user_errors
    def heatmap(self, image, text, session=None, progress=gr.Progress(track_tqdm=True)):
        """Heat map over the image of where the Q-Former looks for `text`. Returns (image, notice)."""
        svc = self.service
        key = session_models(svc, session)[RETRIEVAL]
        heat, _, method, caveat = svc.heatmap(key, image, text, progress=progress_callback(progress))
        return heat, f"Heat map ({method}) for: **{text}** {caveat}".strip()


def heatmap_choices(ranking):
    """The ranked texts of the table, for the heat-map picker."""
    texts = [] if ranking is None or len(ranking) == 0 else [str(t) for t in ranking["text"].tolist()]
    return gr.update(choices=texts, value=texts[0] if texts else None)


def build(tab: MatchingTab, session: gr.State):
    limits = tab.service.limits
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            image = gr.Image(type="filepath", label="Image", height=300, sources=["upload", "clipboard"],
                             elem_id="match-image")
            texts = gr.Textbox(label=f"Candidate texts, one per line (at most {limits.max_candidates})", lines=5,
                               max_lines=12, elem_id="match-texts",
                               placeholder="a small red circle in the center\na large blue square on the left")
            run = gr.Button("Match", variant="primary", elem_id="match-run")
            scenes, photos = examples.matching_examples()
            gr.Examples(scenes, inputs=[image, texts], label=examples.SCENES_LABEL + ": the true caption among "
                        "near misses", examples_per_page=4)
            gr.Examples(photos, inputs=[image, texts], label=examples.PHOTOS_LABEL, examples_per_page=4)
        with gr.Column(scale=1):
            ranked = gr.Dataframe(headers=MATCH_COLUMNS, label="Ranking by ITM log-odds + ITC cosine (as LAVIS "
                                  "ranks); the charts below number the texts by this rank (hover a bar for its text)",
                                  interactive=False, wrap=True, elem_id="match-table",
                                  column_widths=["64px", "50%", "120px", "100px"])  # a phone scrolls the table
            with gr.Row(equal_height=False):
                itm_bars = gr.BarPlot(x="ITM probability", y="rank", x_lim=[0, 1], y_title="rank",
                                      x_title="probability",
                                      tooltip=["rank", "text", "ITM probability"], x_axis_format=".1f",
                                      label="ITM probability (0 to 1)", min_width=260,
                                      elem_id="match-chart-itm")
                itc_bars = gr.BarPlot(x="ITC cosine", y="rank", x_lim=[-1, 1], y_title="rank", x_title="cosine",
                                      tooltip=["rank", "text", "ITC cosine"], x_axis_format=".1f",
                                      label="ITC cosine (-1 to 1)", min_width=260,
                                      elem_id="match-chart-itc")
            notice = gr.Markdown(elem_id="match-notice", label="Notice")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=200):
                    which = gr.Dropdown(choices=[], label="Heat map for", elem_id="match-which", interactive=True,
                                        allow_custom_value=True,
                                        info="Where the Q-Former's queries look for this text: Grad-CAM of the "
                                             "ITM and ITC scores over their cross-attention maps.")
                with gr.Column(scale=3, min_width=200):
                    heat = gr.Image(label="Heat map", type="pil", interactive=False, height=260,
                                    elem_id="match-heatmap", format="png")
    event = model_event(limits, run.click, tab.match, [image, texts, session],
                        [ranked, itm_bars, itc_bars, heat, notice], api_name="match", notice=notice, session=session,
                        api_description="Score candidate texts (one per line) against an image with ITM and ITC, "
                                        "ranked; with a heat map for the best match.")
    event.success(heatmap_choices, [ranked], [which], api_visibility="private", queue=False)
    model_event(limits, which.input, tab.heatmap, [image, which, session], [heat, notice], api_name="heatmap",
                notice=notice, session=session,
                api_description="Heat map over the image of where the Q-Former looks for one text.")
    image.change(lambda: (None, None, None, None, "", gr.update(choices=[], value=None)), None,
                 [ranked, itm_bars, itc_bars, heat, notice, which], api_visibility="private", queue=False)
    return image
