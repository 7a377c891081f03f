"""``analysis.png``: the record of :mod:`.report` at a glance (matplotlib, Agg backend).

One panel per encoder: CKNNA against block depth, one curve per time t (REPA's alignment block
``encoder_depth`` marked; dashed: per token, for the first encoder); then the linear probe's
accuracy against depth, one curve per t, with the encoder's own probe (dashed) and the
majority-class rate (dotted) for scale."""
from __future__ import annotations

import os

from ..atomic_write import atomic_open

MISSING = ("matplotlib is needed for analysis.png: pip install 'repa_fast[analysis]' (or "
           "matplotlib)")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(MISSING) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _curves(axis, record: dict, values: list, colours, per_token: bool = False) -> None:
    blocks = record["blocks"]
    for colour, t, row in zip(colours, record["times"], values):
        ys = [float("nan") if v is None else v for v in row]
        if per_token:
            axis.plot(blocks, ys, linestyle="--", linewidth=1, color=colour,
                      label=f"t = {t:g}, per token")
        else:
            axis.plot(blocks, ys, marker="o", markersize=3, color=colour, label=f"t = {t:g}")
    depth = record["checkpoint"]["model"].get("encoder_depth")
    if depth is not None and not per_token:
        axis.axvline(depth, color="0.6", linewidth=0.8, linestyle="-.",
                     label=f"REPA block ({depth})")
    axis.set_xlabel("block (depth)")
    axis.grid(alpha=0.3)
    if len(blocks) <= 30:
        axis.set_xticks(blocks)


def _legend(axis) -> None:
    """Beside the panel, where it hides no curve."""
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot(record: dict, path: str) -> None:
    """Write the figure of ``record`` to ``path`` (PNG, atomically)."""
    plt = _pyplot()
    encoders, probe = record["encoders"], record["probe"]
    panels = len(encoders) + (probe is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.0), squeeze=False)
    colours = plt.get_cmap("viridis")([i / max(len(record["times"]) - 1, 1) * 0.85
                                       for i in range(len(record["times"]))])
    for axis, encoder in zip(axes[0], encoders):
        _curves(axis, record, encoder["cknna"], colours)
        if encoder.get("cknna_token") is not None:
            _curves(axis, record, encoder["cknna_token"], colours, per_token=True)
        axis.set_ylabel(f"CKNNA (k = {record['settings']['knn']})")
        axis.set_title(f"alignment with {encoder['name']}", fontsize=10)
        _legend(axis)
    if probe is not None:
        axis = axes[0][-1]
        _curves(axis, record, probe["accuracy"], colours)
        for encoder in encoders:
            if encoder["probe"] and encoder["probe"]["accuracy"] is not None:
                axis.axhline(encoder["probe"]["accuracy"], color="C3", linestyle="--",
                             linewidth=1, label=f"{encoder['name']} (clean)")
        if probe["majority_accuracy"] is not None:
            axis.axhline(probe["majority_accuracy"], color="0.5", linestyle=":", linewidth=1,
                         label="majority class")
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("linear probe accuracy (held out)")
        axis.set_title(f"linear probe, {probe['num_train']} train / {probe['num_test']} test",
                       fontsize=10)
        _legend(axis)
    model = record["checkpoint"]["model"]["model"]
    where = os.path.join(*os.path.normpath(record["checkpoint"]["path"]).split(os.sep)[-2:])
    fig.suptitle(f"{model}: {where} ({record['checkpoint']['weights']}), "
                 f"{record['data']['num_samples']} samples", fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
