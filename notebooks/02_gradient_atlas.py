# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The gradient atlas
#
# Pick any registered loss: its formula, its gradients in the log and probability views, and
# its gradient field, with a slider for each hyperparameter. The numeric functions are compiled
# once per loss, so the sliders do no symbolic work.
#
# Static rendering: [`figures/gradient_atlas.png`](../figures/gradient_atlas.png) and the
# [loss catalogue](../docs/losses.md).

# %%
from gradlab import explore
from IPython.display import display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

panel, update = explore.atlas_view("dpo")
display(panel)

# %% [markdown]
# Each slider's positions are logarithmic for a scale parameter such as beta and always include
# the loss's default exactly. The callback the sliders call can also be driven from code; it
# moves the slider too, so the value stays set:

# %%
update(beta=0.5);
