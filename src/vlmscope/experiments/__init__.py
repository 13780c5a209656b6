"""Experiments on the zoo: each method family run on shapes-world data and scored against the
world's ground truth. The demo, the report and the CLI call these; methods stay model-agnostic."""
