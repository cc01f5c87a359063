"""The ``ernie-lab`` subcommands, one module each (``add_parser`` + ``run``)."""

DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # --dtype values; ernie_lab.io.weights.parse_dtype reads them
