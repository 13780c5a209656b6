"""The zoo: small VLMs trained here on the shapes world (so every fact about their inputs is known),
shipped inside the package as ordinary transformers checkpoints (safetensors, real processor).

    from vlmscope import zoo
    m = zoo.load("shapes-llava")                 # the VLM wrapper; vs.load("zoo:shapes-llava") too
    model, processor = zoo.load_hf("shapes-llava", step=1800)   # plain transformers, mid-training
"""

from vlmscope.zoo.evaluate import accuracy, evaluate
from vlmscope.zoo.registry import card, checkpoint_steps, load, load_hf, names

__all__ = ["accuracy", "card", "checkpoint_steps", "evaluate", "load", "load_hf", "names"]
