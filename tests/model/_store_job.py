"""Run by test_store.py in a subprocess: cache a small dataset, slowly, so it can be killed mid-way."""

import sys
import time

import torch

import vlmscope as vs
from vlmscope import testing as T

torch.set_num_threads(1)


class Slow:
    def __init__(self, n, delay):
        self.n, self.delay = n, delay
        self.inputs = T.llava_inputs(T.tiny_llava(), batch=n, seed=4)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return i


def main(out_dir: str, delay: float) -> None:
    model = T.tiny_llava()
    m = vs.load(model)
    data = Slow(24, delay)

    def collate(idx):
        return {k: v[idx] for k, v in data.inputs.items()}

    m.cache_dataset(data, ["lm.blocks.*.resid_post", "connector.out"], out_dir, batch_size=4,
                    positions="image", collate=collate, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
