"""Write the tutorial notebooks of this folder (without outputs): ``python notebooks/make_notebooks.py``.

The notebooks are thin: each code cell calls the library in a few lines, each markdown cell says
what the next output shows. Edit the cells here and rerun, so the committed JSON stays clean (no
outputs, no execution counts, stable cell ids).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def setup(*imports: str) -> str:
    """The first code cell of notebooks 02-04: ``imports`` (e.g. "import torch"), then the toy model."""
    head = "".join(line + "\n" for line in imports) + ("\n" if imports else "")
    return (
        head + "import ernie_lab as el\nfrom ernie_lab.toy.prompts import load_prompt_set\n\n"
        'model = el.load_model("toy")\ntok = el.load_tokenizer("toy")\n'
        "L = model.config.moe_layers[0]  # the first MoE layer; any of model.config.moe_layers works\n"
        "model.config.moe_layers"
    )


QUICKSTART = [
    "# 01 · Quickstart\n\nLoad the embedded toy ERNIE 4.5 MoE model and its tokenizer, generate text, chat, cache "
    "activations and look at how one prompt is routed. The toy model has the real architecture (GQA attention, "
    "interleaved RoPE, routed + shared experts, correction-biased top-k routing) at a tiny size.",
    'import torch\n\nimport ernie_lab as el\n\nmodel = el.load_model("toy")\ntok = el.load_tokenizer("toy")\n'
    "model.config",
    "The tokenizer adds no BOS token; `convert_ids_to_tokens` gives readable pieces.",
    'ids = tok.encode("The capital of Veloria is")\ntok.convert_ids_to_tokens(ids)',
    "## Generate\nGreedy decoding (`temperature=0.0`) after the prompt. Generation stops at the end-of-sentence "
    "token (the ids of the checkpoint's `generation_config.json`, as in transformers; `eos_token_id=()` turns that "
    "off), which `skip_special_tokens=True` leaves out of the text.",
    "out = model.generate(torch.tensor([ids]), max_new_tokens=8, temperature=0.0)\n"
    "tok.decode(out[0, len(ids):], skip_special_tokens=True)",
    "## Chat\n`el.chat` renders the ERNIE chat template, generates until the end-of-turn token and returns the reply.",
    'el.chat(model, tok, "What is the capital of Veloria?", max_new_tokens=24)',
    "## Cache activations\n`run_with_cache` returns the logits and every hook point's activation "
    "(or those a `names_filter` selects). Here: which experts each token of the prompt chose in the first MoE layer.",
    "logits, cache = model.run_with_cache(torch.tensor([ids]))\nL = model.config.moe_layers[0]\n"
    'logits.shape, cache[f"blocks.{L}.moe.hook_topk_idx"][0]',
    "## Routing of one prompt\nOne row per (MoE layer, token, top-k slot): the expert, its mixing weight and its "
    "router probability.",
    "from ernie_lab.widgets import routing_html, routing_table\n\n"
    'table = routing_table(model, tok, "The capital of Veloria is Mirren. 12+7=19")\ntable.head(8)',
    "Each token coloured by its top expert in the first MoE layer (hover for the top-k weights).",
    "from IPython.display import HTML\n\nHTML(routing_html(table, layer=L, n_experts=model.config.moe_num_experts))",
    "## Hook points\nEvery hook point in forward order with its activation shape for this prompt. Hook functions "
    "`fn(tensor, hook)` attach to these names (`run_with_hooks`, `model.hooks(...)`).",
    "import pandas as pd\n\n"
    'pd.DataFrame({"hook": name, "shape": tuple(cache[name].shape)} for name in model.hook_names())',
]

ROUTING = [
    "# 02 · Routing statistics\n\nWhat the routers do on held-out documents of the six toy domains: expert load and "
    "balance, router entropy, co-activation, and which experts specialise in which domain or token. Formulas: "
    "the README's *Definitions* section and the docstrings of `el.routing`.",
    setup("import pandas as pd"),
    "A few documents per domain; `collect_routing` records every MoE layer's router on each real token.",
    'docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(8)\n'
    "r = el.routing.collect_routing(model, docs.text.tolist(), tok, groups=docs.domain.tolist(), progress=False)\nr",
    "**Load**: the share of routing slots each expert receives (white = uniform, 1/E).",
    "load = el.routing.expert_load(r)\nel.routing.plot_load_heatmap(load)",
    "**Balance** per layer: coefficient of variation and max violation of the load (0 = perfectly even), and the "
    "load entropy (1 = even).",
    "el.routing.balance(r)",
    "**Router entropy** per token, normalised by log E (1 = the router cannot decide).",
    "el.routing.plot_entropy_by_layer(el.routing.router_entropy(r))",
    "**Co-activation**: of the tokens routed to expert i (row), the share also routed to expert j.",
    "el.routing.plot_coactivation(el.routing.coactivation(r, layer=L))",
    "**Domain specialisation**: lift = how much more often than uniform a domain's tokens go to an expert.",
    "spec = el.routing.domain_specialisation(r)\nel.routing.plot_specialisation(spec, layer=L)",
    "**Vocabulary specialisation**: per expert, the tokens it receives most often relative to its load.",
    'el.routing.vocab_specialisation(r, tok, min_count=3, top=3).query("layer == @L").head(12)',
    "**Shared vs routed**: output norms of the shared experts and of the routed mixture, and their cosine. On "
    "the toy the shared expert's output is a few percent of the routed mixture's and zeroing it moves held-out NLL "
    "by under 0.001 nats (model card): training dropped its output half the time, so the routed experts took its "
    "work. On ERNIE 4.5 itself, measure rather than assume.",
    "el.routing.shared_vs_routed(r)",
    "## The Chinese experts (discovered on half of the texts)\nEvery other held-out text of each domain is used "
    "here to **discover** which experts Chinese tokens prefer; the other half is kept back to **test** them in "
    "notebook 04, so the test does not reuse the texts that picked the experts. Per MoE layer, the two experts "
    "with the highest Chinese lift (lift 1 = uniform routing, k/E of the tokens).",
    'rows = load_prompt_set("domains")\n'
    "discover = rows[0::2]  # every other text of each domain; rows[1::2] is kept back\n"
    "r_disc = el.routing.collect_routing(\n"
    '    model, [x["text"] for x in discover], tok, groups=[x["domain"] for x in discover], progress=False\n)\n'
    "spec_disc = el.routing.domain_specialisation(r_disc)\n"
    'chinese = spec_disc.query("group == \'chinese\'").sort_values("lift", ascending=False).groupby("layer").head(2)\n'
    'chinese.sort_values(["layer", "lift"], ascending=[True, False])[["layer", "expert", "spec", "lift"]]',
    "## Explore\nType a text, move the layer slider: tokens are coloured by their top expert.",
    "el.widgets.routing_explorer(model, tok)",
]

PATCHING = [
    '# 03 · Activation patching\n\nClean/corrupted prompt pairs differ in one entity ("the capital of Pellune is" '
    'vs "... of Gorvast is"). Denoising runs the corrupted prompt and restores one activation from the clean run; '
    "the normalised effect is 1 when that alone restores the clean logit difference, 0 when it does nothing.",
    setup(),
    "A batch of recall pairs with one token layout (same length, the entity changed at the same position), so "
    "each position is averaged over pairs where it plays the same role; the metric is logit(answer) - "
    "logit(distractor) at the last token. Position labels are the first pair's tokens (␣ = space), "
    "`clean/corrupt` where they differ, `…` where the token varies across pairs.",
    'batch = el.report.pair_batch(tok, load_prompt_set("patching_pairs"), task="recall", n_pairs=4)\n'
    "setup = el.patching.PatchingSetup(model, batch.clean, batch.corrupt, batch.metric(), tokenizer=tok, "
    "progress=False)\nsetup.m_clean, setup.m_corrupt",
    "**Residual stream**: patch `hook_resid_pre` at one (layer, position). Every grid carries the effect's 95% "
    "bootstrap interval over the pairs (`ci_low`, `ci_high`): with 4 pairs it is wide, and the heatmap dots the "
    "cells whose interval includes 0, the ones not distinguishable from no effect.",
    'resid = setup.residual("resid_pre")\nel.patching.plot_patching_heatmap(resid)',
    'resid.sort_values("effect", ascending=False)[["layer", "pos", "token", "effect", "ci_low", "ci_high"]].head(6)',
    "**Attention heads**: patch one head's output (`hook_z`) at every position.",
    "el.patching.plot_head_grid(setup.heads())",
    "**Routing patching**: the corrupted run takes the clean run's expert choice and weights in one MoE layer "
    '("which experts ran").',
    "setup.routing()",
    "**Expert-output patching**: one expert's output taken from the clean run where it runs in both "
    '("what it computed").',
    'setup.experts(layers=[L]).sort_values("effect", ascending=False).head(5)',
    "**Attribution patching** estimates the whole residual grid from one backward pass; points near the dashed line "
    "agree with exact patching.",
    'attr = setup.attribution("resid_pre")\nel.patching.plot_attribution_vs_exact(resid, attr)',
    "## Explore\nPick the value column to draw.",
    "el.widgets.patching_viewer(resid)",
]

ABLATION = [
    "# 04 · Expert ablation\n\nRemove experts and measure the change in next-token loss: zero ablation (weight 0), "
    "reroute ablation (the token's next-best expert takes over) and mean ablation (the expert's mean output).",
    setup("import pandas as pd", "import torch"),
    'docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(2)\ntexts = docs.text.tolist()',
    "**Importance**: Δloss when each expert of one layer is ablated alone, with its load (dots).",
    "imp = el.ablation.expert_importance(model, texts, layers=[L], tokenizer=tok, progress=False)\n"
    "el.ablation.plot_importance(imp, layer=L)",
    "**Pruning curve**: ablate the least important experts together, more and more of them.",
    "E = model.config.moe_num_experts\ncurve = el.ablation.pruning_curve(\n    model, texts, L, importance=imp, "
    "steps=range(0, E + 1, max(1, E // 4)), tokenizer=tok, progress=False\n)\nel.ablation.plot_pruning_curve(curve)",
    "**Per domain**: the two most important experts rerouted together, Δloss by domain.",
    'top2 = imp.query("not control and rank <= 2").expert.tolist()  # control rows: random experts\n'
    "el.ablation.ablation_effect(\n"
    '    model, texts, {L: top2}, mode="reroute", groups=docs.domain.tolist(), tokenizer=tok, progress=False\n)',
    "**Recipes**: the files in `hooks/` build the same interventions for any run, e.g. generation with the two "
    "experts zero-ablated.",
    'hooks = el.interventions.load_recipe("ablate_experts").make_hooks(model, experts={L: top2}, mode="zero")\n'
    'ids = torch.tensor([tok.encode("The capital of Veloria is")])\n'
    "tok.decode(model.generate(ids, max_new_tokens=6, fwd_hooks=hooks)[0, ids.shape[1]:])",
    "**Direct logit attribution** of each component to the logit difference of a recall prompt.",
    'batch = el.report.pair_batch(tok, load_prompt_set("patching_pairs"), task="recall", n_pairs=1)\n'
    "dla = el.ablation.direct_logit_attribution(model, batch.clean, batch.answer, batch.distractor)\n"
    "el.ablation.plot_dla(dla)",
    "## The Chinese experts, tested on held-out texts\nNotebook 02 picked, per layer, the two experts with the "
    "highest Chinese lift on half of the held-out texts. `el.toy.dissociation` zero-ablates them and measures the "
    "NLL rise on the *other* half: on Chinese (with a 95% bootstrap interval over texts), on the most affected other "
    "domain, and for random pairs of the layer's other experts (the control, the noise floor). A layer passes when "
    "the rise is at least 0.10 nats, 3x the other domains' and 5x the control's.",
    'dis = el.toy.dissociation(model, tok, domains=["chinese"], controls=3)\n'
    'dis[["layer", "experts", "lift", "delta", "ci_low", "ci_high", "other", "other_domain", "control", "passes"]]',
    "el.toy.plot_dissociation(dis)",
    "One layer in detail: every domain's rise when that layer's Chinese experts are zeroed, beside the control rows "
    "(random experts, `control=True`).",
    'best = dis.sort_values("delta").iloc[-1]\nheld_out = pd.DataFrame(load_prompt_set("domains")).iloc[1::2]\n'
    "effect = el.ablation.ablation_effect(\n"
    "    model, held_out.text.tolist(), {int(best.layer): best.experts}, groups=held_out.domain.tolist(),\n"
    "    tokenizer=tok, controls=3, progress=False,\n)\n"
    "el.ablation.plot_ablation_effect(effect)",
    "## Explore\nChoose experts and a mode, press run.",
    "el.widgets.ablation_explorer(model, tok, texts[:4])",
    "The same analyses as a reproducible report folder (HTML, PNG, CSV, manifest): "
    "`ernie-lab report --out toy-report` (add `--quick` for a fast run, or pass your own YAML/TOML spec).",
]

REAL_21B = [
    "# 05 · ERNIE-4.5-21B-A3B on a GPU\n\nThe analyses of notebooks 02–04 on the released "
    "`baidu/ERNIE-4.5-21B-A3B-PT` (28 layers, 64 routed experts, top-6, 2 shared experts).\n\n"
    '**Needs**: CUDA GPU(s) with about 48 GB of memory in total (the bf16 weights are about 42 GB; `device="auto"` '
    "spreads the layers over the visible GPUs), and the weights: a local copy of the hub repo whose path is in the "
    "environment variable `ERNIE_LAB_21B`, or network access to download the hub id. Without them this notebook "
    "says what is missing and every later cell does nothing, so it still runs to the end.",
    "import os\n\nimport pandas as pd\nimport torch\n\nimport ernie_lab as el\n"
    "from ernie_lab.toy.prompts import load_prompt_set\n\n"
    'SRC = os.environ.get("ERNIE_LAB_21B", "baidu/ERNIE-4.5-21B-A3B-PT")\nMIN_GPU_GB = 45\n'
    "gpu_gb = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 2**30\n"
    "READY = torch.cuda.is_available() and gpu_gb >= MIN_GPU_GB\n"
    "if not READY:\n"
    '    print(f"Skipping: needs CUDA GPUs with >= {MIN_GPU_GB} GB in total (found {gpu_gb:.0f} GB) and the weights "\n'
    '          f"of {SRC} (set ERNIE_LAB_21B to a local copy).")',
    "Load in bf16, spread over the GPUs. A missing checkpoint (no local copy, no network) is reported, not raised.",
    "if READY:\n    try:\n"
    '        model = el.load_model(SRC, dtype="bfloat16", device="auto")\n'
    "        tok = el.load_tokenizer(SRC)\n"
    "    except (FileNotFoundError, RuntimeError) as err:\n"
    '        print(f"Skipping: cannot load {SRC}: {err}")\n'
    "        READY = False\n"
    "if READY:\n    L = model.config.moe_layers[len(model.config.moe_layers) // 2]  # a middle MoE layer\n"
    "    print(model.config.num_hidden_layers, model.config.moe_num_experts, model.config.moe_k)",
    "## Routing statistics\nLoad per layer and expert, and domain specialisation in a middle layer.",
    "if READY:\n"
    '    docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(16)\n'
    "    r = el.routing.collect_routing(model, docs.text.tolist(), tok, groups=docs.domain.tolist(), batch_size=8)\n"
    "    display(el.routing.balance(r))\n"
    "    display(el.routing.plot_load_heatmap(el.routing.expert_load(r)))\n"
    "    display(el.routing.plot_specialisation(el.routing.domain_specialisation(r), layer=L, top=24))",
    "## Activation patching\nRecall pairs whose clean and corrupted prompts have equal length under the ERNIE "
    "tokenizer; residual-stream grid and attribution patching against it.",
    "if READY:\n"
    '    batch = el.report.pair_batch(tok, load_prompt_set("patching_pairs"), task="recall", n_pairs=8)\n'
    "    setup = el.patching.PatchingSetup(model, batch.clean, batch.corrupt, batch.metric(), tokenizer=tok)\n"
    '    resid = setup.residual("resid_pre")\n'
    "    display(el.patching.plot_patching_heatmap(resid))\n"
    '    display(el.patching.plot_attribution_vs_exact(resid, setup.attribution("resid_pre")))\n'
    "    display(setup.routing())",
    "## Expert ablation\nImportance of the 64 experts of the middle layer, and direct logit attribution.",
    "if READY:\n"
    '    texts = docs.groupby("domain").head(2).text.tolist()\n'
    "    imp = el.ablation.expert_importance(model, texts, layers=[L], tokenizer=tok)\n"
    "    display(el.ablation.plot_importance(imp, layer=L, top=24))\n"
    "    dla = el.ablation.direct_logit_attribution(model, batch.clean[:1], batch.answer[:1], batch.distractor[:1])\n"
    "    display(el.ablation.plot_dla(dla))",
]

EXPERTS = [
    "# 06 · Expert-level analyses\n\nPer-expert saliency (frequency, EAN, REAP, EASY-EP) and whether it predicts the "
    "ablation effect, super experts, how routing persists along a sequence and flows between layers, where router "
    "logits come from, the top-k truncation lens, and steering experts by risk difference. Formulas: the README's "
    "*Definitions* section.",
    setup("import pandas as pd"),
    'docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(2)\ntexts = docs.text.tolist()',
    "**Saliency** per (layer, expert), from hooks in one pass; REAP = mean over the expert's tokens of gate weight "
    "x output norm.",
    'sal = el.experts.saliency(model, texts, tok, progress=False)\nel.experts.plot_saliency(sal, "reap")',
    "**Does the observational score predict the ablation effect?** Spearman rho per layer with the zero-ablation "
    "Δloss of `expert_importance`.",
    "imp = el.ablation.expert_importance(model, texts, layers=[L], tokenizer=tok, progress=False)\n"
    "el.experts.saliency_vs_importance(sal, imp)",
    "The least salient experts form the sets `el.ablation` ablates: the loss when pruning them.",
    'prune = el.experts.pruning_sets(sal.query("layer == @L"), "reap", n=4)\n'
    "el.ablation.ablation_effect(model, texts, prune, tokenizer=tok, progress=False)",
    "What the saliency pass costs against a plain forward pass over the same batches (wall clock; noisy on a busy "
    "machine).",
    "el.experts.saliency_overhead(model, texts, tok, repeats=2)",
    "**Super experts**: rare, huge output activations (peak |output| above the 99.5 % quantile and 10 % of the "
    "maximum).",
    "sup = el.experts.super_experts(model, texts, tok, progress=False)\nel.experts.plot_super_experts(sup)",
    "**Persistence**: do consecutive tokens keep their experts? Against uniform independent routing (chance).",
    "r = el.routing.collect_routing(model, texts, tok, progress=False)\nel.routing.persistence(r)",
    "**Transitions** of the top-1 expert from one layer to the next (lift over independence), the mutual "
    "information by layer distance, and the most frequent paths.",
    'el.routing.plot_transitions(el.routing.transitions(r, L, L + 1), "lift")',
    "el.routing.plot_nmi_by_distance(el.routing.transition_nmi(r))",
    "el.routing.paths(r, top=5, tokenizer=tok)",
    "**Router-logit sources**: the last MoE router's logits split exactly into residual components.",
    "batch = tok(texts[:4])\n"
    "names, parts = el.routing.router_logit_sources(\n"
    '    model, batch["input_ids"], model.config.moe_layers[-1], batch["attention_mask"]\n)\n'
    'el.routing.plot_router_sources(el.routing.source_summary(names, parts, batch["attention_mask"]))',
    "**Top-k truncation lens**: the MoE output with only its k' highest-weight experts, and the loss.",
    "el.experts.plot_truncation_lens(el.experts.truncation_lens(model, texts, tok, progress=False))",
    "**Risk difference** (SteerMoE) between Chinese and English held-out texts: per expert, how much more often "
    "Chinese tokens select it. The experts are picked on one half of each set; `rd_heldout` re-measures them on the "
    "other half, with its interval and a random-expert control row per layer.",
    'rows = pd.DataFrame(load_prompt_set("domains"))\n'
    'zh, en = (rows.query("domain == @d").text.tolist()[:24] for d in ("chinese", "english"))\n'
    "rd = el.experts.risk_difference(model, zh, en, tok, progress=False)\nel.experts.plot_risk_difference(rd)",
    "**Steering you can dose**: the experts Chinese uses most (`on` of `steering_sets`) are pushed *out* of the "
    "selection on held-out Chinese text, by `strength` subtracted from their selection scores (0 = no change, "
    "`math.inf` = never selected). Their selection rate falls and the Chinese loss rises with the dose; the "
    "control rows steer random experts instead.",
    "import math\n\nzh_experts, _ = el.experts.steering_sets(rd, n=2)\n"
    "dose = el.experts.steering_dose(\n"
    "    model, zh[1::2], on={}, off=zh_experts, strengths=[0, 0.2, 0.5, math.inf], tokenizer=tok, progress=False\n)\n"
    'dose[["strength", "off_rate", "delta_loss", "ci_low", "ci_high", "control"]]',
    "The same steering on a generation: a Chinese text's continuation with and without its Chinese experts.",
    "el.widgets.steered_continuations(model, tok, zh[1][:24], {}, zh_experts, max_new_tokens=16)",
    "## Explore\nPick two prompt sets, compare, then generate with and without steering.",
    'el.widgets.steering_explorer(model, tok, {d: g.text.tolist() for d, g in docs.groupby("domain")})',
]

FROM_TL = [
    "# 07 · Coming from TransformerLens\n\nThe same short study twice: first in TransformerLens' vocabulary "
    "(`run_with_cache`, `accumulated_resid`, `decompose_resid`, `logit_attrs`, `W_U`), which ernie_lab speaks, then "
    "with ernie_lab's own functions, which return tidy DataFrames and figures. The question: where in the toy model "
    "does the answer to *The capital of Veloria is* appear, and which components write it?",
    'import pandas as pd\nimport torch\n\nimport ernie_lab as el\n\nmodel = el.load_model("toy")  # model.tokenizer '
    'comes with it\nprompt = "The capital of Veloria is"\ntokens = model.to_tokens(prompt)  # [batch pos]; ERNIE '
    'adds no BOS\nanswer, distractor = model.to_single_token(" Mirren"), model.to_single_token(" Ostra")\n'
    "model.to_str_tokens(prompt)",
    "## In TransformerLens' words\nThe logit lens by hand: the residual stream at the input of every layer, through "
    "the final norm (`apply_ln=True`), unembedded with `W_U` `[d_model vocab]`; the rank of the answer at the last "
    "position, per layer.",
    "logits, cache = model.run_with_cache(tokens)\n"
    "accum, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)  # [component batch pos d_model]\n"
    "layer_logits = accum[:, 0, -1] @ model.W_U\n"
    "rank = (layer_logits > layer_logits[:, [answer]]).sum(-1) + 1\n"
    "pd.Series(rank.tolist(), index=labels, name=\"rank of ' Mirren'\")",
    "Direct logit attribution: `decompose_resid` splits the final residual into the embedding, each attention "
    "output and each MLP output, a MoE layer's into its shared and routed experts; `logit_attrs` applies the "
    "final norm with the cached scale and dots each row with `W_U[:, answer] - W_U[:, distractor]`. The rows add up "
    "to the model's logit difference.",
    "stack, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)  # [component batch d_model]\n"
    "attrs = cache.logit_attrs(stack, answer, incorrect_tokens=distractor, pos_slice=-1)[:, 0]\n"
    "diff = logits[0, -1, answer] - logits[0, -1, distractor]\n"
    'print(f"sum of rows {attrs.sum():.4f}, logit difference {diff:.4f}")\n'
    "pd.Series(attrs.tolist(), index=labels).round(3)",
    "Attention patterns are cached under the README's hook names (`blocks.{L}.attn.hook_pattern`, "
    '`[batch head pos kv_pos]`; TransformerLens\' `cache["pattern", L]` shorthand is not supported).',
    'cache["blocks.1.attn.hook_pattern"][0, :, -1].round(decimals=2)  # where the last token looks, per head',
    "## In ernie_lab's words\n`el.lens.logit_lens` gives the same ranks (and probabilities) for every layer and "
    "position as a DataFrame; `plot_logit_lens` draws them, each cell naming that layer's top prediction.",
    'lens = el.lens.logit_lens(model, tokens, target=" Mirren")\n'
    'last = lens[lens.pos == lens.pos.max()].set_index("label")\n'
    'assert last["rank"].tolist() == rank.tolist()  # the same numbers as by hand\n'
    'last[["rank", "prob", "top"]]',
    "el.lens.plot_logit_lens(lens)",
    "The function `direct_logit_attribution` does the decomposition in one call, down to single experts "
    "(`expert` rows) and, with `heads=True`, single attention heads (`head` rows, which split each `attn` row).",
    "dla = el.ablation.direct_logit_attribution(model, tokens, answer, distractor, heads=True)\n"
    'dla.query("component == \'head\'").sort_values("contribution").tail(4)',
    "el.ablation.plot_dla(dla, top=12)",
    "Every head of one layer, labelled with the tokens.",
    "el.lens.plot_attention(cache, layer=1, tokens=tokens)",
    "## Explore\nPick a layer, a head and a query position; edit the text to rerun.",
    "el.widgets.attention_explorer(model)",
    "## What is different\nGradients at the hook points (`incl_bwd=True`, stored as `<name>_grad`), and caches on "
    "disk (safetensors plus a JSON sidecar), which TransformerLens does not save.",
    "_, grads = model.run_with_cache(\n"
    '    tokens, names_filter="blocks.*.hook_resid_pre", incl_bwd=True,\n'
    "    metric=lambda logits: logits[0, -1, answer] - logits[0, -1, distractor],\n)\n"
    'grads["blocks.2.hook_resid_pre_grad"].norm(dim=-1)  # per position: where the logit difference is sensitive',
    "import tempfile\nfrom pathlib import Path\n\n"
    'path = Path(tempfile.mkdtemp()) / "veloria.safetensors"\ncache.save(path)\n'
    "again = el.ActivationCache.load(path, model=model)\n"
    "all(torch.equal(again[name], cache[name]) for name in cache), sorted(p.name for p in path.parent.iterdir())",
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_routing_statistics.ipynb": ROUTING,
    "03_activation_patching.ipynb": PATCHING,
    "04_expert_ablation.ipynb": ABLATION,
    "05_real_21b_gpu.ipynb": REAL_21B,
    "06_expert_analyses.ipynb": EXPERTS,
    "07_from_transformerlens.ipynb": FROM_TL,
}


def build(cells: list[str]) -> nbformat.NotebookNode:
    """A notebook of ``cells``: a cell whose first character is ``#``, ``*`` or a capital letter is
    markdown, any other is code. Cell ids are stable so regenerating changes nothing."""
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, source in enumerate(cells):
        markdown = source[:1] in "#*" or source[:1].isupper()
        cell = new_markdown_cell(source) if markdown else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)


if __name__ == "__main__":
    main()
