"""Where the model changed: per-layer weight drift and per-layer CKA of hidden states, side by side."""

from pathlib import Path

PLOT = "plots/interference_per_layer.png"


def plot_interference_per_layer(run_dir: Path, interference: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run_dir / "plots").mkdir(exist_ok=True)
    drift = interference["drift_l2_per_layer"]
    cka = interference["cka_per_layer"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(list(drift), list(drift.values()))
    axes[0].set(title="weight drift ‖W_ft − W_pre‖ per layer", ylabel="L2 drift")
    axes[0].tick_params(axis="x", rotation=30)
    # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i-1.
    axes[1].plot(range(len(cka)), cka, "o-")
    axes[1].set(title="linear CKA before vs after, per layer", ylabel="CKA (1 = unchanged)",
                xticks=range(len(cka)), xticklabels=["embeddings"] + [f"layer.{i}" for i in range(len(cka) - 1)])
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(run_dir / PLOT, dpi=110)
    plt.close(fig)
    return PLOT
