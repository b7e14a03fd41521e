# %% [markdown]
# # Entropy and the reference's scale
#
# The entropy of the optimal policy pi* ~ pi_0^(gamma/beta) exp(r/beta) against beta, with
# sliders for gamma/beta and for H-DPO's alpha. Tempering the reference by tau is the same as
# replacing gamma by gamma/tau (posts.md); the figure linked below shows it numerically, and
# trained policies landing on the closed form.
#
# Static rendering: [`figures/entropy.png`](../figures/entropy.png).

# %%
from gradlab import explore, runtime
from IPython.display import display

runtime.configure()  # entry point: float64 JAX and the compilation cache

panel, update = explore.entropy_view()
display(panel)
