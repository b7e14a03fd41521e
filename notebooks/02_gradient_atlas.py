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
from gradlab import explore, runtime
from IPython.display import display

runtime.configure()  # entry point: float64 JAX and the compilation cache

panel, update = explore.atlas_view("dpo")
display(panel)

# %% [markdown]
# The callback the sliders call can also be driven from code:

# %%
update(beta=0.5);
