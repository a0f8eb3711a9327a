"""secure_ai.plots: each plot draws what it says and rejects empty input."""
import warnings

import numpy as np
import pytest
import torch
from secure_ai import plots
from secure_ai.privacy import dp_tpr_bound


def test_show_digits_draws_a_titled_grid():
    images = torch.randn(10, 1, 28, 28)
    fig = plots.show_digits(images, labels=list(range(10)), n=10, cols=5, title="digits")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 10
    assert [ax.get_title() for ax in shown] == [str(i) for i in range(10)]
    assert fig._suptitle.get_text() == "digits"
    raw = plots.show_digits(np.zeros((3, 28, 28), dtype=np.uint8), n=8)
    assert len([ax for ax in raw.axes if ax.images]) == 3
    frozen = np.zeros((2, 28, 28), dtype=np.uint8)
    frozen.flags.writeable = False  # like data.mnist_raw's cached arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays
        plots.show_digits(frozen)


def test_show_digits_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        plots.show_digits(torch.zeros(3, 28))
    with pytest.raises(ValueError, match="no images"):
        plots.show_digits(torch.zeros(0, 28, 28))


def test_label_histogram_counts_per_owner():
    fig = plots.plot_label_histogram({"joe": [0, 0, 1], "jane": [9]})
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 20
    assert heights[:10] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert heights[19] == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["joe", "jane"]
    with pytest.raises(ValueError):
        plots.plot_label_histogram({})


def test_learning_curves_one_line_per_run():
    fig = plots.plot_learning_curves({"federated": [0.9, 0.95], "centralized": [0.91, 0.96, 0.97]})
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[0.9, 0.95], [0.91, 0.96, 0.97]]
    assert list(lines[1].get_xdata()) == [1, 2, 3]
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)  # no "round 1.5"
    with pytest.raises(ValueError):
        plots.plot_learning_curves({})


def test_plot_label_shares_draws_one_panel_per_split_with_shares_per_digit():
    from secure_ai import plots

    fig = plots.plot_label_shares({"a": [[0, 0, 1], [1, 2]], "b": [[3], [3, 4], [5]]})
    assert len(fig.axes) == 2
    shares = fig.axes[0].images[0].get_array()
    assert shares.shape == (2, 10)
    np.testing.assert_allclose(shares[:, 1], [0.5, 0.5])      # digit 1: one sample each
    np.testing.assert_allclose(shares[:, 0], [1.0, 0.0])      # digit 0: all with owner 0
    with pytest.raises(ValueError, match="empty"):
        plots.plot_label_shares({})


# --- Part 3: differential privacy ------------------------------------------------------------------------
def test_plots_draw_and_reject_empty_input():
    import matplotlib.pyplot as plt

    fig = plots.plot_noisy_answers({"with": [1, 2, 3], "without": [0, 1, 2]})
    assert len(fig.axes[0].patches) > 0
    fig2 = plots.plot_privacy_utility({"sigma=1": [(1.0, 0.9), (2.0, 0.95)], "features": [(3.0, 0.98)]},
                                      baselines={"no DP": 0.99, "features, no DP": 0.995},
                                      anchors={"paper": (2.0, 0.95)})
    lines = fig2.axes[0].lines
    assert len(lines) == 5 and [line.get_linestyle() for line in lines[2:4]] == ["--", "--"]
    from matplotlib.colors import same_color

    assert same_color(lines[2].get_color(), lines[0].get_color())
    assert same_color(lines[3].get_color(), lines[1].get_color())
    plt.close("all")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_noisy_answers({})
    with pytest.raises(ValueError, match="empty"):
        plots.plot_privacy_utility({})


# --- Part 5: attacks -------------------------------------------------------------------------------------
def test_plots_of_the_chapter():
    x = torch.zeros(5, 1, 28, 28)
    psnr = torch.tensor([10.0, 43.3, 12.0, 13.0, 14.0])
    identified = np.array([False, True, False, False, False])
    fig = plots.plot_reconstructions({"a": (x, x, psnr, identified),
                                      "b": (x[:1], x[:1], torch.tensor([9.6]), [False])}, n=4)
    assert len([ax for ax in fig.axes if ax.images]) == 2 * (4 + 1)
    labels = [ax.title for ax in fig.axes if ax.get_title()]
    assert [t.get_text() for t in labels] == ["10 dB", "43 dB \u2713", "12 dB", "13 dB", "10 dB"]
    assert [t.get_fontweight() for t in labels][:2] == ["normal", "bold"]
    with pytest.raises(ValueError, match="same length"):
        plots.plot_reconstructions({"a": (x, x[:2], [0.1], [True])})
    with pytest.raises(ValueError, match="empty"):
        plots.plot_reconstructions({})
    fig = plots.plot_roc({"attack": (np.array([0, 0.5, 1]), np.array([0, 0.7, 1]))}, {"bound": (1.0, 1e-5)})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3  # guessing, the attack, the bound
    assert np.allclose(lines[2].get_ydata(), dp_tpr_bound(lines[2].get_xdata(), 1.0, 1e-5))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_roc({})


def test_plots_of_secure_aggregation_and_encryption():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    ring = rng.integers(0, 2**64, 1000, dtype=np.uint64)
    fig = plots.plot_top_bytes({"secret": np.full(1000, 5, dtype=np.uint64), "share": ring})
    assert len(fig.axes) == 2 and fig.axes[0].patches[0].get_height() == 1000   # every top byte is 0
    with pytest.raises(ValueError, match="uint64"):
        plots.plot_top_bytes({"floats": np.zeros(3)})
    with pytest.raises(ValueError, match="empty"):
        plots.plot_top_bytes({})
    fig2 = plots.plot_noise(rng.normal(0, 2.0, 1000), 2.0, xlabel="error")
    assert len(fig2.axes[0].lines) == 1 and "σ = 2" in fig2.axes[0].get_legend().get_texts()[1].get_text()
    with pytest.raises(ValueError, match="sigma > 0"):
        plots.plot_noise([], 1.0, xlabel="error")
    plt.close("all")
