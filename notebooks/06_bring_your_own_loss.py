# %% [markdown]
# # Bring your own loss
#
# Type a formula in the canonical variables (`lp_w, lp_l, ref_w, ref_l, len_w, len_l`) and
# hyperparameters (`beta`, ...). gradlab parses it with a whitelist parser (never `eval`),
# derives its gradients, checks them against JAX autodiff on two toy policies, and computes its
# scorecard row to compare with [`figures/scorecard.md`](../figures/scorecard.md).

# %%
from gradlab import explore, runtime
from IPython.display import display

runtime.configure()  # entry point: float64 JAX and the compilation cache

panel, analyse = explore.custom_loss_view("log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l)))) - 0.1*lp_w/len_w")
display(panel)

# %%
analyse();
