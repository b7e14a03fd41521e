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
# # Bring your own loss
#
# Type a formula in the canonical variables (`lp_w, lp_l, ref_w, ref_l, len_w, len_l`) and
# hyperparameters (`beta`, ...). gradlab parses it with a whitelist parser (never `eval`),
# derives its gradients, checks them against JAX autodiff on two toy policies, and computes its
# scorecard row to compare with [`figures/scorecard.md`](../figures/scorecard.md).
#
# A field appears for every hyperparameter the formula uses, filled with the value a
# registered loss uses; an empty field asks for a value. Press Enter in a field, or the button,
# to analyse again. Anything gradlab cannot accept is shown as a message.

# %%
from gradlab import explore
from IPython.display import display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

panel, analyse = explore.custom_loss_view("-logsigmoid(beta*(lp_w/len_w - lp_l/len_l) - simpo_gamma) - 0.1*lp_w/len_w")
display(panel)

# %%
analyse();
