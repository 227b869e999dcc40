"""`daae curves`: TensorBoard scalars of one or more runs exported as a PNG of
line plots, one panel per tag (for READMEs and reports; TensorBoard itself
stays the place to explore). Drawn with PIL, so no plotting library is needed.

    daae curves --logdir RUNS_OR_EXPERIMENT [--tags val/accuracy ...] --out curves.png

Every folder under --logdir holding event files is one run (one line per panel),
labelled by its path relative to --logdir.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError
from .latent_map import BACKGROUND, FRAME, class_colour

DEFAULT_TAGS = ("val/accuracy", "decorrelation/val/adversary_accuracy")
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 560, 220, 46

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # PIL is imported where a picture is drawn, not on `import daae`
    from PIL.Image import Image as PILImage


def read_scalars(logdir: str | Path, tags) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run: {tag: [(step, value), ...]}} for every run folder under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # It logs each event file it moves on to at INFO, which the CLI's logging would print.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ConfigError(f"--logdir {logdir}: no such folder")
    folders = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    if not folders:
        raise ConfigError(f"--logdir {logdir}: no TensorBoard event files under it "
                          f"(a run folder of `daae train` or a `daae tune` experiment folder)")
    runs, left_out = {}, []
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags()["scalars"])
        series = {}
        for tag in tags:
            if tag in available:
                # Keep the last value written at a step (a resumed run may repeat one).
                by_step = {e.step: e.value for e in events.Scalars(tag)}
                series[tag] = sorted(by_step.items())
        # resolve(): `--logdir .` would otherwise be named "".
        name = str(folder.relative_to(logdir)) if folder != logdir else logdir.resolve().name
        if series:
            runs[name] = series
        else:
            left_out.append(name)
    if not runs:
        raise ConfigError(f"--tags: none of {', '.join(tags)} is in the event files under {logdir}")
    for name in left_out:  # a picture without them would pass for all the runs there are
        log.warning("%s left out: its event files hold none of %s (never evaluated, or "
                    "written by something else)", name, ", ".join(tags))
    return runs


def _panel(draw, font, top: int, tag: str, runs: dict, colours: dict) -> None:
    # A diverged run (another tool's, or one logged before daae stopped on it)
    # can hold inf or NaN, which has no place on the axis: named, not drawn.
    lines = {run: [(s, v) for s, v in series.get(tag, []) if math.isfinite(v)]
             for run, series in runs.items()}
    left_out = sum(len(series.get(tag, [])) for series in runs.values()) - sum(map(len, lines.values()))
    points = [p for line in lines.values() for p in line]
    left, width, height = MARGIN, PANEL_WIDTH - MARGIN - 10, PANEL_HEIGHT - 40
    draw.text((left, top + 2), tag + (f" ({left_out} non-finite values not drawn)" if left_out else ""),
              fill=FRAME, font=font)
    frame_top = top + 18
    draw.rectangle([left, frame_top, left + width, frame_top + height], outline=FRAME)
    if not points:
        draw.text((left + 8, frame_top + 8), "(no data)", fill=FRAME, font=font)
        return
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    x_low, x_high = min(steps), max(max(steps), min(steps) + 1)
    y_low, y_high = min(values), max(values)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def to_pixel(step, value):
        return (left + (step - x_low) / (x_high - x_low) * width,
                frame_top + height - (value - y_low) / (y_high - y_low) * height)

    for label, value in (("%.3g" % y_high, y_high), ("%.3g" % y_low, y_low)):
        draw.text((4, to_pixel(x_low, value)[1] - 6), label, fill=FRAME, font=font)
    draw.text((left, frame_top + height + 3), str(x_low), fill=FRAME, font=font)
    draw.text((left + width - 6 * len(str(x_high)), frame_top + height + 3), str(x_high),
              fill=FRAME, font=font)
    for run, finite in lines.items():
        line = [to_pixel(s, v) for s, v in finite]
        if len(line) > 1:
            draw.line(line, fill=colours[run], width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[run])


def draw_curves(runs: dict, tags) -> PILImage:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    colours = {run: class_colour(i) for i, run in enumerate(runs)}
    legend_height = 14 * len(runs) + 8
    image = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT * len(tags) + legend_height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, tag in enumerate(tags):
        _panel(draw, font, i * PANEL_HEIGHT, tag, runs, colours)
    top = PANEL_HEIGHT * len(tags)
    for i, run in enumerate(runs):
        y = top + 4 + 14 * i
        draw.rectangle([MARGIN, y + 2, MARGIN + 12, y + 8], fill=colours[run])
        draw.text((MARGIN + 18, y), run, fill=FRAME, font=font)
    return image


def write_curves(logdir, out, tags=DEFAULT_TAGS) -> Path:
    from .atomic import atomic_write
    from .grids import check_png_out

    tags, out = list(tags), check_png_out(out)
    image = draw_curves(read_scalars(logdir, tags), tags)
    try:
        return atomic_write(out, lambda handle: image.save(handle, format="PNG"))
    except OSError as exc:  # what check_png_out cannot foresee: a full disk, a quota, a race
        raise ConfigError(f"cannot write {out}: {exc}") from None
