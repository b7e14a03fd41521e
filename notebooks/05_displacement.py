# %% [markdown]
# # Likelihood displacement and squeezing
#
# A shared-parameter linear-head policy trained on a pair of single-token responses whose
# unembeddings are the most similar: the chosen and rejected log-probabilities across training,
# for the loss you pick.
#
# Static rendering: [`figures/displacement.png`](../figures/displacement.png).

# %%
from gradlab import explore, runtime
from IPython.display import display

runtime.configure()  # entry point: float64 JAX and the compilation cache

panel, update = explore.displacement_view()
display(panel)
