"""GMM feature preprocessing on cached reference-model features: AUROC per failure source.

    python benchmarks/preprocess_study.py --cache results/cache/resnet20-cpu.safetensors [--seeds 3]

Reads the features cached by ``benchmarks/reproduce_cifar10.py`` (no forward pass, no attack); every option is
fitted on the training features only, without labels.
"""

from __future__ import annotations

import argparse

from featurefail.evaluate import EvalData, evaluate_features

OPTIONS = [None, "standardize", "pca:0.99", "pca:0.9", "l2", "tanh"]
FUSED = [
    ("fused energy", {"logit_score": "energy"}),
    ("fused energy + l2", {"logit_score": "energy", "preprocess": "l2"}),
    ("fused max_softmax + l2", {"logit_score": "max_softmax", "preprocess": "l2"}),
]
BASELINES = ["max_softmax", "temperature", "mahalanobis"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-components", type=int, default=100)
    args = parser.parse_args()
    data = EvalData.load(args.cache)
    table: dict[str, dict[str, str]] = {}
    for option in OPTIONS:
        result = evaluate_features(
            data,
            scorers=["gmm"],
            seeds=list(range(args.seeds)),
            scorer_options={"gmm": {"n_components": args.n_components, "preprocess": option}},
        )
        for row in result.rows:
            table.setdefault(row.source, {})[str(option)] = f"{100 * row.auroc:.1f} ± {100 * row.auroc_std:.1f}"
        mean = sum(r.auroc for r in result.rows) / len(result.rows)
        table.setdefault("mean over sources", {})[str(option)] = f"{100 * mean:.1f}"
    for label, opts in FUSED:
        result = evaluate_features(
            data,
            scorers=["fused"],
            seeds=list(range(args.seeds)),
            scorer_options={"fused": {"n_components": args.n_components, **opts}},
        )
        for row in result.rows:
            table.setdefault(row.source, {})[label] = f"{100 * row.auroc:.1f} ± {100 * row.auroc_std:.1f}"
        table.setdefault("mean over sources", {})[label] = (
            f"{100 * sum(r.auroc for r in result.rows) / len(result.rows):.1f}"
        )
    result = evaluate_features(data, scorers=BASELINES, seeds=[0])
    for name in BASELINES:
        rows = [r for r in result.rows if r.scorer == name]
        for row in rows:
            table.setdefault(row.source, {})[name] = f"{100 * row.auroc:.1f}"
        table.setdefault("mean over sources", {})[name] = f"{100 * sum(r.auroc for r in rows) / len(rows):.1f}"
    names = [str(o) for o in OPTIONS] + [label for label, _ in FUSED] + BASELINES
    print(
        f"GMM-{args.n_components} with each preprocessing, the fused scorer and baselines; AUROC %, "
        f"{args.seeds} seeds\n"
    )
    print("| source | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for source, cells in table.items():
        print(f"| {source} | " + " | ".join(cells[n] for n in names) + " |")


if __name__ == "__main__":
    main()
