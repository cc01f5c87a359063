"""Reading a forward pass: the logit lens over the residual stream and attention-pattern views.

``el.lens.logit_lens(model, ids)`` gives a tidy frame (rank and probability of a target token at
every layer and position), ``plot_logit_lens`` draws it; ``plot_attention(cache, layer)`` draws a
layer's attention patterns as a grid of heads with readable token labels.
"""

from ernie_lab.lens.attention import attention_html, attention_pattern, plot_attention
from ernie_lab.lens.logit_lens import logit_lens, plot_logit_lens

__all__ = ["logit_lens", "plot_logit_lens", "attention_pattern", "plot_attention", "attention_html"]
