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
# # Entropy and the reference's scale
#
# The entropy of the optimal policy pi* ~ pi_0^(gamma/beta) exp(r/beta) against beta, with
# sliders for gamma/beta and for H-DPO's alpha. Tempering the reference by tau is the same as
# replacing gamma by gamma/tau (docs/background.md); the figure linked below shows it numerically, and
# trained policies landing on the closed form.
#
# Static rendering: [`figures/entropy.png`](../figures/entropy.png).

# %%
from gradlab import explore
from IPython.display import display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

panel, update = explore.entropy_view()
display(panel)
