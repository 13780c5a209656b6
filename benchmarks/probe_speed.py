"""Batched probes vs a loop of scikit-learn LogisticRegression fits, on the same splits.

12 layers x 4,000 rows x 384 features, 6 classes, labels from a noisy planted linear rule.
Prints seconds, the speed ratio, and the accuracy difference per probe. One torch thread.

    python benchmarks/probe_speed.py [--probes 12 --n 4000 --d 384]
"""

import argparse
import time

import torch
from sklearn.linear_model import LogisticRegression

from vlmscope.methods.probing import ProbeConfig, _split, fit_probes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=12)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--classes", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    planted = torch.randn(a.probes, a.d, a.classes)
    x = torch.randn(a.probes, a.n, a.d)
    y = (torch.bmm(x, planted) * 0.15 + torch.randn(a.probes, a.n, a.classes)).argmax(-1)
    cfg = ProbeConfig(control=False)
    t0 = time.perf_counter()
    ours = fit_probes(x, y, cfg)
    t_ours = time.perf_counter() - t0
    tr, _, te = _split(a.n, cfg)
    t0 = time.perf_counter()
    ref = []
    for i in range(a.probes):
        clf = LogisticRegression(max_iter=1000).fit(x[i, tr].numpy(), y[i, tr].numpy())
        ref.append(clf.score(x[i, te].numpy(), y[i, te].numpy()))
    t_sk = time.perf_counter() - t0
    diff = ours.score - torch.tensor(ref)
    print("| method | seconds | ratio | mean acc | ours - sklearn: min, mean |")
    print("|---|---|---|---|---|")
    print(f"| scikit-learn loop | {t_sk:.2f} | 1.0x | {sum(ref) / len(ref):.4f} | |")
    print(f"| vlmscope batched | {t_ours:.2f} | {t_sk / t_ours:.1f}x faster | {ours.score.mean():.4f} | "
          f"{diff.min():+.4f}, {diff.mean():+.4f} |")


if __name__ == "__main__":
    main()
