"""Outlier screening as the published studies did: embed every case, PCA + Isolation Forest, t-SNE plot.

Flagged cases are listed for a human to look at; nothing is removed automatically.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungviz.data.cases import Case
from lungviz.errors import LungvizError


@dataclass
class OutlierResult:
    """Per-case anomaly scores (higher = more unusual), flags and the 2D t-SNE map."""

    case_ids: list[str]
    scores: np.ndarray
    flagged: np.ndarray
    tsne: np.ndarray
    explained_variance: float

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())


def find_outliers(
    embeddings: np.ndarray,
    case_ids: Sequence[str],
    contamination: float = 0.02,
    n_components: int = 50,
    seed: int = 0,
    tsne: bool = True,
) -> OutlierResult:
    """Standardise ``(N, D)`` embeddings, reduce with PCA, flag with an Isolation Forest, map with t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) != len(case_ids):
        raise LungvizError(f"expected one embedding row per case, got {x.shape} for {len(case_ids)} cases.")
    if len(x) < 10:
        raise LungvizError(f"outlier screening needs at least 10 cases, got {len(x)}.")
    x = StandardScaler().fit_transform(x)
    k = int(min(n_components, x.shape[1], len(x) - 1))
    pca = PCA(n_components=k, random_state=seed)
    z = pca.fit_transform(x)
    forest = IsolationForest(n_estimators=300, contamination=contamination, random_state=seed).fit(z)
    scores = -forest.score_samples(z)  # higher = more anomalous
    flagged = forest.predict(z) == -1
    if tsne:
        perplexity = float(min(30, max(5, (len(z) - 1) // 3)))
        emb2 = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
    else:
        emb2 = z[:, :2]
    return OutlierResult(list(case_ids), scores, flagged, emb2.astype(np.float32),
                         float(pca.explained_variance_ratio_.sum()))


def write_outputs(result: OutlierResult, cases: Sequence[Case], out_dir: Path, title: str) -> dict[str, Path]:
    """Save the flagged-case CSV (all cases, sorted by anomaly) and the t-SNE plot as PNG and HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    out_dir.mkdir(parents=True, exist_ok=True)
    by_id = {c.case_id: c for c in cases}
    order = np.argsort(-result.scores)
    csv_path = out_dir / "outliers.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "nodule", "anomaly_score", "flagged", "malignancy", "reader_scores",
                    "diameter_mm", "n_slices", "label_check", "histology", "tsne_x", "tsne_y"])
        for i in order:
            c = by_id[result.case_ids[i]]
            w.writerow([c.patient_id, c.nodule_id, f"{result.scores[i]:.4f}", int(result.flagged[i]),
                        c.malignancy if c.malignancy is not None else "", " ".join(map(str, c.reader_scores)),
                        "" if c.diameter_mm is None else c.diameter_mm, c.n_slices, c.label_check,
                        c.histology or "", f"{result.tsne[i, 0]:.3f}", f"{result.tsne[i, 1]:.3f}"])
    colour = np.array([(by_id[k].malignancy or 0) for k in result.case_ids], float)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    sc = ax.scatter(result.tsne[:, 0], result.tsne[:, 1], c=colour, cmap="RdYlGn_r", s=8, alpha=0.7)
    f = result.flagged
    ax.scatter(result.tsne[f, 0], result.tsne[f, 1], facecolors="none", edgecolors="black", s=60, linewidths=1.2,
               label=f"flagged outliers ({int(f.sum())})")
    fig.colorbar(sc, ax=ax, label="panel malignancy score (0 = none)")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="lower right")
    fig.tight_layout()
    png_path = out_dir / "tsne.png"
    fig.savefig(png_path)
    plt.close(fig)
    hover = [f"{k}<br>score {by_id[k].malignancy} readers {by_id[k].reader_spread}<br>anomaly {s:.3f}"
             for k, s in zip(result.case_ids, result.scores, strict=True)]
    pfig = go.Figure(go.Scattergl(x=result.tsne[:, 0], y=result.tsne[:, 1], mode="markers", text=hover,
                                  hoverinfo="text",
                                  marker={"color": colour, "colorscale": "RdYlGn", "reversescale": True, "size": 5,
                                          "line": {"width": np.where(f, 2, 0), "color": "black"}}))
    pfig.update_layout(title=title, template="plotly_white")
    html_path = out_dir / "tsne.html"
    pfig.write_html(html_path, include_plotlyjs=True)
    return {"csv": csv_path, "png": png_path, "html": html_path}


def embed_cases(
    cases: Sequence[Case],
    embed: Callable[[np.ndarray], np.ndarray],
    image_of: Callable[[Case], np.ndarray],
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Embed one image per case (``image_of`` gives ``(H, W) float32 [0, 1]``) in batches -> ``(N, D)``."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(cases), batch_size), desc="embedding", disable=not progress, unit="batch"):
        batch = np.stack([image_of(c) for c in cases[start : start + batch_size]])
        rows.append(embed(batch))
    return np.concatenate(rows)


def screen_image(case: Case, view: str, input_size: int) -> np.ndarray:
    """The image screened for a case: its view of the slice with the largest mask (or the middle slice)."""
    from lungviz.data.preprocess import view_from_context

    return view_from_context(case.load_slice(case.middle_index()), view, input_size, case.pixel_spacing_mm)


def pretrained_embedder(arch: str) -> Callable[[np.ndarray], np.ndarray]:
    """An ImageNet-pretrained backbone as ``(N, H, W) [0, 1] -> (N, D)`` pooled features, on the resolved device."""
    import torch

    from lungviz.data.preprocess import to_model_input
    from lungviz.models import create_model, resolve_device

    device = resolve_device()
    model = create_model(arch, num_classes=2, pretrained=True).to(device).eval()
    mean, std = model.data_config["mean"], model.data_config["std"]

    @torch.inference_mode()
    def embed(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.stack([to_model_input(im, mean, std) for im in batch])).to(device)
        return model.embed(x).float().cpu().numpy()

    return embed
