"""The Gradio app: the CLIP teacher and the shipped student side by side, for deciding whether
the small model is good enough to ship.

`build_app(run, artifact)` builds the Blocks (tests launch it on a free port); `launch(app, ...)`
starts it with dgkit's queue and bind settings. The work itself lives in `dgkit.demo.models`.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # an edge box may have no internet

import gradio as gr  # noqa: E402

from dgkit.demo.models import (  # noqa: E402
    ARTIFACT_TITLES,
    SOURCES,
    Demo,
    ImageResult,
    RunInfo,
    TopK,
    human_count,
    summarize,
)
from dgkit.errors import DgkitError  # noqa: E402
from dgkit.rundir import RunDir, resolve_run  # noqa: E402
from dgkit.text_table import human_bytes  # noqa: E402

log = logging.getLogger("dgkit.demo")

MAX_IMAGES = 12  # per submission: the queue stays responsive for everyone else
CONCURRENCY = 2  # classifications running at once; the rest wait in the queue
QUEUE_SIZE = 32
MAX_FILE_SIZE = "25mb"
TITLE = "dgkit · teacher vs. student"

CSS = """
.gradio-container { max-width: 1280px !important; margin: 0 auto !important; }
#dg-title h1 { margin-bottom: 0; }
#dg-title p { margin-top: 4px; color: var(--body-text-color-subdued); }
.dg-banner { border-radius: 8px; padding: 10px 14px; margin: 4px 0; font-size: 0.95em; }
.dg-banner.warn { background: #fff7e6; border: 1px solid #f5c26b; color: #6b4500; }
.dg-banner.info { background: #eef5ff; border: 1px solid #9cc0f5; color: #123d73; }
.dg-card table, .dg-acc table { font-size: 0.9em; width: 100%; }
.dg-card th, .dg-card td, .dg-acc th, .dg-acc td { padding: 4px 8px !important; }
.dg-card td:first-child { white-space: nowrap; }
.dg-note { font-size: 0.82em; color: var(--body-text-color-subdued); }
.dg-result { border: 1px solid var(--border-color-primary); border-radius: 10px;
             padding: 6px; margin-bottom: 10px; }
.dg-head { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; padding: 4px 6px; }
.dg-name { font-weight: 600; }
.dg-pill { border-radius: 999px; padding: 2px 10px; font-size: 0.85em; white-space: nowrap; }
.dg-pill.agree { background: #e3f6e8; color: #125b28; }
.dg-pill.disagree { background: #fdecea; color: #8a1c12; }
.dg-pill.truth { background: #eef1f5; color: #333; }
.dg-pill.unseen { background: #f1e9ff; color: #4b2a86; }
.dg-pill.error { background: #fdecea; color: #8a1c12; }
.dg-absent { padding: 14px; color: var(--body-text-color-subdued); font-size: 0.92em; }
#dg-status { min-height: 1.5em; }
#dg-examples .caption-label { font-size: 0.78em; }
#dg-examples .grid-wrap { max-height: none !important; height: auto !important;
                          overflow: visible !important; }
.dg-panel-head { display: flex; justify-content: space-between; align-items: baseline;
                 gap: 6px; padding: 2px 4px 4px; min-height: 2.8em; }
.dg-sub { color: var(--body-text-color-subdued); font-size: 0.88em; }
.dg-ms { font-variant-numeric: tabular-nums; font-weight: 600; white-space: nowrap;
         background: #eef5ff; color: #123d73; border-radius: 6px; padding: 1px 8px; }
"""


# ------------------------------------------------------------------ header pieces
def _esc(text: Any) -> str:
    return html.escape(str(text))


def header_html(demo: Demo) -> str:
    info = demo.info
    unseen = ", ".join(info.targets) or "none"
    lines = [f"<h1>{TITLE}</h1>",
             f"<p>Run <code>{_esc(info.name)}</code> · method <b>{_esc(info.method)}</b> · "
             f"student <b>{_esc(info.student_arch)}</b> · unseen target domain "
             f"<b>{_esc(unseen)}</b> (never seen in training)</p>"]
    return "\n".join(lines)


def banners_html(demo: Demo, student_note: str) -> str:
    out = []
    if demo.info.plumbing_check:
        out.append('<div class="dg-banner warn"><b>Plumbing check.</b> This run was distilled '
                   "from a randomly initialised CLIP (no published weights), so the teacher "
                   "column and all accuracies only show that the pipeline runs; they say nothing "
                   "about the method.</div>")
    if not demo.teacher.available:
        out.append(f'<div class="dg-banner info"><b>Teacher unavailable:</b> '
                   f"{_esc(demo.teacher.reason)}. The student still runs.</div>")
    if student_note:
        out.append(f'<div class="dg-banner warn"><b>Not the shipped model:</b> '
                   f"{_esc(student_note)}.</div>")
    return "\n".join(out)


def teacher_notes(info: RunInfo) -> list[str]:
    """What the teacher's column says of it beside "CLIP": what it is when dgkit trained it,
    whether its zero-shot accuracy was at chance, and whether it has no published weights."""
    return [*([info.teacher_about] if info.teacher_about else []),
            *(["at chance"] if info.teacher_at_chance else []),
            *(["plumbing check"] if info.plumbing_check else [])]


def model_card_md(demo: Demo, artifact: str | None) -> str:
    s = demo.student(artifact)
    t = demo.teacher
    file_t = human_bytes(t.file_bytes) if t.file_bytes else "open_clip cache"
    runtime_t = "torch (CPU)" if t.available else "not loaded"
    rows = [
        ("", f"**Teacher** ({', '.join(['CLIP', *teacher_notes(demo.info)])})",
         "**Student**"),
        ("model", _md(t.name), f"{_md(s.arch)} · {s.title}"),
        ("parameters", human_count(t.params), human_count(s.params)),
        ("file", file_t, f"{human_bytes(s.file_bytes)} (`{s.path.name}`)"),
        ("precision", "fp32", s.precision),
        ("runs on", runtime_t, s.backend),
    ]
    ratio = ""
    if t.params and s.params:
        ratio = f"\n\nThe student has **{_times(t.params, s.params)}** parameters"
        if t.file_bytes and s.file_bytes:
            ratio += f" and a **{_times(t.file_bytes, s.file_bytes, 'smaller', 'larger')}** file"
        ratio += " than the teacher."
    return _table(rows) + ratio


def _times(teacher: float, student: float, less: str = "fewer", more: str = "more") -> str:
    return (f"{teacher / student:.1f}× {less}" if teacher >= student
            else f"{student / teacher:.1f}× {more}")


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _pct(value: float | None, bold: bool = False) -> str:
    if value is None:
        return "—"
    return f"**{value:.1f}**" if bold else f"{value:.1f}"


def accuracy_md(demo: Demo) -> str:
    """The at-a-glance table: unseen-domain and source accuracy, size, latency per model."""
    info = demo.info
    notes = "".join(f'<div class="dg-note">{_esc(n)}.</div>' for n in info.notes)
    if not info.rows:
        return "**Reported accuracy**\n\n*No reported accuracies yet.*\n\n" + notes
    targets = [d for d in info.targets if any(d in r.accuracy for r in info.rows)]
    has_report = any(r.latency_ms is not None or r.agreement is not None for r in info.rows)
    head = ["model", "size"] + [f"**{_md(d)}** (unseen)" for d in targets] + [SOURCES]
    if has_report:
        head += ["latency", "agrees w/ FP32", ""]
    rows = [head]
    for r in info.rows:
        cells = [_md(r.model), human_bytes(r.size_bytes) if r.size_bytes else ""]
        cells += [_pct(r.accuracy.get(d), bold=True) for d in targets]
        cells.append(_pct(r.accuracy.get(SOURCES)))
        if has_report:
            cells.append(f"{r.latency_ms:.1f} ms" if r.latency_ms is not None else "")
            cells.append(f"{r.agreement:.1f} %" if r.agreement is not None else "")
            cells.append(_status(r.status))
        rows.append(cells)
    step = f", selected at step {info.best_step} by source validation" if info.best_step else ""
    where = ""
    if info.report_device or info.report_images:
        sets = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in info.report_images.items())
        where = ('<div class="dg-note">export/report.json (dgkit validate): '
                 + (f"measured on {_esc(sets)} images; " if sets else "")
                 + (f"latency batch 1, median, on {_esc(info.report_device)}"
                    if info.report_device else "") + ".</div>")
    explain = ('<div class="dg-note">"source val": the source domains\' validation split '
               "(the teacher: all their images). ✗: more than the allowed drop below torch "
               "FP32 (hover for why).</div>")
    return (f"**Reported accuracy (%)**{step}\n\n" + _table(rows) + "\n\n" + where + explain
            + notes)


def _status(status: str) -> str:
    if not status:
        return ""
    if status == "ok":
        return "✓"
    return f'<span title="{_esc(status)}">{"–" if "not runnable" in status else "✗"}</span>'


def detail_md(demo: Demo) -> str:
    """Every domain, for the teacher and the FP32 student (summary.json)."""
    info = demo.info
    if not info.detail:
        return "*summary.json has no per-domain accuracies.*"
    order = info.targets + [d for d in info.domains if d not in info.targets]
    head = ["model"] + [f"**{_md(d)}** (unseen)" if d in info.targets else _md(d) for d in order]
    rows = [head] + [[_md(r.model)] + [_pct(r.accuracy.get(d), d in info.targets)
                                       for d in order] for r in info.detail]
    return _table(rows)


# ------------------------------------------------------------------ result pieces
def _confidences(top: TopK) -> dict[str, float]:
    return dict(zip(top.labels, top.probs, strict=True))


def result_head_html(r: ImageResult) -> str:
    pills = [f'<span class="dg-name">{_esc(r.name)}</span>']
    if r.truth:
        pills.append(f'<span class="dg-pill truth">true class: {_esc(r.truth[0])}</span>')
        domain = f"{r.truth[1]} · unseen domain" if r.unseen else f"{r.truth[1]} domain"
        cls = "unseen" if r.unseen else "truth"
        pills.append(f'<span class="dg-pill {cls}">{_esc(domain)}</span>')
    if r.error:
        pills.append(f'<span class="dg-pill error">✗ {_esc(r.error)}</span>')
    elif r.agree is True:
        pills.append(f'<span class="dg-pill agree">✓ teacher and student agree: '
                     f"{_esc(r.student.label)}</span>")
    elif r.agree is False:
        pills.append(f'<span class="dg-pill disagree">✗ disagree: teacher says '
                     f"{_esc(r.teacher.label)}, student says {_esc(r.student.label)}</span>")
    return f'<div class="dg-head">{" ".join(pills)}</div>'


def _panel_head(who: str, what: str, top: TopK | None) -> str:
    """The line above a label panel: which model, and its latency on this image."""
    ms = ""
    if top is not None:
        ms = (f'<span class="dg-ms" title="model call; decoding and resizing took '
              f'{top.prep_ms:.1f} ms more">{top.infer_ms:.1f} ms</span>')
    return (f'<div class="dg-panel-head"><span><b>{who}</b> '
            f'<span class="dg-sub">{_esc(what)}</span></span>{ms}</div>')


# ------------------------------------------------------------------ the app
def build_app(run: RunDir | str | Path | None = None, artifact: str | None = None,
              backend: str = "auto", teacher: bool = True) -> gr.Blocks:
    """The demo of one run as gr.Blocks; the models load here, once, before any request."""
    if not isinstance(run, RunDir):
        run = resolve_run(run)
    demo = Demo(run, artifact, backend=backend, teacher=teacher)
    first = demo.student()
    teacher_sub = " · ".join(["CLIP zero-shot", *teacher_notes(demo.info)])

    def student_title(artifact: str | None) -> str:
        s = demo.student(artifact)
        return f"{s.title} · {s.backend}"

    def run_batch(items: list[tuple[str, str]], artifact: str | None):
        """Classify (path, display name) pairs -> (state, json, status)."""
        artifact = artifact or demo.default_artifact
        try:
            demo.student(artifact)
        except Exception as exc:  # DgkitError, or a runtime that cannot start here
            gr.Warning(str(exc))
            return [], {"error": str(exc), "results": []}, f"⚠️ {exc}"
        if not items:
            msg = "Upload one or more images, or pick an example, then press Classify."
            gr.Warning(msg)
            return [], {"error": msg, "results": []}, msg
        extra = len(items) - MAX_IMAGES
        items = items[:MAX_IMAGES]
        results = []
        title = student_title(artifact)
        for path, name in items:
            try:
                result = demo.classify(path, name, artifact)
            except Exception as exc:  # never let one image take the app down
                log.exception("classifying %s failed", name)
                result = ImageResult(name=name, error=f"internal error: {exc}")
            result.student_title = title
            results.append(result)
        status = summarize(results)
        failed = [r for r in results if r.error]
        if failed:
            gr.Warning("; ".join(r.error for r in failed[:3]))
        if extra > 0:
            note = f"Only the first {MAX_IMAGES} images were classified ({extra} more skipped)."
            gr.Warning(note)
            status += " " + note
        payload = {"artifact": artifact, "student": title,
                   "teacher_available": demo.teacher.available,
                   "teacher_reason": demo.teacher.reason or None,
                   "results": [r.to_dict() for r in results]}
        return results, payload, status

    def classify_uploads(files: list[str] | None, artifact: str | None):
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]
        return run_batch([(p, _display_name(p)) for p in paths], artifact)

    def classify_example(artifact: str | None, evt: gr.SelectData):
        ex = demo.examples[evt.index]
        return run_batch([(str(ex.path), ex.path.name)], artifact)

    def classify_all_examples(artifact: str | None):
        return run_batch([(str(e.path), e.path.name) for e in demo.examples], artifact)

    def switch_artifact(artifact: str):
        try:
            demo.student(artifact)
        except Exception as exc:  # DgkitError, or a runtime that cannot start here
            log.warning("cannot load the %s student: %s", artifact, exc)
            gr.Warning(str(exc))
            return gr.update(), f"⚠️ The {ARTIFACT_TITLES[artifact]} student cannot run here: {exc}"
        return model_card_md(demo, artifact), f"Student switched to {ARTIFACT_TITLES[artifact]}."

    with gr.Blocks(title="dgkit demo", analytics_enabled=False) as app:
        gr.HTML(header_html(demo), elem_id="dg-title")
        gr.HTML(banners_html(demo, first.note))
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                card = gr.Markdown(model_card_md(demo, None), elem_classes="dg-card")
            with gr.Column(scale=7, min_width=480):
                gr.Markdown(accuracy_md(demo), elem_classes="dg-acc")
        chart = _open_png(demo.info.report_png)
        more = "More: accuracy on every domain" + (", export report chart" if chart else "")
        with gr.Accordion(more, open=False), gr.Row():
            with gr.Column(scale=5):
                gr.Markdown(detail_md(demo), elem_classes="dg-acc")
            if chart is not None:
                with gr.Column(scale=4):
                    gr.Image(chart, label="export/report.png", interactive=False,
                             buttons=["fullscreen"], format="png")

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                files = gr.File(label="Images (one or several)", file_count="multiple",
                                height=150, elem_id="dg-files")
                with gr.Row():
                    go = gr.Button("Classify", variant="primary", elem_id="dg-classify")
                    clear = gr.Button("Clear", variant="secondary")
                artifact_box = gr.Dropdown(
                    choices=[(f"{ARTIFACT_TITLES[a]}", a) for a in demo.artifacts],
                    value=demo.default_artifact, label="Student model",
                    info="the exported artifact the edge box runs", interactive=True,
                    elem_id="dg-artifact")
                thumbs = [(e, e.thumbnail()) for e in demo.examples]
                demo.examples = [e for e, img in thumbs if img is not None]
                if demo.examples:
                    gr.Markdown("**Examples** from the run's data: click one "
                                "(★ the unseen domain)", elem_classes="dg-examples-head")
                    gallery = gr.Gallery(
                        [(img, e.caption) for e, img in thumbs if img is not None],
                        show_label=False, columns=2,
                        allow_preview=False, object_fit="cover", buttons=[],
                        elem_id="dg-examples")
                    every = gr.Button("Classify one of every domain", size="sm")
                else:
                    gallery = every = None
                    gr.Markdown('<div class="dg-note">No example images: the run\'s data root '
                                "is not on this machine.</div>")
            with gr.Column(scale=5, min_width=480):
                status = gr.Markdown("", elem_id="dg-status")
                state = gr.State([])
                payload = gr.JSON(visible=False)

                @gr.render(inputs=[state], triggers=[payload.change])
                def show(results: list[ImageResult]) -> None:
                    if not results:
                        gr.Markdown('<div class="dg-absent">Results appear here: the teacher\'s '
                                    "and the student's top-5 for each image, side by side."
                                    "</div>")
                        return
                    for r in results:
                        with gr.Column(elem_classes="dg-result"):
                            gr.HTML(result_head_html(r))
                            if r.error:
                                continue
                            with gr.Row(equal_height=False):
                                gr.Image(r.thumbnail, show_label=False, interactive=False,
                                         height=200, scale=2, min_width=150, container=False,
                                         buttons=[])
                                with gr.Column(scale=3, min_width=220):
                                    gr.HTML(_panel_head("Teacher", teacher_sub, r.teacher))
                                    if r.teacher is not None:
                                        gr.Label(_confidences(r.teacher), num_top_classes=5,
                                                 show_label=False, elem_classes="dg-teacher")
                                    else:
                                        gr.HTML(f'<div class="dg-absent dg-teacher-absent">'
                                                f"No prediction: "
                                                f"{_esc(demo.teacher.reason)}.</div>")
                                with gr.Column(scale=3, min_width=220):
                                    gr.HTML(_panel_head("Student", r.student_title, r.student))
                                    gr.Label(_confidences(r.student), num_top_classes=5,
                                             show_label=False, elem_classes="dg-student")

        outputs = [state, payload, status]
        go.click(classify_uploads, [files, artifact_box], outputs, api_name="classify")
        clear.click(lambda: (None, [], None, ""), None, [files, state, payload, status],
                    api_visibility="private", queue=False)
        artifact_box.change(switch_artifact, [artifact_box], [card, status],
                            api_visibility="private")
        if gallery is not None:
            gallery.select(classify_example, [artifact_box], outputs, api_name="example")
            every.click(classify_all_examples, [artifact_box], outputs, api_name="examples")
    app.dgkit_demo = demo  # for tests and the screenshot helper
    return app


def _open_png(path: Path | None):
    """The report chart as an image (a path outside gradio's allowed folders would be refused)."""
    if path is None:
        return None
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _display_name(path: str) -> str:
    return Path(path).name


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, quiet: bool = True,
           announce: Callable[[str, str | None], None] | None = None) -> str:
    """Start the app with a bounded queue and return its local URL; `block=False` returns at
    once (tests), else it serves until Ctrl-C. `announce(url, share_url)` runs once it listens."""
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    try:
        _, url, share_url = app.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True,
            quiet=quiet, show_error=True, max_file_size=MAX_FILE_SIZE, theme=gr.themes.Soft(),
            css=CSS, footer_links=["api"], ssr_mode=False)
    except OSError as exc:
        raise DgkitError(f"cannot listen on {host}:{port} ({exc}); pass another --port") from exc
    if announce is not None:
        announce(url, share_url)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return url
