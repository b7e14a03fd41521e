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
# # Length bias
#
# Left: the probability-view force on the rejected response against its length, for the chosen
# losses, at a per-token mean log-prob you set. Right (press the button): training on data in
# which chosen and rejected lengths have the same distribution, and the expected generated
# length across training. The right panel's cut-off (the slider) caps the length a policy can
# reach, and with it the drift factor; the uncapped drift, under both optimisers, is the figure
# `length_drift` below.
#
# Static rendering: [`figures/length_force.png`](../figures/length_force.png) and
# [`figures/length_drift.png`](../figures/length_drift.png).

# %%
from gradlab import explore, progress
from IPython.display import display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

panel, update, train = explore.length_view()
display(panel)

# %%
with progress.shown():  # a progress bar of the runs as they train
    train()
