"""Automated explanation: what features, heads and neurons mean, each with a number saying how good
the explanation is (see docs/explain.md).

    from vlmscope.methods import explain
    explain.vlm_word_match(m, sae.W_dec[[3, 7]])              # words aligned with decoder rows
    explain.splice(clip, clip.prepare(images, concepts), concepts)   # sparse concepts per image
    explain.verify(feature_fn, "colour=red")                  # holds / too broad / too narrow
    explain.dissect_formulas(maps, masks)                     # labels such as "patch=4 AND background"
    explain.refine(feature_fn, "colour=red")                  # verify, read the firing, propose, verify again
    explain.explain_tuning(feature_fn)                        # graded: "colour 62%: red 1.00 > orange 0.83 > ..."
"""

from vlmscope.methods.explain.compose import (
    FormulaDissection,
    beam_search,
    dissect_formulas,
    evaluate,
    mask_of,
    parse_formula,
)
from vlmscope.methods.explain.concepts import all_concepts, concept_masks, parse
from vlmscope.methods.explain.cover import cover_text
from vlmscope.methods.explain.describe import Dissection, LLMDescription, describe_with_llm, dissect, llm_messages
from vlmscope.methods.explain.neurons import (
    Deactivation,
    DomainNeurons,
    ModalityNeurons,
    deactivate,
    domain_neurons,
    hidden_change,
    modality_deactivation,
    modality_neurons,
)
from vlmscope.methods.explain.patchscope import (
    PatchscopeResult,
    patchscope,
    patchscope_inputs,
    patchscope_logits,
)
from vlmscope.methods.explain.refine import Refinement, refine
from vlmscope.methods.explain.score import ExplanationScores, correlation, score_explanations
from vlmscope.methods.explain.splice import SpliceResult, nonneg_lasso, splice, splice_decompose
from vlmscope.methods.explain.textspan import (
    HeadAblation,
    HeadContributions,
    TextSpanResult,
    head_ablation,
    head_contributions,
    textspan,
)
from vlmscope.methods.explain.tuning import (
    TuningCurves,
    TuningVerification,
    explain_tuning,
    parse_tuning,
    score_tuning,
    tuning_curves,
    verify_tuning,
)
from vlmscope.methods.explain.verify import (
    Verification,
    formula_scenes,
    judge,
    judge_formula,
    judge_object,
    judge_patch,
    verify,
    verify_many,
)
from vlmscope.methods.explain.word_match import WordMatch, neuron_directions, vlm_word_match, word_match
from vlmscope.methods.explain.zoo import zoo_domain_neurons, zoo_modality_neurons
from vlmscope.methods.explain.zoo_features import ExplainedFeatures
from vlmscope.methods.explain.zoo_patchscope import PatchscopeAccuracy, zoo_patchscope
from vlmscope.methods.explain.zoo_textspan import AttributeHeads, zoo_textspan

__all__ = [
    "AttributeHeads", "Deactivation", "Dissection", "DomainNeurons", "ExplainedFeatures", "ExplanationScores",
    "FormulaDissection", "beam_search", "dissect_formulas", "evaluate", "formula_scenes", "judge_formula", "mask_of",
    "parse_formula", "Refinement", "cover_text", "refine",
    "HeadAblation", "HeadContributions", "LLMDescription", "ModalityNeurons", "PatchscopeAccuracy", "PatchscopeResult",
    "SpliceResult", "TextSpanResult", "TuningCurves", "TuningVerification", "Verification", "WordMatch",
    "all_concepts", "concept_masks", "correlation",
    "deactivate", "describe_with_llm", "dissect", "domain_neurons", "head_ablation", "head_contributions",
    "hidden_change", "judge", "judge_object", "judge_patch", "llm_messages", "modality_deactivation",
    "modality_neurons", "neuron_directions", "nonneg_lasso", "parse", "patchscope", "patchscope_inputs",
    "patchscope_logits", "score_explanations", "explain_tuning", "parse_tuning", "score_tuning", "tuning_curves",
    "verify_tuning", "splice", "splice_decompose", "textspan", "verify", "verify_many",
    "vlm_word_match", "word_match", "zoo_domain_neurons", "zoo_modality_neurons", "zoo_patchscope", "zoo_textspan",
]
