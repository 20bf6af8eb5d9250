import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import flexpbs  # noqa: E402
from flexpbs import plot  # noqa: E402


def test_tile_attention_mass_is_the_dense_mass_by_tile():
    torch.manual_seed(0)
    n, d, block = 100, 16, 32
    q, k = torch.randn(n, d), torch.randn(n, d)
    perm = torch.randperm(n)
    mass = plot.tile_attention_mass(q, k, perm, block)
    probs = ((q @ k.T) * d**-0.5).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)
    assert mass.shape == (4, 4)
    torch.testing.assert_close(mass.sum(), torch.tensor(1.0))
    torch.testing.assert_close(mass[1, 2], probs[32:64][:, perm[64:96]].sum() / n)


def test_pictures_draw_on_given_axes(tmp_path):
    q = torch.randn(1, 2, 300, 16) * 3
    _, stats = flexpbs.attention(q, q[:, :1], q[:, :1], segment_size=128, threshold=0.5, return_stats=True)
    fig, axes = plt.subplots(1, 3)
    mass = plot.tile_attention_mass(q[0, 0], q[0, 0], stats.key_positions[0, 0], 128)
    ax = plot.tiles(stats.tiles[0, 0], mass=mass, ax=axes[0], title="head 0")
    assert ax is axes[0] and "density" in ax.get_title()
    plot.density_by_layer({"PBS": [0.5, 0.4], "none": [0.6, 0.5]}, ax=axes[1])
    plot.tradeoff({"PBS": [(0.5, 10.0), (0.3, 11.0)]}, ylabel="perplexity", baseline=9.5, ax=axes[2])
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    plt.close(fig)
    own = plot.tiles(stats.tiles[0, 1])  # a new figure when no Axes is given
    assert own.figure is not fig
    plt.close(own.figure)
