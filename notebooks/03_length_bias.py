# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
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

# %% [markdown]
# ## Which setting a drift factor comes from
#
# The right panel's legend gives each loss's drift factor (final / initial expected length,
# median [min, max] over seeds) in the setting its title names: Adam at lr 0.05, the steps on the
# slider (150 by default), 4 seeds, and a cut-off at "max content tokens" + 1 tokens. The
# cut-off caps every length, and with it the factor: DPO's ×1.77 at the defaults is a capped
# number.
#
# The figure [`figures/length_drift.png`](../figures/length_drift.png) measures the same data
# (equal-length pairs, beta 0.1) in the named setting `length_drift`: no cut-off, 300 steps,
# 8 seeds, one panel per optimiser. Its legend gives DPO's uncapped factor under each:
# ×5.45 under plain gradient descent (lr 0.5) and ×228 under Adam (lr 0.05). Three settings,
# three numbers; the figure's are the ones the scorecard and `gradlab reproduce length_pathology`
# quote. To see the cap at work, raise "max content tokens" and train again.
