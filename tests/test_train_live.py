"""What a training run shows while it runs, host-free: a callback after every save (the studio
renders its sample images there) and the loss plot's reference lines (each model alone and the
untrained ensemble on the validation set) with their legend."""
import numpy as np
import pytest
from test_train_core import run

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.train_report import CURVE_SIZE, REFERENCE_COLORS, TRAIN_COLOR, reference_losses, render_loss_curve

pytestmark = pytest.mark.usefixtures("one_thread")


def test_on_save_follows_every_save_with_the_file_of_that_step(tmp_path):
    seen = []

    def on_save(step, path):
        seen.append((step, path, load_aggregator(path).training["step"]))
    result = run(tmp_path, steps=6, save_every=2, on_save=on_save)
    assert [(s, f) for s, _, f in seen] == [(2, 2), (4, 4), (6, 6)]
    assert all(p == tmp_path / "agg.safetensors" for _, p, _ in seen) and result.step == 6


def test_a_stop_saves_once_and_calls_on_save_for_it(tmp_path):
    steps, seen = [], []
    result = run(tmp_path, steps=8, save_every=0, should_stop=lambda: len(steps) >= 3,
                 progress=lambda s, total, loss: steps.append(s), on_save=lambda step, path: seen.append(step))
    assert result.stopped and seen == [3]


def _rows_with(img: np.ndarray, color) -> dict:
    """row -> how many pixels of exactly `color` it has."""
    hits = np.all(img == np.array(color, dtype=np.uint8), axis=-1)
    return {int(r): int(hits[r].sum()) for r in np.nonzero(hits.any(axis=1))[0]}


def _as_array(image) -> np.ndarray:
    return (image[0].numpy() * 255 + 0.5).astype(np.uint8)


def test_references_are_dashed_lines_at_their_loss_inside_the_plot():
    history = [[s, 1.0 - 0.08 * s] for s in range(1, 11)]      # 0.92 .. 0.2
    val = [[0, 0.9], [10, 0.25]]
    table = {"rows": [{"name": "AFA aggregator (trained)", "loss": 0.25},
                      {"name": "block-wise average (untrained)", "loss": 0.5},
                      {"name": "single model: a.safetensors", "loss": 2.0}]}
    refs = reference_losses(table)
    assert refs == [("block-wise average (untrained)", 0.5), ("single model: a.safetensors", 2.0)]
    plain = _as_array(render_loss_curve(history, val))
    shown = _as_array(render_loss_curve(history, val, references=refs))
    assert shown.shape[:2] == (CURVE_SIZE[1], CURVE_SIZE[0])
    for color in REFERENCE_COLORS[:2]:
        assert not _rows_with(plain, color)  # the colours belong to the references
    uniform_rows, single_rows = _rows_with(shown, REFERENCE_COLORS[0]), _rows_with(shown, REFERENCE_COLORS[1])
    uniform_y, single_y = max(uniform_rows, key=uniform_rows.get), max(single_rows, key=single_rows.get)
    top, bottom = 30, CURVE_SIZE[1] - 40
    assert top <= single_y < uniform_y <= bottom  # 2.0 (above every train loss) still inside, above 0.5
    row = np.all(shown[uniform_y] == np.array(REFERENCE_COLORS[0], dtype=np.uint8), axis=-1)
    assert np.count_nonzero(np.diff(row.astype(int)) == 1) > 20  # dashed: many separate pieces
    # the plot's scale includes the references: the train line's top moves down when 2.0 is shown
    train_rows_plain = _rows_with(plain, TRAIN_COLOR)
    train_rows_shown = _rows_with(shown, TRAIN_COLOR)
    assert min(r for r in train_rows_shown if r > top + 1) > min(r for r in train_rows_plain if r > top + 1)
