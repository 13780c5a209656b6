"""The same as `vlmscope run examples/where-is-position-lost.toml`, step by step in Python."""

import torch

import vlmscope as vs
from vlmscope.experiments import grounded
from vlmscope.methods.lens import logit_lens
from vlmscope.methods.metrics import logit_diff
from vlmscope.methods.patching import patch_sweep
from vlmscope.zoo import truth

torch.set_num_threads(1)
m = vs.load("zoo:shapes-llava")
print(m)

# 1. where is the object's cell decodable, and where is it lost?
trace, grid, scores = grounded.where_is_it_lost(m, "cell", n=300)
print(trace.to_dataframe()[["site", "score", "control"]])
trace.plot().savefig("trace.png")

# 2. activation patching on semantic image pairs, per image patch
pairs = truth.counterfactual_pairs(seed=0, n=4, kind="sip")
clean = truth.inputs_for(m, [p.clean for p in pairs])
corrupt = truth.inputs_for(m, [p.corrupt for p in pairs])
metric = logit_diff(truth.answer_ids(m, [p.clean for p in pairs]), truth.answer_ids(m, [p.corrupt for p in pairs]))
sweep = patch_sweep(m, clean, corrupt, metric, sites="lm.blocks.*.resid_post", positions="patches")
print(sweep.patch_map("lm.blocks.0.resid_post"))

# 3. the logit lens at the last token
lens = logit_lens(m, clean, k=3)
print([lens.top_tokens(layer, example=0)[-1] for layer in lens.layers])
