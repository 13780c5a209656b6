"""Sparse autoencoders on VLM activations: four architectures, a resumable trainer, evaluation
spliced back into the model, feature views over the image, and SAELens-compatible files.

    from vlmscope.methods import sae
    src = sae.ModelSource(m, dataset, sites=["connector.out"], positions="image")
    specs = [sae.SAESpec("connector.out", "topk", k=32), sae.SAESpec("connector.out", "relu")]
    saes = sae.train_saes(src, specs, sae.TrainConfig(), out_dir="runs/x")   # {name: SAE}
"""

from vlmscope.methods.sae.base import ARCHITECTURES, SAE, LossContext, SAEConfig, StepOut, build_sae
from vlmscope.methods.sae.batchtopk import BatchTopKSAE
from vlmscope.methods.sae.evaluate import (
    SAEComparison,
    SAEEval,
    compare_at_matched_l0,
    evaluate_sae,
    reconstruction,
    splice,
)
from vlmscope.methods.sae.features import ConceptF1, FeatureViews, concept_f1, feature_views
from vlmscope.methods.sae.io import load_sae, save_sae
from vlmscope.methods.sae.jumprelu import JumpReLUSAE
from vlmscope.methods.sae.relu import ReLUSAE
from vlmscope.methods.sae.restarts import Restarts, held_out_fvu, train_restarts
from vlmscope.methods.sae.sources import ModelSource, StoreSource, TensorSource, site_rows
from vlmscope.methods.sae.synthetic import mean_max_cosine, planted_dictionary
from vlmscope.methods.sae.topk import TopKSAE
from vlmscope.methods.sae.train import SAESpec, TrainConfig, train_saes

__all__ = [
    "ARCHITECTURES", "SAE", "BatchTopKSAE", "ConceptF1", "FeatureViews", "JumpReLUSAE", "LossContext",
    "ModelSource", "ReLUSAE", "Restarts", "SAEComparison", "SAEConfig", "SAEEval", "SAESpec", "StepOut", "StoreSource",
    "TensorSource", "TopKSAE", "TrainConfig", "build_sae", "compare_at_matched_l0", "concept_f1",
    "evaluate_sae", "feature_views", "held_out_fvu", "load_sae", "mean_max_cosine", "planted_dictionary",
    "reconstruction", "save_sae", "site_rows", "splice", "train_restarts", "train_saes",
]
