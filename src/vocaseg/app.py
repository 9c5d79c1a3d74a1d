"""``vocaseg app``: a web page to drop in a photo, type words and see the segmentation.

Two layers:

- :class:`SegmentationApp` holds the models and does the work in plain functions (read an upload with
  the size limits, parse the classes, segment, build the overlay, the class-share table and the
  label PNG). Every problem with the visitor's input is an :class:`AppError` whose message is written
  for the page. It needs no Gradio, so tests call it directly.
- :func:`build_app` lays out the Gradio page around it (Gradio is the optional extra
  ``pip install "vocaseg[app]"``); :func:`launch` serves it, on 127.0.0.1 unless told otherwise.

The page never reads a server path a visitor types: images come only from Gradio's upload (or the
clipboard, or the bundled synthetic examples, which are generated in memory), and there is no text
field for a path. Uploads above ``max_upload_mb`` are refused by Gradio before they reach the app,
and again here; images above ``max_megapixels`` are refused before they are decoded.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("vocaseg.app")

DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_MEGAPIXELS = 16.0
MAX_CLASSES = 100
MAX_CLASS_TEXT = 4000  # characters of the class field
DISPLAY_MAX_SIDE = 1024  # the overlay shown in the page (the label PNG keeps the full size)
DISPLAY_MIN_SIDE = 384
EXAMPLE_SCENES = 6
MODES = {"whole image": "whole", "sliding window": "slide"}
INSTALL_HINT = 'the app needs Gradio, an optional extra: pip install "vocaseg[app]"'


class AppError(ValueError):
    """A problem with what the visitor gave; the message is shown in the page as it is."""


@dataclass(frozen=True)
class RejectedUpload:
    """What the page's image input hands over when Gradio could not even open the upload."""

    reason: str


@dataclass
class AppOutput:
    overlay: "object"  # PIL image: the picture tinted by class, with a legend
    shares: list[list]  # [[class, share in %], ...], largest first
    labels: np.ndarray  # (H, W) class indices at the input size
    classes: list[str]
    seconds: float  # segmentation time (without model loading)
    load_seconds: float  # model loading time in this call (0 when already loaded)
    label_png: str | None = None  # the label PNG written for download
    notes: tuple[str, ...] = ()

    def message(self, method: str) -> str:
        h, w = self.labels.shape
        text = (f"Segmented {w}x{h} into {len(self.classes)} classes with {method} in {self.seconds:.2f} s"
                + (f" (model loaded in {self.load_seconds:.1f} s)" if self.load_seconds > 0.05 else "") + ".")
        return " ".join((text,) + self.notes)


def example_scenes(count: int = EXAMPLE_SCENES) -> list[tuple[str, np.ndarray]]:
    """The bundled examples: synth test scenes (generated, no files), with their captions."""
    from .data.synth import SynthScenes

    scenes = SynthScenes("test", length=count)
    return [(f"scene {i}: {scenes[i].caption}", scenes[i].image) for i in range(count)]


def example_classes() -> str:
    """The synthetic world's classes in the synonym syntax (what the examples contain)."""
    from .demo import DEMO_CLASS_NAMES

    return "; ".join(DEMO_CLASS_NAMES)


class SegmentationApp:
    """The app without the page: models, limits and the segmentation of one upload.

    ``model``/``pretrained``: a CLIP (its training-free rules) or a run; ``runs``: trained runs to offer
    as well (default: the shipped runs trained on ``model``). Runs load on first use."""

    def __init__(self, model: str = "toy", pretrained: str | None = "default", runs: Sequence[str] | None = None,
                 device: str = "cpu", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, output_dir: str | None = None):
        from . import Segmenter
        from .runs import find_run, read_run_info, run_inference_defaults, shipped_runs

        if max_upload_mb <= 0 or max_megapixels <= 0:
            raise ValueError("the upload limits must be positive")
        self.model, self.device = model, device
        self.max_upload_mb, self.max_megapixels = float(max_upload_mb), float(max_megapixels)
        # the toy CLIP sees scenes at 96 px whole (the synth protocol); others start from SCLIP's defaults
        self.defaults = dict(mode="whole", short_side=96) if model == "toy" else {}
        self.base = Segmenter.from_pretrained(model, pretrained=pretrained, device=device,
                                              **{**self.defaults, **run_inference_defaults(model)})
        trained = self.base.trained.name if self.base.trained is not None else None
        # method label -> (model or run, training-free rule or None for the trained method)
        self.choices: dict[str, tuple[str, str | None]] = {
            rule: (model, rule) for rule in self.base.methods if rule != trained}
        if trained is not None:
            self.choices[f"{trained} (run {Path(model).name})"] = (model, None)
        if runs is None:
            runs = [name for name, path in shipped_runs().items()
                    if read_run_info(path)["clip"]["model"] == model]
        for run in runs:
            path = find_run(run)
            if path is None:
                raise FileNotFoundError(f"{run}: neither a run folder (with method.json) nor a shipped run")
            self.choices[f"{read_run_info(path)['method']} (run {Path(str(run)).name})"] = (str(run), None)
        self._segmenters = {model: self.base}
        self._lock = threading.Lock()
        self._counter = 0
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="vocaseg-app-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ what the page offers
    @property
    def methods(self) -> list[str]:
        return list(self.choices)

    @property
    def default_method(self) -> str:
        return "maskclip" if "maskclip" in self.choices else self.methods[0]

    @property
    def default_mode(self) -> str:
        return next(k for k, v in MODES.items() if v == self.base.config.mode)

    def limits_text(self) -> str:
        return (f"Images up to {self.max_upload_mb:g} MB and {self.max_megapixels:g} megapixels; "
                f"up to {MAX_CLASSES} classes.")

    # ------------------------------------------------------------------ input checks
    def read_upload(self, upload) -> np.ndarray:
        """An upload (a file path from Gradio, a PIL image or an array) -> (H, W, 3) uint8, or AppError."""
        from PIL import Image, UnidentifiedImageError

        from .images import ImageReadError, read_image

        if upload is None:
            raise AppError("No image yet: upload or paste one, or pick a bundled example.")
        if isinstance(upload, RejectedUpload):
            raise AppError(upload.reason)
        if isinstance(upload, np.ndarray):
            self._check_pixels(upload.shape[1] if upload.ndim > 1 else 0, upload.shape[0])
            try:
                return read_image(upload)
            except ImageReadError as err:
                raise AppError(f"That is not an image: {err}.") from None
        if isinstance(upload, Image.Image):
            self._check_pixels(*upload.size)
            return read_image(upload)
        path = Path(upload)
        if not path.is_file():
            raise AppError("The upload did not arrive; please upload the image again.")
        size_mb = path.stat().st_size / 2 ** 20
        if size_mb > self.max_upload_mb:
            raise AppError(f"The file is {size_mb:.1f} MB; this app takes images up to {self.max_upload_mb:g} MB.")
        if path.stat().st_size == 0:
            raise AppError("The file is empty (0 bytes): that is not an image.")
        try:
            with Image.open(path) as img:  # reads the header only: the size is known before decoding
                self._check_pixels(*img.size)
                img.load()
                return read_image(img)
        except AppError:
            raise
        except Image.DecompressionBombError:
            raise AppError(f"The image has far more than {self.max_megapixels:g} megapixels; "
                           "downscale it and try again.") from None
        except UnidentifiedImageError:
            raise AppError("That file is not an image this app can read: use PNG, JPEG, WebP, BMP, GIF or TIFF.") \
                from None
        except (OSError, SyntaxError, ValueError, ImageReadError):
            raise AppError("The image could not be decoded: the file is damaged or truncated.") from None

    def _check_pixels(self, width: int, height: int) -> None:
        mp = width * height / 1e6
        if width <= 0 or height <= 0:
            raise AppError("The image has no pixels.")
        if mp > self.max_megapixels:
            raise AppError(f"The image is {width}x{height} ({mp:.1f} megapixels); this app takes up to "
                           f"{self.max_megapixels:g} megapixels. Downscale it and try again.")

    @staticmethod
    def parse_classes(text: str | None):
        """The class field (synonym syntax) -> a Vocabulary, or AppError."""
        from .vocabulary import Vocabulary, VocabularyError

        text = (text or "").strip()
        if not text or not text.replace(",", "").replace(";", "").strip():
            raise AppError('Type the classes to look for, e.g. "cat, dog, grass" (with synonyms: '
                           '"tv, television; sofa; cat").')
        if len(text) > MAX_CLASS_TEXT:
            raise AppError(f"The class list is {len(text)} characters long; the limit is {MAX_CLASS_TEXT}.")
        try:
            vocab = Vocabulary.parse(text)
        except VocabularyError as err:
            raise AppError(f"Class list: {err}.") from None
        if len(vocab) > MAX_CLASSES:
            raise AppError(f"{len(vocab)} classes; this app takes up to {MAX_CLASSES}.")
        return vocab

    # ------------------------------------------------------------------ segmentation
    def segmenter(self, method: str, **options):
        """The Segmenter for a method label, with the page's options; (segmenter, seconds spent loading)."""
        from . import Segmenter
        from .runs import run_inference_defaults

        if method not in self.choices:
            raise AppError(f"Unknown method {method!r}; choose one of: {', '.join(self.methods)}.")
        source, rule = self.choices[method]
        t0 = time.perf_counter()
        with self._lock:
            if source not in self._segmenters:
                self._segmenters[source] = Segmenter.from_pretrained(
                    source, device=self.device, **{**self.defaults, **run_inference_defaults(source)})
        seg = self._segmenters[source]
        return seg.with_options(method=rule or seg.trained.name, **options), time.perf_counter() - t0

    def segment(self, upload, classes: str, method: str | None = None, mode: str | None = None,
                key_smoothing: bool = False, prompt_denoising: bool = False, background: str = "",
                threshold: float = 0.0) -> AppOutput:
        """Segment one upload; every problem with the input raises AppError with a readable message."""
        from .visualize import label_counts, overlay, save_label_png, shrink
        from .vocabulary import parse_background

        vocab = self.parse_classes(classes)
        array = self.read_upload(upload)
        method = method or self.default_method
        mode = mode or self.default_mode
        if mode not in MODES:
            raise AppError(f"Unknown mode {mode!r}; choose {' or '.join(MODES)}.")
        try:
            threshold = float(threshold or 0.0)
        except (TypeError, ValueError):
            raise AppError("The threshold must be a number between 0 and 1.") from None
        if not 0.0 <= threshold < 1.0:
            raise AppError("The threshold must be at least 0 (off) and below 1.")
        words = parse_background(background)
        notes = []
        options = dict(mode=MODES[mode], key_smoothing=1.0 if key_smoothing else None,
                       prompt_denoising=0.5 if prompt_denoising else None, prob_threshold=threshold or None)
        seg, load_seconds = self.segmenter(method, **options)
        if key_smoothing and seg.trained is not None and seg.method == seg.trained.name:
            notes.append("Key smoothing applies to the training-free rules only; it was not used.")
        if words and "background" in (n.lower() for n in vocab.names):
            raise AppError("The classes already include 'background': clear the background words or drop that class.")
        vocab = seg.vocabulary(vocab, words)
        t0 = time.perf_counter()
        res = seg.segment_arrays([array], vocab)[0]
        labels = res.labels
        seconds = time.perf_counter() - t0
        counts = label_counts(labels, minlength=len(res.classes))
        order = np.argsort(-counts, kind="stable")
        shares = [[res.classes[i], round(100.0 * float(counts[i]) / labels.size, 1)] for i in order]
        shown, (shown_labels,) = shrink(array, [labels], DISPLAY_MAX_SIDE)
        grow = DISPLAY_MIN_SIDE // max(shown.shape[:2])  # small pictures (the examples) shown larger, blocky
        if grow > 1:
            shown = shown.repeat(grow, 0).repeat(grow, 1)
            shown_labels = shown_labels.repeat(grow, 0).repeat(grow, 1)
        picture = overlay(shown, shown_labels, res.classes)
        with self._lock:
            self._counter += 1
            folder = self.output_dir / f"{self._counter:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        label_png = folder / "vocaseg_labels.png"
        save_label_png(labels, label_png)
        return AppOutput(picture, shares, labels, list(res.classes), seconds, load_seconds, str(label_png),
                         tuple(notes))

    def run(self, upload, classes, method, mode, key_smoothing, prompt_denoising, background, threshold):
        """The page's handler: (overlay, shares, status message, label PNG); a readable message on any error."""
        try:
            out = self.segment(upload, classes, method, mode, key_smoothing, prompt_denoising, background,
                               threshold)
        except AppError as err:
            return None, [], f"**Error:** {err}", None
        except Exception:  # never a traceback in the page; the server log has it
            log.exception("segmentation failed")
            return None, [], ("**Error:** the segmentation failed inside vocaseg (the server log has the "
                              "details). Try another image or fewer classes."), None
        return out.overlay, out.shares, out.message(method), out.label_png


# ---------------------------------------------------------------------------- the page
def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return gr


def build_app(app: SegmentationApp):
    """The Gradio page (a ``gr.Blocks``) around ``app``."""
    gr = _gradio()

    class UploadImage(gr.Image):
        """gr.Image whose unreadable uploads reach the handler as a RejectedUpload (a message in the
        page) instead of failing inside Gradio."""

        def get_block_name(self) -> str:
            return "image"

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except Exception as err:  # PIL could not open it, or Gradio refused the format
                log.info("upload refused: %s", err)
                return RejectedUpload("That file is not an image this app can read: use PNG, JPEG, WebP, BMP, "
                                      "GIF or TIFF.")

    examples = example_scenes()
    with gr.Blocks(title="vocaseg", analytics_enabled=False) as page:
        gr.Markdown(f"# vocaseg: segment an image into the classes you name\n"
                    f"Model **{app.model}** on {app.device}. Upload or paste an image (or pick a bundled "
                    f"synthetic example), type the classes, choose a method and press *Segment*. "
                    f"{app.limits_text()}", elem_id="intro")
        with gr.Row():
            with gr.Column():
                image = UploadImage(label="Image: upload or paste", type="filepath", format="png",
                                    sources=["upload", "clipboard"], elem_id="input-image")
                example = gr.Dropdown(choices=[label for label, _ in examples], value=None,
                                      label="...or a bundled synthetic example", elem_id="example")
                classes = gr.Textbox(label="Classes", lines=2, elem_id="classes",
                                     placeholder="cat, dog, grass    or, with synonyms:    tv, television; sofa; cat",
                                     info="Separate classes with commas; when a class has synonyms, separate "
                                     "classes with ';' and synonyms with ','.")
                method = gr.Dropdown(choices=app.methods, value=app.default_method, label="Method",
                                     elem_id="method")
                with gr.Accordion("Options", open=False):
                    mode = gr.Radio(choices=list(MODES), value=app.default_mode, label="Mode", elem_id="mode")
                    key_smoothing = gr.Checkbox(label="Key smoothing (MaskCLIP)", value=False)
                    prompt_denoising = gr.Checkbox(label="Prompt denoising (drop classes never confident)",
                                                   value=False)
                    background = gr.Textbox(label="Background words", elem_id="background",
                                            placeholder="e.g. background   or   sky, wall, floor",
                                            info="Adds a class 'background' scored as the best of these words.")
                    threshold = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Probability threshold",
                                          info="Pixels less confident than this become background (0: off).")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                result = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
                shares = gr.Dataframe(headers=["class", "share (%)"], datatype=["str", "number"],
                                      label="Class shares", interactive=False, elem_id="shares")
                download = gr.File(label="Label PNG (pixel value = class index, in the order typed)",
                                   interactive=False, elem_id="labels-file")

        def pick_example(label):
            for name, array in examples:
                if name == label:
                    return array, example_classes()
            return None, gr.update()

        example.change(pick_example, inputs=example, outputs=[image, classes])
        run.click(app.run, inputs=[image, classes, method, mode, key_smoothing, prompt_denoising, background,
                                   threshold], outputs=[result, shares, status, download], concurrency_limit=1)
    return page


def launch(app: SegmentationApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; ``block=False`` returns (page, local URL) with the server running in a thread."""
    page = build_app(app)
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(server_name=host, server_port=port, max_file_size=f"{int(app.max_upload_mb * 1024)}kb",
                            show_error=False, share=False, inbrowser=False, quiet=not block,
                            prevent_thread_lock=not block)
    return page, url
