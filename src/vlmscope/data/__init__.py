"""The shapes world: seeded synthetic scenes with known ground truth (objects, masks, the object at
every patch), six question families, captions, counterfactual pairs, tokenizer and processor."""

from vlmscope.data.batches import PatchBatch, QABatch, examples_batch, family_weights, patch_batch, qa_batch
from vlmscope.data.counterfactual import CounterfactualPair, sip_pair, str_pair
from vlmscope.data.questions import Question, answer_of, caption, question_text
from vlmscope.data.render import object_mask, patch_objects, render, render_with_mask
from vlmscope.data.sampling import Example, ask, example_batch, standard_examples
from vlmscope.data.scene import Obj, Scene, place, sample_scene
from vlmscope.data.tokenizer import build_processor, build_tokenizer, encode, prompt, vocabulary
from vlmscope.data.vocab import COLOURS, DOMAINS, FAMILIES, POSITIONS, SHAPES, SIZES

__all__ = [
    "COLOURS", "DOMAINS", "FAMILIES", "POSITIONS", "SHAPES", "SIZES",
    "CounterfactualPair", "Example", "Obj", "PatchBatch", "QABatch", "Question", "Scene",
    "answer_of", "ask", "build_processor", "build_tokenizer", "caption", "encode", "example_batch",
    "examples_batch",
    "family_weights", "object_mask", "patch_batch", "patch_objects", "place", "prompt", "qa_batch",
    "question_text", "render", "render_with_mask", "sample_scene", "sip_pair", "standard_examples",
    "str_pair", "vocabulary",
]
