"""Run by test_sae_train.py (and in-process by it): train four small SAEs slowly enough to be
killed mid-way. Argument: the run folder, and the seconds each data chunk takes."""

import sys
import time

import torch

from vlmscope.methods import sae as S

torch.set_num_threads(1)


class SlowSource(S.TensorSource):
    delay: float = 0.0

    def chunk(self, epoch, index, seed):
        time.sleep(self.delay)
        return super().chunk(epoch, index, seed)


def specs():
    return [S.SAESpec("x", a, d_sae=24, k=3, name=a) for a in ("relu", "topk", "batchtopk", "jumprelu")]


def config():
    # resampling every 10 steps and a short dead window, so the RNG and AuxK paths are exercised
    return S.TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, sparsity_warmup_steps=10,
                         dead_after_tokens=64, resample_every=10, checkpoint_every=4, log_every=5)


def source(delay: float = 0.0):
    x, _ = S.planted_dictionary(n_rows=640, d=8, n_features=16, mean_active=2, seed=5)
    src = SlowSource({"x": x}, chunk_rows=64)  # 2 batches per chunk, 10 chunks per epoch
    src.delay = delay
    return src


def main(out_dir: str, delay: float) -> None:
    S.train_saes(source(delay), specs(), config(), out_dir=out_dir, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
