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
# # Likelihood displacement and squeezing
#
# A shared-parameter linear-head policy trained on a pair of single-token responses whose
# unembeddings are the most similar: the chosen and rejected log-probabilities across training,
# for the loss you pick.
#
# This is an exploration, not the published condition: the project figure
# [`figures/displacement.png`](../figures/displacement.png) is built on Razin et al.'s model
# (the hidden state trains, the unembeddings stay fixed) and its CHES condition, with the
# cases where it holds and where it fails (`gradlab reproduce razin_displacement`).

# %%
from gradlab import explore
from IPython.display import display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

panel, update = explore.displacement_view()
display(panel)
