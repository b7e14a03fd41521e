# %% [markdown]
# # Length bias
#
# Left: the probability-view force on the rejected response against its length, for the chosen
# losses, at a per-token mean log-prob you set. Right (press the button): training on data in
# which chosen and rejected lengths have the same distribution, and the expected generated
# length across training.
#
# Static rendering: [`figures/length_force.png`](../figures/length_force.png) and
# [`figures/length_drift.png`](../figures/length_drift.png).

# %%
from gradlab import explore, runtime
from IPython.display import display

runtime.configure()  # entry point: float64 JAX and the compilation cache

panel, update, train = explore.length_view()
display(panel)

# %%
train();
