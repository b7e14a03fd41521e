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
from gradlab import explore
from IPython.display import display

panel, update = explore.entropy_view()
display(panel)
